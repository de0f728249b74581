"""The result object that flows from inference to the writers and the Slicer bridge."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from DiffusionSegLib.core.enums import Uncertainty
from DiffusionSegLib.models.card import LabelInfo
from DiffusionSegLib.pipeline.ensemble import (ambiguity_from_counts, consistency_from_counts, probability_from_counts,
                                                uncertainty_from_probability)


@dataclass
class SegmentationResult:
    """All outputs of one run, on exactly the input image's grid.

    Arrays are in SimpleITK array order of ``reference``: spatial = (z, y, x) or (y, x).

    The per-voxel statistics of the samples are kept as one small array, ``counts`` (how many of
    the ``n_samples`` samples mark each voxel, uint8 for N <= 255): probability, consistency,
    ambiguity and uncertainty are functions of it and are computed when read. A 512 x 512 x 100 CT
    with 9 labels then holds 236 MB of counts instead of 2.6 GB of float maps and masks. Use the
    ``*_of(label)`` methods to get one label's map without computing every label's.
    """

    reference: Any  # SimpleITK.Image: the input image (geometry source; may be an RGB vector image)
    labels: list[LabelInfo]
    counts: np.ndarray  # (L, *spatial) uint8/uint16: samples marking the voxel foreground, 0..n_samples
    n_samples: int
    fused: np.ndarray  # (L, *spatial) uint8, mean > 0.5 (or STAPLE), after post-processing
    uncertainty_kind: Uncertainty = Uncertainty.VARIANCE
    refined: np.ndarray | None = None  # (L, *spatial) uint8, DenseCRF-refined fused mask
    samples: np.ndarray | None = None  # (N, L, *spatial) uint8, kept when asked
    sample_diversity: list[float] = field(default_factory=list)  # per label, mean pairwise 1-IoU
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able run report

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.counts.shape != self.fused.shape:
            raise ValueError(f"counts {self.counts.shape} and fused {self.fused.shape} differ in shape")
        self.uncertainty_kind = Uncertainty.parse(self.uncertainty_kind, "uncertainty kind")

    @property
    def final_mask(self) -> np.ndarray:
        """The mask to show first: CRF-refined when available, else the fused mask."""
        return self.refined if self.refined is not None else self.fused

    def probability_of(self, label: int | slice = slice(None)) -> np.ndarray:
        """float32 fraction of the samples marking each voxel: (*spatial) for one label, (L, *spatial)
        for a slice of labels (default: every label)."""
        return probability_from_counts(self.counts[label], self.n_samples)

    def uncertainty_of(self, label: int | slice = slice(None)) -> np.ndarray:
        """float32 variance or entropy (``uncertainty_kind``) of the samples, shaped as ``probability_of``."""
        return uncertainty_from_probability(self.probability_of(label), self.uncertainty_kind)

    @property
    def probability(self) -> np.ndarray:
        """(L, *spatial) float32, the mean of the samples."""
        return self.probability_of()

    @property
    def uncertainty(self) -> np.ndarray:
        """(L, *spatial) float32, variance or entropy of the samples."""
        return self.uncertainty_of()

    def regions(self) -> Iterator[tuple[str, np.ndarray]]:
        """("fused", "crf" when refined, "consistency", "ambiguity") with their (L, *spatial) uint8
        masks, each computed when its turn comes: never every label's consistency and ambiguity at once."""
        yield "fused", self.fused
        if self.refined is not None:
            yield "crf", self.refined
        yield "consistency", self.consistency
        yield "ambiguity", self.ambiguity

    @property
    def consistency(self) -> np.ndarray:
        """(L, *spatial) uint8: every sample marks the voxel foreground."""
        return consistency_from_counts(self.counts, self.n_samples)

    @property
    def ambiguity(self) -> np.ndarray:
        """(L, *spatial) uint8: the samples disagree (some but not all foreground)."""
        return ambiguity_from_counts(self.counts, self.n_samples)
