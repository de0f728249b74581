"""The model catalogue, ``Resources/Models.json``: what each known model is and how well it measured.

One JSON file lists the models (bundled ones and, later, downloadable ones) with the figures that
decide which to use, so a model can be added without code changes::

    {"format_version": 1, "models": [{
        "name": "ct_abdomen_organs_2d", "task": "...", "modality": "CT", "labels": ["liver", "spleen"],
        "method": "medsegdiff", "spatial_dims": 2,
        "source": "bundled",               # or "url": "https://...zip" with "archive_sha256"
        "path": "Models/ct_abdomen_organs_2d",   # bundled: folder relative to Resources/
        "weights_sha256": "...", "weights_bytes": 4802248,
        "dice": {"liver": 0.87, ...}, "dice_measured": "where and how (command, reference, doc section)",
        "seconds_per_volume": {"cpu": {"seconds": 54.0, "measured": "..."}, "gpu": {...}}}]}

``catalogue()`` reads and checks it; ``check_bundled()`` verifies that the sha256 and size of every
bundled entry equal the files in ``Resources/``; the CLI (``diffusionseg models``) shows the figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from DiffusionSegLib.core.errors import ModelLoadError

RESOURCES = Path(__file__).resolve().parents[2] / "Resources"
CATALOGUE_PATH = RESOURCES / "Models.json"
REQUIRED = ("name", "task", "modality", "labels", "method", "weights_sha256", "weights_bytes", "source")


def catalogue(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The catalogue's model entries (``[]`` when the file does not exist).

    Raises ModelLoadError for an unreadable file or an entry missing a required field, a
    downloadable entry without ``url``, or a bundled one without ``path``.
    """
    path = Path(path) if path is not None else CATALOGUE_PATH
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"unreadable model catalogue {path}: {err}") from err
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ModelLoadError(f"model catalogue {path}: no 'models' list")
    for entry in entries:
        missing = [k for k in REQUIRED if k not in entry]
        if missing:
            raise ModelLoadError(f"model catalogue {path}: entry {entry.get('name', '?')!r} lacks {', '.join(missing)}")
        if entry["source"] == "bundled" and "path" not in entry:
            raise ModelLoadError(f"model catalogue {path}: bundled entry {entry['name']!r} lacks 'path'")
        if entry["source"] != "bundled" and "url" not in entry:
            raise ModelLoadError(f"model catalogue {path}: entry {entry['name']!r} is not bundled and has no 'url'")
    return entries


def entry_for(name: str, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The catalogue entry named ``name``, or None."""
    return next((e for e in catalogue(path) if e["name"] == name), None)


def check_bundled(path: str | os.PathLike | None = None, resources: str | os.PathLike | None = None) -> list[str]:
    """Problems of the bundled entries: weights missing, or sha256/size differing from the files ([] = fine)."""
    from DiffusionSegLib.core.files import sha256_of
    from DiffusionSegLib.models.card import WEIGHTS_NAME, read_card
    from DiffusionSegLib.models.store import verify_members

    root = Path(resources) if resources is not None else RESOURCES
    problems = []
    for entry in catalogue(path):
        if entry["source"] != "bundled":
            continue
        weights = root / entry["path"] / WEIGHTS_NAME
        if not weights.is_file():
            problems.append(f"{entry['name']}: {weights} missing")
            continue
        if weights.stat().st_size != entry["weights_bytes"]:
            problems.append(f"{entry['name']}: size {weights.stat().st_size} != catalogue {entry['weights_bytes']}")
        if sha256_of(weights) != entry["weights_sha256"]:
            problems.append(f"{entry['name']}: sha256 differs from the catalogue")
        try:  # an ensemble's other members: present and as its card says
            verify_members(root / entry["path"], read_card(root / entry["path"]))
        except ModelLoadError as err:
            problems.append(f"{entry['name']}: {err}")
    return problems


def summary_line(entry: dict[str, Any] | None) -> str:
    """One line of measured figures (``diffusionseg models`` and the Slicer model panel); "" for None."""
    if not entry:
        return ""
    parts = []
    dice = {k: v for k, v in (entry.get("dice") or {}).items() if v is not None}
    if dice:
        parts.append("held-out Dice " + ", ".join(f"{k} {v:.2f}" for k, v in dice.items()))
    for kind in ("cpu", "gpu"):
        seconds = ((entry.get("seconds_per_volume") or {}).get(kind) or {}).get("seconds")
        if seconds is not None:
            shown = f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"
            parts.append(f"{shown} s per volume on {kind.upper()}")
    return "; ".join(parts)
