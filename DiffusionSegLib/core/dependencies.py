"""Which third-party packages the compute path needs, and which of them are missing.

Pure standard library and import-free: :func:`missing_requirements` asks
:func:`importlib.util.find_spec` whether a top-level module can be found, it never imports it
(importing torch inside Slicer's process just to check would cost seconds and memory).

The Slicer module installs what is missing at first use, after asking the user: torch through
the PyTorch extension (``PyTorchUtils``, which picks the build matching the GPU driver), the rest
with pip. torch must come first: ``monai`` declares a torch requirement, and pip would otherwise
pull a default torch build that may not match the GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable

# The module name torch is imported as; installed through the PyTorch extension, never pip.
TORCH = "torch"

# Import name -> pip requirement string, in install order (torch first). Keep in line with
# pyproject.toml [project.dependencies]; numpy is not listed because Slicer ships it.
REQUIREMENTS: dict[str, str] = {
    TORCH: "torch>=2.1",
    "monai": "monai>=1.4",
    "einops": "einops",
    "SimpleITK": "SimpleITK>=2.3",
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "slicerio": "slicerio>=1.1",
    "nibabel": "nibabel",
    "scipy": "scipy",
}

# Optional: DenseCRF. pydensecrf2 ships only as source and needs a C++ compiler, so it is never
# required; without it the library uses its own torch mean-field CRF (report: crf_backend).
OPTIONAL_REQUIREMENTS: dict[str, str] = {
    "pydensecrf": "pydensecrf2",
}


def is_importable(name: str, find_spec: Callable = importlib.util.find_spec) -> bool:
    """True when the top-level module ``name`` can be found (without importing it)."""
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        # ValueError: the module is in sys.modules with __spec__ None (e.g. a stub); treat such a
        # module as present only when it really is in sys.modules.
        import sys

        return name in sys.modules


def missing_requirements(names: Iterable[str] | None = None,
                         find_spec: Callable = importlib.util.find_spec) -> dict[str, str]:
    """The required packages that cannot be found: import name -> pip requirement, in install order.

    ``names`` restricts the check to some import names of :data:`REQUIREMENTS` (default: all).
    ``find_spec`` is injectable for tests.
    """
    wanted = list(REQUIREMENTS) if names is None else [n for n in REQUIREMENTS if n in set(names)]
    return {name: REQUIREMENTS[name] for name in wanted if not is_importable(name, find_spec)}


def pip_requirements(missing: dict[str, str]) -> list[str]:
    """The pip requirement strings of ``missing`` that pip may install (everything but torch)."""
    return [requirement for name, requirement in missing.items() if name != TORCH]


def describe(missing: dict[str, str]) -> str:
    """One human-readable line listing ``missing`` (for the confirmation dialog)."""
    return ", ".join(missing.values())


__all__ = ["TORCH", "REQUIREMENTS", "OPTIONAL_REQUIREMENTS", "is_importable", "missing_requirements",
           "pip_requirements", "describe"]
