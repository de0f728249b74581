"""Image-level (lesion / healthy) datasets: discovery, loading on the model grid, per-slice labels and
the (crop, class) sampler (DiffusionSegLib.training.weak_labels)."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.core.errors import DatasetError, SettingsError
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.training import weak_labels as wl
from DiffusionSegLib.training.data import Augmentation

VALUE_STEP = 100.0  # file slice k holds the constant VALUE_STEP * (k + 1) HU


def _card(**kwargs) -> ModelCard:
    defaults = dict(name="t", method="medsegdiff", spatial_dims=2, in_channels=1, labels=[LabelInfo("lesion")],
                    normalization={"kind": "ct_window", "center": 0, "width": 2000}, orientation="LPS", spacing=None)
    return ModelCard(**{**defaults, **kwargs})


def _write(array: np.ndarray, path, spacing=None, direction=None, is_vector=False) -> None:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _slice_volume(path, n_slices=6, shape=(8, 10), **kwargs) -> None:
    """A volume whose file slice k is the constant VALUE_STEP * (k + 1): content tells the slice."""
    values = VALUE_STEP * (np.arange(n_slices, dtype=np.float32) + 1)
    _write(np.broadcast_to(values[:, None, None], (n_slices, *shape)).copy(), path, **kwargs)


def _file_slice_of(model_slice: np.ndarray) -> int:
    """The file slice a normalized model slice (C, H, W) came from (ct_window: HU / 1000)."""
    assert np.ptp(model_slice) < 1e-5, "a file slice should stay constant on the model grid"
    return int(round(float(model_slice.mean()) * 1000.0 / VALUE_STEP)) - 1


def _csv(root, *rows: str, header: str = "image,label,slices,split") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / wl.CSV_NAME).write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def _rgb_png(path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    _write(pixels, path, is_vector=True)


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def test_csv_rows_give_labels_slice_ranges_splits_and_unique_names(tmp_path):
    for name in ("vols/a.nii.gz", "vols/b.nrrd", "other/a.nii.gz", "c.mha", "d.nii.gz"):
        _slice_volume(tmp_path / name, n_slices=12)
    _csv(tmp_path, "vols/a.nii.gz,lesion, 3;5;7-9 ,", "vols/b.nrrd,HEALTHY,,training",
         "other/a.nii.gz,1,10-11,", "c.mha,0,,Validation", "d.nii.gz,Lesion,,test")
    # a spreadsheet export with a byte-order mark must read the same
    (tmp_path / wl.CSV_NAME).write_text((tmp_path / wl.CSV_NAME).read_text(), encoding="utf-8-sig")
    train = wl.discover_weak_cases(tmp_path)
    assert [(c.name, c.label, c.lesion_slices, c.split) for c in train] == [
        ("vols_a", wl.LESION, (3, 5, 7, 8, 9), "training"),
        ("b", wl.HEALTHY, None, "training"),
        ("other_a", wl.LESION, (10, 11), "training")]
    assert train[0].image == (tmp_path / "vols" / "a.nii.gz").resolve()
    assert "line 2" in train[0].source
    assert [(c.name, c.label, c.split) for c in wl.discover_weak_cases(tmp_path, "validation")] == [
        ("c", wl.HEALTHY, "validation")]
    assert [(c.name, c.lesion_slices) for c in wl.discover_weak_cases(tmp_path, "test")] == [("d", None)]
    assert wl.is_weak_dataset(tmp_path)


def test_folder_layout_labels_whole_images_and_the_csv_wins(tmp_path):
    _rgb_png(tmp_path / "lesion" / "x.png", 0)
    _rgb_png(tmp_path / "lesion" / "y.png", 1)
    _rgb_png(tmp_path / "healthy" / "x.png", 2)
    (tmp_path / "healthy" / "notes.txt").write_text("not an image")
    assert wl.is_weak_dataset(tmp_path)
    cases = wl.discover_weak_cases(tmp_path)
    assert [(c.name, c.label, c.lesion_slices, c.split) for c in cases] == [
        ("lesion_x", wl.LESION, None, "training"), ("y", wl.LESION, None, "training"),
        ("healthy_x", wl.HEALTHY, None, "training")]
    assert wl.discover_weak_cases(tmp_path, "validation") == []
    _csv(tmp_path, "lesion/y.png,healthy,,")  # the CSV overrides what the folders say
    assert [(c.name, c.label) for c in wl.discover_weak_cases(tmp_path)] == [("y", wl.HEALTHY)]


def test_missing_layout_says_what_is_expected(tmp_path):
    assert not wl.is_weak_dataset(tmp_path)
    with pytest.raises(DatasetError, match="image_labels.csv.*lesion/ and healthy/"):
        wl.discover_weak_cases(tmp_path)
    (tmp_path / "lesion").mkdir()
    assert not wl.is_weak_dataset(tmp_path)
    with pytest.raises(DatasetError, match="found only lesion/"):
        wl.discover_weak_cases(tmp_path)


@pytest.mark.parametrize("row, message", [
    ("b.nii.gz,maybe,,", "line 3: unknown label 'maybe'"),
    ("b.nii.gz,healthy,2-3,", "line 3: a healthy image has no lesion slices"),
    ("missing.nii.gz,lesion,,", "line 3: image missing.nii.gz does not exist"),
    ("b.nii.gz,lesion,3-x,", "line 3: cannot read slices '3-x'"),
    ("b.nii.gz,lesion,5-2,", "line 3: slice range '5-2' runs backwards"),
    ("b.nii.gz,lesion,-1,", "line 3: cannot read slices"),
    ("a.nii.gz,healthy,,", "line 3: image a.nii.gz is already listed on line 2"),
    ("b.nii.gz,lesion,,train", "line 3: unknown split 'train'"),
    ("labelsTr/b.nii.gz,lesion,,", "line 3: labelsTr/b.nii.gz lies in a mask folder"),
])
def test_bad_csv_rows_name_their_line(tmp_path, row, message):
    for name in ("a.nii.gz", "b.nii.gz", "labelsTr/b.nii.gz"):
        _slice_volume(tmp_path / name)
    _csv(tmp_path, "a.nii.gz,lesion,1,", row)
    with pytest.raises(DatasetError, match=message):
        wl.discover_weak_cases(tmp_path)


def test_bad_csv_header_is_rejected(tmp_path):
    _slice_volume(tmp_path / "a.nii.gz")
    _csv(tmp_path, "a.nii.gz,lesion,1,", header="image,label,slices,")  # a trailing comma is harmless
    assert wl.discover_weak_cases(tmp_path)[0].lesion_slices == (1,)
    _csv(tmp_path, "a.nii.gz,lesion,1", header="image,label,slice")  # "slice" misspelt
    with pytest.raises(DatasetError, match="unknown column.*slice"):
        wl.discover_weak_cases(tmp_path)
    _csv(tmp_path, "a.nii.gz,lesion", header="file,class")
    with pytest.raises(DatasetError, match="image,label"):
        wl.discover_weak_cases(tmp_path)


def test_slice_errors_found_on_loading_name_the_line(tmp_path):
    _slice_volume(tmp_path / "a.nii.gz", n_slices=6)
    _rgb_png(tmp_path / "p.png", 0)
    _csv(tmp_path, "a.nii.gz,lesion,4-6,", "p.png,lesion,0,")
    volume, picture = wl.discover_weak_cases(tmp_path)
    with pytest.raises(DatasetError, match=r"line 2: slice\(s\) 6 out of range: a.nii.gz has 6 slices"):
        wl.load_weak_case(volume, _card())
    with pytest.raises(DatasetError, match="line 3: p.png is a 2D image; slices apply to volumes only"):
        wl.load_weak_case(picture, _card(in_channels=3, normalization={"kind": "rgb"}))


def test_both_classes_are_needed_and_3d_cards_are_refused(tmp_path):
    _slice_volume(tmp_path / "a.nii.gz")
    _slice_volume(tmp_path / "b.nii.gz")
    card = _card()
    _csv(tmp_path, "a.nii.gz,healthy,,", "b.nii.gz,0,,")
    with pytest.raises(DatasetError, match="no lesion slice in any of the 2 image"):
        wl.load_weak_cases(wl.discover_weak_cases(tmp_path), card)
    _csv(tmp_path, "a.nii.gz,lesion,,", "b.nii.gz,1,,")
    with pytest.raises(DatasetError, match="no healthy slice in any of the 2 image"):
        wl.load_weak_cases(wl.discover_weak_cases(tmp_path), card)
    _csv(tmp_path, "a.nii.gz,lesion,2,", "b.nii.gz,1,,")  # a's other slices are healthy: fine
    assert len(wl.load_weak_cases(wl.discover_weak_cases(tmp_path), card)) == 2
    with pytest.raises(DatasetError, match="image-level labels train 2D models: a slice is an item"):
        wl.load_weak_case(wl.discover_weak_cases(tmp_path)[0], _card(spatial_dims=3))


# ---------------------------------------------------------------------------------------------
# Loading on the model grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction, spacing, in_plane", [
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), None, (8, 10)),
    ((1, 0, 0, 0, 1, 0, 0, 0, -1), None, (8, 10)),  # LPS card reorients: file slice k is model slice 5 - k
    ((1, 0, 0, 0, 1, 0, 0, 0, -1), [0.5, 0.5], (16, 20)),  # reoriented and resampled in-plane
])
def test_slice_labels_follow_the_image_through_reorientation_and_resampling(tmp_path, direction, spacing, in_plane):
    _slice_volume(tmp_path / "v.nii.gz", n_slices=6, spacing=(1.0, 1.0, 2.0), direction=direction)
    _csv(tmp_path, "v.nii.gz,lesion,1-2,")
    case = wl.load_weak_case(wl.discover_weak_cases(tmp_path)[0], _card(spacing=spacing))
    assert case.image.shape == (1, 6, *in_plane) and case.image.dtype == np.float32
    assert case.slice_labels.dtype == np.uint8 and case.slice_labels.shape == (6,)
    origin = [_file_slice_of(case.image[:, s]) for s in range(6)]
    assert sorted(origin) == list(range(6))
    if direction[-1] == -1:
        assert origin == [5, 4, 3, 2, 1, 0]  # the flip really happened, so the check below means something
    assert case.slice_labels.tolist() == [int(k in (1, 2)) for k in origin]


def test_whole_volume_labels_are_constant(tmp_path):
    _slice_volume(tmp_path / "a.nii.gz", n_slices=4)
    _slice_volume(tmp_path / "b.nii.gz", n_slices=5)
    _csv(tmp_path, "a.nii.gz,lesion,,", "b.nii.gz,healthy,,")
    a, b = wl.load_weak_cases(wl.discover_weak_cases(tmp_path), _card())
    assert a.slice_labels.tolist() == [1] * 4 and b.slice_labels.tolist() == [0] * 5


def test_loading_never_reads_a_mask(tmp_path, monkeypatch):
    from DiffusionSegLib.pipeline import io
    from DiffusionSegLib.training import data

    def refuse(*args, **kwargs):
        raise AssertionError("read_label called by image-level training")

    monkeypatch.setattr(io, "read_label", refuse)
    monkeypatch.setattr(data, "read_label", refuse)
    opened: list[str] = []
    real_read = sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage", lambda path, *a, **k: opened.append(str(path)) or real_read(path, *a, **k))
    _slice_volume(tmp_path / "imagesTr" / "a.nii.gz")
    _slice_volume(tmp_path / "imagesTr" / "b.nii.gz")
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "labelsTr" / "a.nii.gz").write_bytes(b"garbage, not an image")
    (tmp_path / "labelsTr" / "b.nii.gz").write_bytes(b"garbage, not an image")
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    _csv(tmp_path, "imagesTr/a.nii.gz,lesion,2-3,", "imagesTr/b.nii.gz,healthy,,")
    cases = wl.load_weak_cases(wl.discover_weak_cases(tmp_path), _card())
    assert [c.slice_labels.tolist() for c in cases] == [[0, 0, 1, 1, 0, 0], [0] * 6]
    assert len(opened) == 2 and not any("labelsTr" in p for p in opened)


def test_rgb_pictures_in_class_folders_load_as_single_slices(tmp_path):
    _rgb_png(tmp_path / "lesion" / "a.png", 0)
    _rgb_png(tmp_path / "healthy" / "b.png", 1)
    card = _card(in_channels=3, normalization={"kind": "rgb"}, modality="RGB")
    lesion, healthy = wl.load_weak_cases(wl.discover_weak_cases(tmp_path), card)
    assert lesion.image.shape == healthy.image.shape == (3, 1, 9, 11)
    assert lesion.image.dtype == np.float32 and -1.0 <= lesion.image.min() < lesion.image.max() <= 1.0
    assert (lesion.name, lesion.slice_labels.tolist(), healthy.slice_labels.tolist()) == ("a", [1], [0])


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _memory_case(name: str, lesion: list[int], n_slices: int, value: float, size=(12, 14)) -> wl.WeakCase:
    """Lesion slices hold ``value`` + 0.5, healthy slices ``value`` - 0.5, constant in-plane."""
    labels = np.zeros(n_slices, np.uint8)
    labels[lesion] = 1
    image = np.broadcast_to((value + labels - 0.5).astype(np.float32)[None, :, None, None],
                            (1, n_slices, *size)).copy()
    return wl.WeakCase(name, image, labels)


def _cases() -> list[wl.WeakCase]:
    # lesion slices: 1 in "a", 3 in "b", 1 in "c" (5 of 24); "c" is smaller than the patch (padded
    # with its minimum, 19.5, the value of its healthy slices)
    return [_memory_case("a", [4], 10, 0.0), _memory_case("b", [0, 1, 5], 8, 10.0),
            _memory_case("c", [2], 6, 20.0, size=(5, 6))]


def test_sampler_items_have_the_documented_shapes_and_come_from_their_class():
    sampler = wl.ImageLabelSampler(_cases(), (8, 8), seed=1)
    image, label = sampler.sample()
    assert image.shape == (1, 8, 8) and image.dtype == np.float32 and label in (wl.LESION, wl.HEALTHY)
    images, labels = sampler.batch(400)
    assert images.shape == (400, 1, 8, 8) and images.dtype == np.float32
    assert labels.shape == (400,) and labels.dtype == np.int64
    # an item holds only its slice's value (lesion: x.5, healthy: x9.5), plus padding for case c
    for item, label in zip(images, labels):
        values = np.unique(item)
        if label == wl.LESION:
            content = values[values != 19.5]
            assert len(content) == 1 and content[0] % 10 == 0.5, values
            if content[0] == 20.5:  # the 5 x 6 slice of c in an 8 x 8 crop: padded with c's minimum
                assert 19.5 in values
        else:
            assert len(values) == 1 and values[0] % 10 == 9.5, values
    from_a = images[labels == wl.LESION].max(axis=(1, 2, 3)) == 0.5
    assert 0.12 < from_a.mean() < 0.28  # uniform over the 5 lesion slices (1 in a), not over cases (1/3)


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_sampler_balances_classes_by_lesion_fraction(fraction):
    # 5 of 24 slices are lesion: drawing uniformly over slices would give about 0.21, not the fraction
    _, labels = wl.ImageLabelSampler(_cases(), (8, 8), seed=2, lesion_fraction=fraction).batch(400)
    assert abs(labels.mean() - fraction) < 0.08


def test_sampler_needs_both_classes_and_rejects_mask_augmentations():
    only_healthy = [_memory_case("a", [], 4, 0.0)]
    with pytest.raises(DatasetError, match="no lesion slice"):
        wl.ImageLabelSampler(only_healthy, (8, 8))
    with pytest.raises(DatasetError, match="no healthy slice"):
        wl.ImageLabelSampler([_memory_case("a", [0, 1, 2, 3], 4, 0.0)], (8, 8))
    with pytest.raises(SettingsError, match="masks"):
        wl.ImageLabelSampler(_cases(), (8, 8), Augmentation(label_offsets=((0.0, 0.1),)))
    with pytest.raises(ValueError, match="patch_size"):
        wl.ImageLabelSampler(_cases(), (8, 8, 8))


def _textured_cases() -> list[wl.WeakCase]:
    """Cases with in-plane texture, so that crops, flips and rotations change the values."""
    rng = np.random.default_rng(0)
    return [wl.WeakCase(c.name, c.image + rng.normal(size=c.image.shape).astype(np.float32), c.slice_labels)
            for c in _cases()]


def test_sampler_is_seeded_and_resumes_from_its_state_with_augmentation():
    aug = Augmentation(prob=1.0, flips=True)
    first = wl.ImageLabelSampler(_textured_cases(), (8, 8), aug, seed=5)
    same = wl.ImageLabelSampler(_textured_cases(), (8, 8), aug, seed=5)
    a, b = first.batch(6), same.batch(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    plain = wl.ImageLabelSampler(_textured_cases(), (8, 8), seed=5).batch(6)
    np.testing.assert_array_equal(plain[1], a[1])  # same locations: augmentation draws elsewhere
    assert not np.allclose(plain[0], a[0])  # ... and it does change the items
    other = wl.ImageLabelSampler(_textured_cases(), (8, 8), aug, seed=6).batch(6)
    assert not np.allclose(other[0], a[0])

    state = json.loads(json.dumps(first.get_state()))
    expected = first.batch(8)
    resumed = wl.ImageLabelSampler(_textured_cases(), (8, 8), aug, seed=99)
    resumed.set_state(state)
    got = resumed.batch(8)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------


def _files(n: int) -> list[wl.WeakCaseFiles]:
    return [wl.WeakCaseFiles(f"c{i}", Path(f"/x/c{i}.png"), i % 2, None, "training") for i in range(n)]


def test_validation_split_is_by_case_with_counts_names_and_seed():
    cases = _files(10)
    train, val = wl.split_weak_validation(cases, None, seed=0)
    assert len(val) == 2 and len(train) == 8 and {c.name for c in train} | {c.name for c in val} == {
        c.name for c in cases}
    held = np.random.default_rng(3).permutation(10)[:4]
    train, val = wl.split_weak_validation(cases, 4, seed=3)
    assert [c.name for c in val] == [f"c{i}" for i in sorted(held)]
    assert [c.name for c in train] == [c.name for c in cases if c not in val]
    assert wl.split_weak_validation(cases, 4, seed=3) == (train, val)
    train, val = wl.split_weak_validation(cases, ["c7", "c2"], seed=0)
    assert [c.name for c in val] == ["c7", "c2"] and len(train) == 8
    assert wl.split_weak_validation(_files(1), None, seed=0) == (_files(1), [])
    assert [len(part) for part in wl.split_weak_validation(_files(2), None, seed=0)] == [1, 1]
    assert wl.split_weak_validation(cases, 0, seed=0) == (cases, [])


@pytest.mark.parametrize("val_cases, message", [
    (["c1", "nope"], "not among the training images: nope"),
    ([f"c{i}" for i in range(3)], "nothing left to train on"),
    (3, "leaves no training image"),
    (5, "leaves no training image"),
    (-1, "must not be negative"),
])
def test_validation_split_errors(val_cases, message):
    with pytest.raises(DatasetError, match=message):
        wl.split_weak_validation(_files(3), val_cases, seed=0)
