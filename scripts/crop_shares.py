"""The share of each slice a card's crop would leave out, per image (issue 13, ``crop_min_removed``).

    python3 scripts/crop_shares.py IMAGE_OR_FOLDER [...] [--region lungs]

One line per image (a folder: its ``*.nii.gz`` and ``*.nrrd``, ``imagesTs/`` when it has one): its
in-plane size, the region's in-plane bounding box and the share of the slice area outside it
(pipeline/crop.py ``find_box``, as a run finds them), the number a run compares with the card's
``crop_min_removed``. Images only: no model, no labels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.enums import Region  # noqa: E402
from DiffusionSegLib.pipeline.crop import find_box  # noqa: E402


def images_of(path: Path) -> list[Path]:
    """``path`` itself, or the images in it (in ``imagesTs/`` when a dataset folder), sorted."""
    if path.is_file():
        return [path]
    folder = path / "imagesTs" if (path / "imagesTs").is_dir() else path
    found = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii", ".nrrd")))
    if not found:
        raise SystemExit(f"no images in {folder}")
    return found


def describe(path: Path, region: Region) -> str:
    """One line: name, in-plane size (x, y), box size (x, y) and the share of the slice left out."""
    image = sitk.ReadImage(str(path))
    size = image.GetSize()[:2]
    _, why, box, share = find_box(region, image)
    if box is None:
        return f"{path.name}: {size[0]} x {size[1]}, region {region} not found ({why or 'empty'})"
    rows, cols = box
    return (f"{path.name}: {size[0]} x {size[1]}, box {cols.stop - cols.start} x {rows.stop - rows.start}, "
            f"removed {share:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--region", default="lungs", help="a region of pipeline/regions.py (default lungs)")
    args = p.parse_args(argv)
    try:
        region = Region.parse(args.region, "--region")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for path in args.paths:
        if not path.exists():
            raise SystemExit(f"{path} does not exist")
        for image in images_of(path):
            print(describe(image, region))
    return 0


if __name__ == "__main__":
    sys.exit(main())
