"""scripts/make_lung_full_fov_test.py: the real lung cases exactly as the package holds them (no crop),
as the test split, and nothing else."""

import json

import numpy as np
import SimpleITK as sitk

from helpers import load_script


def _script():
    return load_script("make_lung_full_fov_test")


def _fake_cases(folder):
    """The five pyradiomics cases as small NRRD pairs (float image, as a reader may give)."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for n, case in enumerate(("brain1", "brain2", "breast1", "lung1", "lung2")):
        ct = np.full((6, 40, 50), -900.0 + n, np.float32)
        label = np.zeros(ct.shape, np.uint8)
        label[2:4, 10:14, 20:25] = 1
        paths = []
        for kind, array in (("image", ct), ("label", label)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.6, 0.6, 5.0))
            image.SetOrigin((-10.0, 20.0, -300.0 - n))
            path = folder / f"{case}_{kind}.nrrd"
            sitk.WriteImage(image, str(path))
            paths.append(path)
        pairs.append(tuple(paths))
    return pairs


def test_writes_the_two_lung_cases_uncropped_as_the_test_split(tmp_path, monkeypatch):
    script = _script()
    monkeypatch.setattr(script.realdata, "build_lesion_cases", lambda out: _fake_cases(tmp_path / "src"))
    out = tmp_path / "full"
    test = script.build(out)
    assert [e["image"] for e in test] == ["./imagesTs/lung1.nii.gz", "./imagesTs/lung2.nii.gz"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["training"] == [] and meta["test"] == test and meta["labels"] == {"0": "background", "1": "lesion"}
    for n, case in ((3, "lung1"), (4, "lung2")):
        image = sitk.ReadImage(str(out / "imagesTs" / f"{case}.nii.gz"))
        label = sitk.ReadImage(str(out / "labelsTs" / f"{case}.nii.gz"))
        assert image.GetSize() == (50, 40, 6) and image.GetPixelID() == sitk.sitkInt16  # nothing cropped
        assert image.GetOrigin() == (-10.0, 20.0, -300.0 - n) and label.GetSpacing() == image.GetSpacing()
        assert int(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTs" / f"{case}.nii.gz"))).max()) == -900 + n
        assert int(sitk.GetArrayFromImage(label).sum()) == 2 * 4 * 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "src"]  # no staging folder left

    script.build(out)  # a rebuild replaces the folder whole
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["lung1.nii.gz", "lung2.nii.gz"]
