"""Ensemble statistics of sampled masks: the uncertainty outputs.

``samples`` is (N, L, *spatial) binary (uint8/bool): N sampled masks, L labels. Per-voxel outputs
are (L, *spatial); per-label scalars are lists of L floats.

Distances are d(a, b) = 1 - IoU(a, b), with d = 0 when both masks are empty (two empty masks agree).
``sample_diversity`` is the E[d(S, S')] term of the Generalized Energy Distance (Kohl et al. 2018),
the only GED term available without a reference. Expectations within one set (S, S' or Y, Y') run
over the N(N-1)/2 distinct pairs, never pairing a mask with itself, as the reference implementations
do; they are 0 for a set of one mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from DiffusionSegLib.core.enums import Fusion, Uncertainty

# Voxels per chunk of the pairwise-intersection product: float32 counts are exact below 2**24, and
# a chunk's float copy stays in the CPU cache (K masks x 64 Ki voxels: 1.3 MB for K = 5); chunks of
# 4 Mi voxels took 1.3x (K = 5) to 18x (K = 20) longer on a 100 x 250 x 300 box.
_CHUNK_VOXELS = 1 << 16


def _check_samples(samples: np.ndarray, name: str = "samples") -> np.ndarray:
    """Validate an (N, L, *spatial) stack and return it as bool."""
    samples = np.asarray(samples)
    if samples.ndim < 3 or samples.shape[0] < 1:
        raise ValueError(f"{name} must be (N, L, *spatial) with N >= 1, got shape {samples.shape}")
    return samples.astype(bool, copy=False)


def count_dtype(n_samples: int) -> type:
    """The smallest unsigned integer type that counts up to ``n_samples``."""
    return np.uint8 if n_samples <= np.iinfo(np.uint8).max else np.uint16


def sample_counts(samples: np.ndarray) -> np.ndarray:
    """How many samples mark each voxel foreground: (N, L, *S) -> (L, *S) uint8 (uint16 for N > 255).

    Probability, consistency, ambiguity and uncertainty are all functions of this one array.
    """
    samples = _check_samples(samples)
    return samples.sum(axis=0, dtype=count_dtype(samples.shape[0]))


def probability_from_counts(counts: np.ndarray, n_samples: int) -> np.ndarray:
    """counts / N as float32, any shape: exactly the float32 mean of the binary samples."""
    probability = np.asarray(counts).astype(np.float32)
    probability /= np.float32(n_samples)  # in place: one float array, not two
    return probability


def probability(samples: np.ndarray) -> np.ndarray:
    """Per-voxel fraction of samples marking foreground: (N, L, *S) -> (L, *S) float32."""
    samples = _check_samples(samples)
    return probability_from_counts(sample_counts(samples), samples.shape[0])


def fused_probability(samples: np.ndarray, method: Fusion | str = Fusion.MEAN) -> np.ndarray:
    """The soft map a fusion thresholds: (N, L, *S) -> (L, *S) float32 in [0, 1].

    ``"mean"``: the fraction of samples marking the voxel. ``"staple"``: SimpleITK STAPLE per label
    (each sample is a rater, foreground value 1), the posterior foreground probability of its EM.
    This map, not the plain mean, is what DenseCRF refines, so the CRF output follows the fusion
    the user chose. Any N >= 1 works.
    """
    samples = _check_samples(samples)
    if Fusion.parse(method, "fusion method") == Fusion.MEAN:
        return probability(samples)
    import SimpleITK as sitk

    mean = probability(samples)
    fused = np.empty(samples.shape[1:], dtype=np.float32)
    for label in range(samples.shape[1]):
        staple = sitk.STAPLEImageFilter()
        staple.SetForegroundValue(1)
        raters = [sitk.GetImageFromArray(s[label].astype(np.uint8)) for s in samples]
        # The list (VectorOfImage) overload: the positional Execute(image1, ...) stops at 5 raters.
        prob = sitk.GetArrayFromImage(staple.Execute(raters))
        # STAPLE's EM is undefined (NaN) when no rater ever varies, e.g. all raters empty or all
        # full; there every rater agrees, so the mean is the answer.
        fused[label] = np.where(np.isnan(prob), mean[label], prob)
    return fused


def fused_mask(samples: np.ndarray, method: Fusion | str = Fusion.MEAN, threshold: float = 0.5) -> np.ndarray:
    """One mask from the samples: (N, L, *S) -> (L, *S) uint8, ``fused_probability`` > threshold."""
    return (fused_probability(samples, method) > threshold).astype(np.uint8)


def fused_mask_from_counts(counts: np.ndarray, n_samples: int, threshold: float = 0.5) -> np.ndarray:
    """Mean fusion from the sample counts: (L, *S) -> (L, *S) uint8, equal to ``fused_mask(samples)``.

    Each of the N + 1 possible counts is decided once, with the float32 arithmetic of
    ``probability_from_counts`` (counts / N > threshold): no float map is made.
    """
    decided = np.arange(n_samples + 1, dtype=np.float32) / np.float32(n_samples) > threshold
    # Monotone in the count: foreground from the first count decided so (none: n_samples + 1).
    first = int(np.argmax(decided)) if decided.any() else n_samples + 1
    return (np.asarray(counts) >= first).view(np.uint8)


def consistency(samples: np.ndarray) -> np.ndarray:
    """Voxels every sample marks foreground: (N, L, *S) -> (L, *S) uint8."""
    samples = _check_samples(samples)
    return consistency_from_counts(sample_counts(samples), samples.shape[0])


def ambiguity(samples: np.ndarray) -> np.ndarray:
    """Voxels where the samples disagree (some but not all foreground): (N, L, *S) -> (L, *S) uint8."""
    samples = _check_samples(samples)
    return ambiguity_from_counts(sample_counts(samples), samples.shape[0])


def consistency_from_counts(counts: np.ndarray, n_samples: int) -> np.ndarray:
    """counts == N as uint8, any shape (the bool result viewed as uint8: no second copy)."""
    return (np.asarray(counts) == n_samples).view(np.uint8)


def ambiguity_from_counts(counts: np.ndarray, n_samples: int) -> np.ndarray:
    """0 < counts < N as uint8, any shape.

    Computed along the first axis (a label, or a slice) at a time: the temporaries of the two
    comparisons are one row's size, not the whole array's (a CT's 9 labels: 0.5 GB).
    """
    counts = np.asarray(counts)
    if counts.ndim == 0:
        return np.asarray((0 < counts < n_samples)).view(np.uint8)
    out = np.empty(counts.shape, dtype=bool)
    for row, values in zip(out, counts):
        np.greater(values, 0, out=row)
        row &= values < n_samples
    return out.view(np.uint8)


def agreement_mask(samples: np.ndarray, k: int) -> np.ndarray:
    """Voxels at least ``k`` of the N samples mark foreground: (N, L, *S) -> (L, *S) uint8.

    k = N gives the consistency region, k = 1 the union of the samples, k = N // 2 + 1 the
    majority (the mean > 0.5 fused mask). The Slicer agreement slider moves k without resampling.
    """
    samples = _check_samples(samples)
    n = samples.shape[0]
    if not 1 <= int(k) <= n:
        raise ValueError(f"agreement k must be between 1 and the number of samples ({n}), got {k}")
    # Counting in uint16 keeps the temporary small and is exact for any practical N (< 65536).
    return (samples.sum(axis=0, dtype=np.uint16) >= int(k)).astype(np.uint8)


def uncertainty(samples: np.ndarray, kind: Uncertainty | str = Uncertainty.VARIANCE) -> np.ndarray:
    """Per-voxel uncertainty of the samples: (N, L, *S) -> (L, *S) float32 (see uncertainty_from_probability)."""
    return uncertainty_from_probability(probability(samples), kind)


def uncertainty_from_probability(p: np.ndarray, kind: Uncertainty | str = Uncertainty.VARIANCE) -> np.ndarray:
    """Per-voxel uncertainty of the mean p of binary samples, any shape -> float32.

    ``"variance"``: p (1 - p), the variance of the binary samples (max 0.25).
    ``"entropy"``: binary entropy of p in bits (max 1), with 0 log 0 = 0.
    """
    kind = Uncertainty.parse(kind, "uncertainty kind")
    p = np.asarray(p).astype(np.float64)
    if kind == Uncertainty.VARIANCE:
        return (p * (1.0 - p)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return np.nan_to_num(terms, nan=0.0).astype(np.float32)


def iou_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - IoU of two binary masks of the same shape; 0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    if union == 0:
        return 0.0
    return 1.0 - np.count_nonzero(a & b) / union


def occupied_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of a mask's non-zero voxels as slices, any shape; None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _pairwise_distances(masks: np.ndarray) -> np.ndarray:
    """All pairwise 1 - IoU of K binary masks: (K, *S) -> (K, K) float64.

    The intersections of every pair are one matrix product of the flattened masks (summed over
    voxel chunks), so the cost is a BLAS call, not a Python loop over pairs and voxels; only the
    bounding box of the voxels any mask marks is read.
    """
    box = occupied_box(masks.max(axis=0)) if masks.ndim > 1 else None
    if box is not None:  # voxels no mask marks add nothing to any intersection or size
        masks = masks[(slice(None), *box)]
    flat = masks.reshape(masks.shape[0], -1)
    inter = np.zeros((flat.shape[0], flat.shape[0]), dtype=np.float64)
    for start in range(0, flat.shape[1], _CHUNK_VOXELS):
        chunk = flat[:, start:start + _CHUNK_VOXELS].astype(np.float32)
        inter += chunk @ chunk.T
    sizes = np.diag(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.where(union > 0, 1.0 - inter / union, 0.0)
    return distance


def _mean_distinct_pairs(distance: np.ndarray) -> float:
    """Mean of the strictly-upper-triangle entries of a (K, K) matrix; 0 for K < 2."""
    k = distance.shape[0]
    if k < 2:
        return 0.0
    return float(distance[np.triu_indices(k, 1)].mean())


def sample_diversity(samples: np.ndarray) -> list[float]:
    """Mean pairwise 1 - IoU over the N(N-1)/2 sample pairs, per label (0 for N < 2)."""
    samples = _check_samples(samples)
    return [_mean_distinct_pairs(_pairwise_distances(samples[:, label])) for label in range(samples.shape[1])]


@dataclass(frozen=True)
class GEDTerms:
    """D2_GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] with its three terms, d = 1 - IoU."""

    ged: float
    cross: float  # E[d(S, Y)]: samples against references, all N x M pairs
    sample_diversity: float  # E[d(S, S')]: distinct sample pairs (0 for one sample)
    reference_diversity: float  # E[d(Y, Y')]: distinct reference pairs (0 for one reference)

    def to_dict(self) -> dict[str, float]:
        return {"ged": round(self.ged, 6), "cross": round(self.cross, 6),
                "sample_diversity": round(self.sample_diversity, 6),
                "reference_diversity": round(self.reference_diversity, 6)}


def ged_terms(samples: np.ndarray, references: np.ndarray) -> list[GEDTerms]:
    """The GED and its three terms per label: samples (N, L, *S), references (M, L, *S), M >= 1."""
    samples = _check_samples(samples)
    references = _check_samples(references, "references")
    if samples.shape[1:] != references.shape[1:]:
        raise ValueError(f"samples {samples.shape} and references {references.shape} differ in (L, *spatial)")
    n = samples.shape[0]
    terms = []
    for label in range(samples.shape[1]):
        distance = _pairwise_distances(np.concatenate([samples[:, label], references[:, label]]))
        cross = float(distance[:n, n:].mean())
        within_samples, within_references = _mean_distinct_pairs(distance[:n, :n]), _mean_distinct_pairs(distance[n:, n:])
        terms.append(GEDTerms(2.0 * cross - within_samples - within_references, cross, within_samples,
                              within_references))
    return terms


def generalized_energy_distance(samples: np.ndarray, references: np.ndarray) -> list[float]:
    """D2_GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] per label, d = 1 - IoU.

    samples (N, L, *S), references (M, L, *S). E[d(S, Y)] averages all N x M pairs; the within-set
    terms average distinct pairs (0 for a set of one).
    """
    return [t.ged for t in ged_terms(samples, references)]


def volumes_ml(mask: np.ndarray, spacing: Sequence[float]) -> list[float]:
    """Foreground volume per label in mL: (L, *S) mask, spacing in mm (one value per spatial axis).

    The product of the spacings is the voxel volume, so the axis order (SimpleITK x, y, z vs array
    z, y, x) does not matter.
    """
    mask = np.asarray(mask)
    if len(spacing) != mask.ndim - 1:
        raise ValueError(f"spacing {tuple(spacing)} does not match a mask of shape {mask.shape}")
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    return [np.count_nonzero(mask[label]) * voxel_mm3 / 1000.0 for label in range(mask.shape[0])]
