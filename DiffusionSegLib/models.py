"""Where models live: bundled with the extension, installed by the user, or given by path.

Search order for a model name: folders in ``$DIFFUSIONSEG_MODELS`` (os.pathsep-separated), the
bundled ``Resources/Models`` of this repository/extension, then the user folder
``~/.cache/diffusionseg/models``. A path to a model folder is always accepted as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from DiffusionSegLib.errors import ModelLoadError
from DiffusionSegLib.modelcard import CARD_NAME, ModelCard, read_card

DEFAULT_MODEL = "ct_liver_spleen_2d"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"


def user_models_dir() -> Path:
    """Folder for models the user installs or downloads."""
    return Path(os.environ.get("DIFFUSIONSEG_HOME", Path.home() / ".cache" / "diffusionseg")) / "models"


def search_dirs() -> list[tuple[str, Path]]:
    """(origin, folder) pairs searched for models, in priority order."""
    extra = [("env", Path(p)) for p in os.environ.get("DIFFUSIONSEG_MODELS", "").split(os.pathsep) if p]
    return [*extra, ("bundled", BUNDLED_DIR), ("installed", user_models_dir())]


def list_models() -> list[tuple[str, Path, ModelCard]]:
    """Every readable model: (origin, folder, card). Unreadable folders are skipped."""
    found = []
    for origin, folder in search_dirs():
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if (child / CARD_NAME).is_file():
                try:
                    found.append((origin, child, read_card(child)))
                except ModelLoadError:
                    continue
    return found


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """A model folder from a path or a name (None = the bundled default)."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path)
    if (path / CARD_NAME).is_file():
        return path
    for _origin, folder in search_dirs():
        if (folder / str(name_or_path) / CARD_NAME).is_file():
            return folder / str(name_or_path)
    if path.exists():
        raise ModelLoadError(f"not a DiffusionSeg model folder (no {CARD_NAME}): {path}")
    raise ModelLoadError(f"model '{name_or_path}' not found (see 'diffusionseg models')")
