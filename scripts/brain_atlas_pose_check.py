"""How well the brain atlas region follows a head that lies differently in its field of view.

    python3 scripts/brain_atlas_pose_check.py data/brain_whole_val [--case NAME ...]

For each whole head of an nnU-Net style test split (imagesTs/, labelsTs/: e.g. the output of
scripts/make_brain_whole_validation.py) the brain is found once as the head lies, then the head and its
label are moved rigidly within the same grid (pitch, roll and yaw of 10-20 degrees about the grid's
centre, shifts of 15 and 30 mm) and the brain is found again. Printed per pose: the Dice between the brain
found on the moved head and the first brain carried by the same motion, and the fraction of the
moved tumour inside the brain found (pipeline/brain_atlas.py; a piece is kept when at least half of it
is inside). Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.pipeline.brain_atlas import find_brain  # noqa: E402

# (axis of the rotation: 0 = x, left-right (pitch); 1 = y (roll); 2 = z (yaw), degrees, shift along y in mm)
POSES = ((0, 10.0, 0.0), (0, -10.0, 0.0), (0, 20.0, 0.0), (0, -20.0, 0.0), (0, 30.0, 0.0), (0, -30.0, 0.0),
         (1, 10.0, 0.0), (2, 15.0, 0.0), (2, -15.0, 0.0), (2, 30.0, 0.0), (0, 0.0, 15.0), (0, 0.0, -15.0),
         (0, 0.0, 30.0), (0, 0.0, -30.0))


def pose_rows(image: sitk.Image, label: sitk.Image, poses=POSES) -> list[dict[str, float]]:
    """One row per pose: {"axis", "degrees", "shift_mm", "dice", "tumour_inside"} (dice/fraction NaN
    when the brain is not found on the moved head; tumour_inside NaN when the tumour left the grid)."""
    base, why = find_brain(image)
    if base is None:
        raise ValueError(f"no brain found on the head as it lies: {why}")
    first = sitk.GetImageFromArray(base.astype(np.float32))
    first.CopyInformation(image)
    size = np.array(image.GetSize(), dtype=float)
    centre = image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0))
    rows = []
    for axis, degrees, shift in poses:
        motion = sitk.Euler3DTransform()
        motion.SetCenter(centre)
        angles = [0.0, 0.0, 0.0]
        angles[axis] = float(np.deg2rad(degrees))
        motion.SetRotation(*angles)
        motion.SetTranslation((0.0, float(shift), 0.0))
        moved = sitk.Resample(image, image, motion, sitk.sitkLinear, 0.0)
        tumour = sitk.GetArrayFromImage(sitk.Resample(label, image, motion, sitk.sitkNearestNeighbor, 0)) > 0
        expected = sitk.GetArrayFromImage(sitk.Resample(first, image, motion, sitk.sitkLinear, 0.0)) > 0.5
        found, _ = find_brain(moved)
        dice = inside = float("nan")
        if found is not None:
            dice = float(2 * (found & expected).sum() / max(found.sum() + expected.sum(), 1))
            inside = float(found[tumour].mean()) if tumour.any() else float("nan")
        rows.append({"axis": axis, "degrees": degrees, "shift_mm": shift, "dice": dice, "tumour_inside": inside})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder with imagesTs/ and labelsTs/")
    parser.add_argument("--case", action="append", help="case name(s) (default: every image in imagesTs/)")
    args = parser.parse_args(argv)
    images = sorted((args.folder / "imagesTs").glob("*.nii.gz"))
    cases = args.case or [p.name[: -len(".nii.gz")] for p in images]
    if not cases:
        print(f"error: no images in {args.folder / 'imagesTs'}", file=sys.stderr)
        return 2
    for case in cases:
        image = sitk.ReadImage(str(args.folder / "imagesTs" / f"{case}.nii.gz"))
        label = sitk.ReadImage(str(args.folder / "labelsTs" / f"{case}.nii.gz"))
        for row in pose_rows(image, label, POSES):
            print(f"{case}: rotation {row['degrees']:+.0f} deg about axis {row['axis']}, shift {row['shift_mm']:+.0f} mm: "
                  f"brain Dice {row['dice']:.3f}, tumour inside {row['tumour_inside']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
