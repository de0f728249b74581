"""Tests of DiffusionSegLib.pipeline.io: reading (files, DICOM folders, pictures), validation, atomic writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import write_dicom_series

from DiffusionSegLib.core.errors import DiffusionSegError, InputImageError
from DiffusionSegLib.pipeline.io import (
    array_with_channels,
    image_from_array,
    read_image,
    read_label,
    validate_image,
    write_image_atomic,
)


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _volume(shape_zyx=(4, 6, 5), dtype=np.int16) -> sitk.Image:
    """A ramp volume with non-trivial geometry."""
    array = (np.arange(np.prod(shape_zyx)).reshape(shape_zyx) * 3 - 20).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    image.SetDirection(_rotation_z(10).ravel().tolist())
    return image


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin())
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_volume_formats_keep_values_and_geometry(tmp_path, suffix):
    image = _volume()
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(image, str(path))
    loaded = read_image(path)
    assert loaded.GetDimension() == 3 and loaded.GetNumberOfComponentsPerPixel() == 1
    assert _same_geometry(loaded, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(image))


def test_read_pictures_gray_rgb_and_rgba(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(7, 9, 4), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "rgba.png"))
    sitk.WriteImage(sitk.GetImageFromArray(rgba[..., :3].copy(), isVector=True), str(tmp_path / "rgb.png"))
    sitk.WriteImage(sitk.GetImageFromArray(rgba[..., 0].copy()), str(tmp_path / "gray.png"))

    for name in ("rgba.png", "rgb.png"):
        image = read_image(tmp_path / name)
        assert image.GetDimension() == 2 and image.GetNumberOfComponentsPerPixel() == 3
        assert image.GetSize() == (9, 7)
        # Alpha dropped, the colour channels untouched.
        np.testing.assert_array_equal(array_with_channels(image), np.moveaxis(rgba[..., :3], -1, 0).astype(np.float32))
    gray = read_image(tmp_path / "gray.png")
    assert gray.GetNumberOfComponentsPerPixel() == 1
    assert array_with_channels(gray).shape == (1, 7, 9)


def _oblique_single_slice(dtype=np.int16) -> sitk.Image:
    """One slice (size (5, 6, 1)) tilted out of the axial plane: 25 degrees about x, then 10 about z."""
    image = _volume(shape_zyx=(1, 6, 5), dtype=dtype)
    t = np.deg2rad(25)
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])
    image.SetDirection((tilt @ _rotation_z(10)).ravel().tolist())
    image.SetSpacing((0.7, 0.9, 2.5))
    return image


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_single_slice_volume_stays_3d_with_its_geometry(tmp_path, suffix):
    """A 1-slice volume is a volume: no axis dropped, the oblique 3D direction and the origin kept."""
    image = _oblique_single_slice()
    path = tmp_path / f"slice{suffix}"
    sitk.WriteImage(image, str(path))
    loaded = read_image(path)
    assert loaded.GetDimension() == 3 and loaded.GetSize() == (5, 6, 1)
    assert _same_geometry(loaded, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(image))


def test_single_slice_label_stays_3d_like_its_image(tmp_path):
    label = sitk.GetImageFromArray(np.zeros((1, 6, 5), np.uint8))  # a case without foreground
    label.CopyInformation(_oblique_single_slice())
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    loaded = read_label(tmp_path / "label.nii.gz")
    assert loaded.GetDimension() == 3 and _same_geometry(loaded, label)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_a_trailing_length_1_fourth_axis_is_dropped_but_a_single_slice_kept(tmp_path, suffix):
    """(x, y, z, 1) is a 3D volume; (x, y, 1, 1) is a 1-slice 3D volume, not a 2D image."""
    for depth in (3, 1):
        array = np.arange(depth * 30, dtype=np.float32).reshape(depth, 6, 5)
        four = sitk.JoinSeries([sitk.GetImageFromArray(array)])  # size (5, 6, depth, 1)
        sitk.WriteImage(four, str(tmp_path / f"four{suffix}"))
        loaded = read_image(tmp_path / f"four{suffix}")
        assert loaded.GetDimension() == 3 and loaded.GetSize() == (5, 6, depth)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), array)
        four_label = sitk.JoinSeries([sitk.GetImageFromArray(array.astype(np.uint8))])
        sitk.WriteImage(four_label, str(tmp_path / f"four_label{suffix}"))
        assert read_label(tmp_path / f"four_label{suffix}").GetSize() == (5, 6, depth)


def test_dicom_folder_reads_the_largest_series_as_3d(tmp_path):
    volume = _volume(shape_zyx=(4, 6, 5))
    folder = tmp_path / "dicom"
    write_dicom_series(folder, volume, "1.2.826.0.1.3680043.9.7.2")
    # A second, smaller series (e.g. a localizer) in the same folder must not be picked.
    write_dicom_series(folder, _volume(shape_zyx=(2, 6, 5)), "1.2.826.0.1.3680043.9.7.3", first_instance=50)
    loaded = read_image(folder)
    assert loaded.GetDimension() == 3
    assert _same_geometry(loaded, volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(volume))


def test_single_slice_dicom_folder_reads_as_a_3d_volume_with_its_geometry(tmp_path):
    volume = _oblique_single_slice()
    folder = tmp_path / "dicom1"
    write_dicom_series(folder, volume, "1.2.826.0.1.3680043.9.7.4")
    loaded = read_image(folder)
    assert loaded.GetDimension() == 3 and loaded.GetSize() == (5, 6, 1)
    assert np.allclose(loaded.GetOrigin(), volume.GetOrigin(), atol=1e-5)
    assert np.allclose(loaded.GetDirection(), volume.GetDirection(), atol=1e-5)
    assert np.allclose(loaded.GetSpacing()[:2], volume.GetSpacing()[:2])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(volume))


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    """One file (or folder) per way an input can be unusable."""
    paths: dict[str, Path] = {"missing": tmp_path / "missing.nii.gz"}
    good = sitk.GetImageFromArray(np.random.default_rng(1).random((6, 7, 8)).astype(np.float32))
    sitk.WriteImage(good, str(tmp_path / "good.nii.gz"))
    sitk.WriteImage(good, str(tmp_path / "good.nii"))
    for name in ("good.nii.gz", "good.nii"):
        data = (tmp_path / name).read_bytes()
        paths[f"truncated {name}"] = tmp_path / f"truncated_{name}"
        paths[f"truncated {name}"].write_bytes(data[: len(data) * 2 // 3])
    paths["text renamed nrrd"] = tmp_path / "notes.nrrd"
    paths["text renamed nrrd"].write_text("these are not voxels\n")
    paths["zero voxels"] = tmp_path / "empty.nrrd"
    paths["zero voxels"].write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 0 4 4\nencoding: raw\n\n")
    paths["4D"] = tmp_path / "series4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([good, good]), str(paths["4D"]))
    for components in (2, 4):
        paths[f"{components} components"] = tmp_path / f"vector{components}.nrrd"
        vector = np.random.default_rng(2).random((3, 4, 5, components)).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(vector, isVector=True), str(paths[f"{components} components"]))
    for label, value in (("NaN", np.nan), ("Inf", np.inf)):
        array = np.random.default_rng(3).random((3, 4, 5)).astype(np.float32)
        array[1, 2, 3] = value
        paths[label] = tmp_path / f"{label}.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(paths[label]))
    paths["constant"] = tmp_path / "constant.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), 7, np.int16)), str(paths["constant"]))
    paths["size-1 x axis"] = tmp_path / "line.nrrd"
    line = np.arange(12, dtype=np.float32).reshape(3, 4, 1)  # (z, y, x): size (1, 4, 3)
    sitk.WriteImage(sitk.GetImageFromArray(line), str(paths["size-1 x axis"]))
    paths["folder without DICOM"] = tmp_path / "not_dicom"
    paths["folder without DICOM"].mkdir()
    (paths["folder without DICOM"] / "readme.txt").write_text("nothing here")
    return paths


# What each bad input's message must say (the reason the user can act on).
_EXPECTED_REASON = {
    "missing": "not found",
    "truncated good.nii.gz": "truncated",
    "truncated good.nii": "truncated",
    "text renamed nrrd": "cannot read image",
    "zero voxels": "cannot read image",  # the NRRD reader itself refuses a zero-length axis
    "4D": "4D images are not supported",
    "2 components": "2 components",
    "4 components": "4 components",
    "NaN": "NaN or infinite",
    "Inf": "NaN or infinite",
    "constant": "constant",
    "size-1 x axis": "length-1 x or y axis",
    "folder without DICOM": "no DICOM series",
}


def test_every_bad_input_raises_one_line_input_image_error_naming_the_file(tmp_path):
    bad = _bad_inputs(tmp_path)
    assert set(bad) == set(_EXPECTED_REASON)
    for reason, path in bad.items():
        with pytest.raises(InputImageError) as info:
            read_image(path)
        message = str(info.value)
        assert str(path) in message, reason
        assert _EXPECTED_REASON[reason] in message, (reason, message)
        assert "\n" not in message, reason


def test_good_inputs_next_to_the_bad_ones_still_read(tmp_path):
    _bad_inputs(tmp_path)
    for name in ("good.nii.gz", "good.nii"):
        assert read_image(tmp_path / name).GetSize() == (8, 7, 6)


def test_validate_image_in_memory():
    validate_image(_volume(shape_zyx=(1, 6, 5)), "one-slice volume")  # z = 1 is a valid 3D volume
    with pytest.raises(InputImageError, match="my volume.*empty"):
        validate_image(sitk.Image([0, 0, 0], sitk.sitkFloat32), "my volume")
    with pytest.raises(InputImageError, match="my volume.*NaN"):
        nan = np.ones((3, 4, 5), np.float32)
        nan[0, 0, 0] = np.nan
        validate_image(sitk.GetImageFromArray(nan), "my volume")
    with pytest.raises(InputImageError, match="constant"):
        validate_image(sitk.Image([4, 5, 3], sitk.sitkInt16), "blank")
    with pytest.raises(InputImageError, match="not a SimpleITK image"):
        validate_image(np.zeros((3, 4)), "array")


def test_write_image_atomic_writes_and_leaves_only_the_output(tmp_path):
    image = _volume()
    out = tmp_path / "result.nii.gz"
    write_image_atomic(image, out)
    write_image_atomic(image, out)  # overwriting an existing output works too
    assert os.listdir(tmp_path) == ["result.nii.gz"]
    loaded = sitk.ReadImage(str(out))
    assert _same_geometry(loaded, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(image))


def test_write_image_atomic_failure_leaves_nothing(tmp_path):
    image = _volume()
    with pytest.raises(DiffusionSegError, match="does not exist"):
        write_image_atomic(image, tmp_path / "no_such_folder" / "out.nii.gz")
    with pytest.raises(DiffusionSegError, match="out.unknownformat"):
        write_image_atomic(image, tmp_path / "out.unknownformat")  # SimpleITK has no writer for it
    assert os.listdir(tmp_path) == []


def test_array_with_channels_and_image_from_array():
    rgb = sitk.GetImageFromArray(np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3), isVector=True)
    array = array_with_channels(rgb)
    assert array.dtype == np.float32 and array.shape == (3, 2, 3, 4)
    assert array[1, 1, 2, 3] == sitk.GetArrayViewFromImage(rgb)[1, 2, 3, 1]

    reference = _volume()
    mask = image_from_array(np.ones((4, 6, 5), np.float32), reference, sitk.sitkUInt8)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert _same_geometry(mask, reference)
    with pytest.raises(ValueError):
        image_from_array(np.ones((5, 6, 4), np.float32), reference)


def test_dicom_folder_keeps_its_modality_tag(tmp_path):
    """The input check names the modality from (0008,0060); a series read must carry it."""
    volume = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.int16))
    write_dicom_series(tmp_path / "series", volume, "1.2.826.0.1.3680043.9.7.2")
    image = read_image(tmp_path / "series")
    assert image.GetMetaData("0008|0060") == "CT"
