"""The result object that flows from inference to the writers and the Slicer bridge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from DiffusionSegLib.models.card import LabelInfo


@dataclass
class SegmentationResult:
    """All outputs of one run, on exactly the input image's grid.

    Arrays are in SimpleITK array order of ``reference``: spatial = (z, y, x) or (y, x).
    """

    reference: Any  # SimpleITK.Image: the input image (geometry source; may be an RGB vector image)
    labels: list[LabelInfo]
    probability: np.ndarray  # (L, *spatial) float32, mean of the samples
    fused: np.ndarray  # (L, *spatial) uint8, mean > 0.5 (or STAPLE)
    consistency: np.ndarray  # (L, *spatial) uint8, every sample foreground
    ambiguity: np.ndarray  # (L, *spatial) uint8, samples disagree
    uncertainty: np.ndarray  # (L, *spatial) float32, variance or entropy of the samples
    refined: np.ndarray | None = None  # (L, *spatial) uint8, DenseCRF-refined fused mask
    samples: np.ndarray | None = None  # (N, L, *spatial) uint8, kept when asked
    sample_diversity: list[float] = field(default_factory=list)  # per label, mean pairwise 1-IoU
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able run report

    @property
    def final_mask(self) -> np.ndarray:
        """The mask to show first: CRF-refined when available, else the fused mask."""
        return self.refined if self.refined is not None else self.fused
