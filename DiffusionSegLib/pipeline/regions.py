"""Anatomical regions found by thresholds, to which a model card may confine a label's fused pieces.

A lung lesion model trained on chest crops meets a whole scan in use: table, arms, shoulders, neck
and upper abdomen, where lesion-like texture (the trachea's wall, an axilla's skin fold, the
diaphragm's dome cut by a thick slice) draws false positives. A lung tumour lies in the chest
cavity, which the lungs outline: per axial slice, the convex hull of the lung mask covers the lungs,
the hila and the mediastinum between them, so a tumour growing into the mediastinum still touches it.
postprocess.keep_region_components then drops a piece of the fused mask that does not touch that
region (grown by a margin, for tumours that reach into the chest wall) and keeps a piece that touches
it whole. The lung mask is an HU threshold, so the region is only defined for CT.

The brain region does the same for brain tumours on a head MR: a brain template registered to the
input (pipeline/brain_atlas.py). There a piece is kept when at least half of it lies in the brain, not
when it merely touches it: the false positives it is for (orbit, sinuses, skull base) abut the brain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from DiffusionSegLib.core.enums import Region

if TYPE_CHECKING:
    import SimpleITK as sitk

    from DiffusionSegLib.models.card import ModelCard


def threshold_lung_mask(ct: np.ndarray, spacing_zyx: Sequence[float], threshold_hu: float = -400.0,
                        min_volume_ml: float = 100.0, min_slice_area_mm2: float = 300.0,
                        min_median_hu: float | None = None) -> np.ndarray:
    """Lung mask of a chest CT (z, y, x) by HU threshold: bool (z, y, x).

    Air below ``threshold_hu`` that does not touch the in-plane border of the volume (outside
    air), in 3D components above ``min_volume_ml`` (lungs; the trachea joins them), holes filled
    per axial slice (vessels and nodules inside the lung belong to it, as in TotalSegmentator's
    lung labels), then per-slice components below ``min_slice_area_mm2`` dropped (trachea and
    bowel gas cross-sections, lung apex tips). With ``min_median_hu``, a 3D component whose median
    is at or below it is gas, not lung, and is dropped: aerated lung is tissue and air (median about
    -800 HU), while bowel and stomach gas is nearly pure air (median below -950 HU).
    """
    spacing = np.asarray(spacing_zyx, dtype=float)
    air = np.asarray(ct) < threshold_hu
    labels, n = ndimage.label(air)
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    inner = air & ~np.isin(labels, border)
    labels, n = ndimage.label(inner)
    if n == 0:
        return np.zeros(air.shape, dtype=bool)
    index = np.arange(1, n + 1)
    volumes_ml = ndimage.sum(inner, labels, index) * float(np.prod(spacing)) / 1000.0
    keep = volumes_ml >= min_volume_ml
    if min_median_hu is not None and keep.any():
        kept = index[keep]  # medians only of the components large enough to be lungs
        keep[kept - 1] = np.asarray(ndimage.median(np.asarray(ct, np.float32), labels, kept)) > min_median_hu
    lungs = np.isin(labels, index[keep])
    pixel_mm2 = float(spacing[1] * spacing[2])
    out = np.zeros_like(lungs)
    for z in range(lungs.shape[0]):
        filled = ndimage.binary_fill_holes(lungs[z])
        parts, k = ndimage.label(filled)
        if k:
            areas = ndimage.sum(filled, parts, range(1, k + 1)) * pixel_mm2
            out[z] = np.isin(parts, [i + 1 for i, a in enumerate(areas) if a >= min_slice_area_mm2])
    return out


def slice_hulls(mask: np.ndarray) -> np.ndarray:
    """Bool (z, y, x) -> bool (z, y, x): per axial slice, the convex hull of the slice's True pixels
    (pixel centres; a slice whose pixels lie on one line keeps its pixels)."""
    from scipy.spatial import ConvexHull, QhullError

    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    for z in range(mask.shape[0]):
        points = np.argwhere(mask[z])
        if len(points) < 3:
            continue
        # Only the outline's pixels can be hull vertices: fewer points for Qhull.
        outline = points[~ndimage.binary_erosion(mask[z])[tuple(points.T)]]
        try:
            hull = ConvexHull(outline)
        except QhullError:  # all on one line
            continue
        (y0, x0), (y1, x1) = points.min(axis=0), points.max(axis=0) + 1
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = np.ones(yy.shape, dtype=bool)
        for ny, nx, offset in hull.equations:  # inside: n . p + offset <= 0 for every facet
            inside &= ny * yy + nx * xx + offset <= 1e-9
        out[z, y0:y1, x0:x1] |= inside
    return out


# The region's lung finder (not the dataset builders', whose crops stay as published): an abdominal
# CT holds only the lung bases, 42 and 62 mL in TotalSegmentator's example_ct, under the 100 mL that
# keeps stray air out; there the largest "lungs" were bowel gas (238 mL, median -967 HU), and the region
# dropped every lung-base lesion (docs/BENCHMARKS.md, whole-scan validation). Gas is told apart by its
# median, so smaller lungs can be let in.
REGION_MIN_LUNG_ML = 20.0
REGION_GAS_MEDIAN_HU = -950.0


def region_lung_mask(ct: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """The lungs the region is built on: :func:`threshold_lung_mask` with gas left out and lungs of
    ``REGION_MIN_LUNG_ML`` counted. CT (z, y, x) in HU -> bool (z, y, x)."""
    return threshold_lung_mask(ct, spacing_zyx, min_volume_ml=REGION_MIN_LUNG_ML, min_median_hu=REGION_GAS_MEDIAN_HU)


def lung_region(ct: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float = 10.0) -> np.ndarray | None:
    """The chest cavity of a CT (z, y, x) in HU: per-slice convex hull of the threshold lung mask
    (gas-filled bowel and stomach left out), grown in-plane by ``margin_mm``. Bool (z, y, x), or None
    when no lungs are found (then a caller must not filter: the scan is not a chest CT, or not in HU)."""
    lungs = region_lung_mask(ct, spacing_zyx)
    if not lungs.any():
        return None
    hull = slice_hulls(lungs)
    sampling = (float(spacing_zyx[-2]), float(spacing_zyx[-1]))
    region = np.zeros_like(hull)
    for z in np.flatnonzero(hull.any(axis=(1, 2))):  # in-plane only: slices keep their extent
        region[z] = ndimage.distance_transform_edt(~hull[z], sampling=sampling) <= margin_mm
    return region


def _lungs_in(image: "sitk.Image") -> tuple[np.ndarray | None, str]:
    """:func:`lung_region` on the grid of a CT ``image`` in HU: (bool array in SimpleITK's array order,
    "") or (None, why not). A 2D image is one slice, (1, y, x)."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        return None, "not a scalar image"
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = tuple(reversed(image.GetSpacing()))
    if array.ndim == 2:
        array, spacing = array[None], (1.0, *spacing)
    # The region is coarse (a hull grown 10 mm), so it is found on a grid of about 2 mm in-plane
    # (every k-th pixel) and brought back by repetition: a 512 x 512 CT costs a ninth.
    ky, kx = (max(1, int(2.0 // spacing[axis])) for axis in (1, 2))
    found = lung_region(array[:, ::ky, ::kx], (spacing[0], spacing[1] * ky, spacing[2] * kx))
    if found is None:
        return None, f"no {Region.LUNGS} found"
    found = np.repeat(np.repeat(found, ky, axis=1), kx, axis=2)[:, :array.shape[1], :array.shape[2]]
    return found.reshape(sitk.GetArrayViewFromImage(image).shape), ""


def _brain_in(image: "sitk.Image") -> tuple[np.ndarray | None, str]:
    from DiffusionSegLib.pipeline.brain_atlas import find_brain  # SimpleITK registration: loaded when used

    return find_brain(image)


# Each Region: its finder (image -> (bool array in SimpleITK's array order, "") or (None, why not)) and
# the fraction of a piece that must lie in it for the piece to be kept (0: touching it is enough).
_FINDERS: dict[Region, tuple[Callable[["sitk.Image"], tuple[np.ndarray | None, str]], float]] = {
    Region.LUNGS: (_lungs_in, 0.0), Region.BRAIN: (_brain_in, 0.5)}


def find_region(region: Region, image: "sitk.Image") -> np.ndarray | None:
    """``region`` on the grid of ``image`` (a CT in HU for the lungs, a head MR for the brain): bool
    array in SimpleITK's array order ((z, y, x); a 2D image as one slice, (1, y, x)), or None where it
    cannot be found."""
    return find_region_why(region, image)[0]


def find_region_why(region: Region, image: "sitk.Image") -> tuple[np.ndarray | None, str]:
    """:func:`find_region` and, when it is None, why (a sentence for report.json)."""
    return _FINDERS[region][0](image)


def find_card_regions(image: "sitk.Image", card: "ModelCard",
                      known: dict[Region, tuple[np.ndarray | None, str]] | None = None,
                      ) -> tuple[list[tuple[np.ndarray, list[str], float]], list[str]]:
    """The card's ``region_components`` found on ``image``: ([(region bool (array order), labels
    confined to it, fraction of a piece that must lie in it)], notes). A region that cannot be found
    (no lungs in the scan) confines nothing, and a note says so: better a false positive than a lesion
    erased. ``known``: regions already found on this image (:func:`find_region_why`'s answers), reused."""
    found, notes = [], []
    for region, confined in card.labels_by_region().items():
        mask, why = (known or {}).get(region) or find_region_why(region, image)
        if mask is None:
            notes.append(f"region {region} not found in the input ({why}): {', '.join(confined)} not confined to it")
        else:
            found.append((mask, confined, _FINDERS[region][1]))
    return found, notes
