"""Assemble a deep-ensemble model folder from separately trained models of one recipe.

The members are networks of the same card (architecture, method, preprocessing, labels) trained
with other seeds. The folder is an ordinary model folder: the first model's card and weights, plus
``member_K.safetensors`` files listed in ``card.members`` with their sha256; a run splits its samples
over the members (``pipeline.segment``). Written in a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.core.files import atomic_write_bytes, replace_folder, sha256_of
from DiffusionSegLib.models.card import CARD_NAME, WEIGHTS_NAME, ModelCard, read_card
from DiffusionSegLib.models.store import verify_weights

# Card fields that may differ between members: what each run was and measured, not what it is.
PER_RUN_FIELDS = ("name", "description", "training", "metrics", "limits", "weights_sha256", "members")


def make_ensemble(out_dir: str | Path, model_dirs: Sequence[str | Path], name: str | None = None,
                  overwrite: bool = False, half: bool = False) -> ModelCard:
    """Write a model folder whose networks are those of ``model_dirs`` (>= 2; the first is member 0).

    ``half``: store the floating-point tensors as float16 (half the folder; a load casts them back into
    the float32 network), so a bundled ensemble stays within the extension's size budget. Otherwise
    the weight files are copied byte for byte.

    Every model must be a single network with intact weights (sha256) and a card equal to the first
    one's in every field but ``PER_RUN_FIELDS``; otherwise ModelLoadError, and nothing is written.
    The new card keeps the first card's fields, takes ``name`` (default: the folder name), lists the
    members and records each member's source and training summary under ``training["ensemble"]``.
    An existing ``out_dir`` is refused unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if len(model_dirs) < 2:
        raise ModelLoadError("an ensemble needs at least two models")
    if out_dir.exists() and not overwrite:
        raise ModelLoadError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    cards = [read_card(d) for d in model_dirs]
    for d, card in zip(model_dirs, cards):
        verify_weights(Path(d), card)
        if card.members:
            raise ModelLoadError(f"{d} is already an ensemble; give its source models instead")
    first = _recipe(cards[0])
    for d, card in zip(model_dirs[1:], cards[1:]):
        differs = sorted(k for k, v in _recipe(card).items() if first.get(k) != v)
        if differs:
            raise ModelLoadError(f"{d} is not the same recipe as {model_dirs[0]}: {', '.join(differs)} differ")
    card = dataclasses.replace(cards[0], name=name or out_dir.name)
    card.members = [{"file": f"member_{k}.safetensors", "sha256": c.weights_sha256} for k, c in enumerate(cards[1:], 1)]
    card.training = {**cards[0].training, "ensemble": [
        {"member": k, "source": str(Path(d)), "seed": c.training.get("seed", c.training.get("config", {}).get("seed")),
         "weights_sha256": c.weights_sha256} for k, (d, c) in enumerate(zip(model_dirs, cards))]}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a model folder is read by other users too
    try:
        files = [WEIGHTS_NAME] + [entry["file"] for entry in card.members]
        if half:
            for d, file in zip(model_dirs, files):
                _write_half(Path(d) / WEIGHTS_NAME, staging / file)
            card.weights_sha256 = sha256_of(staging / WEIGHTS_NAME)
            for entry in card.members:
                entry["sha256"] = sha256_of(staging / entry["file"])
            card.training["weights_storage"] = "float16 (floating-point tensors; loaded into the float32 network)"
        else:
            for d, file in zip(model_dirs, files):
                shutil.copyfile(Path(d) / WEIGHTS_NAME, staging / file)
            for entry, c in zip(card.members, cards[1:]):  # the copies are what the card promises
                if sha256_of(staging / entry["file"]) != c.weights_sha256:
                    raise ModelLoadError(f"{entry['file']} changed while it was copied")
        atomic_write_bytes(staging / CARD_NAME, card.to_json().encode())
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def _write_half(source: Path, target: Path) -> None:
    """A safetensors file with its floating-point tensors as float16 (others unchanged)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in load_file(str(source)).items()}
    save_file(tensors, str(target), metadata={"format": "diffusionseg", "storage": "float16"})
    target.chmod(0o644)  # safetensors writes owner-only; a model folder is read by other users too


def _recipe(card: ModelCard) -> dict[str, Any]:
    """The card's fields that make two networks interchangeable members."""
    return {k: v for k, v in dataclasses.asdict(card).items() if k not in PER_RUN_FIELDS}
