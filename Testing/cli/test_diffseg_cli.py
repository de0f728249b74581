"""DiffSeg end to end through the CLI: ``train --method diffseg`` from image-level labels (RGB pictures,
the paper's domain, made here: no dermoscopy set is available), then ``segment`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.bench.synthetic_skin import write_skin_dataset
from DiffusionSegLib.cli.main import main

TINY = ['--set', 'network={"channels": [8, 16], "norm_num_groups": 4}', "--set", "patch_size=[32, 32]",
        "--set", 'normalization={"kind": "rgb"}', "--set", "modality=RGB", "--set", "batch_size=4",
        "--set", "steps=3", "--set", "val_every=3", "--set", "checkpoint_every=3", "--set", "augment=false",
        "--set", 'method_settings={"noise_levels": [60, 150], "train_t_max": 300}']


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(skin dataset, DiffSeg model trained on it for 3 steps) with every mask read forbidden."""
    root = tmp_path_factory.mktemp("diffseg")
    data = write_skin_dataset(root / "skin", n_lesion=5, n_healthy=5, size=32, seed=0)
    model = root / "model"
    patch = pytest.MonkeyPatch()
    import DiffusionSegLib.pipeline.io as io
    import DiffusionSegLib.training.data as data_module

    def no_masks(*args, **kwargs):
        raise AssertionError("image-level training read a mask")

    patch.setattr(io, "read_label", no_masks)
    patch.setattr(data_module, "read_label", no_masks)
    try:
        assert main(["train", str(data), "-o", str(model), "--method", "diffseg", "-q", *TINY]) == 0
    finally:
        patch.undo()
    return data, model


def test_train_from_image_labels_writes_a_calibrated_diffseg_card(trained):
    _, model = trained
    card = json.loads((model / "model.json").read_text())
    assert card["method"] == "diffseg" and card["in_channels"] == 3 and [l["name"] for l in card["labels"]] == ["lesion"]
    assert card["default_crf"] == "published" and card["default_steps"] == 1
    table = card["method_settings"]["healthy_thresholds"]
    assert len(table["t"]) == len(table["value"]) >= 2 and all(v >= 0 for v in table["value"])
    assert card["metrics"]["calibration"]["source"] == "held-out healthy slices"
    assert card["training"]["validation_cases"] == ["lesion_0004", "healthy_0004"]


def test_segment_an_rgb_picture_gives_every_output_on_its_grid(trained, tmp_path):
    data, model = trained
    out = tmp_path / "out"
    picture = data / "images" / "lesion_0004.png"
    assert main(["segment", str(picture), "--model", str(model), "-o", str(out), "--samples", "4", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 4 and report["crf_mode"] == "published" and report["model"]["method"] == "diffseg"
    assert "lesion" in report["sample_diversity"]
    for name in ("fused.nii.gz", "consistency.nii.gz", "ambiguity.nii.gz", "uncertainty_lesion.nii.gz", "crf.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == (32, 32), name


def test_evaluate_reports_precision_recall_and_the_ged_terms(trained, tmp_path):
    data, model = trained
    # An nnU-Net style test split of the validation lesion pictures and their masks.
    test = tmp_path / "test"
    (test / "imagesTs").mkdir(parents=True)
    (test / "labelsTs").mkdir()
    for name in ("lesion_0004",):
        (test / "imagesTs" / f"{name}.png").write_bytes((data / "images" / f"{name}.png").read_bytes())
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "masks" / f"{name}.png")))
        sitk.WriteImage(sitk.GetImageFromArray((mask > 0).astype(np.uint8)), str(test / "labelsTs" / f"{name}.nii.gz"))
    (test / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "lesion"}}))
    result = tmp_path / "metrics.json"
    assert main(["evaluate", str(model), str(test), "-o", str(result), "--samples", "3", "-q"]) == 0
    summary = json.loads(result.read_text())
    row = summary["cases"][0]
    assert set(row["metrics"]["lesion"]) >= {"dice", "precision", "recall"}
    terms = row["ged"]["lesion"]
    assert terms["ged"] == pytest.approx(2 * terms["cross"] - terms["sample_diversity"] - terms["reference_diversity"])


def test_a_mask_dataset_or_an_unbounded_normalization_is_refused_before_training(tmp_path, capsys):
    folder = tmp_path / "masks_only"
    (folder / "imagesTr").mkdir(parents=True)
    assert main(["train", str(folder), "-o", str(tmp_path / "m1"), "--method", "diffseg", "-q", *TINY]) != 0
    assert "image-level labels" in capsys.readouterr().err
    data = write_skin_dataset(tmp_path / "skin", n_lesion=2, n_healthy=2, size=32, seed=1)
    args = ["train", str(data), "-o", str(tmp_path / "m2"), "--method", "diffseg", "-q", *TINY,
            "--set", 'normalization={"kind": "zscore"}']
    assert main(args) != 0
    assert "normalization" in capsys.readouterr().err
    assert not (tmp_path / "m2" / "checkpoint").exists()


def test_the_bundled_skin_model_finds_synthetic_lesions_it_never_saw(tmp_path):
    """The shipped DiffSeg model at its card defaults, on generator seeds outside its training and validation."""
    from PIL import Image

    from DiffusionSegLib.bench.synthetic_skin import make_skin_image
    from DiffusionSegLib.models.store import resolve_model
    from DiffusionSegLib.training.metrics import dice

    model = resolve_model("rgb_skin_lesion_diffseg_2d")
    scores = []
    for seed in (300000, 300001, 300002):
        picture, mask = make_skin_image(64, True, seed)
        Image.fromarray(picture).save(tmp_path / f"p{seed}.png")
        out = tmp_path / f"out{seed}"
        assert main(["segment", str(tmp_path / f"p{seed}.png"), "--model", str(model), "-o", str(out), "-q"]) == 0
        final = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "crf.nii.gz")))
        scores.append(dice(final > 0, mask > 0))
    assert np.mean(scores) > 0.6, scores  # measured 0.81 mean over 30 test pictures (docs/BENCHMARKS.md)
