"""``diffusionseg segment``: one image or volume -> masks, uncertainty, report.json, overview.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from DiffusionSegLib.core.enums import Stage


def add_parser(sub: "argparse._SubParsersAction") -> None:
    from DiffusionSegLib.pipeline.settings import add_arguments

    p = sub.add_parser("segment", help="segment an image or volume; write masks, uncertainty, report, overview",
                       description="Segment an image or volume: fused mask, consistency, ambiguity, probability, "
                                   "uncertainty, sample diversity, report.json and overview.png. The input is "
                                   "checked against the model card first (modality, intensities, spacing, field "
                                   "of view, channels) and the sampling time is announced.")
    p.add_argument("input", help="image file (NIfTI, NRRD, MHA, PNG, JPEG...) or a DICOM folder")
    p.add_argument("-o", "--output", required=True,
                   help="output folder; the outputs of an earlier run in it are replaced, so it holds exactly "
                        "this run's outputs")
    p.add_argument("--overwrite", action="store_true",
                   help="also write into a folder that holds files other than an earlier run's outputs: they "
                        "are kept, except a file at the path of one of this run's outputs, which is replaced")
    add_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no time estimate (same as --progress none)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="bar: tqdm bar on stderr (default); json: one 'DIFFUSIONSEG_PROGRESS {...}' line "
                        "per event on stdout (stages load, sampling, crf, restore, write), for other programs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.cli.progress import json_progress, print_estimate, print_warnings, sampling_bar
    from DiffusionSegLib.models.store import resolve_model
    from DiffusionSegLib.outputs.writers import OutputFolder
    from DiffusionSegLib.pipeline.segment import segment_file
    from DiffusionSegLib.pipeline.settings import SegmentSettings

    settings = SegmentSettings.from_args(args)
    mode = "none" if args.quiet else args.progress
    progress = json_progress if mode == "json" else sampling_bar(mode == "none")
    model_dir = resolve_model(settings.model)
    # The output folder is checked (user files, writable) and reserved before the minutes of
    # sampling, not after them; a run that fails leaves it as it was.
    with OutputFolder(args.output, overwrite=args.overwrite) as folder:
        # The estimate costs one timed network call; a quiet run skips it.
        result = segment_file(args.input, model_dir, settings, progress, on_warnings=print_warnings,
                              on_estimate=None if args.quiet else print_estimate)
        if mode == "json":
            # Writing (seg.nrrd, overview) takes seconds on large volumes: a stage of its own for the UI.
            json_progress(Stage.WRITE, 0, 1)
        written = folder.write(result, keep_samples=settings.keep_samples)
    if mode == "json":
        json_progress(Stage.WRITE, 1, 1)
    rep = result.report
    print(f"model {rep['model']['name']} on {rep['device']}: {rep['samples']} samples x {rep['steps']} "
          f"{rep['sampler'].upper()} steps, {rep['total_s']:.2f} s, CRF: {rep['crf_backend']}")
    for name, value in rep["sample_diversity"].items():
        print(f"  {name}: sample diversity (mean pairwise 1-IoU) {value:.4f}")
    if rep.get("warnings"):  # repeated after the run: the lines before sampling scrolled away
        codes = ", ".join(dict.fromkeys(w["code"] for w in rep["warnings"]))
        print(f"  the input does not fit the model ({codes}): the masks may be meaningless, see 'warnings' "
              f"in report.json")
    if rep.get("crop"):  # where the card's crop sampled, or why it sampled the whole image
        print(f"  crop to {rep['crop']['region']}: {rep['crop']['note']}")
    for note in rep.get("postprocessing", {}).get("region_notes", []):  # a card filter that could not apply
        print(f"  {note}")
    print(f"outputs in {Path(args.output).resolve()}:")
    for name, path in written.items():
        print(f"  {name}: {path}")
    return 0
