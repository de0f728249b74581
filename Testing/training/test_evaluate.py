"""`evaluate` on a folder of predictions: per-case metrics against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.cli.main import main
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.training.evaluate import evaluate


def _write(array: np.ndarray, path, spacing=(1.0, 1.0, 2.0)) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "ds"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    label = np.zeros((2, 6, 6), np.uint8)
    label[0, 1:3, 1:3] = 1  # 4 voxels of label 1
    label[1, 3:5, 3:5] = 2  # 4 voxels of label 2
    for split in ("Tr", "Ts"):
        _write(rng.normal(size=(2, 6, 6)).astype(np.float32), root / f"images{split}" / "case1.nii.gz")
        _write(label, root / f"labels{split}" / "case1.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    return root, label


def test_prediction_folder_scores_match_hand_computed_values(tmp_path, dataset):
    root, label = dataset
    pred = label.copy()
    pred[0, 1, 1] = 0  # label a: 3 of 4 voxels found -> Dice 6/7, IoU 3/4
    preds = tmp_path / "preds"
    preds.mkdir()
    _write(pred, preds / "case1.nii.gz")
    summary = evaluate(preds, root, split="test", out_json=tmp_path / "m.json")
    a, b = summary["cases"][0]["metrics"]["a"], summary["cases"][0]["metrics"]["b"]
    assert a["dice"] == pytest.approx(6 / 7) and a["iou"] == pytest.approx(3 / 4)
    assert a["precision"] == 1.0 and a["recall"] == pytest.approx(3 / 4)  # nothing extra, one of 4 missed
    assert b["dice"] == 1.0 and b["hd95_mm"] == pytest.approx(0.0)
    assert json.loads((tmp_path / "m.json").read_text())["mean"]["a"]["dice_mean"] == pytest.approx(6 / 7)


def test_prediction_on_another_grid_is_refused(tmp_path, dataset):
    root, label = dataset
    preds = tmp_path / "preds"
    preds.mkdir()
    _write(label, preds / "case1.nii.gz", spacing=(1.0, 1.0, 3.0))
    with pytest.raises(DatasetError):
        evaluate(preds, root, split="test")


def test_evaluate_a_model_from_the_cli(tmp_path, dataset, tiny_model):
    root, _ = dataset
    # The tiny model's only label is "lesion", which the dataset does not have: a clear refusal.
    assert main(["evaluate", str(tiny_model), str(root), "--steps", "1", "--samples", "1"]) == 2


@pytest.mark.parametrize("fusion,crf", [("mean", False), ("staple", True)])
def test_evaluate_a_model_scores_the_runs_final_mask(tmp_path, tiny_model, fusion, crf):
    """Model mode: each case is segmented and its final mask (the one the run names) is scored."""
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.pipeline.io import read_image

    root = tmp_path / "ds"
    for sub in ("imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 24, 24)).astype(np.float32)
    label = np.zeros((2, 24, 24), np.uint8)
    label[:, 6:18, 6:18] = 1
    _write(image, root / "imagesTs" / "case1.nii.gz")
    _write(label, root / "labelsTs" / "case1.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "lesion"}}))
    opts = SegmentSettings(samples=4, steps=2, seed=2, fusion=fusion, crf=crf)

    summary = evaluate(tiny_model, root, options=opts, split="test")

    result = segment_image(read_image(root / "imagesTs" / "case1.nii.gz"), tiny_model, opts)
    pred, ref = result.final_mask[0].astype(bool), label.astype(bool)
    expected = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())  # Dice by hand
    assert summary["mode"] == "model"
    assert summary["cases"][0]["metrics"]["lesion"]["dice"] == pytest.approx(expected)
    assert summary["cases"][0]["metrics"]["lesion"]["iou"] == pytest.approx((pred & ref).sum() / (pred | ref).sum())

    # The GED of the run's samples against the one reference, by hand: d = 1 - IoU.
    kept = segment_image(read_image(root / "imagesTs" / "case1.nii.gz"), tiny_model,
                         SegmentSettings(samples=4, steps=2, seed=2, fusion=fusion, crf=crf, keep_samples=True))
    samples = kept.samples[:, 0].astype(bool)

    def d(a, b):
        union = (a | b).sum()
        return 0.0 if union == 0 else 1.0 - (a & b).sum() / union

    cross = np.mean([d(s_, ref) for s_ in samples])
    within = np.mean([d(samples[i], samples[j]) for i in range(4) for j in range(i + 1, 4)])
    ged = summary["cases"][0]["ged"]["lesion"]
    assert ged["cross"] == pytest.approx(cross, abs=1e-6)
    assert ged["sample_diversity"] == pytest.approx(within, abs=1e-6) and ged["reference_diversity"] == 0.0
    assert ged["ged"] == pytest.approx(2 * cross - within, abs=1e-6)
    assert summary["ged_mean"]["lesion"]["ged"] == pytest.approx(ged["ged"])


def test_evaluate_reports_progress_per_case_and_no_monai_future_warning(tmp_path, dataset):
    import warnings

    root, label = dataset
    preds = tmp_path / "preds"
    preds.mkdir()
    pred = label.copy()
    pred[0, 1, 1] = 0  # non-empty masks on both sides: HD95 is computed (MONAI's get_mask_edges)
    _write(pred, preds / "case1.nii.gz")
    events = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(preds, root, split="test", progress=lambda stage, done, total: events.append((stage, done, total)))
    assert events == [("cases", 0, 1), ("cases", 1, 1)]
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future


def test_evaluate_cli_draws_a_case_bar(tmp_path, dataset, monkeypatch):
    from DiffusionSegLib.cli import progress as cli

    root, label = dataset
    preds = tmp_path / "preds"
    preds.mkdir()
    _write(label, preds / "case1.nii.gz")
    bars = []
    real = cli.Bar

    class Keep(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(cli, "Bar", Keep)
    assert main(["evaluate", str(preds), str(root)]) == 0
    assert bars and bars[0].stage == "cases" and bars[0].last == (1, 1)


def test_a_model_with_more_labels_than_the_dataset_is_scored_on_the_shared_ones(tmp_path, dataset):
    """An organ model on a dataset that annotates fewer organs: shared labels scored, the rest listed."""
    from helpers import make_model
    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.models.card import LabelInfo

    root, _ = dataset  # labels "a" and "b"
    model = make_model(tmp_path / "abc", labels=[LabelInfo("a"), LabelInfo("kidney"), LabelInfo("b")])
    summary = evaluate(model, root, options=SegmentSettings(samples=2, steps=1, crf=False), split="test")
    assert set(summary["cases"][0]["metrics"]) == {"a", "b"}
    assert summary["model_labels_not_in_dataset"] == ["kidney"]
