"""VALIDATION volumes for how a 2D lung model does on a small field of view: lesion-centred crops of the
lung checks.

    python3 scripts/make_tight_lung_checks.py --bench data/bench --out data/lung_check_tight [--box-mm 80]

A tumour is often handed over cut close around it (pyradiomics' breast1 is an 80 x 30 mm crop), while
the lung models were trained on crops of 128 mm (unified model) and 192 mm (lung model). Each synthetic
lesion of the two lung check volumes (``data/bench/lung_synthetic_check``; not test cases) of at least
``--min-voxels`` becomes one case: a ``--box-mm`` square centred in-plane on the lesion (clipped to the
volume), the lesion's slices plus ``--margin-mm`` above and below, original voxels and geometry; its
label holds every lesion voxel inside the box. The result is the test split of an nnU-Net style folder
(``diffusionseg evaluate MODEL OUT --split test --task lung``), written to a temporary sibling and
renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.bench import data as benchdata  # noqa: E402
from DiffusionSegLib.core.errors import DatasetError  # noqa: E402

CASES = ("check_chest", "check_base")


def lesion_boxes(label: np.ndarray, spacing_xyz: tuple[float, ...], box_mm: float, margin_mm: float,
                 min_voxels: int) -> list[tuple[int, tuple[slice, slice, slice]]]:
    """(lesion number, (z, y, x) box) for each lesion (26-connected piece, numbered in raster order from
    1) of at least ``min_voxels``: ``box_mm`` in-plane around its centre, its slices +- ``margin_mm``."""
    pieces, _ = ndimage.label(label > 0, structure=np.ones((3, 3, 3)))
    boxes = []
    for number, found in enumerate(ndimage.find_objects(pieces), 1):
        if found is None or int((pieces[found] == number).sum()) < min_voxels:
            continue
        box = []
        for axis, (extent, size) in enumerate(zip(found, label.shape)):
            spacing = spacing_xyz[2 - axis]
            if axis == 0:
                grow = int(round(margin_mm / spacing))
                start, stop = extent.start - grow, extent.stop + grow
            else:
                half = int(round(box_mm / spacing / 2))
                centre = (extent.start + extent.stop) // 2
                start, stop = centre - half, centre + half
            box.append(slice(max(0, start), min(size, stop)))
        boxes.append((number, tuple(box)))
    return boxes


def build(bench: Path, out: Path, box_mm: float, margin_mm: float, min_voxels: int) -> list[dict[str, str]]:
    """Write ``out`` (imagesTs/labelsTs/dataset.json) from ``bench``'s lung check set; returns the test list."""
    check_dir = benchdata.lung_check_dir(bench)
    if not (box_mm > 0 and margin_mm >= 0 and min_voxels >= 1):
        raise DatasetError(f"--box-mm must be > 0, --margin-mm >= 0 and --min-voxels >= 1; got {box_mm:g}, "
                           f"{margin_mm:g}, {min_voxels}")
    cases, info = {}, {}
    for case in CASES:
        image = sitk.ReadImage(str(check_dir / "imagesTs" / f"{case}.nii.gz"))
        label = sitk.ReadImage(str(check_dir / "labelsTs" / f"{case}.nii.gz"))
        for number, (zs, ys, xs) in lesion_boxes(sitk.GetArrayFromImage(label), image.GetSpacing(), box_mm,
                                                 margin_mm, min_voxels):
            name = f"{case}_lesion{number}"
            cases[name] = (image[xs, ys, zs], label[xs, ys, zs])  # SimpleITK slicing keeps the geometry
            info[name] = {"check_case": case, "index_xyz": [xs.start, ys.start, zs.start],
                          "size": list(cases[name][0].GetSize())}
    if not cases:
        raise DatasetError(f"no lesion of at least {min_voxels} voxels in {check_dir}")
    return benchdata.write_lung_check_variant(
        out, cases, f"Lung check lesions in {box_mm:g} mm crops (validation)",
        "SYNTHETIC lesions (the benchmark's lung check set, not test cases), each in a crop centred on "
        "it: for measuring a model on a small field of view; not a test set.", info,
        f"python3 scripts/make_tight_lung_checks.py --bench {bench} --out {out} "
        f"--box-mm {box_mm:g} --margin-mm {margin_mm:g} --min-voxels {min_voxels}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, default=Path("data/bench"), help="the prepared benchmark folder")
    p.add_argument("--out", type=Path, default=Path("data/lung_check_tight"))
    p.add_argument("--box-mm", type=float, default=80.0, help="in-plane side of each crop, mm (default 80)")
    p.add_argument("--margin-mm", type=float, default=15.0, help="slices kept above and below the lesion, mm")
    p.add_argument("--min-voxels", type=int, default=100, help="smaller lesions get no case of their own")
    args = p.parse_args(argv)
    return benchdata.run_builder(lambda: build(args.bench, args.out, args.box_mm, args.margin_mm,
                                               args.min_voxels), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
