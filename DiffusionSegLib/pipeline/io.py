"""Reading and writing images with SimpleITK; the only module that opens image files.

Images are ``SimpleITK.Image`` objects: 2D or 3D, scalar or 3-component vector (RGB). Arrays
follow SimpleITK array order: spatial = (z, y, x) for 3D, (y, x) for 2D, with the channel axis
first, (C, *spatial), wherever a channel axis exists.

Accepted inputs of :func:`read_image`: any single file SimpleITK reads (NIfTI, NRRD, MHA, ...),
a folder holding a DICOM series (the series with the most files is read), and 2D PNG/JPEG
photographs (grayscale or RGB; the alpha channel of RGBA images is dropped).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.core.errors import DatasetError, DiffusionSegError, InputImageError

log = logging.getLogger(__name__)

# 2D picture formats whose 4th (RGBA) component is transparency, not image content.
_PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_COMPLEX_PIXELS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read an image file or DICOM folder as a validated 2D/3D scalar or RGB image.

    A 3D image stays 3D, a single slice (z = 1) included, so every output keeps its 3D origin,
    spacing and direction; only trailing length-1 axes beyond the third ((x, y, z, 1) volumes)
    are dropped, and the (x, y, 1) form of a 2D picture format. Raises InputImageError (one
    line, naming ``path``) when the path is missing, the file is unreadable, corrupt or
    truncated, or the content fails :func:`validate_image`.
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"image not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise InputImageError(
                f"cannot read image {path}: corrupt, truncated or not an image format SimpleITK reads"
            ) from err
        _check_nifti_complete(path)
        _check_nifti_finite(path)
        if image.GetNumberOfComponentsPerPixel() == 4 and path.suffix.lower() in _PICTURE_SUFFIXES:
            image = _drop_alpha(image)
    image = _drop_extra_axes(image, str(path), picture=path.suffix.lower() in _PICTURE_SUFFIXES)
    validate_image(image, str(path))
    return image


def read_label(path: str | os.PathLike) -> sitk.Image:
    """A label map as a scalar integer image, length-1 axes handled as for images (a 1-slice
    volume stays 3D).

    Not :func:`read_image`: a label map may legitimately be constant (a case without foreground),
    which read_image rejects for images. The truncation check and the axis handling are the same,
    so a label keeps exactly the geometry its image gets. Raises DatasetError naming the file.
    """
    path = Path(path)
    try:
        label = sitk.ReadImage(str(path))
        _check_nifti_complete(path)
    except (RuntimeError, DiffusionSegError) as err:
        raise DatasetError(f"unreadable label file {path.name}: corrupt, truncated or not an image") from err
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"label file {path.name}: expected a scalar label map, found "
                           f"{label.GetNumberOfComponentsPerPixel()} components per voxel")
    label = _drop_extra_axes(label, str(path), picture=path.suffix.lower() in _PICTURE_SUFFIXES)
    if label.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        label = sitk.Cast(sitk.Round(label), sitk.sitkInt32)  # float label maps store integers
    return label


def validate_image(image: sitk.Image, name: str) -> None:
    """Check that ``image`` is something a model can take; raise InputImageError naming ``name``.

    Rejects: non-images, dimensions other than 2 or 3, component counts other than 1 or 3,
    complex pixels, 0 voxels, a length-1 axis other than the last axis of a 3D image, NaN/Inf
    voxels, and constant images (nothing to segment; also the usual sign of a blank export).
    """
    if not isinstance(image, sitk.Image):
        raise InputImageError(f"{name}: not a SimpleITK image ({type(image).__name__})")
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InputImageError(f"{name}: {dim}D images are not supported (2D or 3D only), size {image.GetSize()}")
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (1, 3):
        raise InputImageError(
            f"{name}: {components} components per voxel; only scalar (1) or RGB (3) images are supported"
        )
    if image.GetPixelID() in _COMPLEX_PIXELS:
        raise InputImageError(f"{name}: complex-valued images are not supported")
    size = image.GetSize()
    if image.GetNumberOfPixels() == 0:
        raise InputImageError(f"{name}: the image is empty (size {size})")
    # A 3D volume may hold one slice (z = 1); a length-1 x or y axis means a line, not an image.
    if any(n == 1 for n in size[:2]):
        raise InputImageError(f"{name}: size {size} has a length-1 x or y axis; not an image to segment")
    view = sitk.GetArrayViewFromImage(image)
    # NaN propagates to min/max and +-Inf becomes one of them: no full-size boolean temporary.
    low, high = view.min(), view.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputImageError(f"{name}: the image contains NaN or infinite values")
    if low == high:
        raise InputImageError(f"{name}: the image is constant (every voxel is {low}); nothing to segment")


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write ``image`` to ``path`` through a temporary file in the same folder, then rename.

    The temporary name keeps the extension (``.nii.gz``, ``.nrrd``...) so SimpleITK picks the
    same format. On any failure nothing is left behind and DiffusionSegError names ``path``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise DiffusionSegError(f"cannot write {path}: folder {path.parent} does not exist")
    suffix = _format_suffix(path)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; SimpleITK creates the file
    # with the usual umask-derived permissions.
    stem = path.name[: len(path.name) - len(suffix)]
    tmp = path.with_name(f".{stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    except RuntimeError as err:
        raise DiffusionSegError(f"cannot write {path}: SimpleITK could not write this format or location") from err
    except OSError as err:
        raise DiffusionSegError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def array_with_channels(image: sitk.Image) -> np.ndarray:
    """Voxel values as float32 (C, *spatial) in SimpleITK array order; C = 1 (scalar) or 3 (RGB)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if image.GetNumberOfComponentsPerPixel() == 1:
        return array[None]
    return np.ascontiguousarray(np.moveaxis(array, -1, 0))


def image_from_array(array: np.ndarray, reference: sitk.Image, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """Scalar image of ``array`` (spatial, SimpleITK array order) on exactly ``reference``'s grid.

    ``reference`` may be a vector (RGB) image; only its size, origin, spacing and direction are used.
    """
    expected = tuple(reversed(reference.GetSize()))
    if array.shape != expected:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {expected}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    if image.GetPixelID() != pixel_type:
        image = sitk.Cast(image, pixel_type)
    image.SetOrigin(reference.GetOrigin())
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    return image


DICOM_MODALITY_TAG = "0008|0060"  # (0008,0060) Modality: CT, MR, ...


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """The series of ``folder`` with the most files, as one volume."""
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as err:
        raise InputImageError(f"cannot scan folder {folder} for DICOM files") from err
    if not series_ids:
        raise InputImageError(f"no DICOM series found in folder {folder}")
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids]
    files = max(series, key=len)
    if len(series) > 1:
        log.info("%s holds %d DICOM series; reading the largest (%d files)", folder, len(series), len(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # keep the tags: the input check reads the Modality
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputImageError(f"cannot read the DICOM series in {folder}: corrupt or incomplete files") from err
    if reader.HasMetaDataKey(0, DICOM_MODALITY_TAG):
        image.SetMetaData(DICOM_MODALITY_TAG, reader.GetMetaData(0, DICOM_MODALITY_TAG).strip())
    return image


def _drop_alpha(image: sitk.Image) -> sitk.Image:
    """RGBA picture -> RGB (the transparency channel is not image content)."""
    rgb = [sitk.VectorIndexSelectionCast(image, k) for k in range(3)]
    out = sitk.Compose(rgb)
    out.CopyInformation(image)
    return out


def _drop_extra_axes(image: sitk.Image, name: str, picture: bool) -> sitk.Image:
    """Drop trailing length-1 axes that carry no geometry: beyond the third ((x, y, z, 1) is a 3D
    volume), and the third of a 2D picture format read as (x, y, 1).

    A 3D volume with one slice keeps its third axis: its origin, slice spacing and 3D direction
    are real geometry (an oblique slice cannot be described in 2D), and the outputs must carry it.
    """
    keep = 2 if picture else 3
    while image.GetDimension() > keep and image.GetSize()[-1] == 1:
        image = _drop_last_axis(image, name)
    return image


def _drop_last_axis(image: sitk.Image, name: str) -> sitk.Image:
    """Remove a trailing length-1 axis, keeping origin, spacing and the remaining direction block.

    Only called for axes without geometry of their own (see :func:`_drop_extra_axes`). The
    direction block is kept when it is still orthonormal (the kept axes are perpendicular to the
    dropped one); otherwise the geometry cannot be expressed in fewer dimensions and the identity
    is used.
    """
    dim = image.GetDimension()
    block = np.array(image.GetDirection()).reshape(dim, dim)[: dim - 1, : dim - 1]
    extractor = sitk.ExtractImageFilter()
    extractor.SetSize([*image.GetSize()[:-1], 0])
    extractor.SetIndex([0] * dim)
    if np.allclose(block.T @ block, np.eye(dim - 1), atol=1e-4):
        extractor.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    else:
        log.warning("%s: the kept axes are oblique to the dropped axis; using identity direction", name)
        extractor.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOIDENTITY)
    return extractor.Execute(image)


def _format_suffix(path: Path) -> str:
    """The extension SimpleITK looks at: ``.nii.gz`` for gzip-wrapped names, else the last suffix."""
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".gz":
        return "".join(suffixes[-2:])
    return path.suffix


def _check_nifti_complete(path: Path) -> None:
    """Raise InputImageError if a NIfTI file holds fewer voxel bytes than its header announces.

    ITK's NIfTI reader fills a truncated file (plain or gzip) with zeros without an error, which
    would be segmented as if real; other formats (NRRD, MHA, PNG) already fail on truncation.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            header, total = _gzip_head_and_length(path, 540)
        else:
            total = path.stat().st_size
            with open(path, "rb") as f:
                header = f.read(540)
    except (OSError, EOFError, zlib.error) as err:
        raise InputImageError(f"cannot read image {path}: truncated or corrupt compressed data") from err
    needed = _nifti_bytes_needed(header)
    if needed is not None and total < needed:
        raise InputImageError(f"cannot read image {path}: truncated file ({total} of {needed} bytes)")


def _check_nifti_finite(path: Path) -> None:
    """Raise InputImageError if a floating-point NIfTI file stores NaN or infinite voxels.

    ITK's NIfTI reader silently turns NaN/Inf into 0, so validate_image cannot see them after
    reading; nibabel reads the stored values as they are.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    import nibabel

    try:
        nii = nibabel.load(str(path))
        if nii.get_data_dtype().kind != "f":
            return
        finite = np.isfinite(np.asarray(nii.dataobj)).all()
    except Exception as err:  # noqa: BLE001 - any failure here means the file is not sound
        raise InputImageError(f"cannot read image {path}: {type(err).__name__}") from err
    if not finite:
        raise InputImageError(f"{path}: the image contains NaN or infinite values")


def _gzip_head_and_length(path: Path, head_bytes: int) -> tuple[bytes, int]:
    """First ``head_bytes`` and total length of the decompressed data; EOFError when truncated."""
    head = b""
    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if len(head) < head_bytes:
                head += chunk[: head_bytes - len(head)]
            total += len(chunk)
    return head, total


def _nifti_bytes_needed(header: bytes) -> int | None:
    """vox_offset + voxel data size from a NIfTI-1/2 header; None when the header is not NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(f"{endian}i", header[:4])[0] == 348:
            ndim = struct.unpack(f"{endian}h", header[40:42])[0]
            dims = struct.unpack(f"{endian}7h", header[42:56])[: max(0, min(ndim, 7))]
            bitpix = struct.unpack(f"{endian}h", header[72:74])[0]
            offset = int(struct.unpack(f"{endian}f", header[108:112])[0])
            return max(offset, 348) + int(np.prod(dims, dtype=np.int64)) * bitpix // 8
        if len(header) >= 540 and struct.unpack(f"{endian}i", header[:4])[0] == 540:
            ndim = struct.unpack(f"{endian}q", header[16:24])[0]
            dims = struct.unpack(f"{endian}7q", header[24:80])[: max(0, min(ndim, 7))]
            bitpix = struct.unpack(f"{endian}h", header[14:16])[0]
            offset = struct.unpack(f"{endian}q", header[168:176])[0]
            return max(offset, 540) + int(np.prod(dims, dtype=np.int64)) * bitpix // 8
    return None
