"""An input cut to a model card's region before sampling, and the outputs put back on the input's grid.

A lung lesion model trained on chest crops (the lungs plus 10 mm, every slice) meets whole scans in
use: table, arms, back, neck and abdomen, which it never saw and where it draws false positives. With
``crop_to_region`` a run samples only the in-plane bounding box of the card's region (for the lungs,
the per-slice lung hull grown 10 mm: the training crop) and keeps every slice, as the crops did. Every
output is then written back on the whole input grid, zero (not sampled) outside the box.

Measured on the unified model's lung task (docs/BENCHMARKS.md, "Whole chest scans cropped"): a whole
scan's false positives went, but a tumour already cropped scored lower: cut again to a box a few pixels
different. ``crop_min_removed`` leaves such an input as it is: the crop applies only when its box leaves
out at least that share of the slice. Both bundled lung models crop so (0.25; docs/BENCHMARKS.md, "A crop
that leaves an input already cut to the region as it is").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

    from DiffusionSegLib.core.enums import Region

# (rows, columns) of the input in SimpleITK's array order: the last two axes of (z, y, x) or (y, x).
Box = tuple[slice, slice]


def region_box(mask: np.ndarray) -> Box | None:
    """In-plane bounding box of a bool region (z, y, x) or (y, x): (rows, columns) slices, None when empty."""
    plane = np.asarray(mask, dtype=bool).reshape(-1, *np.shape(mask)[-2:]).any(axis=0)  # (y, x)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def removed_fraction(box: Box, plane: Sequence[int]) -> float:
    """The share of a (rows, columns) slice's area that ``box`` leaves out, in [0, 1)."""
    rows, cols = box
    return 1.0 - (rows.stop - rows.start) * (cols.stop - cols.start) / (int(plane[0]) * int(plane[1]))


def find_box(region: "Region", image: "sitk.Image") -> tuple[np.ndarray | None, str, Box | None, float | None]:
    """The region in ``image`` and its crop: (mask or None, why it is None, in-plane box or None, share of
    the slice the box leaves out or None)."""
    from DiffusionSegLib.pipeline.regions import find_region_why

    mask, why = find_region_why(region, image)
    box = None if mask is None else region_box(mask)
    return mask, why, box, None if box is None else removed_fraction(box, mask.shape[-2:])


def crop_image(image: "sitk.Image", box: Box) -> "sitk.Image":
    """``image`` (2D or 3D) cut in-plane to ``box``, every slice kept; each kept voxel keeps its physical
    position (SimpleITK slicing moves the origin)."""
    rows, cols = box
    return image[cols, rows] if image.GetDimension() == 2 else image[cols, rows, :]


def paste(array: np.ndarray, box: Box, shape: Sequence[int]) -> np.ndarray:
    """``array`` (..., *cropped spatial) put back at ``box`` into zeros of (..., *shape), same dtype.
    ``shape`` is the whole input's spatial shape in array order ((z, y, x) or (y, x))."""
    lead = array.shape[:array.ndim - len(shape)]
    out = np.zeros(lead + tuple(shape), dtype=array.dtype)
    out[(Ellipsis, *box)] = array
    return out


def box_report(box: Box, image: "sitk.Image") -> dict[str, Any]:
    """Where the box lies, for report.json: its first voxel and size in SimpleITK (x, y[, z]) order."""
    rows, cols = box
    index, size = [cols.start, rows.start], [cols.stop - cols.start, rows.stop - rows.start]
    if image.GetDimension() == 3:
        index, size = index + [0], size + [image.GetSize()[2]]
    return {"index_xyz": index, "size_xyz": size, "input_size_xyz": list(image.GetSize())}
