"""What modality an image is: the DICOM Modality tag when it carries one, else its intensities.

The modality comes from the DICOM Modality tag when the image carries it (SimpleITK metadata key
``0008|0060``); otherwise from intensity statistics: a CT in Hounsfield units has air near -1000 HU
and nearly every voxel within -1024..3071, which MR volumes and PNG/JPEG pictures do not have.

One module for both readers of the answer, so they cannot disagree: the input check
(``inputcheck``: does the input suit the model card?) and preprocessing (``preprocess``: a
``by_modality`` normalization picks its entry with :func:`input_modality`, at training and at
inference alike). numpy only at import (SimpleITK inside the functions): the Slicer panel imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MODALITY_TAG = "0008|0060"  # DICOM (0008,0060) Modality, as SimpleITK names it in the metadata
# The HU scale of CT: air -1000, bone up to ~3000; 12-bit scanners store -1024..3071. The margin
# absorbs reconstruction noise; voxels at a lower constant value are padding outside the scan circle.
HU_LOW, HU_HIGH, HU_MARGIN = -1024.0, 3071.0, 80.0
AIR_HU = -900.0  # anything at or below this is air (or lung): MR and pictures have none
_CT_IN_RANGE = 0.95  # share of voxels that must lie on the HU scale
_STAT_VOXELS = 2_000_000  # statistics on an even subsample: a second for any volume, in the Slicer UI too


def dicom_modality(image: Any) -> str | None:
    """The DICOM Modality code the image carries (``"CT"``, ``"MR"``...), or None."""
    try:
        if image.HasMetaDataKey(MODALITY_TAG):
            value = image.GetMetaData(MODALITY_TAG).strip().upper()
            return value or None
    except (AttributeError, RuntimeError):
        pass
    return None


@dataclass(frozen=True)
class IntensityStats:
    """What the intensity check looked at (on an even subsample of at most 2 M voxels)."""

    low: float
    high: float
    on_hu_scale: float  # share of non-padding voxels within -1024..3071 (+- margin)
    air: float  # share of voxels at or below -900
    eight_bit: bool  # unsigned 8-bit pixels: a picture, not a scan


def intensity_stats(image: Any) -> IntensityStats:
    """Statistics of a scalar image that tell CT in Hounsfield units from everything else."""
    import SimpleITK as sitk

    view = sitk.GetArrayViewFromImage(image).reshape(-1)
    sample = np.asarray(view[:: max(1, view.size // _STAT_VOXELS)], dtype=np.float64)
    low, high = float(sample.min()), float(sample.max())
    body = sample[sample > low] if low < HU_LOW - HU_MARGIN else sample  # drop scan-circle padding
    body = body if body.size else sample
    on_scale = float(np.mean((body >= HU_LOW - HU_MARGIN) & (body <= HU_HIGH + HU_MARGIN)))
    return IntensityStats(low=low, high=high, on_hu_scale=on_scale, air=float(np.mean(sample <= AIR_HU)),
                          eight_bit=image.GetPixelID() == sitk.sitkUInt8)


def not_ct_reason(stats: IntensityStats) -> str | None:
    """Why these intensities are not CT Hounsfield units, or None when they look like CT."""
    if stats.eight_bit:
        return (f"8-bit values {stats.low:g}..{stats.high:g}, as in a PNG/JPEG picture, where CT has "
                f"Hounsfield units (air -1000, water 0)")
    if stats.on_hu_scale < _CT_IN_RANGE:
        return (f"{100 * (1 - stats.on_hu_scale):.0f}% of the voxels lie outside the CT range "
                f"{HU_LOW:g}..{HU_HIGH:g} HU (values {stats.low:g}..{stats.high:g}): MR, or rescaled intensities?")
    if stats.air == 0.0 and stats.low > -200.0:
        return (f"no air: the lowest value is {stats.low:g}, where a CT has air near -1000 HU (MR, or CT "
                f"values without their rescale intercept?)")
    return None


def input_modality(image: Any) -> dict[str, str]:
    """The input's modality as far as it can be told, and from what: for report.json.

    ``modality`` is the DICOM Modality tag when the image carries one (``"CT"``, ``"MR"``...), else
    ``"RGB"`` for a 3-channel picture, else ``"CT"`` or ``"not CT"`` from the intensity statistics.
    """
    tag = dicom_modality(image)
    if tag:
        return {"modality": tag, "source": "DICOM Modality tag (0008,0060)"}
    if image.GetNumberOfComponentsPerPixel() == 3:
        return {"modality": "RGB", "source": "3 colour channels"}
    reason = not_ct_reason(intensity_stats(image))
    why = reason or "air near -1000 HU, values on the HU scale"
    return {"modality": "not CT" if reason else "CT", "source": f"intensity statistics: {why}"}


__all__ = ["MODALITY_TAG", "AIR_HU", "HU_LOW", "HU_HIGH", "HU_MARGIN", "IntensityStats", "dicom_modality",
           "intensity_stats", "not_ct_reason", "input_modality"]
