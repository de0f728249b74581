"""DiffusionSegLib.core.dependencies: what the Slicer module checks for and installs at first use."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from DiffusionSegLib.core import dependencies
from DiffusionSegLib.core.dependencies import (OPTIONAL_REQUIREMENTS, REQUIREMENTS, TORCH, describe, is_importable,
                                          missing_requirements, pip_requirements)

from helpers import REPO  # noqa: E402

ROOT = REPO
# Packages Slicer itself ships, so the module never needs to install them.
SHIPPED_WITH_SLICER = {"numpy"}


def _pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in data["project"]["dependencies"]}


def test_requirements_match_pyproject():
    """Same packages and version floors as the pip-installable library (numpy comes with Slicer)."""
    pyproject = _pyproject_requirements()
    ours = {canonicalize_name(Requirement(r).name): Requirement(r) for r in REQUIREMENTS.values()}
    assert set(ours) == set(pyproject) - SHIPPED_WITH_SLICER
    for name, requirement in ours.items():
        assert requirement.specifier == pyproject[name].specifier, name


def test_torch_first_and_never_by_pip():
    assert list(REQUIREMENTS)[0] == TORCH == "torch"
    everything_missing = missing_requirements(find_spec=lambda name: None)
    assert list(everything_missing) == list(REQUIREMENTS)
    pip = pip_requirements(everything_missing)
    assert not any(canonicalize_name(Requirement(r).name) == "torch" for r in pip)
    assert len(pip) == len(REQUIREMENTS) - 1


def test_densecrf_is_optional():
    assert "pydensecrf" not in REQUIREMENTS
    assert OPTIONAL_REQUIREMENTS == {"pydensecrf": "pydensecrf2"}


def test_missing_requirements_with_some_absent():
    absent = {"monai", "slicerio"}
    found = missing_requirements(find_spec=lambda name: None if name in absent else object())
    assert found == {"monai": REQUIREMENTS["monai"], "slicerio": REQUIREMENTS["slicerio"]}
    assert pip_requirements(found) == [REQUIREMENTS["monai"], REQUIREMENTS["slicerio"]]
    assert describe(found) == f"{REQUIREMENTS['monai']}, {REQUIREMENTS['slicerio']}"
    # Restricting the check to some names keeps the install order.
    only = missing_requirements(["slicerio", "torch"], find_spec=lambda name: None)
    assert list(only) == ["torch", "slicerio"]


def test_nothing_missing_in_the_test_environment():
    """setup.sh --test installs everything; the real find_spec finds it all."""
    assert missing_requirements() == {}


def test_unknown_module_is_missing():
    assert not is_importable("diffusionseg_no_such_module_xyz")
    assert is_importable("json")


@pytest.mark.parametrize("error", [ValueError("__spec__ is None"), ModuleNotFoundError("parent missing")])
def test_find_spec_errors_mean_missing_unless_loaded(error):
    def raising(name):
        raise error

    assert not is_importable("diffusionseg_no_such_module_xyz", raising)
    assert is_importable("sys", raising)  # in sys.modules: present


def test_checking_imports_nothing_heavy():
    """The check runs in Slicer's UI process: it must not import the packages it looks for."""
    code = ("import sys; from DiffusionSegLib.core.dependencies import missing_requirements; missing_requirements(); "
            "print(','.join(m for m in ('torch', 'monai', 'scipy', 'matplotlib', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_module_uses_the_library_lists():
    """The Slicer module (its logic in the library's Slicer layer) installs what this module lists, torch
    through PyTorchUtils."""
    source = (ROOT / "DiffusionSegLib" / "slicer" / "logic.py").read_text(encoding="utf-8")
    assert "from DiffusionSegLib.core.dependencies import" in source
    assert "installTorch" in source
    assert dependencies.__all__
