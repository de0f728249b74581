"""Tests of DiffusionSegLib.pipeline.preprocess: model grid, normalization, padding and the exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.core.errors import InputImageError, ModelLoadError
from DiffusionSegLib.pipeline.io import array_with_channels, image_from_array, read_image
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.pipeline.preprocess import (
    model_spacing,
    normalize,
    prepare,
    resample_labels_to_model_grid,
    resample_to_model_grid,
    restore,
)

# Oblique (20 degrees about x, then 20 about z) and anisotropic, like a tilted-gantry CT.
SIZE = (24, 20, 8)  # SimpleITK (x, y, z)
SPACING = (0.8, 1.3, 4.0)
ORIGIN = (10.0, -5.0, 3.0)
WINDOW = {"kind": "ct_window", "center": 0.0, "width": 2000.0}


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    i, j = (k for k in range(3) if k != axis)
    m = np.eye(3)
    m[i, i] = m[j, j] = np.cos(t)
    m[i, j], m[j, i] = -np.sin(t), np.sin(t)
    return m


DIRECTION = _rotation(0, 20) @ _rotation(2, 20)


def _physical_points(size, spacing, origin, direction) -> np.ndarray:
    """(z, y, x, 3) physical position of every voxel centre of a 3D grid."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)  # (x, y, z, 3)
    points = np.asarray(origin) + (index * np.asarray(spacing)) @ np.reshape(direction, (3, 3)).T
    return np.ascontiguousarray(points.transpose(2, 1, 0, 3))


def _linear_field(points: np.ndarray) -> np.ndarray:
    """A function of physical position that linear interpolation reproduces exactly (HU, inside WINDOW)."""
    return (18.0 * points[..., 0] - 12.0 * points[..., 1] + 6.0 * points[..., 2] - 350.0).astype(np.float32)


def _oblique_volume() -> sitk.Image:
    image = sitk.GetImageFromArray(_linear_field(_physical_points(SIZE, SPACING, ORIGIN, DIRECTION)))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION.ravel().tolist())
    return image


def _card(**fields) -> ModelCard:
    return ModelCard(name="test-model", **fields)


def _in_batch_layout(prepared, volume: np.ndarray) -> np.ndarray:
    """(L, *model spatial) -> the padded batch layout restore() takes (padding filled with -1)."""
    if prepared.slice_axis is None:
        items = volume[None]
    else:
        items = np.moveaxis(volume, 1 + prepared.slice_axis, 0)
    maps = np.full((prepared.batch.shape[0], items.shape[1], *prepared.batch.shape[2:]), -1.0, np.float32)
    maps[(slice(None), slice(None), *prepared.crop)] = items
    return maps


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_model_spacing_follows_slice_axis():
    image = _oblique_volume()
    assert model_spacing(image, _card(spatial_dims=3, spacing=[1.1, 0.9, 2.5])) == (1.1, 0.9, 2.5)
    assert model_spacing(image, _card(spatial_dims=2, spacing=None)) == SPACING
    # card.spacing = (columns W, rows H) of a slice; the slice axis keeps its spacing.
    assert model_spacing(image, _card(spatial_dims=2, spacing=[0.5, 0.7], slice_axis=0)) == (0.5, 0.7, 4.0)
    assert model_spacing(image, _card(spatial_dims=2, spacing=[0.5, 0.7], slice_axis=1)) == (0.5, 1.3, 0.7)
    assert model_spacing(image, _card(spatial_dims=2, spacing=[0.5, 0.7], slice_axis=2)) == (0.8, 0.5, 0.7)
    with pytest.raises(ModelLoadError):
        model_spacing(image, _card(spatial_dims=3, spacing=[1.0, 1.0]))


def test_resampling_stays_in_the_image_index_frame():
    image = _oblique_volume()
    resampled = resample_to_model_grid(image, _card(spatial_dims=3, spacing=[1.1, 0.9, 2.5]))
    # size = round(old_size * old_spacing / new_spacing): 17.45 -> 17, 28.9 -> 29, 12.8 -> 13
    assert resampled.GetSize() == (17, 29, 13)
    assert resampled.GetSpacing() == (1.1, 0.9, 2.5)
    assert resampled.GetOrigin() == image.GetOrigin()
    assert resampled.GetDirection() == image.GetDirection()
    # The model-grid voxels hold the same function of physical position (interior: no extrapolation).
    expected = _linear_field(_physical_points(resampled.GetSize(), resampled.GetSpacing(), ORIGIN, DIRECTION))
    inside = (slice(0, 12), slice(0, 26), slice(0, 19))
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(resampled)[inside], expected[inside], atol=0.05)
    # Same spacing: the image itself, not a resampled copy.
    assert resample_to_model_grid(image, _card(spatial_dims=3, spacing=list(SPACING))) is image


@pytest.mark.parametrize(
    "fields, batch_shape",
    [
        # 3D: patch (H, W, D) = (16, 16, 8); model grid (x, y, z) = (17, 29, 13) -> (D, H, W) = (16, 32, 24)
        (dict(spatial_dims=3, spacing=[1.1, 0.9, 2.5], patch_size=[16, 16, 8]), (1, 1, 16, 32, 24)),
        # 2D axial: in-plane (x, y) = (38, 37), 8 slices untouched -> (8, 1, 40, 40)
        (dict(spatial_dims=2, spacing=[0.5, 0.7], slice_axis=0), (8, 1, 40, 40)),
        # 2D, slices along numpy x: (x, y, z) spacing (0.8, 0.5, 0.7) -> size (24, 52, 46); (S, H=z, W=y)
        (dict(spatial_dims=2, spacing=[0.5, 0.7], slice_axis=2), (24, 1, 48, 56)),
    ],
)
def test_oblique_anisotropic_round_trip(fields, batch_shape):
    image = _oblique_volume()
    card = _card(normalization=WINDOW, **fields)
    prepared = prepare(image, card, size_divisor=8)
    assert prepared.batch.shape == batch_shape and prepared.batch.dtype == np.float32
    assert prepared.resampled

    # 1) The normalized image itself comes back onto the input grid.
    restored = restore(prepared, prepared.batch, "linear")
    assert restored.shape == (1, 8, 20, 24) and restored.dtype == np.float32
    expected = normalize(array_with_channels(image), card)[0]
    np.testing.assert_allclose(restored[0][1:-1, 1:-1, 1:-1], expected[1:-1, 1:-1, 1:-1], atol=1e-4)
    # Border voxels past the last model voxel centre take its value: off by under one model voxel of slope.
    np.testing.assert_allclose(restored[0], expected, atol=0.05)

    # 2) A sphere drawn in physical space on the model grid lands on the same sphere of the input
    # grid: origin, spacing and direction are all undone (a wrong direction would move it by mm).
    grid = prepared.model_grid
    centre = np.asarray(ORIGIN) + DIRECTION @ (np.array([11.5, 9.5, 3.5]) * SPACING)
    model_points = _physical_points(grid.size, grid.spacing, grid.origin, grid.direction)
    sphere_model = (np.linalg.norm(model_points - centre, axis=-1) < 7.0).astype(np.float32)
    sphere_back = restore(prepared, _in_batch_layout(prepared, sphere_model[None]), "linear")[0] > 0.5
    input_points = _physical_points(SIZE, SPACING, ORIGIN, DIRECTION)
    sphere_input = np.linalg.norm(input_points - centre, axis=-1) < 7.0
    assert _dice(sphere_back, sphere_input) > 0.9
    # The map fits the input grid exactly (raises if the shape did not match the reference).
    mask = image_from_array(sphere_back.astype(np.uint8), image, sitk.sitkUInt8)
    assert mask.GetOrigin() == image.GetOrigin() and mask.GetDirection() == image.GetDirection()


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_model_without_resampling_uses_input_slices_and_restores_exactly(slice_axis):
    image = _oblique_volume()
    card = _card(spatial_dims=2, slice_axis=slice_axis, normalization=WINDOW)
    prepared = prepare(image, card, size_divisor=1)
    normalized = normalize(array_with_channels(image), card)  # (1, z, y, x)
    slices = np.moveaxis(normalized, 1 + slice_axis, 0)
    assert prepared.batch.shape == slices.shape and not prepared.resampled
    np.testing.assert_array_equal(prepared.batch, slices)
    np.testing.assert_array_equal(restore(prepared, prepared.batch), normalized)
    np.testing.assert_array_equal(prepared.image_for_crf, np.moveaxis(slices, 1, 0))


def test_rgb_png_round_trip(tmp_path):
    # A smooth colour gradient (linear in x and y) so linear interpolation reproduces it exactly.
    y, x = np.mgrid[0:11, 0:13]
    rgb = np.stack([10 + 15 * x, 20 + 18 * y, 200 - 7 * x - 5 * y], axis=-1).astype(np.uint8)
    path = tmp_path / "lesion.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    image = read_image(path)
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetSize() == (13, 11)

    card = _card(spatial_dims=2, in_channels=3, normalization={"kind": "rgb"}, spacing=[0.6, 0.6],
                 labels=[LabelInfo("lesion"), LabelInfo("border")])
    prepared = prepare(image, card, size_divisor=4)
    # model grid (x, y) = round(13 / 0.6), round(11 / 0.6) = (22, 18) -> padded to (24, 20)
    assert prepared.batch.shape == (1, 3, 20, 24)
    assert prepared.batch.min() >= -1.0 and prepared.batch.max() <= 1.0
    restored = restore(prepared, prepared.batch[:, :2], "linear")  # two "labels": the R and G channels
    assert restored.shape == (2, 11, 13)
    expected = np.moveaxis(rgb[..., :2], -1, 0) / 127.5 - 1.0
    np.testing.assert_allclose(restored[:, :-1, :-1], expected[:, :-1, :-1], atol=1e-4)
    np.testing.assert_allclose(restored, expected, atol=0.1)
    fused = image_from_array((restored[0] > 0).astype(np.uint8), image, sitk.sitkUInt8)
    assert fused.GetSize() == image.GetSize() and fused.GetSpacing() == image.GetSpacing()


def test_small_image_is_padded_to_patch_size_with_the_normalized_minimum():
    array = np.arange(12 * 10, dtype=np.float32).reshape(12, 10) - 100.0  # (y, x)
    image = sitk.GetImageFromArray(array)
    card = _card(spatial_dims=2, patch_size=[32, 32], normalization={"kind": "ct_window", "center": 0, "width": 100})
    prepared = prepare(image, card, size_divisor=8)
    assert prepared.batch.shape == (1, 1, 32, 32)
    normalized = np.clip(array, -50, 50) / 50.0
    # Centred: 20 rows of padding split 10/10, 22 columns split 11/11.
    np.testing.assert_array_equal(prepared.batch[0, 0, 10:22, 11:21], normalized)
    border = prepared.batch[0, 0].copy()
    border[10:22, 11:21] = np.nan
    assert np.all(border[~np.isnan(border)] == -1.0)  # the window's floor: air stays air
    np.testing.assert_array_equal(restore(prepared, prepared.batch, "nearest"), normalized[None])


def test_single_slice_volume_is_one_slice_for_a_2d_model():
    image = sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(1, 5, 6))
    prepared = prepare(image, _card(spatial_dims=2), size_divisor=4)
    assert prepared.batch.shape == (1, 1, 8, 8) and prepared.slice_axis == 0
    assert restore(prepared, prepared.batch).shape == (1, 1, 5, 6)


def _lps_and_ras_twins(slices: int, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """The same random anatomy (slices x 6 x 5) stored LPS, and with x and y reversed (direction
    diag(-1, -1, 1), origin at the far corner), as a RAS-flipped NIfTI would store it."""
    lps_array = np.random.default_rng(seed).normal(size=(slices, 6, 5)).astype(np.float32)
    lps = sitk.GetImageFromArray(lps_array)
    lps.SetSpacing((1.0, 2.0, 3.0))
    lps.SetOrigin((-10.0, 20.0, 5.0))
    ras = sitk.GetImageFromArray(lps_array[:, ::-1, ::-1].copy())
    ras.SetSpacing((1.0, 2.0, 3.0))
    ras.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ras.SetOrigin(lps.TransformIndexToPhysicalPoint((4, 5, 0)))
    return lps, ras


def test_single_slice_stored_flipped_reaches_the_network_like_its_lps_twin():
    """The LPS reorientation applies to a 1-slice volume as to any volume (in-plane flips undone)."""
    lps, ras = _lps_and_ras_twins(slices=1, seed=4)
    card = _card(spatial_dims=2, normalization={"kind": "zscore"})
    a, b = prepare(lps, card), prepare(ras, card)
    assert a.batch.shape == (1, 1, 6, 5)
    assert np.allclose(a.batch, b.batch, atol=1e-6)
    back_ras = restore(b, b.batch, "nearest")[0]
    assert back_ras.shape == (1, 6, 5)
    assert np.allclose(back_ras, restore(a, a.batch, "nearest")[0][:, ::-1, ::-1], atol=1e-6)


def test_oblique_single_slice_round_trip_through_the_model_grid():
    """A tilted 1-slice volume resampled in-plane comes back onto exactly its own grid."""
    size = (24, 20, 1)
    image = sitk.GetImageFromArray(_linear_field(_physical_points(size, SPACING, ORIGIN, DIRECTION)))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION.ravel().tolist())
    card = _card(spatial_dims=2, spacing=[0.5, 0.7], normalization=WINDOW)
    prepared = prepare(image, card, size_divisor=8)
    assert prepared.batch.shape == (1, 1, 40, 40) and prepared.resampled
    restored = restore(prepared, prepared.batch, "linear")
    assert restored.shape == (1, 1, 20, 24)
    expected = normalize(array_with_channels(image), card)[0]
    np.testing.assert_allclose(restored[0][:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-4)
    np.testing.assert_allclose(restored[0], expected, atol=0.05)


def test_3d_model_refuses_a_single_slice_volume_and_a_2d_image():
    one_slice = sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(1, 5, 6))
    with pytest.raises(InputImageError, match="single slice"):
        prepare(one_slice, _card(spatial_dims=3))
    with pytest.raises(InputImageError, match="3D"):
        prepare(sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(5, 6)), _card(spatial_dims=3))


def test_single_slice_across_another_axis_than_the_models_slices_is_refused():
    """One sagittal slice (its length-1 axis runs left-right) is no axial slice: a clear error, not lines."""
    image = sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(1, 5, 6))
    # Voxel axes i -> posterior, j -> inferior, k -> left: after LPS reorientation k is the x axis.
    image.SetDirection((0, 0, 1, 1, 0, 0, 0, -1, 0))
    with pytest.raises(InputImageError, match="single slice"):
        prepare(image, _card(spatial_dims=2, slice_axis=0))
    # A model that takes sagittal slices (numpy axis 2 of the LPS volume) segments it.
    prepared = prepare(image, _card(spatial_dims=2, slice_axis=2), size_divisor=1)
    assert prepared.batch.shape == (1, 1, 5, 6)
    assert restore(prepared, prepared.batch).shape == (1, 1, 5, 6)


def test_normalize_hand_computed():
    ct = np.array([[-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0]], np.float32)
    window = _card(normalization={"kind": "ct_window", "center": 40, "width": 400})
    np.testing.assert_allclose(normalize(ct, window), [[-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]])

    rgb = np.array([[0.0, 127.5, 255.0]] * 3, np.float32) * np.ones((3, 1), np.float32)
    rgb[1] = [255.0, 0.0, 0.0]
    out = normalize(rgb, _card(in_channels=3, normalization={"kind": "rgb"}))
    np.testing.assert_allclose(out, [[-1.0, 0.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 0.0, 1.0]])
    with pytest.raises(InputImageError, match="8-bit"):
        normalize(rgb * 4, _card(in_channels=3, normalization={"kind": "rgb"}))

    ramp = np.arange(101, dtype=np.float32)[None]  # 1st percentile 1, 99th 99
    np.testing.assert_allclose(normalize(ramp, _card(normalization={"kind": "minmax"}))[0, [0, 1, 50, 99, 100]],
                               [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)

    # zscore ignores the constant background (the 1st percentile and below): stats of 1..50 only.
    mr = np.concatenate([np.zeros(50), np.arange(1, 51)]).astype(np.float32)[None]
    std = np.sqrt((50**2 - 1) / 12.0)
    z = normalize(mr, _card(normalization={"kind": "zscore"}))[0]
    np.testing.assert_allclose(z[[0, 50, 99]], [-25.5 / std, -24.5 / std, 24.5 / std], rtol=1e-5)
    with pytest.raises(ModelLoadError, match="unknown normalization"):
        normalize(ramp, _card(normalization={"kind": "histogram"}))


def test_channel_mismatch():
    gray_as_rgb = np.repeat(np.arange(20, dtype=np.float32).reshape(1, 4, 5), 3, axis=0)
    reduced = normalize(gray_as_rgb, _card(in_channels=1, normalization={"kind": "rgb"}))
    assert reduced.shape == (1, 4, 5)
    colour = gray_as_rgb.copy()
    colour[2, 0, 0] = 99.0
    with pytest.raises(InputImageError, match="1-channel"):
        normalize(colour, _card(in_channels=1))
    with pytest.raises(InputImageError, match="3-channel.*grayscale"):
        normalize(gray_as_rgb[:1], _card(in_channels=3))


def test_restore_nearest_keeps_label_values_and_checks_shape():
    image = _oblique_volume()
    prepared = prepare(image, _card(spatial_dims=3, spacing=[1.1, 0.9, 2.5], normalization=WINDOW), size_divisor=4)
    labels = np.zeros_like(prepared.batch)
    labels[..., 5:9, 10:20, 6:12] = 2.0
    labels[..., 2:5, 3:8, 3:8] = 1.0
    restored = restore(prepared, labels, "nearest")
    assert set(np.unique(restored)) == {0.0, 1.0, 2.0}
    with pytest.raises(ValueError):
        restore(prepared, labels[..., :-1])
    with pytest.raises(ValueError):
        restore(prepared, labels, "cubic")


@pytest.mark.parametrize("spacing", [[1.1, 0.9, 2.5], None])  # resampled, and on the input grid
def test_restore_with_a_threshold_equals_thresholding_the_restored_maps(spacing):
    """The thresholded restore holds one label's float map at a time; the masks must not change."""
    image = _oblique_volume()
    prepared = prepare(image, _card(spatial_dims=3, spacing=spacing, normalization=WINDOW), size_divisor=4)
    rng = np.random.default_rng(3)
    maps = (rng.random((1, 3, *prepared.batch.shape[2:])) > 0.6).astype(np.float32)
    binary = restore(prepared, maps, "linear", threshold=0.5)
    assert binary.dtype == np.uint8 and binary.shape == (3, *reversed(image.GetSize()))
    np.testing.assert_array_equal(binary, (restore(prepared, maps, "linear") > 0.5).astype(np.uint8))


def test_labels_follow_the_image_onto_the_model_grid():
    image = _oblique_volume()
    card = _card(spatial_dims=3, spacing=[1.1, 0.9, 2.5])
    label_array = np.zeros((8, 20, 24), np.uint8)
    label_array[2:6, 5:15, 6:18] = 3
    label = image_from_array(label_array, image, sitk.sitkUInt8)
    resampled = resample_to_model_grid(image, card)
    on_model = resample_labels_to_model_grid(label, card, resampled)
    assert on_model.GetPixelID() == sitk.sitkUInt8
    assert on_model.GetSize() == resampled.GetSize() and on_model.GetOrigin() == resampled.GetOrigin()
    assert on_model.GetDirection() == resampled.GetDirection()
    values = sitk.GetArrayViewFromImage(on_model)
    assert set(np.unique(values)) == {0, 3}
    # Physical volume of the box is kept within one model voxel layer: 4*10*12 input voxels.
    box_mm3 = 4 * 10 * 12 * np.prod(SPACING)
    assert abs((values == 3).sum() * np.prod(resampled.GetSpacing()) - box_mm3) < 0.2 * box_mm3


def test_same_anatomy_stored_with_flipped_axes_gives_the_same_slices():
    """A RAS-flipped NIfTI-style volume and its LPS twin must reach the network identically."""
    from DiffusionSegLib.models.card import ModelCard
    from DiffusionSegLib.pipeline.preprocess import prepare, restore

    lps, ras = _lps_and_ras_twins(slices=4, seed=3)
    card = ModelCard(name="o", normalization={"kind": "zscore"})
    a, b = prepare(lps, card), prepare(ras, card)
    assert np.allclose(a.batch, b.batch, atol=1e-6)
    # Outputs go back onto each file's own grid.
    back_lps = restore(a, a.batch[:, :1], "nearest")[0]
    back_ras = restore(b, b.batch[:, :1], "nearest")[0]
    assert back_ras.shape == sitk.GetArrayViewFromImage(lps).shape
    assert np.allclose(back_ras, back_lps[:, ::-1, ::-1], atol=1e-6)


def _whole_grid_resample(prepared, volume: np.ndarray, interpolation: str) -> np.ndarray:
    """The reference: one Resample of a (model spatial) map onto the whole input grid."""
    from DiffusionSegLib.pipeline.preprocess import _INTERPOLATORS

    out = sitk.Resample(prepared.model_grid.scalar_image(volume), prepared.reference, sitk.Transform(),
                        _INTERPOLATORS[interpolation], 0.0, sitk.sitkFloat32, True)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
@pytest.mark.parametrize("fields", [
    dict(spatial_dims=3, spacing=[1.1, 0.9, 2.5], patch_size=[16, 16, 8]),
    dict(spatial_dims=2, spacing=[0.5, 0.7], slice_axis=0),
    dict(spatial_dims=2, spacing=[0.5, 0.7], slice_axis=2),
])
def test_restore_resamples_only_where_a_map_is_non_zero_with_the_same_numbers(interpolation, fields, monkeypatch):
    """Blobs inside, blobs touching the model grid's border (whose value extrapolates outwards) and an
    empty map, on an oblique anisotropic input: every voxel equals the whole-grid resample's, and a
    small blob is resampled onto a sub-box of the input grid, not the whole grid."""
    image = _oblique_volume()
    prepared = prepare(image, _card(normalization=WINDOW, **fields), size_divisor=8)
    size = prepared.model_grid.size[::-1]  # model spatial, array order
    rng = np.random.default_rng(0)
    inner = np.zeros(size, np.float32)
    inner[tuple(slice(n // 2 - 1, n // 2 + 1) for n in size)] = rng.random((2,) * len(size)) + 0.2
    border = np.zeros(size, np.float32)
    border[(slice(0, 2),) + tuple(slice(0, 3) for _ in size[1:])] = 1.0
    border[-1, -1, -1] = 0.7
    volumes = np.stack([inner, border, np.zeros(size, np.float32)])  # (3, *model spatial)
    targets = []
    real_resample = sitk.Resample
    monkeypatch.setattr(sitk, "Resample", lambda *a, **k: targets.append(a[1].GetSize()) or real_resample(*a, **k))
    restored = restore(prepared, _in_batch_layout(prepared, volumes), interpolation)
    monkeypatch.undo()
    whole = np.stack([_whole_grid_resample(prepared, volume, interpolation) for volume in volumes])
    # A sub-box's origin is its own rounded point: interpolation weights may differ by ~1e-16.
    np.testing.assert_allclose(restored, whole, rtol=0, atol=1e-12)
    thresholded = restore(prepared, _in_batch_layout(prepared, volumes), interpolation, threshold=0.5)
    np.testing.assert_array_equal(thresholded, (whole > 0.5).astype(np.uint8))
    assert restored[1].any() and not restored[2].any()
    assert len(targets) == 2  # the empty map is not resampled at all
    assert np.prod(targets[0]) < np.prod(image.GetSize()) / 2  # the inner blob: a sub-box


def test_nonzero_region_of_an_empty_map_is_empty_and_a_full_map_is_the_whole_grid():
    from DiffusionSegLib.pipeline.preprocess import Grid, nonzero_region

    image = _oblique_volume()
    grid = Grid.of(image)
    assert nonzero_region(grid, np.zeros(SIZE[::-1]), grid).size == 0
    whole = nonzero_region(grid, np.ones(SIZE[::-1]), grid)
    assert (whole.start, whole.stop) == ((0, 0, 0), SIZE)


def test_nonzero_region_reaches_past_a_grid_border_where_values_extrapolate():
    """Points beyond the source grid take its border voxel (nearest extrapolation): a non-zero voxel on
    the border of a small source paints the whole far side of a larger target."""
    from DiffusionSegLib.pipeline.preprocess import Grid, nonzero_region

    source = sitk.Image([4, 4], sitk.sitkFloat32)
    values = np.zeros((4, 4), np.float32)
    values[1, 0] = 1.0  # x = 0: the source's left border
    source = sitk.GetImageFromArray(values)
    target = sitk.Image([21, 21], sitk.sitkUInt8)
    target.SetOrigin((-10.0, -10.0))
    out = sitk.GetArrayFromImage(sitk.Resample(source, target, sitk.Transform(), sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32, True))
    region = nonzero_region(Grid.of(source), values, Grid.of(target))
    inside = np.zeros(out.shape, bool)
    inside[region.slices()] = True
    assert out[:, 0].any()  # the far left column of the target is painted
    assert not out[~inside].any()
