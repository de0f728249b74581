"""Per-model-card preprocessing (resample, normalize, pad) and its exact inverse.

Conventions. Arrays are in SimpleITK array order: a volume is (z, y, x), a 2D image (y, x),
with the channel axis first where there is one. ``card.spacing`` is in SimpleITK (x, y[, z])
order; for a 2D model its two entries are the in-plane spacing along the slice's columns (W)
then rows (H). ``card.slice_axis`` is the numpy axis of the (z, y, x) volume a 2D model slices
along (0 = axial); the slice's (H, W) are the two remaining axes in their array order. A 3D
volume holding a single slice is a volume like any other (reoriented, S = 1 slice for a 2D
model, restored onto its own 3D grid); a 3D model refuses it, and so does a 2D model whose
slices lie in another plane than that single slice.

Pipeline of :func:`prepare`:

1. Resample onto the model grid, in the image's own index frame: same origin and direction,
   new spacing, size = round(old_size * old_spacing / new_spacing). The voxel axes stay the
   image's axes, so oblique images are never rotated and the inverse is a resampling back onto
   the input grid. A 2D model keeps the slice axis untouched (each model slice is an input slice).
2. Normalize per ``card.normalization`` (see :func:`normalize`); a ``by_modality`` card first picks
   the entry for the input's modality (:func:`modality_normalization`, on the image as given).
3. Arrange as a batch and pad the spatial axes at both ends with the per-channel minimum of the
   normalized image (CT air stays air) to multiples of ``size_divisor`` and at least
   ``card.patch_size``.

:func:`restore` crops the padding and resamples network outputs back onto exactly the input grid.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.core.errors import InputImageError, ModelLoadError
from DiffusionSegLib.pipeline.io import array_with_channels
from DiffusionSegLib.models.card import ModelCard
from DiffusionSegLib.pipeline.modality import input_modality

# Spacings within this relative tolerance are the same grid (NIfTI stores float32 spacings).
_SPACING_RTOL = 1e-5
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
NORMALIZATION_KINDS = ("ct_window", "zscore", "rgb", "minmax")  # what :func:`normalize` computes
BY_MODALITY = "by_modality"  # one of NORMALIZATION_KINDS per input modality (see :func:`modality_normalization`)
# Entry names of a by_modality normalization: DICOM Modality codes ("CT", "MR", "PT"...: upper-case
# letters, digits, underscore, at most 16) and "RGB", as pipeline.modality.input_modality names inputs.
_ENTRY_NAME = re.compile(r"[A-Z0-9_]{1,16}")


@dataclass(frozen=True)
class Grid:
    """Geometry of an image grid, all in SimpleITK (x, y[, z]) order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major dim x dim matrix; column k = physical direction of axis k

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def scalar_image(self, array: np.ndarray) -> sitk.Image:
        """Float32 scalar image of ``array`` (SimpleITK array order) on this grid."""
        if array.shape != tuple(reversed(self.size)):
            raise ValueError(f"array shape {array.shape} does not fit grid size {self.size}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass
class PreparedInput:
    """The network input of one image and what :func:`restore` needs to undo the preprocessing.

    ``batch`` is float32, (S, C, H, W) for 2D models (S slices along ``slice_axis``; a 2D image
    gives S = 1) or (1, C, D, H, W) for 3D models, padded. It is also the image the CRF uses:
    it lies on the same (padded) model grid as the network outputs.
    """

    batch: np.ndarray
    reference: sitk.Image  # the input image: restore() resamples onto exactly its grid
    model_grid: Grid  # grid of the resampled, unpadded image
    spatial_dims: int  # of the model: 2 or 3
    slice_axis: int | None  # numpy axis of the model-grid (z, y, x) volume stacked into S; None: no stacking
    crop: tuple[slice, ...]  # selects the image inside the padded spatial axes, (H, W) or (D, H, W)
    resampled: bool  # False when the model grid is the input grid (restore only crops)
    # The normalization applied ({"kind": "zscore"}...): the card's, or for a by_modality card the
    # entry chosen for this image, whose name is normalization_used ("CT", "MR"; None: single normalization).
    normalization: dict[str, Any] = field(default_factory=dict)
    normalization_used: str | None = None
    context_slices: int = 0  # 2.5D: batch channels are (2k + 1) blocks of the image's C channels, centre block k
    task_channels: int = 0  # a multi-task model: the last channels of the batch are its task planes

    @property
    def image_for_crf(self) -> np.ndarray:
        """The normalized padded image (its own slices, not the 2.5D neighbours) channel-first like the
        ensemble maps: (C, S, H, W) or (C, D, H, W)."""
        image_channels = self.batch.shape[1] - self.task_channels
        if self.spatial_dims == 2:
            per_slice = image_channels // (2 * self.context_slices + 1)
            centre = self.batch[:, self.context_slices * per_slice:(self.context_slices + 1) * per_slice]
            return np.moveaxis(centre, 1, 0)
        return self.batch[0, :image_channels]


def model_spacing(image: sitk.Image, card: ModelCard) -> tuple[float, ...]:
    """Spacing (SimpleITK order) of the model grid of ``image``; the image's own when card.spacing is None."""
    old = tuple(image.GetSpacing())
    _check_dims(image, card)
    if card.spacing is None:
        return old
    if len(card.spacing) != card.spatial_dims:
        raise ModelLoadError(
            f"model card '{card.name}': spacing {card.spacing} must have {card.spatial_dims} entries for a "
            f"{card.spatial_dims}D model"
        )
    if card.spatial_dims == 3 or image.GetDimension() == 2:
        return tuple(float(s) for s in card.spacing)
    rows_axis, cols_axis = _in_plane_numpy_axes(card.slice_axis)
    new = list(old)
    new[2 - cols_axis] = float(card.spacing[0])  # numpy axis k is SimpleITK axis 2 - k
    new[2 - rows_axis] = float(card.spacing[1])
    return tuple(new)


def orient(image: sitk.Image, card: ModelCard) -> sitk.Image:
    """A 3D ``image`` with its voxel axes permuted/flipped to ``card.orientation`` (exact, no interpolation).

    Files store the same anatomy with different direction matrices (NIfTI often RAS-flipped, DICOM
    LPS); without this a 2D model would see the liver on the left in one file and on the right in
    another. Returns ``image`` itself when it is 2D, already oriented, or the card has no orientation.
    """
    if card.orientation is None or image.GetDimension() != 3:
        return image
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if current == card.orientation:
        return image
    return sitk.DICOMOrient(image, card.orientation)


def resample_to_model_grid(image: sitk.Image, card: ModelCard) -> sitk.Image:
    """``image`` (scalar or RGB) oriented per the card and on the model grid: linear interpolation,
    float32 pixels.

    Returns ``image`` itself when orientation and grid already agree.
    """
    image = orient(image, card)
    _check_single_slice_plane(image, card)
    spacing = model_spacing(image, card)
    if np.allclose(spacing, image.GetSpacing(), rtol=_SPACING_RTOL, atol=0.0):
        return image
    float_type = sitk.sitkFloat32 if image.GetNumberOfComponentsPerPixel() == 1 else sitk.sitkVectorFloat32
    return _resample_in_index_frame(sitk.Cast(image, float_type), spacing, sitk.sitkLinear)


def add_slice_context(volume: np.ndarray, card: ModelCard, slice_axis: int | None,
                      slice_spacing: float) -> np.ndarray:
    """2.5D input: (C, *spatial) -> (C * (2k + 1), *spatial), k = ``card.context_slices``.

    Channel block j (0..2k) holds the image at offset (j - k) * ``card.context_spacing`` mm along
    ``slice_axis`` (a numpy axis of the (z, y, x) spatial axes), linearly interpolated between the
    slices ``slice_spacing`` mm apart; past the first/last slice the edge slice is repeated. A 2D image
    (``slice_axis`` None) has no neighbours: its slice fills every block. Returns ``volume`` itself when k = 0.
    """
    slices, step_mm = card.slice_context()
    if slices == 0:
        return volume
    if slice_axis is None:
        return np.concatenate([volume] * (2 * slices + 1), axis=0)
    if not slice_spacing > 0:
        raise ValueError(f"slice_spacing must be > 0, got {slice_spacing}")
    axis = 1 + slice_axis
    count = volume.shape[axis]
    blocks = []
    for offset in range(-slices, slices + 1):
        position = np.clip(np.arange(count) + offset * step_mm / slice_spacing, 0, count - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, count - 1)
        shape = [1] * volume.ndim
        shape[axis] = count
        weight = (position - low).astype(np.float32).reshape(shape)
        blocks.append(np.take(volume, low, axis=axis) * (1 - weight) + np.take(volume, high, axis=axis) * weight)
    return np.concatenate(blocks, axis=0).astype(np.float32, copy=False)


def add_task_planes(volume: np.ndarray, card: ModelCard) -> np.ndarray:
    """The task token of a multi-task card: (C, *spatial) -> (C + T, *spatial), one constant plane per
    task (1 for the card's task, 0 for the others; ``ModelCard.task_plane_values``). Single-task cards:
    ``volume`` itself."""
    values = card.task_plane_values()
    if not values:
        return volume
    planes = np.broadcast_to(np.asarray(values, dtype=np.float32).reshape(-1, *([1] * (volume.ndim - 1))),
                             (len(values), *volume.shape[1:]))
    return np.concatenate([volume.astype(np.float32, copy=False), planes], axis=0)


def slice_spacing_of(image: sitk.Image, slice_axis: int | None) -> float:
    """Spacing in mm of ``image`` along numpy axis ``slice_axis`` of its (z, y, x) array (0.0 for None)."""
    return 0.0 if slice_axis is None else float(image.GetSpacing()[image.GetDimension() - 1 - slice_axis])


def resample_labels_to_model_grid(label_image: sitk.Image, card: ModelCard,
                                  reference_resampled: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label map onto the grid of ``reference_resampled``.

    ``reference_resampled`` is :func:`resample_to_model_grid` of the label's image; the label
    keeps its pixel type. ``card`` is checked for a matching dimension only (the grid comes from
    the reference).
    """
    _check_dims(label_image, card)
    if Grid.of(label_image) == Grid.of(reference_resampled):
        return label_image
    return sitk.Resample(label_image, reference_resampled, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                         label_image.GetPixelID(), True)


def modality_normalization(image: sitk.Image | None, card: ModelCard) -> tuple[str | None, dict[str, Any]]:
    """(entry name, normalization settings) that ``card`` applies to ``image``.

    A card with a single normalization gives (None, card.normalization) without looking at the
    image. A ``by_modality`` card (see :func:`normalize`) is validated whole (every entry, whichever
    this image needs) and picks the entry named by the image's modality as
    ``pipeline.modality.input_modality`` tells it, the same way at training and at inference: the
    DICOM Modality tag when the image carries one, else "CT" when its intensities are Hounsfield
    units (``"not CT"`` otherwise), "RGB" for a colour picture. No entry of that name: the
    ``default`` entry. ``image`` is the image as read (before resampling: the tag and the HU
    statistics are its own). Raises ModelLoadError naming the card for a malformed by_modality.
    """
    settings = card.normalization or {}
    if settings.get("kind") != BY_MODALITY:
        return None, settings
    entries, default = _by_modality_entries(settings, card.name)
    if image is None:
        raise ValueError(f"model card '{card.name}': a by_modality normalization chooses its entry from the "
                         "image: pass the image as read")
    modality = input_modality(image)["modality"]
    name = modality if modality in entries else default
    return name, entries[name]


def normalize(array: np.ndarray, card: ModelCard, image: sitk.Image | None = None) -> np.ndarray:
    """float32 (C, *spatial) -> normalized float32 (card.in_channels, *spatial).

    Kinds (``card.normalization["kind"]``), all per channel:

    - ``ct_window``: clip to center +- width/2 (HU), map linearly to [-1, 1].
    - ``zscore``: (x - mean) / std over the voxels above the channel's 1st percentile, so a large
      constant background (MR air, zero fill outside the field of view) does not set the scale;
      every voxel is then transformed, without clipping.
    - ``rgb``: 8-bit values 0..255 -> [-1, 1]; values above 255 raise InputImageError.
    - ``minmax``: clip to the 1st..99th percentile, map to [-1, 1] (min..max when those coincide).
    - ``by_modality``: one of the kinds above per input modality, for a model of several modalities,
      e.g. ``{"kind": "by_modality", "CT": {"kind": "ct_window", "center": -300, "width": 1800},
      "MR": {"kind": "zscore"}, "default": "MR"}``. Entries are named by DICOM Modality codes (and
      "RGB"); ``default`` names the entry for an image whose modality has none (required with more
      than one entry). Each entry is a normalization of the kinds above (no nesting). The entry is
      chosen from ``image``, the image as read before resampling (:func:`modality_normalization`):
      its DICOM Modality tag, else whether its intensities are CT Hounsfield units. ``image`` is
      needed by this kind only.

    Raises InputImageError when C != card.in_channels, except that an RGB image whose three
    channels are identical (a grayscale picture saved as RGB) is reduced to one channel;
    ModelLoadError (naming the card) for an unknown kind or malformed settings.
    """
    return _normalized(array, card, modality_normalization(image, card)[1])


def _normalized(array: np.ndarray, card: ModelCard, settings: Mapping[str, Any]) -> np.ndarray:
    """:func:`normalize` with the settings already chosen (what :func:`prepare` computes too)."""
    return _normalize_as(_match_channels(np.asarray(array, dtype=np.float32), card), settings, card.name)


def _normalize_as(array: np.ndarray, settings: Mapping[str, Any], card_name: str) -> np.ndarray:
    """The per-kind normalization of :func:`normalize`: (C, *spatial) float32 -> float32, per channel."""
    _check_normalization(settings, card_name)
    kind = settings.get("kind")
    out = np.empty_like(array)
    for c, channel in enumerate(array):
        if kind == "ct_window":
            center, half = float(settings["center"]), float(settings["width"]) / 2.0
            out[c] = (np.clip(channel, center - half, center + half) - center) / half
        elif kind == "zscore":
            floor = np.percentile(channel, 1.0)
            body = channel[channel > floor]
            body = body if body.size else channel
            out[c] = (channel - body.mean()) / max(float(body.std()), 1e-8)
        elif kind == "rgb":
            if channel.min() < 0 or channel.max() > 255:
                raise InputImageError(
                    f"model '{card_name}' takes 8-bit RGB (0..255); the image has values in "
                    f"[{channel.min():g}, {channel.max():g}]"
                )
            out[c] = channel / 127.5 - 1.0
        else:  # minmax
            low, high = np.percentile(channel, [1.0, 99.0])
            if high <= low:
                low, high = float(channel.min()), float(channel.max())
            out[c] = 2.0 * (np.clip(channel, low, high) - low) / max(high - low, 1e-8) - 1.0
    return out


def _check_normalization(settings: Mapping[str, Any], card_name: str, entry: str | None = None) -> None:
    """ModelLoadError unless ``settings`` is one of NORMALIZATION_KINDS with what that kind needs."""
    where = f"model card '{card_name}': " + (f"normalization entry '{entry}': " if entry is not None else "")
    kind = settings.get("kind")
    if kind == BY_MODALITY and entry is not None:
        raise ModelLoadError(f"{where}a by_modality normalization cannot be nested in another")
    if kind not in NORMALIZATION_KINDS:
        raise ModelLoadError(f"{where}unknown normalization kind {kind!r}")
    if kind == "ct_window" and ("center" not in settings or "width" not in settings
                                or float(settings["width"]) <= 0):
        raise ModelLoadError(f"{where}ct_window needs center and a positive width")


def _by_modality_entries(settings: Mapping[str, Any], card_name: str) -> tuple[dict[str, dict[str, Any]], str]:
    """(entries by name, default entry name) of a by_modality normalization, each entry checked."""
    where = f"model card '{card_name}': by_modality normalization"
    entries: dict[str, dict[str, Any]] = {}
    for name, value in settings.items():
        if name in ("kind", "default"):
            continue
        if not isinstance(name, str) or not _ENTRY_NAME.fullmatch(name) or not isinstance(value, Mapping):
            raise ModelLoadError(
                f"{where}: unknown key {name!r}: besides 'kind' and 'default' its keys are modality codes as "
                f"DICOM writes them ('CT', 'MR'...), each with a normalization such as {{\"kind\": \"zscore\"}}"
            )
        _check_normalization(value, card_name, name)
        entries[name] = dict(value)
    if not entries:
        raise ModelLoadError(f"{where} has no entries (e.g. \"CT\": {{\"kind\": \"ct_window\", ...}})")
    names = ", ".join(sorted(entries))
    if "default" not in settings:
        if len(entries) > 1:
            raise ModelLoadError(f"{where} has {len(entries)} entries ({names}) and needs a 'default': the entry "
                                 f"for an image whose modality has none")
        return entries, next(iter(entries))
    default = settings["default"]
    if not isinstance(default, str) or default not in entries:
        raise ModelLoadError(f"{where}: default {default!r} is not one of its entries ({names})")
    return entries, default


def prepare(image: sitk.Image, card: ModelCard, size_divisor: int = 1) -> PreparedInput:
    """Resample, normalize and pad ``image`` into the network's batch layout (see PreparedInput)."""
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    _check_dims(image, card)
    used, settings = modality_normalization(image, card)  # on the image as given: its tag, its HU
    resampled = resample_to_model_grid(image, card)
    volume = _normalized(array_with_channels(resampled), card, settings)  # (C, *model spatial)
    slice_axis = card.slice_axis if card.spatial_dims == 2 and image.GetDimension() == 3 else None
    volume = add_slice_context(volume, card, slice_axis, slice_spacing_of(resampled, slice_axis))
    volume = add_task_planes(volume, card)
    if slice_axis is None:
        items = volume[None]  # (1, C, *spatial)
    else:
        items = np.moveaxis(volume, 1 + slice_axis, 0)  # (S, C, H, W)
    spatial = items.shape[2:]
    targets = [_padded_length(n, p, size_divisor) for n, p in zip(spatial, _minimum_sizes(card))]
    before = [(t - n) // 2 for n, t in zip(spatial, targets)]
    # Per-channel minimum: the darkest value (CT air, photo black) fills the border, not a new value.
    fill = volume.reshape(volume.shape[0], -1).min(axis=1)
    batch = np.empty((items.shape[0], items.shape[1], *targets), dtype=np.float32)
    batch[:] = fill.reshape(1, -1, *([1] * len(targets)))
    crop = tuple(slice(b, b + n) for b, n in zip(before, spatial))
    batch[(slice(None), slice(None), *crop)] = items
    return PreparedInput(
        batch=batch,
        reference=image,
        model_grid=Grid.of(resampled),
        spatial_dims=card.spatial_dims,
        slice_axis=slice_axis,
        crop=crop,
        resampled=resampled is not image,
        normalization=dict(settings),
        normalization_used=used,
        context_slices=card.slice_context()[0],
        task_channels=len(card.tasks),
    )


def restore(prepared: PreparedInput, maps: np.ndarray, interpolation: str = "linear",
            threshold: float | None = None) -> np.ndarray:
    """Network outputs on the padded model grid -> float32 (L, *input spatial) on the input grid.

    With ``threshold``, each label map is thresholded (> threshold) as soon as it is resampled and
    the result is uint8: a whole volume then never holds more than one label's float map.

    ``maps`` has the shape of ``prepared.batch`` with L channels instead of C: (S, L, H, W) or
    (1, L, D, H, W). The result lies on exactly the input's size, origin, spacing and direction,
    spatial in SimpleITK array order ((z, y, x) or (y, x)). ``interpolation``: ``linear`` for
    continuous maps, ``nearest`` for label values. Points of the input grid just outside the
    model grid's extent (its size is rounded) take the nearest model voxel.
    """
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}, got {interpolation!r}")
    batch_shape = prepared.batch.shape
    if maps.ndim != len(batch_shape) or maps.shape[0] != batch_shape[0] or maps.shape[2:] != batch_shape[2:]:
        raise ValueError(f"maps shape {maps.shape} does not match the batch shape {batch_shape} (channels aside)")
    items = maps[(slice(None), slice(None), *prepared.crop)]
    if prepared.slice_axis is None:
        volume = items[0]  # (L, *model spatial)
    else:
        volume = np.moveaxis(np.moveaxis(items, 0, 1), 1, 1 + prepared.slice_axis)  # (L, z, y, x)
    volume = np.asarray(volume, dtype=np.float32)

    def finish(label_map: np.ndarray) -> np.ndarray:
        return np.array(label_map) if threshold is None else (label_map > threshold).astype(np.uint8)

    reference_grid = Grid.of(prepared.reference)
    output_shape = tuple(reversed(reference_grid.size))

    def resampled(label_map: np.ndarray) -> np.ndarray:
        region = None if threshold is not None and threshold < 0 else nonzero_region(prepared.model_grid, label_map,
                                                                                    reference_grid)
        if region is None:  # the whole grid (a negative threshold marks even the zeros)
            target: sitk.Image = prepared.reference
        elif region.size == 0:
            return finish(np.zeros(output_shape, dtype=np.float32))
        else:
            target = region.grid_image()
        image = sitk.Resample(prepared.model_grid.scalar_image(label_map), target, sitk.Transform(),
                              _INTERPOLATORS[interpolation], 0.0, sitk.sitkFloat32, True)
        values = finish(sitk.GetArrayViewFromImage(image))  # a view: thresholding copies only the uint8 mask
        if region is None:
            return values
        out = np.zeros(output_shape, dtype=values.dtype)
        out[region.slices()] = values
        return out

    one_label = finish if not prepared.resampled else resampled
    return stack_filled((one_label(label_map) for label_map in volume), volume.shape[0])


@dataclass(frozen=True)
class IndexRegion:
    """A box of a grid's voxels: ``start`` and ``stop`` (exclusive) index per axis, (x, y[, z]) order."""

    grid: Grid
    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod([max(0, b - a) for a, b in zip(self.start, self.stop)]))

    def slices(self) -> tuple[slice, ...]:
        """The box in SimpleITK array order ((z,) y, x)."""
        return tuple(slice(a, b) for a, b in reversed(list(zip(self.start, self.stop))))

    def grid_image(self) -> sitk.Image:
        """An empty image on exactly these voxels of the grid (the target of a Resample)."""
        g = self.grid
        image = sitk.Image([b - a for a, b in zip(self.start, self.stop)], sitk.sitkUInt8)
        image.SetSpacing(g.spacing)
        image.SetDirection(g.direction)
        image.SetOrigin(tuple(_index_to_physical(g, np.asarray(self.start, dtype=float)[None])[0]))
        return image


def _index_to_physical(grid: Grid, index: np.ndarray) -> np.ndarray:
    """(k, dim) continuous indices of ``grid`` -> (k, dim) physical points."""
    dim = len(grid.size)
    direction = np.asarray(grid.direction, dtype=float).reshape(dim, dim)
    return np.asarray(grid.origin) + (index * np.asarray(grid.spacing)) @ direction.T


def nonzero_region(grid: Grid, values: np.ndarray, target: Grid) -> IndexRegion:
    """The voxels of ``target`` where resampling ``values`` (on ``grid``, SimpleITK array order)
    can be non-zero, with a linear or nearest interpolator, zero default and nearest-voxel
    extrapolation; every other voxel of the result is exactly 0. An empty region when
    ``values`` is all zero.

    Interpolation at continuous index c reads the voxels floor(c) and floor(c) + 1 per axis, so
    only points within one voxel of the non-zero box can be non-zero; a box that touches the
    border of ``grid`` reaches on to infinity on that side (points outside take the border voxel).
    The box's corners are mapped to ``target`` indices (a superset for oblique grids) and widened
    by one voxel against rounding. Restoring a label then costs its extent, not the whole volume.
    """
    dim = len(grid.size)
    occupied = values != 0
    if not occupied.any():
        return IndexRegion(target, (0,) * dim, (0,) * dim)
    far = 1e7  # voxels: "to infinity", kept finite for the arithmetic
    low, high = [], []
    for axis in range(dim):  # SimpleITK axis k is array axis dim - 1 - k
        others = tuple(a for a in range(dim) if a != dim - 1 - axis)
        present = np.flatnonzero(occupied.any(axis=others))
        low.append(-far if present[0] == 0 else present[0] - 1.0)
        high.append(far if present[-1] == grid.size[axis] - 1 else present[-1] + 1.0)
    corners = np.array(list(itertools.product(*zip(low, high))), dtype=float)  # (2^dim, dim)
    points = _index_to_physical(grid, corners)
    t_dir = np.asarray(target.direction, dtype=float).reshape(dim, dim)
    t_index = ((points - np.asarray(target.origin)) @ t_dir) / np.asarray(target.spacing)  # direction is orthonormal
    start = np.clip(np.floor(t_index.min(axis=0)) - 1, 0, target.size).astype(int)
    stop = np.clip(np.ceil(t_index.max(axis=0)) + 2, 0, target.size).astype(int)
    return IndexRegion(target, tuple(int(a) for a in start), tuple(int(max(a, b)) for a, b in zip(start, stop)))


def stack_filled(arrays: Iterable[np.ndarray], count: int) -> np.ndarray:
    """np.stack of ``count`` equal-shaped arrays made one at a time: (count, *shape), without holding
    the list of them as well (each is copied in and let go before the next is made)."""
    out = None
    for index, array in enumerate(arrays):
        if out is None:
            out = np.empty((count, *array.shape), dtype=array.dtype)
        out[index] = array
        del array
    if out is None or index != count - 1:
        raise ValueError(f"expected {count} arrays")
    return out


def _resample_in_index_frame(image: sitk.Image, spacing: tuple[float, ...], interpolator: int) -> sitk.Image:
    """``image`` at ``spacing`` with the same origin and direction; size = round(size * old / new).

    Model-grid voxels past the input's last voxel centre take the nearest input value rather
    than an arbitrary default (0 HU would paint water along the border).
    """
    # floor(x + 0.5), not round(): Python's round() sends 2.5 to 2 (banker's rounding).
    size = [max(1, math.floor(n * old / new + 0.5))
            for n, old, new in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, image.GetPixelID(), True)


def _check_dims(image: sitk.Image, card: ModelCard) -> None:
    """The model's dimension and slice axis fit the image."""
    if card.spatial_dims not in (2, 3):
        raise ModelLoadError(f"model card '{card.name}': spatial_dims must be 2 or 3, got {card.spatial_dims}")
    if card.spatial_dims == 3 and image.GetDimension() != 3:
        raise InputImageError(f"model '{card.name}' segments 3D volumes; the image is {image.GetDimension()}D")
    if card.spatial_dims == 3 and 1 in image.GetSize():
        # Padding would let the network run, but a 3D model's through-plane context would be
        # made-up border values: refuse rather than return a confident guess.
        raise InputImageError(f"model '{card.name}' segments 3D volumes; the image is a single slice "
                              f"(size {image.GetSize()}): use a 2D model")
    if card.spatial_dims == 2 and card.slice_axis not in (0, 1, 2):
        raise ModelLoadError(f"model card '{card.name}': slice_axis must be 0, 1 or 2, got {card.slice_axis}")


def _check_single_slice_plane(oriented: sitk.Image, card: ModelCard) -> None:
    """A single-slice volume must lie in the plane a 2D model takes (InputImageError otherwise).

    After reorientation the length-1 axis of a 1-slice volume says which plane the slice is: a 2D
    model slicing along another axis would be handed 1-pixel-wide lines, not images.
    """
    if card.spatial_dims != 2 or oriented.GetDimension() != 3:
        return
    shape = tuple(reversed(oriented.GetSize()))  # numpy (z, y, x)
    rows_axis, cols_axis = _in_plane_numpy_axes(card.slice_axis)
    if shape[rows_axis] == 1 or shape[cols_axis] == 1:
        single = shape.index(1)
        frame = f" after reorientation to {card.orientation}" if card.orientation else ""
        raise InputImageError(
            f"model '{card.name}' segments slices along array axis {card.slice_axis} of the (z, y, x) volume; "
            f"this image is a single slice across axis {single}{frame} (size {oriented.GetSize()}), "
            f"a plane the model does not take"
        )


def _in_plane_numpy_axes(slice_axis: int) -> tuple[int, int]:
    """Numpy axes (rows H, columns W) of a (z, y, x) volume's slices along ``slice_axis``."""
    rows, cols = (axis for axis in range(3) if axis != slice_axis)
    return rows, cols


def _minimum_sizes(card: ModelCard) -> list[int]:
    """Minimum padded spatial sizes in batch order: (H, W) or (D, H, W) (the card's training crop)."""
    shape = card.patch_shape()
    return [1] * card.spatial_dims if shape is None else list(shape)


def _padded_length(length: int, minimum: int, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= both ``length`` and ``minimum``."""
    return math.ceil(max(length, minimum) / divisor) * divisor


def _match_channels(array: np.ndarray, card: ModelCard) -> np.ndarray:
    """(C, *spatial) with C == card.in_channels, or InputImageError."""
    channels = array.shape[0]
    if channels == card.in_channels:
        return array
    identical = channels == 3 and np.array_equal(array[0], array[1]) and np.array_equal(array[0], array[2])
    if identical and card.in_channels == 1:
        return array[:1]
    kind = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
    raise InputImageError(
        f"model '{card.name}' takes {card.in_channels}-channel images; the image is {kind} ({channels} channel(s))"
    )
