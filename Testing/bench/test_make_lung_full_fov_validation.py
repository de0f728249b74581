"""scripts/make_lung_full_fov_validation.py: the lung check volumes pasted back, voxel for voxel, into the
uncropped scans they were cut from; a check volume that does not match its source is refused."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import load_script
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.bench import data as benchdata


def _script():
    return load_script("make_lung_full_fov_validation")


def _image(array, spacing, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _fixture(tmp_path, script, tamper=False):
    """Source scans in a fake sdist root and a bench check set cut from them (one lesion each)."""
    root = tmp_path / "sdist"
    rng = np.random.default_rng(0)
    chest = rng.integers(-1000, 200, (8, 30, 40)).astype(np.int16)  # 1.5 mm slices: the check has every 2nd
    base = rng.integers(-1000, 200, (10, 20, 24)).astype(np.int16)
    for member, array, spacing in ((script.SOURCES["check_chest"][0], chest, (1.5, 1.5, 1.5)),
                                   (script.SOURCES["check_base"][0], base, (3.0, 3.0, 3.0))):
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(_image(array, spacing), str(root / member))
    check = tmp_path / "bench" / "lung_synthetic_check"
    (check / "imagesTs").mkdir(parents=True)
    (check / "labelsTs").mkdir()
    (check / "dataset.json").write_text("{}")
    # chest: every 2nd slice (3 mm), cropped to z 1-3, y 5-24, x 10-29; base: z 6-9, whole in-plane
    crops = {"check_chest": (chest[::2][1:4, 5:25, 10:30], (3.0 * 1, 1.5 * 5, 1.5 * 10), (1.5, 1.5, 3.0)),
             "check_base": (base[6:10], (3.0 * 6, 0.0, 0.0), (3.0, 3.0, 3.0))}
    for case, (crop, (oz, oy, ox), spacing) in crops.items():
        crop = crop.copy()
        label = np.zeros(crop.shape, np.uint8)
        label[1, 4:8, 4:8] = 1
        crop[1, 4:8, 4:8] = 60  # the "lesion"
        if tamper and case == "check_base":
            crop[0, 0, 0] += 5  # a voxel far from the lesion differs from the source
        sitk.WriteImage(_image(crop, spacing, (ox, oy, oz)), str(check / "imagesTs" / f"{case}.nii.gz"))
        sitk.WriteImage(_image(label, spacing, (ox, oy, oz)), str(check / "labelsTs" / f"{case}.nii.gz"))
    return root, chest, base


def _patch_sources(monkeypatch, script, root):
    monkeypatch.setattr(script.realdata, "fetch_package", lambda name: root / "archive.tar.gz")
    monkeypatch.setattr(script.realdata, "extract_members", lambda archive, top, wanted, dest: root)


def test_the_check_lesions_are_pasted_back_into_their_whole_scans(tmp_path, monkeypatch):
    script = _script()
    root, chest, base = _fixture(tmp_path, script)
    _patch_sources(monkeypatch, script, root)
    out = tmp_path / "val"
    test = script.build(tmp_path / "bench", out)
    assert [e["image"] for e in test] == ["./imagesTs/check_chest_whole.nii.gz", "./imagesTs/check_base_whole.nii.gz"]
    assert {e["task"] for e in test} == {"lung"}
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["training"] == [] and meta["test"] == test

    chest_image = sitk.ReadImage(str(out / "imagesTs" / "check_chest_whole.nii.gz"))
    assert chest_image.GetSize() == (40, 30, 4) and chest_image.GetSpacing() == (1.5, 1.5, 3.0)
    whole = sitk.GetArrayFromImage(chest_image)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / "check_chest_whole.nii.gz")))
    expected = chest[::2].copy()
    expected[2, 9:13, 14:18] = 60  # crop slice 1 = whole slice 2; rows 5+4..; columns 10+4..
    np.testing.assert_array_equal(whole, expected)
    assert label.sum() == 16 and label[2, 9:13, 14:18].all()

    base_whole = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTs" / "check_base_whole.nii.gz")))
    expected = base.copy()
    expected[7, 4:8, 4:8] = 60
    np.testing.assert_array_equal(base_whole, expected)  # all 10 slices: the 6 the check left out are back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "sdist", "val"]  # no staging folder left


def test_a_check_volume_that_differs_from_its_source_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    script = _script()
    root, _, _ = _fixture(tmp_path, script, tamper=True)
    _patch_sources(monkeypatch, script, root)
    with pytest.raises(DatasetError, match="check_base: the source scan differs"):
        script.build(tmp_path / "bench", tmp_path / "val")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "sdist"]


def test_a_check_volume_off_the_source_grid_is_refused():
    script = _script()
    whole = _image(np.zeros((4, 10, 10), np.int16), (2.0, 2.0, 2.0))
    crop = _image(np.zeros((2, 4, 4), np.int16), (2.0, 2.0, 2.0), origin=(1.0, 0.0, 0.0))  # half a voxel off
    with pytest.raises(DatasetError, match="does not lie on its source scan's grid"):
        benchdata.paste_crop(whole, crop, crop, "case")
    outside = _image(np.zeros((2, 4, 4), np.int16), (2.0, 2.0, 2.0), origin=(16.0, 0.0, 0.0))  # columns 8-11 of 10
    with pytest.raises(DatasetError, match="reaches outside"):
        benchdata.paste_crop(whole, outside, outside, "case")
