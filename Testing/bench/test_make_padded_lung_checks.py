"""scripts/make_padded_lung_checks.py: the lung check volumes with air around them in-plane, every voxel
inside and its physical place unchanged."""

import json

import numpy as np
import SimpleITK as sitk

from helpers import load_script, write_lung_check_set


def _check_set(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for case, spacing in (("check_chest", (1.5, 1.5, 3.0)), ("check_base", (3.0, 3.0, 3.0))):
        ct = rng.integers(-900, 200, (4, 10, 12)).astype(np.int16)
        label = np.zeros(ct.shape, np.uint8)
        label[1, 3:6, 4:8] = 1
        cases[case] = (ct, label, spacing)
    return write_lung_check_set(tmp_path, cases)


def test_the_checks_get_air_on_the_four_in_plane_sides_and_keep_every_voxel_in_place(tmp_path):
    script = load_script("make_padded_lung_checks")
    bench = _check_set(tmp_path)
    out = tmp_path / "padded"
    assert script.main(["--bench", str(bench), "--out", str(out), "--pad-mm", "6"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert [t["task"] for t in meta["test"]] == ["lung", "lung"] and meta["numTest"] == 2
    for case, pad in (("check_chest", 4), ("check_base", 2)):  # 6 mm: 4 voxels of 1.5 mm, 2 of 3 mm
        before = sitk.ReadImage(str(bench / "lung_synthetic_check" / "imagesTs" / f"{case}.nii.gz"))
        after = sitk.ReadImage(str(out / "imagesTs" / f"{case}_padded.nii.gz"))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / f"{case}_padded.nii.gz")))
        assert after.GetSize() == (12 + 2 * pad, 10 + 2 * pad, 4)
        inner = (slice(None), slice(pad, pad + 10), slice(pad, pad + 12))
        array = sitk.GetArrayFromImage(after)
        np.testing.assert_array_equal(array[inner], sitk.GetArrayFromImage(before))
        ring = np.ones(array.shape, bool)
        ring[inner] = False
        assert (array[ring] == -1000).all() and label.sum() == 12 and label[inner].sum() == 12
        assert np.allclose(after.TransformIndexToPhysicalPoint((pad, pad, 0)), before.GetOrigin())


def test_a_missing_check_set_is_refused_and_nothing_is_written(tmp_path, capsys):
    script = load_script("make_padded_lung_checks")
    out = tmp_path / "padded"
    assert script.main(["--bench", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err and not out.exists()
