"""Anatomical regions found by thresholds, to which a model card may confine a label's fused pieces.

A lung lesion model trained on chest crops meets a whole scan in use: table, arms, shoulders, neck
and upper abdomen, where lesion-like texture (the trachea's wall, an axilla's skin fold, the
diaphragm's dome cut by a thick slice) draws false positives. A lung tumour lies in the chest
cavity, which the lungs outline: per axial slice, the convex hull of the lung mask covers the lungs,
the hila and the mediastinum between them, so a tumour growing into the mediastinum still touches it.
postprocess.keep_region_components then drops a piece of the fused mask that does not touch that
region (grown by a margin, for tumours that reach into the chest wall) and keeps a piece that touches
it whole. The lung mask is an HU threshold, so the region is only defined for CT.

The brain region does the same for brain tumours on a head MR (``brain_region``): a piece of the
fused mask is kept when at least half of it lies in the brain, found by three intensity classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

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


def otsu_thresholds(values: np.ndarray, classes: int = 2, bins: int = 256) -> tuple[float, ...]:
    """Otsu's thresholds of a set of intensities: 1 threshold for 2 classes, 2 for 3 classes (the
    pair that maximises the between-class variance over a ``bins``-bin histogram). A value above a
    threshold belongs to the brighter class. Raises ValueError for an empty or constant input."""
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes}")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.min() == values.max():
        raise ValueError("Otsu's threshold needs at least two distinct values")
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight, total = np.cumsum(counts).astype(np.float64), np.cumsum(counts * centres)

    def spread(w: np.ndarray, s: np.ndarray) -> np.ndarray:  # sum of a class's S^2 / W, 0 when empty
        return np.where(w > 0, s ** 2 / np.where(w > 0, w, 1.0), 0.0)

    if classes == 2:  # the between-class variance is sum_k S_k^2 / W_k up to a constant
        score = spread(weight, total) + spread(weight[-1] - weight, total[-1] - total)
        score[(weight == 0) | (weight == weight[-1])] = -np.inf
        return (float(edges[int(np.argmax(score)) + 1]),)
    w0, s0 = weight[:, None], total[:, None]
    w1, s1 = weight[None, :] - w0, total[None, :] - s0
    w2, s2 = weight[-1] - weight[None, :], total[-1] - total[None, :]
    score = spread(w0, s0) + spread(w1, s1) + spread(w2, s2)
    index = np.arange(bins)
    score[~((index[:, None] < index[None, :]) & (w0 > 0) & (w1 > 0) & (w2 > 0))] = -np.inf
    if not np.isfinite(score).any():
        raise ValueError("three Otsu classes need at least three distinct values")
    low, high = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(edges[low + 1]), float(edges[high + 1])


def largest_component_3d(mask: np.ndarray) -> np.ndarray:
    """Bool (z, y, x) -> bool: its largest connected component (face connectivity); a copy when empty."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == int(np.argmax(sizes)) + 1


def per_slice(op: Callable[..., np.ndarray], mask: np.ndarray, **kwargs: Any) -> np.ndarray:
    """``op`` applied to each axial slice of ``mask`` (z, y, x), restacked."""
    return np.stack([op(s, **kwargs) for s in mask]) if mask.shape[0] else mask.copy()


def brain_mask(image: np.ndarray, spacing_zyx: Sequence[float], thresholds: tuple[float, float] | None = None,
               opening_mm: float = 2.0) -> np.ndarray:
    """Brain mask of a head MR (z, y, x): bool (z, y, x).

    1. Three-class Otsu thresholds of the image: dark (air, bone, CSF), tissue (brain, muscle) and
       bright (scalp fat, marrow, enhancing vessels on T1); tissue = between the two thresholds.
    2. Per axial slice, an erosion by ``opening_mm`` cuts thin bridges of tissue-like voxels
       (muscle, dura) to the brain; the largest 3D component is kept, dilated back within the
       tissue, and its holes are filled per slice (ventricles, sulci, a lesion inside the brain).
    ``thresholds`` (low, high) replaces step 1 (e.g. thresholds measured on other slices).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected a (z, y, x) image, got shape {image.shape}")
    low, high = otsu_thresholds(image, classes=3) if thresholds is None else thresholds
    tissue = (image > low) & (image < high)
    steps = max(1, int(round(opening_mm / float(min(spacing_zyx[1], spacing_zyx[2])))))
    cross = ndimage.generate_binary_structure(2, 1)
    core = largest_component_3d(per_slice(ndimage.binary_erosion, tissue, structure=cross, iterations=steps))
    core = per_slice(ndimage.binary_dilation, core, structure=cross, iterations=steps) & tissue
    return per_slice(ndimage.binary_fill_holes, core).astype(bool)


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


# A head MR given to a brain-tumour model holds the orbits, sinuses, skull base and scalp, where bright
# fat and marrow on a post-contrast T1 draw false positives (docs/BENCHMARKS.md, brain region). A brain
# tumour lies in the brain; the brain mask is coarse at the skull base (muscle joins it there), so a
# piece is kept when at least half of it lies in the mask rather than when it merely touches it.
BRAIN_REGION_MIN_ML = 100.0
BRAIN_REGION_MIN_INSIDE = 0.5


def brain_region(mr: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray | None:
    """The brain of a head MR (z, y, x), any intensity unit: :func:`brain_mask` (three Otsu classes,
    the tissue class cut from scalp and muscle by an opening). Bool (z, y, x), or None when it is under
    ``BRAIN_REGION_MIN_ML`` (a crop or not a head: then a caller must not filter)."""
    try:
        mask = brain_mask(mr, spacing_zyx)
    except ValueError:  # constant or near-constant image: no three classes
        return None
    if mask.sum() * float(np.prod(spacing_zyx)) / 1000.0 < BRAIN_REGION_MIN_ML:
        return None
    return mask


# Each Region's finder: (array (z, y, x), spacing zyx) -> bool (z, y, x) or None when not found.
_FINDERS: dict[Region, Callable[[np.ndarray, Sequence[float]], np.ndarray | None]] = {
    Region.LUNGS: lung_region, Region.BRAIN: brain_region}
# The fraction of a piece that must lie in the region for it to be kept (0: touching it is enough).
_MIN_INSIDE: dict[Region, float] = {Region.LUNGS: 0.0, Region.BRAIN: BRAIN_REGION_MIN_INSIDE}


def find_region(region: Region, image: "sitk.Image") -> np.ndarray | None:
    """``region`` on the grid of ``image`` (a CT in HU for the lungs, an MR for the brain): bool array in SimpleITK's array order
    ((z, y, x); a 2D image as one slice, (1, y, x)), or None where it cannot be found."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        return None
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = tuple(reversed(image.GetSpacing()))
    if array.ndim == 2:
        array, spacing = array[None], (1.0, *spacing)
    # The region is coarse (a hull grown 10 mm), so it is found on a grid of about 2 mm in-plane
    # (every k-th pixel) and brought back by repetition: a 512 x 512 CT costs a ninth.
    ky, kx = (max(1, int(2.0 // spacing[axis])) for axis in (1, 2))
    coarse = array[:, ::ky, ::kx]
    found = _FINDERS[region](coarse, (spacing[0], spacing[1] * ky, spacing[2] * kx))
    if found is not None:
        found = np.repeat(np.repeat(found, ky, axis=1), kx, axis=2)[:, :array.shape[1], :array.shape[2]]
    return None if found is None else found.reshape(sitk.GetArrayViewFromImage(image).shape)


def find_card_regions(image: "sitk.Image",
                      card: "ModelCard") -> tuple[list[tuple[np.ndarray, list[str], float]], list[str]]:
    """The card's ``region_components`` found on ``image``: ([(region bool (array order), labels
    confined to it, fraction of a piece that must lie in it)], notes). A region that cannot be found
    (no lungs in the scan) confines nothing, and a note says so: better a false positive than a lesion
    erased."""
    found, notes = [], []
    for region, confined in card.labels_by_region().items():
        mask = find_region(region, image)
        if mask is None:
            notes.append(f"region {region} not found in the input: {', '.join(confined)} not confined to it")
        else:
            found.append((mask, confined, _MIN_INSIDE[region]))
    return found, notes
