"""Head-foot anchors for unlabelled CTs from one landmark, the lung base (issue 15, coordinate model).

Crop consistency defines each scan's coordinates only up to its own translation; nothing in it says
that slice 40 of one patient and slice 12 of another cut the body at the same level. In-plane, the
body outline gives that away in every crop; head-foot it does not, and with a handful of patients
the coordinate network memorises each scan's level instead of reading it from anatomy.

This module finds, WITHOUT labels, one head-foot level every chest or abdominal CT can agree on: the
lung base, where the share of the body's cross-section that is air (``air_profile``) first stays above
a threshold for the longest run of slices (the lungs; bowel gas gives short, low bumps). A scan that
starts inside the lungs shows only the apex end of that run; its base is then the apex minus the lung
height measured on the scans that show both ends (``lung_base_levels``). The levels (mm) anchor the
coordinate network's head-foot axis (``train_coordinates(anchors=...)``), so that it learns "this
anatomy lies this far from the lung base" from several patients at once.

(A first design slid whole profiles of air, bone and cross-section along each other; with scans that
overlap only partly, chest and abdomen, it put whole scans hundreds of mm apart. One landmark that is
either seen or not is what held.)

Volumes are (D, H, W) arrays, axis 0 head-foot with the head at the END (LPS: z grows to the head),
normalised by ``ct_window`` (-1 = -1000 HU, 1 = 1000 HU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

BODY_HU, AIR_HU = -500.0, -400.0
LUNG_AIR_FRACTION = 0.1  # lung slices: 0.15-0.4 of the body is air; abdomen 0.01-0.07 (measured on the 4 patients)


def air_profile(volume: np.ndarray, min_area_fraction: float = 0.2) -> np.ndarray:
    """(D, H, W) ct_window-normalised CT -> (D,) share of each axial slice's body cross-section below -400 HU.

    The body is the largest connected piece above -500 HU (a separate table drops out), its holes filled
    slice by slice so that lungs and bowel gas count as inside. Slices whose body is smaller than
    ``min_area_fraction`` of the largest (the ends of a scan, padding) are NaN: too little to judge.
    """
    hu = np.asarray(volume, dtype=np.float32) * 1000.0
    if hu.ndim != 3:
        raise ValueError(f"air_profile needs a (D, H, W) volume, not shape {hu.shape}")
    out = np.full(hu.shape[0], np.nan)
    pieces, count = ndimage.label(hu > BODY_HU)
    if count == 0:
        return out
    body = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
    area = filled.sum(axis=(1, 2)).astype(np.float64)
    keep = area >= min_area_fraction * area.max()
    air = (filled & (hu < AIR_HU)).sum(axis=(1, 2))
    out[keep] = air[keep] / area[keep]
    return out


def lung_run(profile: np.ndarray, threshold: float = LUNG_AIR_FRACTION) -> tuple[int, int] | None:
    """(first, last) slice of the longest run with air share >= threshold (the lungs), None without one.
    NaN slices break a run."""
    above = np.nan_to_num(np.asarray(profile, dtype=np.float64), nan=0.0) >= threshold
    best, start = None, None
    for i, flag in enumerate([*above, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = (start, i - 1)
            start = None
    return best


def lung_base_levels(profiles: Sequence[np.ndarray], spacing_mm: float, threshold: float = LUNG_AIR_FRACTION
                     ) -> np.ndarray:
    """(S,) head-foot level (mm from each scan's first slice) of the lung base; NaN where it cannot be placed.

    profiles: one (D_s,) ``air_profile`` per scan, all at ``spacing_mm``. The base is the first slice of
    the lung run (``lung_run``) when the slice below it is inside the scan and below the threshold. A
    run that starts at the scan's first defined slice (the scan begins inside the lungs) but ends
    before its top gives the base as apex - lung height, the median height of the scans that show both
    ends; with none such, or no lung run, NaN.
    """
    if spacing_mm <= 0:
        raise ValueError("spacing_mm must be positive")
    base, apex = [], []
    for profile in profiles:
        p = np.asarray(profile, dtype=np.float64)
        run = lung_run(p, threshold)
        defined = np.flatnonzero(np.isfinite(p))
        if run is None or not len(defined):
            base.append(np.nan)
            apex.append(np.nan)
            continue
        base.append(run[0] * spacing_mm if run[0] > defined[0] else np.nan)
        apex.append(run[1] * spacing_mm if run[1] < defined[-1] else np.nan)
    base, apex = np.array(base), np.array(apex)
    heights = (apex - base)[np.isfinite(apex - base)]
    if len(heights):
        missing = np.isnan(base) & np.isfinite(apex)
        base[missing] = apex[missing] - float(np.median(heights))
    return base


RIGHT_LUNG, LEFT_LUNG = 1, 2  # values of lung_halves' map


def lung_halves(lungs: np.ndarray, spacing_mm: float, body: np.ndarray, z_range_mm: tuple[float, float] | None = None,
                level_mm: float = 0.0) -> np.ndarray:
    """Label-free right and left lungs of an LPS CT (z, y, x) on an isotropic ``spacing_mm`` grid: int (z, y, x),
    RIGHT_LUNG / LEFT_LUNG / 0. ``lungs`` (bool, e.g. pipeline.regions.threshold_lung_mask) split at the
    body's centroid in x (LPS: x grows toward the patient's left). ``z_range_mm``: keep only slices whose
    head-foot level relative to ``level_mm`` (e.g. the scan's lung base, mm from its first slice) lies in
    [low, high], so two scans are compared over the same stretch of lung rather than over what each covers."""
    lungs = np.asarray(lungs, bool)
    out = np.zeros(lungs.shape, np.int16)
    if not lungs.any() or not body.any():
        return out
    middle = float(np.argwhere(body)[:, 2].mean())
    x = np.arange(lungs.shape[2])[None, None, :]
    out[lungs & (x < middle)] = RIGHT_LUNG
    out[lungs & (x >= middle)] = LEFT_LUNG
    if z_range_mm is not None:
        level = np.arange(lungs.shape[0]) * spacing_mm - level_mm
        out[(level < z_range_mm[0]) | (level > z_range_mm[1])] = 0
    return out


def lung_extent_mm(halves: np.ndarray, spacing_mm: float, level_mm: float) -> tuple[float, float] | None:
    """(lowest, highest) head-foot level of a lung_halves map's slices, relative to ``level_mm``; None without lung."""
    slices = np.flatnonzero(halves.reshape(halves.shape[0], -1).any(axis=1))
    if slices.size == 0:
        return None
    return float(slices[0] * spacing_mm - level_mm), float(slices[-1] * spacing_mm - level_mm)
