"""``diffusionseg evaluate``: Dice, IoU and HD95 of a prediction folder or of a model on a dataset."""

from __future__ import annotations

import argparse
import json

# The run settings evaluate takes (its model is the first argument, not --model). A multi-task model runs
# each case with the task its dataset.json entry names; --task runs every case with one task.
SETTINGS = ("task", "samples", "steps", "sampler", "seed", "device", "batch_size", "crf", "postprocess", "crop")


def add_parser(sub: "argparse._SubParsersAction") -> None:
    from DiffusionSegLib.pipeline.settings import add_arguments

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95 of predictions (folder) or of a model on a dataset")
    p.add_argument("predictions_or_model", help="folder of predicted label maps, or a model folder/name")
    p.add_argument("dataset", help="dataset folder with reference labels (as for train)")
    p.add_argument("--split", default="test", help="test (default), validation or training")
    p.add_argument("-o", "--output", default=None, help="write per-case metrics as JSON here")
    add_arguments(p, SETTINGS)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.cli.progress import Bar
    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.training.evaluate import evaluate

    bar = None if args.quiet else Bar("cases", "evaluate", " cases")
    try:
        summary = evaluate(args.predictions_or_model, args.dataset, SegmentSettings.from_args(args),
                           split=args.split, out_json=args.output, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(summary["mean"], indent=2))
    if "ged_mean" in summary:  # a model's run: the spread of its samples against the references
        print("generalized energy distance (2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')], d = 1 - IoU):")
        for name, terms in summary["ged_mean"].items():
            print(f"  {name}: GED {terms['ged']:.4f} = 2 x {terms['cross']:.4f} - {terms['sample_diversity']:.4f} "
                  f"- {terms['reference_diversity']:.4f}")
    return 0
