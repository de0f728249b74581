"""Where a lesion model's fused mask puts its pieces, against the reference (issue 13).

    diffusionseg segment CT -o OUT --model MODEL --no-postprocess
    python3 scripts/describe_lesion_pieces.py OUT CT LABEL

One line per connected piece (full connectivity) of ``OUT/fused.nii.gz``: its voxels, the slices it
spans, how many of its voxels the reference marks, the share inside the HU-threshold lung mask (the
one the region is built on, gas left out) and inside the lungs region (pipeline/regions.py), and the
largest share of samples that marks one of its voxels (``probability_lesion.nii.gz``; 1.0 = a voxel
every sample marks, which ``consistent_components`` asks for). Then the share of the reference inside
the lung mask and the region.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.enums import Region  # noqa: E402
from DiffusionSegLib.pipeline.regions import find_region, region_lung_mask  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outputs", type=Path, help="a segment output folder (fused.nii.gz, probability_lesion.nii.gz)")
    p.add_argument("image", type=Path)
    p.add_argument("label", type=Path)
    args = p.parse_args(argv)
    for needed in (args.outputs / "fused.nii.gz", args.outputs / "probability_lesion.nii.gz", args.image, args.label):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing (a segment output folder of a model with a 'lesion' label?)")
    image = sitk.ReadImage(str(args.image))
    ct = sitk.GetArrayFromImage(image).astype(np.float32)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(args.label))) > 0
    fused = sitk.GetArrayFromImage(sitk.ReadImage(str(args.outputs / "fused.nii.gz"))) > 0
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(args.outputs / "probability_lesion.nii.gz")))
    lungs = region_lung_mask(ct, tuple(reversed(image.GetSpacing())))  # the lungs the region is built on
    region = find_region(Region.LUNGS, image)
    if region is None:
        region = np.zeros_like(lungs)
    pieces, n = ndimage.label(fused, structure=np.ones((3, 3, 3), bool))
    print(f"{n} pieces, {int(fused.sum())} voxels; reference {int(reference.sum())} voxels")
    for i in range(1, n + 1):
        piece = pieces == i
        z = np.flatnonzero(piece.any(axis=(1, 2)))
        print(f"piece {i}: {int(piece.sum())} voxels, slices {z.min()}-{z.max()}, reference {int((piece & reference).sum())},"
              f" in lung mask {lungs[piece].mean():.2f}, in region {region[piece].mean():.2f},"
              f" most samples {probability[piece].max():.2f}")
    print(f"reference in lung mask {lungs[reference].mean():.3f}, in region {region[reference].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
