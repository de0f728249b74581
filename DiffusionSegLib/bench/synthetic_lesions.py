"""Synthetic lung lesions inserted into real CT anatomy (training data only, never test data).

A lesion is a lobulated, randomly oriented ellipsoid (smooth random perturbation of its
boundary), given a solid-tumour CT density with a coarse heterogeneous texture plus fine
scanner-like noise, and blended into the CT over a short partial-volume ramp at its border.
It is confined to the lung mask: the label is always a subset of the lung, and the CT outside the
lung is never changed. Everything is seeded: the same inputs and seed give bit-identical output.

Design values (``LesionDesign``) follow the two real pyradiomics lung tumours the benchmark tests
on (measured with SimpleITK from ``lung1/lung2_image.nrrd``): diameters about 13 mm and 45 mm,
median density -31 HU and +41 HU (5th percentile -300 / -223 HU: partial volume at the border
of 5 mm slices), surrounded by aerated lung around -800 HU. The design spans 6-45 mm and
-60..+60 HU so both sit inside the training distribution without copying either.

Arrays are (z, y, x) in SimpleITK array order; spacings are (z, y, x) in mm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["LesionDesign", "InsertedLesion", "SynthesisResult", "insert_lesions"]


@dataclass(frozen=True)
class LesionDesign:
    """What a synthetic lesion looks like; all sizes in mm, densities in HU."""

    diameter_mm: tuple[float, float] = (6.0, 45.0)  # drawn log-uniformly: small lesions are common
    axis_ratio: tuple[float, float] = (0.75, 1.3)  # per-axis factor on the radius (volume-preserving)
    lobulation: float = 0.2  # boundary perturbation amplitude, as a fraction of the radius
    density_hu: tuple[float, float] = (-60.0, 60.0)  # mean density of the solid lesion
    texture_hu: tuple[float, float] = (10.0, 30.0)  # std of the coarse heterogeneity (sigma texture_mm)
    texture_mm: float = 2.0
    noise_hu: float = 20.0  # std of the fine, scanner-like noise (about one voxel)
    edge_mm: float = 1.5  # width of the partial-volume ramp across the border
    min_inside_lung: float = 0.75  # share of the ideal blob that must lie in the lung
    margin_mm: float = 5.0  # minimum gap between two lesions
    attempts: int = 60  # placements tried per lesion before giving up on it

    def check(self) -> None:
        lo, hi = self.diameter_mm
        if not 0 < lo <= hi:
            raise ValueError(f"diameter_mm must satisfy 0 < low <= high, got {self.diameter_mm}")
        if not 0 < self.axis_ratio[0] <= self.axis_ratio[1]:
            raise ValueError(f"axis_ratio must satisfy 0 < low <= high, got {self.axis_ratio}")
        if self.edge_mm <= 0 or not 0 < self.min_inside_lung <= 1:
            raise ValueError("edge_mm must be > 0 and min_inside_lung in (0, 1]")


@dataclass
class InsertedLesion:
    """One inserted lesion (JSON-able with ``asdict``)."""

    centre_zyx: list[int]  # voxel index of the centre
    diameter_mm: float  # nominal diameter before the axis ratios and lobulation
    density_hu: float
    texture_hu: float
    voxels: int  # label voxels (inside the lung)
    volume_ml: float


@dataclass
class SynthesisResult:
    """ct: float32 (z, y, x) HU with lesions; mask: uint8 (z, y, x) lesion label; lesions: what was inserted."""

    ct: np.ndarray
    mask: np.ndarray
    lesions: list[InsertedLesion]

    def summary(self) -> list[dict[str, Any]]:
        return [asdict(lesion) for lesion in self.lesions]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit std: (shape) float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=list(sigma_vox),
                                    mode="reflect")
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _blob_field(rng: np.random.Generator, design: LesionDesign, radius: float, box_shape: tuple[int, ...],
                centre_in_box: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) of a lobulated rotated ellipsoid in a box."""
    ratios = np.exp(rng.uniform(math.log(design.axis_ratio[0]), math.log(design.axis_ratio[1]), 3))
    ratios = ratios / np.prod(ratios) ** (1.0 / 3.0)  # same volume as the sphere of this radius
    semi_axes = radius * ratios
    rotation = _random_rotation(rng)
    grid = np.indices(box_shape, dtype=np.float32)
    offsets_mm = (grid - centre_in_box.reshape(3, 1, 1, 1)) * spacing.reshape(3, 1, 1, 1)
    local = np.tensordot(rotation.T.astype(np.float32), offsets_mm, axes=1)  # coordinates along the axes
    rho = np.sqrt(sum((local[i] / semi_axes[i]) ** 2 for i in range(3)))
    lobes = _smooth_noise(rng, box_shape, np.maximum(0.4 * radius / spacing, 0.5))
    return (rho - 1.0) * radius + design.lobulation * radius * lobes


def insert_lesions(ct: np.ndarray, lung: np.ndarray, spacing_zyx: Sequence[float], n_lesions: int, seed: int,
                   design: LesionDesign = LesionDesign()) -> SynthesisResult:
    """Insert up to ``n_lesions`` synthetic lesions into the lung of a CT.

    ct: (z, y, x) HU (any real dtype); lung: (z, y, x) bool lung mask; spacing_zyx: mm.
    Each lesion: diameter log-uniform in ``design.diameter_mm``; centre a lung voxel at least
    half a radius from the lung border and ``margin_mm`` clear of earlier lesions; placed only
    when ``min_inside_lung`` of its ideal shape lies in the lung (else another centre is tried,
    ``attempts`` times, then the lesion is skipped). The new value of a voxel is
    ``ct + alpha * (density + texture + noise - ct)`` with alpha the partial-volume ramp (1 inside,
    0 outside, linear over ``edge_mm``) times the lung mask; the label is alpha >= 0.5.
    Returns the modified CT (float32), the label (uint8) and the lesions inserted.
    """
    design.check()
    ct = np.asarray(ct)
    lung = np.asarray(lung, dtype=bool)
    if ct.ndim != 3 or ct.shape != lung.shape:
        raise ValueError(f"ct {ct.shape} and lung {lung.shape} must be the same (z, y, x) shape")
    if not lung.any():
        raise ValueError("the lung mask is empty: nowhere to insert a lesion")
    spacing = np.asarray(spacing_zyx, dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = ct.astype(np.float32, copy=True)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    occupied = np.zeros(ct.shape, dtype=bool)  # earlier lesions grown by margin_mm
    depth_mm = ndimage.distance_transform_edt(lung, sampling=spacing)  # distance to the lung border
    lesions: list[InsertedLesion] = []
    for _ in range(n_lesions):
        diameter = float(math.exp(rng.uniform(math.log(design.diameter_mm[0]), math.log(design.diameter_mm[1]))))
        radius = diameter / 2.0
        # Large lesions cannot be half a radius deep in a thin lung region: fall back to the deepest voxels.
        depth = min(0.5 * radius, float(depth_mm.max()))
        candidates = np.argwhere((depth_mm >= depth) & ~occupied)
        if len(candidates) == 0:
            break
        for _attempt in range(design.attempts):
            centre = candidates[int(rng.integers(len(candidates)))]
            reach_mm = radius * design.axis_ratio[1] * (1.0 + 3.0 * design.lobulation) + design.edge_mm + design.margin_mm
            half = np.ceil(reach_mm / spacing).astype(int) + 1
            lo = np.maximum(centre - half, 0)
            hi = np.minimum(centre + half + 1, ct.shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            signed = _blob_field(rng, design, radius, tuple(hi - lo), (centre - lo).astype(np.float32), spacing)
            blob = signed <= 0.0
            if not blob.any():
                continue
            inside = float((blob & lung[box]).sum()) / float(blob.sum())
            if inside < design.min_inside_lung or (blob & occupied[box]).any():
                continue
            alpha = np.clip(0.5 - signed / design.edge_mm, 0.0, 1.0) * lung[box]
            density = float(rng.uniform(*design.density_hu))
            texture = float(rng.uniform(*design.texture_hu))
            coarse = _smooth_noise(rng, blob.shape, np.maximum(design.texture_mm / spacing, 0.5))
            fine = _smooth_noise(rng, blob.shape, (0.0, 0.6, 0.6))  # in-plane grain, like reconstruction noise
            value = density + texture * coarse + design.noise_hu * fine
            region = out[box]
            out[box] = region + alpha * (value - region)
            label = alpha >= 0.5
            mask[box] |= label.astype(np.uint8)
            occupied[box] |= signed <= design.margin_mm
            voxels = int(label.sum())
            lesions.append(InsertedLesion([int(c) for c in centre], round(diameter, 2), round(density, 1),
                                          round(texture, 1), voxels,
                                          round(voxels * float(np.prod(spacing)) / 1000.0, 3)))
            break
    return SynthesisResult(out, mask, lesions)
