"""readers.read_outputs: what write_outputs wrote comes back exactly (the Slicer workflow relies on it)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DiffusionSegLib.outputs import writers
from DiffusionSegLib.outputs.readers import OutputFolderError, read_outputs
from helpers import make_result


def test_round_trip_of_a_3d_oblique_result_with_overlapping_labels(tmp_path, oblique_3d):
    result = make_result(oblique_3d)
    assert (result.fused[0] & result.fused[1]).any(), "the test data must contain overlaps"
    # As inference.build_report writes it: the reader takes the diversity from the report.
    result.report["sample_diversity"] = {"liver": 0.125, "left kidney/cortex": 0.0}
    writers.write_outputs(result, tmp_path / "o", keep_samples=True)

    back = read_outputs(tmp_path / "o")
    assert [(lab.name, lab.color, lab.terminology) for lab in back.labels] == [
        (lab.name, lab.color, lab.terminology) for lab in result.labels]
    # Exact: float maps bit for bit, masks from the .seg.nrrd (overlaps kept).
    for name in ("probability", "uncertainty", "consistency", "ambiguity", "refined"):
        assert np.array_equal(getattr(back, name), getattr(result, name)), name
    assert back.refined is not None and np.array_equal(back.final_mask, result.final_mask)
    assert back.sample_diversity == [0.125, 0.0]
    assert back.report["model"] == {"name": "tiny"} and "outputs" not in back.report
    # Samples come from label maps: exact wherever labels do not overlap in a sample.
    assert back.samples.shape == result.samples.shape
    alone = result.samples.sum(axis=1, keepdims=True) <= 1
    assert np.array_equal(np.where(alone, back.samples, 0), np.where(alone, result.samples, 0))
    assert back.reference.GetSize() == oblique_3d.GetSize()
    assert np.allclose(back.reference.GetDirection(), oblique_3d.GetDirection(), atol=1e-6)


def test_round_trip_of_a_2d_rgb_result_without_crf_or_samples(tmp_path, rgb_2d):
    result = make_result(rgb_2d, refined=False)
    writers.write_outputs(result, tmp_path / "o")
    back = read_outputs(tmp_path / "o")
    assert back.refined is None and back.samples is None
    assert back.fused.shape == result.fused.shape == (2, 14, 18)
    assert np.array_equal(back.fused, result.fused)
    assert np.array_equal(back.probability, result.probability)


def test_an_unfinished_or_damaged_folder_is_a_clear_error(tmp_path, oblique_3d):
    with pytest.raises(OutputFolderError, match="does not exist"):
        read_outputs(tmp_path / "nothing")
    out = tmp_path / "o"
    writers.write_outputs(make_result(oblique_3d), out)

    report = json.loads((out / "report.json").read_text())
    (out / "uncertainty_liver.nii.gz").unlink()
    with pytest.raises(OutputFolderError, match="missing uncertainty_liver.nii.gz"):
        read_outputs(out)

    (out / "report.json").unlink()
    with pytest.raises(OutputFolderError, match="did not finish"):
        read_outputs(out)

    report["outputs"].append("../../etc/passwd")
    (out / "report.json").write_text(json.dumps(report))
    with pytest.raises(OutputFolderError, match="outside the folder"):
        read_outputs(out)

    (out / "report.json").write_text("{ truncated")
    with pytest.raises(OutputFolderError, match="unreadable"):
        read_outputs(out)


def test_probability_maps_must_be_fractions_of_the_reports_samples(tmp_path, oblique_3d):
    """The reader rebuilds the sample counts from probability x N: a map or report that does not
    fit (edited, another run's) is refused instead of giving wrong consistency and ambiguity."""
    import SimpleITK as sitk

    out = tmp_path / "o"
    result = make_result(oblique_3d)
    writers.write_outputs(result, out)
    back = read_outputs(out)
    assert np.array_equal(back.counts, result.counts) and back.n_samples == result.n_samples == 3

    report = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**report, "samples": 4}))
    with pytest.raises(OutputFolderError, match="not a fraction of the report's 4 samples"):
        read_outputs(out)
    (out / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "samples"}))
    with pytest.raises(OutputFolderError, match="how many samples"):
        read_outputs(out)

    (out / "report.json").write_text(json.dumps(report))
    path = out / "probability_liver.nii.gz"
    image = sitk.ReadImage(str(path))
    edited = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * np.float32(0.9))
    edited.CopyInformation(image)
    sitk.WriteImage(edited, str(path))
    with pytest.raises(OutputFolderError, match="probability_liver.nii.gz is not a fraction"):
        read_outputs(out)
