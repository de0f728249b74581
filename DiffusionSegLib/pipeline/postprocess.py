"""Post-processing of the fused mask: the largest connected component, and consistent components.

Largest component: a solid organ (liver, spleen, one kidney) is one connected piece of tissue, so any other
component the model marks is a false positive: e.g. a kidney-shaped blob called "liver". Like
nnU-Net's post-processing, this is applied per label only where the model card says so (chosen
by measuring on validation data whether it helps), and only to the fused / final masks: the
samples, and the consistency, ambiguity and uncertainty derived from them, are left as sampled.
Components are found on the input grid with full (8 / 26) connectivity, so two pieces touching
at a corner count as one.

Consistent components (lesions): a piece of the fused (majority) mask is kept only if it holds at
least one voxel where every sample agrees (the consistency region). This is hysteresis on the
sample agreement: the high threshold (N of N) seeds a piece, the low one (majority) draws its
outline. A lesion the samples agree on keeps its whole majority outline; a piece that only a bare
majority of the samples marks anywhere, the typical false positive of a few samples or one
ensemble member, goes. With one sample it changes nothing (consistency = fused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from DiffusionSegLib.pipeline.ensemble import occupied_box

if TYPE_CHECKING:
    from DiffusionSegLib.models.card import ModelCard


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Binary (*S) -> the same mask with only its largest connected component (ties: lowest label id)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.uint8)
    box = occupied_box(mask)
    if box is None:
        return out
    # Components lie inside the mask's bounding box, and labelling the box numbers them in the
    # same raster order as labelling the whole grid: the same answer for the box's cost.
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    components, n = ndimage.label(mask[box], structure=structure)
    if n <= 1:
        out[box] = mask[box]
        return out
    sizes = np.bincount(components.ravel())[1:]
    out[box] = components == int(np.argmax(sizes)) + 1
    return out


def _per_label(masks: np.ndarray, label_names: Sequence[str], apply_to: Sequence[str], voxel_ml: float,
               in_place: bool, keep: Callable[[int, np.ndarray], np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """masks (L, *S) -> (masks with ``keep(i, mask_i)`` for the labels named in ``apply_to``,
    removed volume per processed label in mL); ``in_place`` (uint8 masks) changes ``masks`` itself."""
    if in_place and np.asarray(masks).dtype != np.uint8:
        raise ValueError("in_place needs uint8 masks")
    out = masks if in_place else np.asarray(masks).astype(np.uint8, copy=True)
    removed: dict[str, float] = {}
    for i, name in enumerate(label_names):
        if name not in apply_to:
            continue
        kept = keep(i, out[i])
        removed[name] = float((out[i].sum() - kept.sum()) * voxel_ml)
        out[i] = kept
    return out, removed


def keep_largest_component(masks: np.ndarray, label_names: Sequence[str], apply_to: Sequence[str],
                           voxel_ml: float, in_place: bool = False) -> tuple[np.ndarray, dict[str, float]]:
    """Apply :func:`largest_component` to the labels named in ``apply_to``.

    masks (L, *S) binary, label i named ``label_names[i]``; ``voxel_ml`` is one voxel's volume
    (mL; for a 2D image, the area in mm^2 / 1000). Returns (masks (L, *S) uint8, removed volume
    per processed label in mL), so the report can say what was taken away. ``in_place`` (masks
    must be uint8) changes and returns ``masks`` itself: no copy of a whole CT's masks.
    """
    return _per_label(masks, label_names, apply_to, voxel_ml, in_place, lambda i, mask: largest_component(mask))


def components_touching(mask: np.ndarray, region: np.ndarray, min_inside: float = 0.0) -> np.ndarray:
    """Binary (*S) mask, binary (*S) region -> uint8 (*S): the mask's connected pieces (full
    connectivity) with at least one voxel in the region, each kept whole; with ``min_inside`` > 0,
    only the pieces with at least that fraction of their voxels in the region."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.uint8)
    box = occupied_box(mask)
    if box is None:
        return out
    pieces, _ = ndimage.label(mask[box], structure=np.ones((3,) * mask.ndim, dtype=bool))
    inside = np.asarray(region, dtype=bool)[box] & mask[box]
    if min_inside <= 0.0:
        touching = np.unique(pieces[inside])
        out[box] = np.isin(pieces, touching[touching > 0])
        return out
    index = np.arange(1, int(pieces.max()) + 1)
    fraction = ndimage.sum(inside, pieces, index) / ndimage.sum(mask[box], pieces, index)
    out[box] = np.isin(pieces, index[fraction >= min_inside])
    return out


def keep_consistent_components(masks: np.ndarray, counts: np.ndarray, n_samples: int, label_names: Sequence[str],
                               apply_to: Sequence[str], voxel_ml: float,
                               in_place: bool = False) -> tuple[np.ndarray, dict[str, float]]:
    """Keep, for the labels named in ``apply_to``, only the pieces that hold a voxel every sample marks.

    masks (L, *S) binary; counts (L, *S): how many of the ``n_samples`` samples mark each voxel
    (the core is counts == n_samples). Returns (masks (L, *S) uint8, removed volume per processed
    label in mL); ``in_place`` as in :func:`keep_largest_component`.
    """
    return _per_label(masks, label_names, apply_to, voxel_ml, in_place,
                      lambda i, mask: components_touching(mask, np.asarray(counts[i]) >= n_samples))


def keep_region_components(masks: np.ndarray, region: np.ndarray, label_names: Sequence[str],
                           apply_to: Sequence[str], voxel_ml: float, in_place: bool = False,
                           min_inside: float = 0.0) -> tuple[np.ndarray, dict[str, float]]:
    """Keep, for the labels named in ``apply_to``, only the pieces that touch ``region`` (bool (*S),
    e.g. regions.lung_region), or with ``min_inside`` > 0 that have at least that fraction inside it;
    masks (L, *S). Returns (masks uint8, removed mL per processed label)."""
    return _per_label(masks, label_names, apply_to, voxel_ml, in_place,
                      lambda i, mask: components_touching(mask, region, min_inside))


def apply_card_filters(masks: np.ndarray, counts: np.ndarray, n_samples: int, label_names: Sequence[str],
                       card: "ModelCard", regions: Sequence[tuple[np.ndarray, Sequence[str], float]],
                       voxel_ml: float) -> dict[str, float]:
    """A model card's post-processing on uint8 masks (L, *S), in place: region components (``regions``:
    [(region (*S) bool, labels confined to it, fraction of a piece that must lie in it)], as
    regions.find_card_regions gives), then consistent
    components (``counts`` (L, *S) of ``n_samples``), then the largest component, so the largest piece
    is chosen among those that pass the first two. Returns the removed volume per label in mL."""
    taken = [keep_region_components(masks, region, label_names, confined, voxel_ml, True, min_inside)[1]
             for region, confined, min_inside in regions]
    taken.append(keep_consistent_components(masks, counts, n_samples, label_names, card.consistent_components,
                                            voxel_ml, True)[1])
    taken.append(keep_largest_component(masks, label_names, card.largest_component, voxel_ml, True)[1])
    return {label: sum(t.get(label, 0.0) for t in taken) for t in taken for label in t}
