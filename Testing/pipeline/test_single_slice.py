"""A single-slice 3D input (1-slice NIfTI, 1-slice DICOM series) is segmented as a volume with one
slice: every output file is 3D with exactly the input's size, origin, spacing and direction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import make_model
from DiffusionSegLib.pipeline.segment import segment_file
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.pipeline.io import read_image
from DiffusionSegLib.outputs.writers import ijk_to_lps, write_outputs
from helpers import write_dicom_series

SIZE = (26, 30, 1)  # SimpleITK (x, y, z): one slice
SPACING = (0.9, 1.4, 3.5)
ORIGIN = (-20.0, 12.5, 7.0)


def _tilted_direction() -> np.ndarray:
    """Rotated 0.35 rad about z, then tilted 0.35 rad about x: oblique to every patient axis."""
    c, s = np.cos(0.35), np.sin(0.35)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _single_slice() -> sitk.Image:
    """One oblique slice holding a bright ellipse on noise (int16, as scanners store CT)."""
    yy, xx = np.mgrid[:SIZE[1], :SIZE[0]]
    array = 100.0 * (((xx - 13) / 8.0) ** 2 + ((yy - 15) / 10.0) ** 2 < 1)
    array += np.random.default_rng(0).normal(0, 5, array.shape)
    image = sitk.GetImageFromArray(array[None].astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(_tilted_direction().ravel().tolist())
    return image


@pytest.fixture(scope="module")
def model_2mm(tmp_path_factory) -> Path:
    """A 2D model at 2 mm in-plane: the slice is reoriented, resampled and restored."""
    return make_model(tmp_path_factory.mktemp("m") / "tiny_2mm_single", spacing=[2.0, 2.0])


def _assert_on_grid(image: sitk.Image, reference: sitk.Image, name: str) -> None:
    assert image.GetDimension() == 3, f"{name} is {image.GetDimension()}D"
    assert image.GetSize() == reference.GetSize(), name
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4), name
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5), name
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5), name


def _check_outputs(input_path: Path, model: Path, out: Path) -> None:
    """Segment ``input_path``, write every output and check each one against the input's grid."""
    reference = read_image(input_path)
    assert reference.GetDimension() == 3 and reference.GetSize() == SIZE
    result = segment_file(input_path, model, SegmentSettings(samples=2, steps=2, keep_samples=True))
    for name in ("probability", "fused", "consistency", "ambiguity", "uncertainty", "refined"):
        assert getattr(result, name).shape == (1, 1, SIZE[1], SIZE[0]), name
    written = write_outputs(result, out, keep_samples=True)
    niftis = sorted(out.rglob("*.nii.gz"))
    assert len(niftis) == 8  # fused, crf, consistency, ambiguity, probability, uncertainty, 2 samples
    for path in niftis:
        _assert_on_grid(sitk.ReadImage(str(path)), reference, path.name)
    import slicerio

    segmentation = slicerio.read_segmentation(str(written["segmentation"]))
    assert segmentation["voxels"].shape[-3:] == SIZE  # (i, j, k)
    assert np.allclose(segmentation["ijkToLPS"], ijk_to_lps(reference), atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["size"] == list(SIZE)
    assert np.allclose(report["input"]["origin"], reference.GetOrigin())
    assert np.allclose(report["input"]["direction"], reference.GetDirection())
    assert "volumes_ml" in report and "areas_mm2" not in report
    assert report["slices_or_patches"] == 1


def test_single_slice_nifti_outputs_keep_the_3d_input_grid(tmp_path, model_2mm):
    image = _single_slice()
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(image, str(path))
    _check_outputs(path, model_2mm, tmp_path / "out")
    # The grid is the file's own, not an in-plane reduction of it.
    written = sitk.ReadImage(str(tmp_path / "out" / "fused.nii.gz"))
    assert np.allclose(written.GetOrigin(), ORIGIN, atol=1e-4)
    assert np.allclose(written.GetSpacing(), SPACING, atol=1e-5)
    assert np.allclose(written.GetDirection(), _tilted_direction().ravel(), atol=1e-5)


def test_single_slice_dicom_folder_outputs_keep_the_3d_input_grid(tmp_path, model_2mm):
    image = _single_slice()
    folder = tmp_path / "dicom"
    write_dicom_series(folder, image, "1.2.826.0.1.3680043.9.7.21")
    assert len(list(folder.iterdir())) == 1
    _check_outputs(folder, model_2mm, tmp_path / "out")
    written = sitk.ReadImage(str(tmp_path / "out" / "fused.nii.gz"))
    assert np.allclose(written.GetOrigin(), ORIGIN, atol=1e-4)
    assert np.allclose(written.GetSpacing()[:2], SPACING[:2], atol=1e-5)
    assert np.allclose(written.GetDirection(), _tilted_direction().ravel(), atol=1e-5)


def test_3d_model_refuses_a_single_slice_file_with_a_clear_error(tmp_path, tiny_3d_model):
    from DiffusionSegLib.core.errors import InputImageError

    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(_single_slice(), str(path))
    with pytest.raises(InputImageError, match="single slice"):
        segment_file(path, tiny_3d_model, SegmentSettings(samples=1, steps=1))
