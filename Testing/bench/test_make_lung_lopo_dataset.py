"""scripts/make_lung_lopo_dataset.py: the held-out real case is the only test case, the other real case
trains with its tumour labelled, and synthetic lesions keep clear of that tumour."""

import json
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from helpers import REPO

SPACING = (4.0, 4.0, 5.0)  # x, y, z mm


def _chest(tumour_centre: tuple[int, int, int] | None) -> tuple[sitk.Image, sitk.Image]:
    """(z, y, x) = (12, 64, 64) phantom: air, a 40 HU body, two -850 HU lungs, a 40 HU tumour sphere."""
    ct = np.full((12, 64, 64), -1000, np.int16)
    ct[:, 8:56, 6:58] = 40
    ct[:, 16:48, 10:30] = -850
    ct[:, 16:48, 34:54] = -850
    label = np.zeros(ct.shape, np.uint8)
    if tumour_centre is not None:
        z, y, x = np.ogrid[:12, :64, :64]
        cz, cy, cx = tumour_centre
        ball = ((z - cz) * 5.0) ** 2 + ((y - cy) * 4.0) ** 2 + ((x - cx) * 4.0) ** 2 <= 8.0 ** 2
        ct[ball], label[ball] = 40, 1
    images = []
    for array in (ct, label):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        images.append(image)
    return images[0], images[1]


def _bench(root):
    lungs, checks = root / "lung_lesions", root / "lung_synthetic_check"
    cases = {(lungs, "Tr", "synth_chest_r0"): (6, 20, 20), (lungs, "Ts", "lung1"): (6, 30, 44),
             (lungs, "Ts", "lung2"): (5, 24, 18), (checks, "Ts", "check_chest"): (6, 40, 40)}
    for (folder, split, case), centre in cases.items():
        image, label = _chest(centre)
        for kind, item in (("images", image), ("labels", label)):
            (folder / f"{kind}{split}").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(item, str(folder / f"{kind}{split}" / f"{case}.nii.gz"))
    design = {"diameter_mm": [8.0, 12.0], "axis_ratio": [0.9, 1.1], "lobulation": 0.1, "density_hu": [0.0, 40.0],
              "texture_hu": [5.0, 10.0], "texture_mm": 2.0, "noise_hu": 10.0, "edge_mm": 1.5,
              "min_inside_lung": 0.75, "margin_mm": 5.0, "attempts": 60}
    (lungs / "dataset.json").write_text(json.dumps({"lesion_design": design, "training": [
        {"image": "./imagesTr/synth_chest_r0.nii.gz", "label": "./labelsTr/synth_chest_r0.nii.gz"}]}))
    (checks / "dataset.json").write_text(json.dumps({"test": [
        {"image": "./imagesTs/check_chest.nii.gz", "label": "./labelsTs/check_chest.nii.gz"}]}))


def _run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_lung_lopo_dataset.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_the_held_out_real_case_is_the_only_test_case_and_the_other_trains_with_its_tumour(tmp_path):
    _bench(tmp_path / "bench")
    out = tmp_path / "lopo"
    done = _run("--bench", tmp_path / "bench", "--held-out", "lung1", "--out", out, "--realisations", "2",
                "--lesions", "2", "--margin-mm", "10")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "dataset.json").read_text())
    names = {split: sorted(e["image"].split("/")[-1] for e in meta[split]) for split in ("training", "validation", "test")}
    assert names["test"] == ["lung1.nii.gz"]
    assert names["validation"] == ["check_chest.nii.gz"]
    assert names["training"] == sorted(["synth_chest_r0.nii.gz", "lung2.nii.gz", "lung2_synth_r0.nii.gz",
                                        "lung2_synth_r1.nii.gz"])
    assert not any(p.name.startswith(".lopo") for p in tmp_path.iterdir())  # no staging folder left

    real_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr/lung2.nii.gz")))
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr/lung2.nii.gz"))) > 0
    for k in range(2):
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"imagesTr/lung2_synth_r{k}.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"labelsTr/lung2_synth_r{k}.nii.gz"))) > 0
        assert label[tumour].all() and (label & ~tumour).any()  # the real tumour stays labelled, lesions added
        assert np.array_equal(ct[tumour], real_ct[tumour])  # and its voxels untouched
        # Every synthetic voxel lies outside the 10 mm keep-out box around the real tumour (2 voxels in z, 3 in-plane).
        keep_out = ndimage.binary_dilation(tumour, np.ones((5, 7, 7), bool))
        assert not (label & ~tumour & keep_out).any()
    assert len(meta["realisations"]) == 2 and meta["realisations"]["lung2_synth_r0"]["real_case"] == "lung2"

    assert _run("--bench", tmp_path / "bench", "--held-out", "lung1", "--out", out).returncode != 0  # never overwrites


def test_held_out_none_trains_on_both_real_cases_and_has_no_test_split(tmp_path):
    _bench(tmp_path / "bench")
    done = _run("--bench", tmp_path / "bench", "--held-out", "none", "--out", tmp_path / "all", "--realisations", "1",
                "--lesions", "1")
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "all" / "dataset.json").read_text())
    assert meta["test"] == [] and {"lung1.nii.gz", "lung2.nii.gz"} <= {e["image"].split("/")[-1] for e in meta["training"]}
    assert _run("--bench", tmp_path / "missing", "--held-out", "none", "--out", tmp_path / "x").returncode != 0


def test_real_cases_can_come_uncropped_from_another_folder(tmp_path):
    """--real-cases: the real training case and the held-out test case are read from that folder
    (data/lung_full_fov: the whole scan), not from the benchmark's crop."""
    _bench(tmp_path / "bench")
    full = tmp_path / "full"
    for case, centre in (("lung1", (6, 30, 44)), ("lung2", (5, 24, 18))):
        image, label = _chest(centre)
        image, label = (sitk.ConstantPad(x, (8, 8, 0), (8, 8, 0), v) for x, v in ((image, -1000), (label, 0)))
        for kind, item in (("images", image), ("labels", label)):
            (full / f"{kind}Ts").mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(item, str(full / f"{kind}Ts" / f"{case}.nii.gz"))
    (full / "dataset.json").write_text("{}")
    out = tmp_path / "lopo"
    done = _run("--bench", tmp_path / "bench", "--held-out", "lung1", "--out", out, "--realisations", "1",
                "--lesions", "1", "--real-cases", full)
    assert done.returncode == 0, done.stderr
    for path in ("imagesTr/lung2.nii.gz", "labelsTr/lung2.nii.gz", "imagesTr/lung2_synth_r0.nii.gz", "imagesTs/lung1.nii.gz"):
        assert sitk.ReadImage(str(out / path)).GetSize() == (80, 80, 12), path  # the padded, uncropped scans
    assert sitk.ReadImage(str(out / "imagesTr/synth_chest_r0.nii.gz")).GetSize() == (64, 64, 12)  # the benchmark's own
