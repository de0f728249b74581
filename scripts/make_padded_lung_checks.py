"""VALIDATION volumes for how a 2D lung model depends on the slice's extent: the lung checks padded with air.

    python3 scripts/make_padded_lung_checks.py --bench data/bench --out data/lung_check_padded [--pad-mm 60]

A 2D model takes each axial slice whole, so a wider field of view changes what every layer's group
normalisation sees even where the anatomy is the same. The unified model's Dice on the real lung1
tumour moved by about 0.1 with the box it was sampled in (docs/BENCHMARKS.md, "Whole chest scans
cropped"). These volumes isolate that on validation data: the two lung check volumes
(``data/bench/lung_synthetic_check``, synthetic lesions; not test cases) with ``--pad-mm`` of air
(-1000 HU, label 0) added on the four in-plane sides, every voxel and label inside as it was. The
result is the test split of an nnU-Net style folder (``diffusionseg evaluate MODEL OUT --split test
--task lung``), written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.bench import data as benchdata  # noqa: E402
from DiffusionSegLib.core.errors import DatasetError  # noqa: E402

AIR_HU = -1000
CASES = ("check_chest", "check_base")


def pad_in_plane(image: sitk.Image, pad_mm: float, value: float) -> sitk.Image:
    """``image`` (3D) grown by ``pad_mm`` (rounded to whole voxels) of ``value`` on its four in-plane
    sides; slices and every voxel inside unchanged, the origin moved so that they keep their place."""
    pad = [int(round(pad_mm / s)) for s in image.GetSpacing()[:2]] + [0]
    return sitk.ConstantPad(image, pad, pad, value)


def build(bench: Path, out: Path, pad_mm: float) -> list[dict[str, str]]:
    """Write ``out`` (imagesTs/labelsTs/dataset.json) from ``bench``'s lung check set; returns the test list."""
    check_dir = benchdata.lung_check_dir(bench)
    if not pad_mm > 0:
        raise DatasetError(f"--pad-mm must be > 0, got {pad_mm}")
    cases, info = {}, {}
    for case in CASES:
        image = sitk.ReadImage(str(check_dir / "imagesTs" / f"{case}.nii.gz"))
        label = sitk.ReadImage(str(check_dir / "labelsTs" / f"{case}.nii.gz"))
        cases[f"{case}_padded"] = (pad_in_plane(image, pad_mm, AIR_HU), pad_in_plane(label, pad_mm, 0))
        info[f"{case}_padded"] = {"check_case": case, "size": list(cases[f"{case}_padded"][0].GetSize()),
                                  "size_before": list(image.GetSize())}
    return benchdata.write_lung_check_variant(
        out, cases, f"Lung check lesions padded with {pad_mm:g} mm of air in-plane (validation)",
        "SYNTHETIC lesions (the benchmark's lung check set, not test cases); the same voxels as the "
        "check set inside, air (-1000 HU) outside. For measuring how a model depends on the slice's "
        "extent; not a test set.", info,
        f"python3 scripts/make_padded_lung_checks.py --bench {bench} --out {out} --pad-mm {pad_mm:g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, default=Path("data/bench"), help="the prepared benchmark folder")
    p.add_argument("--out", type=Path, default=Path("data/lung_check_padded"))
    p.add_argument("--pad-mm", type=float, default=60.0, help="air added on each in-plane side, mm (default 60)")
    args = p.parse_args(argv)
    return benchdata.run_builder(lambda: build(args.bench, args.out, args.pad_mm), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
