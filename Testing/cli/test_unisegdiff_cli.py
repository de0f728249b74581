"""UniSegDiff end to end through the CLI: ``train --method unisegdiff`` on a tiny 3D CT-like dataset with masks,
then ``segment`` a CT volume, and the refusals (a chain longer than the staged one, settings that cannot work)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--set", "spatial_dims=3", "--set", 'network={"channels": [8, 16], "norm_groups": 4}',
        "--set", "patch_size=[16, 16, 8]", "--set", 'normalization={"kind": "ct_window", "center": 40, "width": 400}',
        "--set", "batch_size=2", "--set", "steps=3", "--set", "val_every=3", "--set", "checkpoint_every=3",
        "--set", "val_cases=1", "--set", "val_samples=1", "--set", "val_steps=3", "--set", "augment=false",
        "--set", "default_samples=2", "--set", "default_steps=3"]


def ct_volume(rng: np.random.Generator, shape=(8, 16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU volume (z, y, x): air at -1000 around a soft-tissue body, a brighter ellipsoidal organ; its mask."""
    zz, yy, xx = np.indices(shape)
    d, h, w = shape
    body = ((yy - h / 2) / (h * 0.45)) ** 2 + ((xx - w / 2) / (w * 0.45)) ** 2 < 1
    cy, cx = rng.uniform(h * 0.35, h * 0.65), rng.uniform(w * 0.35, w * 0.65)
    organ = body & ((((yy - cy) / 4.0) ** 2 + ((xx - cx) / 4.0) ** 2 + ((zz - d / 2) / 3.0) ** 2) < 1)
    hu = np.where(body, 20.0, -1000.0) + rng.normal(0, 15, shape) + 80.0 * organ
    return hu.astype(np.int16), organ.astype(np.uint8)


def write_ct_dataset(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = ct_volume(rng)
        for array, sub in ((image, "imagesTr"), (label, "labelsTr")):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((1.5, 1.5, 3.0))
            volume.SetOrigin((-12.0, -12.0, 5.0))
            sitk.WriteImage(volume, str(root / sub / f"ct_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    return root


def ct_input(tmp: Path) -> tuple[Path, sitk.Image]:
    """A CT volume of another size, anisotropic spacing, an origin and a rotated direction."""
    array, _ = ct_volume(np.random.default_rng(9), (7, 18, 20))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.2, 1.4, 2.5))
    image.SetOrigin((3.0, -7.0, 11.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp / "ct_in.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, image


def cli(*args) -> int | str:
    """The exit status, or what escaped ``main`` (a traceback for a user)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as done:
        return int(done.code or 0)
    except Exception as err:  # noqa: BLE001 - the test reports it as the failure
        return f"uncaught {type(err).__name__}: {err}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(3D CT dataset, UniSegDiff model trained on it for 3 steps, the first one encoder pretraining)."""
    root = tmp_path_factory.mktemp("unisegdiff_cli")
    data = write_ct_dataset(root / "ct")
    model = root / "model"
    assert cli("train", data, "-o", model, "--method", "unisegdiff", "-q", *TINY,
               "--set", 'method_settings={"encoder_pretrain_steps": 1}') == 0
    return data, model


def test_train_writes_a_unisegdiff_card_with_every_setting(trained):
    from DiffusionSegLib.methods.unisegdiff.stages import UniSegDiffSettings

    _, model = trained
    card = json.loads((model / "model.json").read_text())
    assert card["method"] == "unisegdiff" and card["spatial_dims"] == 3 and card["patch_size"] == [16, 16, 8]
    assert [label["name"] for label in card["labels"]] == ["liver"]
    assert card["method_settings"] == UniSegDiffSettings.from_mapping({"encoder_pretrain_steps": 1}, 1000).record()
    assert card["training"]["steps"] == 3 and "validation_mean_dice" in card["metrics"]
    assert (model / "model.safetensors").is_file() and (model / "checkpoint" / "weights.safetensors").is_file()


def test_segment_a_ct_volume_gives_every_output_on_the_inputs_grid(trained, tmp_path, capsys):
    _, model = trained
    source, reference = ct_input(tmp_path)
    out = tmp_path / "out"
    assert cli("segment", source, "--model", model, "-o", out, "--samples", "3", "--steps", "3", "-q") == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["method"] == "unisegdiff" and report["model"]["spatial_dims"] == 3
    assert report["samples"] == 3 and report["steps"] == 3 and "liver" in report["sample_diversity"]
    names = ("fused.nii.gz", "consistency.nii.gz", "ambiguity.nii.gz", "probability_liver.nii.gz",
             "uncertainty_liver.nii.gz")
    assert set(names) <= set(report["outputs"])
    for name in names:
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == reference.GetSize(), name
        assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6), name
        assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4), name
        assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6), name
    fused = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fused.nii.gz")))
    assert set(np.unique(fused).tolist()) <= {0, 1}
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "probability_liver.nii.gz")))
    assert probability.min() >= 0 and probability.max() <= 1
    assert set(np.round(np.unique(probability) * 3, 4).tolist()) <= {0.0, 1.0, 2.0, 3.0}  # means of 3 binary samples


@pytest.mark.parametrize("steps", ["5000", "700"])  # 5000 > T = 1000; 700 <= T, but > the 667 below branch_t 666
def test_steps_beyond_the_staged_chain_are_a_one_line_error_that_leaves_no_output(trained, tmp_path, capsys, steps):
    _, model = trained
    source, _ = ct_input(tmp_path)
    out = tmp_path / "o"
    code = cli("segment", source, "--model", model, "-o", out, "--samples", "2", "--steps", steps, "-q")
    assert not out.exists() or not any(out.iterdir()), "no output may be left behind"
    assert code == 2, code
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusionseg: error:") and "\n" not in err, err
    assert "steps" in err and steps in err, err


def test_method_settings_that_cannot_work_are_refused_before_training(trained, tmp_path, capsys):
    data, _ = trained
    model = tmp_path / "m"
    code = cli("train", data, "-o", model, "--method", "unisegdiff", "-q", *TINY,
               "--set", 'method_settings={"t_sampling": "stratified"}')
    assert not (model / "checkpoint").exists() and not (model / "model.json").exists()
    assert code == 2, code
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusionseg: error:") and "\n" not in err and "t_sampling" in err, err


def test_a_model_card_with_broken_settings_is_a_one_line_error(trained, tmp_path, capsys):
    _, model = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(model / name, broken / name)
    card = json.loads((broken / "model.json").read_text())
    card["method_settings"]["branch_t"] = 5000
    (broken / "model.json").write_text(json.dumps(card))
    source, _ = ct_input(tmp_path)
    out = tmp_path / "o"
    code = cli("segment", source, "--model", broken, "-o", out, "--samples", "2", "--steps", "3", "-q")
    assert not out.exists() or not any(out.iterdir()), "no output may be left behind"
    assert code == 2, code
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusionseg: error:") and "\n" not in err and "branch_t" in err, err
