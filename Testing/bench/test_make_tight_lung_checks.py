"""scripts/make_tight_lung_checks.py: one lesion-centred crop per lesion of the lung checks, original
voxels in place, every lesion voxel inside the box kept."""

import json

import numpy as np
import SimpleITK as sitk

from helpers import load_script, write_lung_check_set


def _check_set(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for case in ("check_chest", "check_base"):
        ct = rng.integers(-900, 200, (10, 40, 40)).astype(np.int16)
        label = np.zeros(ct.shape, np.uint8)
        label[4:6, 20:24, 10:14] = 1  # 32 voxels: centre row 22, column 12, slices 4-5
        label[5, 30, 30] = 1  # a 1-voxel lesion: no case of its own
        cases[case] = (ct, label, (2.0, 2.0, 3.0))
    return write_lung_check_set(tmp_path, cases)


def test_each_lesion_gets_a_box_centred_on_it_with_its_slices_and_margin(tmp_path):
    script = load_script("make_tight_lung_checks")
    bench = _check_set(tmp_path)
    out = tmp_path / "tight"
    # 20 mm = 10 voxels of 2 mm: rows 17-26, columns 7-16; 3 mm margin = 1 slice: slices 3-6.
    assert script.main(["--bench", str(bench), "--out", str(out), "--box-mm", "20", "--margin-mm", "3",
                        "--min-voxels", "10"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert [t["image"] for t in meta["test"]] == ["./imagesTs/check_chest_lesion1.nii.gz",
                                                  "./imagesTs/check_base_lesion1.nii.gz"]
    assert meta["cases"]["check_chest_lesion1"] == {"check_case": "check_chest", "index_xyz": [7, 17, 3],
                                                    "size": [10, 10, 4]}
    source = sitk.ReadImage(str(bench / "lung_synthetic_check" / "imagesTs" / "check_chest.nii.gz"))
    crop = sitk.ReadImage(str(out / "imagesTs" / "check_chest_lesion1.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), sitk.GetArrayFromImage(source)[3:7, 17:27, 7:17])
    assert np.allclose(crop.GetOrigin(), source.TransformIndexToPhysicalPoint((7, 17, 3)))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / "check_chest_lesion1.nii.gz")))
    assert label.sum() == 32  # the lesion whole; the 1-voxel one lies outside the box


def test_no_lesion_large_enough_is_an_error_and_writes_nothing(tmp_path, capsys):
    script = load_script("make_tight_lung_checks")
    bench = _check_set(tmp_path)
    assert script.main(["--bench", str(bench), "--out", str(tmp_path / "tight"), "--min-voxels", "1000"]) == 2
    assert "no lesion of at least 1000 voxels" in capsys.readouterr().err
    assert not (tmp_path / "tight").exists()
