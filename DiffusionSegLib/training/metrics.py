"""Overlap and distance metrics between binary masks (numpy in, floats out)."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2|P∩R| / (|P| + |R|); 1.0 when both masks are empty."""
    p, r = pred.astype(bool), ref.astype(bool)
    denom = p.sum() + r.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, r).sum() / denom)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """IoU = |P∩R| / |P∪R|; 1.0 when both masks are empty."""
    p, r = pred.astype(bool), ref.astype(bool)
    union = np.logical_or(p, r).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, r).sum() / union)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """Precision = |P∩R| / |P|; with nothing predicted: 1.0 when the reference is empty too, else 0.0."""
    p, r = pred.astype(bool), ref.astype(bool)
    n = p.sum()
    return float(not r.any()) if n == 0 else float(np.logical_and(p, r).sum() / n)


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """Recall (sensitivity) = |P∩R| / |R|; with an empty reference: 1.0 when nothing is predicted, else 0.0."""
    p, r = pred.astype(bool), ref.astype(bool)
    n = r.sum()
    return float(not p.any()) if n == 0 else float(np.logical_and(p, r).sum() / n)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI), None if either mask is empty.

    ``spacing`` is in numpy axis order of the masks (e.g. (sz, sy, sx) for a (z, y, x) array).
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not ref.any():
        return None
    p = torch.from_numpy(pred.astype(bool))[None, None]
    r = torch.from_numpy(ref.astype(bool))[None, None]
    with warnings.catch_warnings():
        # MONAI >= 1.5 warns on every call that get_mask_edges' always_return_as_numpy argument,
        # which its own compute_hausdorff_distance passes, is deprecated: nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*get_mask_edges:always_return_as_numpy.*",
                                category=FutureWarning)
        value = float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))[0, 0])
    return None if math.isnan(value) or math.isinf(value) else value


def false_positive_components(pred: np.ndarray, ref: np.ndarray, voxel_ml: float) -> list[float]:
    """Volumes (mL, largest first) of the connected pieces of ``pred`` that touch no voxel of ``ref``.

    Full connectivity (8 in 2D, 26 in 3D). A stray piece the reader has to delete by hand, e.g. a
    kidney-shaped blob labelled "liver", shows here even when Dice barely moves.
    """
    from scipy import ndimage

    p, r = pred.astype(bool), ref.astype(bool)
    components, n = ndimage.label(p, structure=np.ones((3,) * p.ndim, dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    touching = np.unique(components[r & p])
    stray = [int(sizes[i]) for i in range(1, n + 1) if i not in set(touching.tolist())]
    return sorted((s * voxel_ml for s in stray), reverse=True)
