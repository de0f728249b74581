"""Synthetic dermoscopy-like RGB pictures (DiffusionSegLib.bench.synthetic_skin): determinism, shapes,
a lesion blob of the stated width that is clearly darker than the skin, empty healthy masks, the CSV
and PNG files the weakly supervised pipeline reads."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from DiffusionSegLib.bench import synthetic_skin
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.pipeline.io import read_image


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_the_same_seed_gives_the_same_picture_and_another_seed_another():
    a = synthetic_skin.make_skin_image(96, True, 3)
    b = synthetic_skin.make_skin_image(96, True, 3)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    c = synthetic_skin.make_skin_image(96, True, 4)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_and_dtypes(size):
    for lesion in (True, False):
        rgb, mask = synthetic_skin.make_skin_image(size, lesion, 0)
        assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 1}
    with pytest.raises(ValueError):
        synthetic_skin.make_skin_image(16, True, 0)


@pytest.mark.parametrize("size", [64, 128])
def test_a_lesion_is_one_blob_of_the_stated_width_and_clearly_darker_than_the_skin(size):
    low, high = synthetic_skin.WIDTH_FRACTION
    for seed in range(30):
        rgb, mask = synthetic_skin.make_skin_image(size, True, seed)
        _, n = ndimage.label(mask)
        assert n == 1, f"seed {seed}: {n} pieces"
        columns = np.flatnonzero(mask.any(axis=0))
        assert low <= (columns[-1] - columns[0] + 1) / size <= high, f"seed {seed}"
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())  # whole blob
        lum = _luminance(rgb)
        assert lum[mask == 0].mean() - lum[mask > 0].mean() > 50, f"seed {seed}"
        # Darker centre: the innermost pixels are darker than the rim of the mask.
        depth = ndimage.distance_transform_edt(mask)
        assert lum[depth >= np.percentile(depth[mask > 0], 80)].mean() < lum[(depth > 0) & (depth <= 2)].mean()


def test_healthy_pictures_have_empty_masks_and_skin_tones():
    for seed in range(20):
        rgb, mask = synthetic_skin.make_skin_image(64, False, seed)
        assert not mask.any()
        r, g, b = (rgb[..., i].astype(float).mean() for i in range(3))
        assert r > g > b and _luminance(rgb).mean() > 120  # skin: red over green over blue, light


def test_hairs_appear_on_some_pictures_of_both_classes():
    for lesion in (False, True):
        hairy = 0
        for seed in range(20):
            rgb, mask = synthetic_skin.make_skin_image(64, lesion, seed)
            hairy += int((_luminance(rgb)[mask == 0] < 70).sum() > 20)  # dark pixels off any lesion: hair
        assert 0 < hairy < 20, f"lesion={lesion}: {hairy} of 20 pictures have hairs"


# ---------------------------------------------------------------------------------------------
# The dataset folder
# ---------------------------------------------------------------------------------------------


def _rows(out) -> list[dict[str, str]]:
    with open(out / synthetic_skin.CSV_NAME, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_dataset_has_pngs_masks_and_a_csv_with_the_last_fifth_of_each_class_for_validation(tmp_path):
    out = synthetic_skin.write_skin_dataset(tmp_path / "skin", n_lesion=5, n_healthy=4, size=48, seed=1)
    assert out == tmp_path / "skin"
    rows = _rows(out)
    assert list(rows[0]) == ["image", "label", "slices", "split"]
    assert [(r["image"], r["label"], r["split"]) for r in rows] == (
        [(f"images/lesion_{i:04d}.png", "lesion", "training") for i in range(4)]
        + [("images/lesion_0004.png", "lesion", "validation")]
        + [(f"images/healthy_{i:04d}.png", "healthy", "training") for i in range(3)]
        + [("images/healthy_0003.png", "healthy", "validation")])
    assert all(r["slices"] == "" for r in rows)
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"lesion_{i:04d}.png" for i in range(5)]
    for row in rows:
        image = read_image(out / row["image"])
        assert image.GetDimension() == 2 and image.GetNumberOfComponentsPerPixel() == 3
        assert image.GetSize() == (48, 48)
        if row["label"] == "lesion":
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["image"].replace("images/", "masks/"))))
            assert mask.shape == (48, 48) and set(np.unique(mask).tolist()) == {0, 255}
    # The PNG holds exactly the picture make_skin_image returns.
    seed = int(np.random.SeedSequence([1, 0, 2]).generate_state(1)[0])
    rgb, mask = synthetic_skin.make_skin_image(48, True, seed)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "lesion_0002.png"))), rgb)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / "lesion_0002.png"))), mask * 255)


def test_the_dataset_is_byte_identical_for_a_seed_and_written_atomically(tmp_path):
    a = synthetic_skin.write_skin_dataset(tmp_path / "a", 3, 2, 40, seed=7)
    b = synthetic_skin.write_skin_dataset(tmp_path / "b", 3, 2, 40, seed=7)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(DatasetError, match="exists"):
        synthetic_skin.write_skin_dataset(a, 1, 1, 40, seed=8)
    synthetic_skin.write_skin_dataset(a, 1, 1, 40, seed=8, rebuild=True)
    assert len(_rows(a)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging or old folder left
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError):
        synthetic_skin.write_skin_dataset(tmp_path / "other", 1, 1, 40, seed=8, rebuild=True)
    with pytest.raises(ValueError):
        synthetic_skin.write_skin_dataset(tmp_path / "none", 0, 0, 40, seed=8)
