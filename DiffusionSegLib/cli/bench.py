"""``diffusionseg bench``: inference timing of one model, or the real-data benchmark of every method.

The benchmark code (``DiffusionSegLib/bench/``) ships with the pip package only; in the Slicer
extension this command says so instead of failing on an import.
"""

from __future__ import annotations

import argparse

from DiffusionSegLib.core.errors import DiffusionSegError

SETTINGS = ("model", "samples", "steps", "sampler", "seed", "device", "batch_size")


def add_parser(sub: "argparse._SubParsersAction") -> None:
    from DiffusionSegLib.pipeline.settings import add_arguments, int_at_least

    p = sub.add_parser("bench", help="seconds per image/volume, network evaluations and peak memory for "
                                     "(samples x steps) settings")
    add_arguments(p, SETTINGS)
    p.add_argument("--settings", default="1x1,5x10,10x10,5x25", help="comma list of SAMPLESxSTEPS")
    p.add_argument("--size", default="128x128", help="2D image size HxW for the per-image figures")
    p.add_argument("--volume", default=None, help="volume file for the per-volume figures (default: bundled sample)")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed runs per setting; the median is shown")
    p.add_argument("-o", "--output", default=None, help="write the figures as JSON here")
    p.add_argument("--suite", choices=("inference", "real"), default="inference",
                   help="inference: timing of one model (default); real: the real-data benchmark (train and "
                        "evaluate every method on real CT, see docs/BENCHMARKS.md)")
    p.add_argument("--quick", action="store_true", help="--suite real: tiny budgets, a smoke check in minutes")
    p.add_argument("--data", default=None, help="--suite real: data folder (default runs/bench_real/data)")
    p.add_argument("--out", default=None, help="--suite real: results folder (default runs/bench_real/full|quick)")
    p.add_argument("--resume", action="store_true", help="--suite real: skip finished runs, continue interrupted ones")
    p.add_argument("--prepare-only", action="store_true", help="--suite real: only build the data folder")
    p.add_argument("--measure-steps", action="store_true",
                   help="--suite real: print the seconds per training step of each method (sizes the budget)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.suite == "real":
            from DiffusionSegLib.bench.real import cli
        else:
            from DiffusionSegLib.bench.synthetic import run_benchmark
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("DiffusionSegLib.bench"):
            raise
        raise DiffusionSegError("the benchmark is not part of this installation (the Slicer extension leaves it "
                                "out): pip install diffusionseg to run it") from None
    if args.suite == "real":
        return cli(args)
    run_benchmark(args)
    return 0
