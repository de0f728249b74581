"""``diffusionseg train``: a model from a dataset folder (resumable)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: "argparse._SubParsersAction") -> None:
    from DiffusionSegLib.methods.registry import Method

    p = sub.add_parser("train", help="train a model on a dataset folder (dataset.json or imagesTr/labelsTr; "
                                     "image_labels.csv for image-level labels)",
                       epilog="data-parallel on N processes (gloo on CPU, NCCL with one GPU each): torchrun "
                              "--standalone --nproc_per_node=N -m DiffusionSegLib train DATASET -o MODEL ... "
                              "(batch_size is the global batch, split evenly over the processes)")
    p.add_argument("dataset", help="dataset folder: dataset.json, or imagesTr/ and labelsTr/ (nnU-Net layout); "
                                   "for diffseg image_labels.csv, or lesion/ and healthy/ folders (no masks)")
    p.add_argument("--method", choices=Method.values(), default=None,
                   help="the method to train (default: the config's, else medsegdiff); diffseg learns from "
                        "image-level labels only")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override one TrainConfig field, e.g. --set steps=2000 --set 'patch_size=[96,96]'")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the model folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun --nproc_per_node=N -m DiffusionSegLib train ...`` every process runs this; rank 0
    alone shows the progress bar, logs below errors and prints the result (``training.distributed``)."""
    import logging

    from DiffusionSegLib.training import distributed
    from DiffusionSegLib.training.loop import config_from_cli, train

    main = distributed.is_main()
    if not main:  # the other ranks' warnings would repeat rank 0's
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    config = config_from_cli(args)
    card = train(args.dataset, args.output, config, resume=args.resume, progress=not args.quiet)
    if main:
        print(f"model written to {Path(args.output).resolve()}")
        print(json.dumps(card.metrics, indent=2))
    return 0
