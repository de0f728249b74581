"""Command-line interface: diffusionseg segment, train, evaluate, bench, models (install, download, clear).

User errors (DiffusionSegError) and usage errors are printed as one line on stderr with exit
status 2; no output file is left behind (the writers are all-or-nothing). Inputs that do not fit
the model give one "diffusionseg: warning:" line each before sampling (refusals with --strict).
SIGTERM ends a run like Ctrl+C does (temporary files removed), with exit status 143. A closed
stdout pipe (``diffusionseg models --json | head -1``) ends the program quietly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from DiffusionSegLib import __version__
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.pipeline.inputcheck import InputMismatchError

log = logging.getLogger("diffusionseg")

DESCRIPTION = ("Segment medical images with conditional diffusion models and show how sure the model is: fused "
               "mask, consistency, ambiguity, uncertainty and sample diversity.")
WARNING_PREFIX = "diffusionseg: warning: "
ESTIMATE_PREFIX = "diffusionseg: estimate: "


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line, like every other error of the CLI.

    argparse prints the (multi-line) usage before its message; programs reading stderr (the Slicer
    module shows the last "diffusionseg: error:" line) and people alike need only the message.
    Subparsers inherit the class, so this holds for every subcommand. Exit status stays 2.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"diffusionseg: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum``; anything else is a usage error naming the value.

    The option must not accept 0 for "default": leaving it out is how the card's default is asked for.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"  # argparse names the type in some messages
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _add_run_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Sampling options shared by segment, evaluate and bench (evaluate names its model positionally).

    Range checks here need no model; the bound that depends on the model card (steps <= its
    training timesteps) is checked by the library before sampling (errors.SettingsError).
    """
    if model:
        p.add_argument("--model", default=None, help="model folder or name (default: the bundled default model)")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="number of sampled masks N >= 1 (default: model card)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps K per sample, 1 to the model's training timesteps (default: model card)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                   help="ddim (short chains, default) or ddpm (full chain)")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="random seed >= 0 (same seed, same device -> same output)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (unavailable -> CPU with a warning)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="items per network call >= 1 (default: from free memory)")


def _add_crf_options(p: argparse.ArgumentParser, on_help: str, off_help: str) -> None:
    """--crf / --no-crf; neither: the model card's default (default_crf)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--crf", dest="crf", action="store_const", const=True, default=None,
                       help=f"{on_help} (default: as the model card says)")
    group.add_argument("--no-crf", dest="crf", action="store_const", const=False, help=off_help)


def _segment_options(args: argparse.Namespace):
    from DiffusionSegLib.pipeline.segment import SegmentOptions

    return SegmentOptions(samples=args.samples, steps=args.steps, sampler=args.sampler, seed=args.seed,
                          device=args.device, crf=getattr(args, "crf", None),
                          fusion=getattr(args, "fusion", "mean"),
                          uncertainty=getattr(args, "uncertainty", "variance"),
                          keep_samples=getattr(args, "keep_samples", False), batch_size=args.batch_size,
                          strict=getattr(args, "strict", False))


class _Bar:
    """One tqdm bar on stderr that follows (done, total) events of one stage.

    ``unit`` names what is counted, so the bar's total is checkable: for sampling it is network
    evaluations (samples x steps x slices), as announced by the estimate and written in report.json.
    """

    def __init__(self, stage: str, desc: str, unit: str):
        self.stage, self.desc, self.unit = stage, desc, unit
        self.bar = None
        self.last: tuple[int, int] | None = None  # the last (done, total) shown: tests check the count

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False, file=sys.stderr)
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        self.last = (int(self.bar.n), int(total))
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _tqdm_progress(quiet: bool) -> _Bar | None:
    """A progress callback drawing one tqdm bar for the sampling stage (stderr), counting network evaluations."""
    if quiet:
        return None
    return _Bar("sampling", "sampling", " network evaluations")


def _print_warnings(warnings: list) -> None:
    """One stderr line per way the input does not fit the model (before sampling, whatever --progress)."""
    for warning in warnings:
        print(f"{WARNING_PREFIX}{warning.message}", file=sys.stderr, flush=True)


def _print_estimate(estimate) -> None:
    print(f"{ESTIMATE_PREFIX}sampling will take {estimate.text()}", file=sys.stderr, flush=True)


# Prefix of the machine-readable progress lines of ``segment --progress json`` (stdout, one JSON
# object per line); background.SegmentJob, which parses them, owns it (it imports only the stdlib).
from DiffusionSegLib.slicer.job import PROGRESS_PREFIX  # noqa: E402


def _json_progress(stage: str, done: int, total: int) -> None:
    """Print one progress event as ``DIFFUSIONSEG_PROGRESS {"stage": ..., "done": ..., "total": ...}``.

    Flushed at once: the reader is another process waiting on a pipe, which Python block-buffers.
    """
    event = json.dumps({"stage": stage, "done": int(done), "total": int(total)})
    print(PROGRESS_PREFIX + event, flush=True)


def cmd_segment(args: argparse.Namespace) -> int:
    from DiffusionSegLib.pipeline import segment as inference
    from DiffusionSegLib.models.store import resolve_model
    from DiffusionSegLib.outputs.writers import OutputFolder

    mode = "none" if args.quiet else args.progress
    progress = _json_progress if mode == "json" else _tqdm_progress(mode == "none")
    model_dir = resolve_model(args.model)
    # The output folder is checked (user files, writable) and reserved before the minutes of
    # sampling, not after them; a run that fails leaves it as it was.
    with OutputFolder(args.output, overwrite=args.overwrite) as folder:
        # The estimate costs one timed forward pass; a quiet run skips it.
        result = inference.segment_file(args.input, model_dir, _segment_options(args), progress,
                                        on_warnings=_print_warnings,
                                        on_estimate=None if args.quiet else _print_estimate)
        if mode == "json":
            # Writing (seg.nrrd, overview) takes seconds on large volumes: a stage of its own for the UI.
            _json_progress("write", 0, 1)
        written = folder.write(result, keep_samples=args.keep_samples)
    if mode == "json":
        _json_progress("write", 1, 1)
    rep = result.report
    print(f"model {rep['model']['name']} on {rep['device']}: {rep['samples']} samples x {rep['steps']} "
          f"{rep['sampler'].upper()} steps, {rep['total_s']:.2f} s, CRF: {rep['crf_backend']}")
    for name, value in rep["sample_diversity"].items():
        print(f"  {name}: sample diversity (mean pairwise 1-IoU) {value:.4f}")
    if rep.get("warnings"):  # repeated after the run: the lines before sampling scrolled away
        codes = ", ".join(dict.fromkeys(w["code"] for w in rep["warnings"]))
        print(f"  the input does not fit the model ({codes}): the masks may be meaningless, see 'warnings' "
              f"in report.json")
    print(f"outputs in {Path(args.output).resolve()}:")
    for name, path in written.items():
        print(f"  {name}: {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    action = getattr(args, "models_command", None)
    if action == "install":
        return _models_install(args)
    if action == "download":
        return _models_download(args)
    if action == "clear":
        return _models_clear(args)
    return _models_list(args)


def _models_list(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models.store import DEFAULT_MODEL, list_models, search_dirs

    from DiffusionSegLib.models.catalogue import catalogue, summary_line

    found = list_models()
    try:
        listed = {e["name"]: e for e in catalogue()}
    except DiffusionSegError as err:  # a broken catalogue must not hide the models themselves
        log.warning("%s", err)
        listed = {}
    if args.json:
        print(json.dumps([{"name": p.name, "origin": o, "path": str(p), "method": c.method,
                           "modality": c.modality, "labels": [lab.name for lab in c.labels],
                           "spatial_dims": c.spatial_dims, "metrics": c.metrics,
                           "catalogue": listed.get(p.name)} for o, p, c in found], indent=2))
        return 0
    if not found:
        print("no models found in: " + ", ".join(str(d) for _, d in search_dirs()))
    for origin, path, card in found:
        default = " (default)" if path.name == DEFAULT_MODEL else ""
        labels = ", ".join(card.labels[i].name for i in card.output_label_indices())
        print(f"{path.name}{default} [{origin}] {card.method} {card.spatial_dims}D {card.modality}: {labels}  {path}")
        figures = summary_line(listed[path.name]) if path.name in listed else ""
        if figures:
            print(f"    measured: {figures} (Resources/Models.json)")
    return 0


def _models_install(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models.store import install_model

    path = install_model(args.source, name=args.name, overwrite=args.overwrite)
    print(f"installed model {path.name} in {path}")
    return 0


def _models_download(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models.store import download_model

    bars: list = []  # the tqdm bar, created on the first callback when the size is known

    def progress(done: int, total: int) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=total or None, desc="download", unit="B", unit_scale=True, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        path = download_model(args.url, args.sha256, name=args.name, overwrite=args.overwrite,
                              progress=None if args.quiet else progress)
    finally:
        for bar in bars:
            bar.close()
    print(f"installed model {path.name} in {path}")
    return 0


def _models_clear(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models.store import clear_installed_models, user_models_dir

    removed = clear_installed_models()
    print(f"removed {removed} installed model{'s' if removed != 1 else ''} from {user_models_dir()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from DiffusionSegLib.training.loop import config_from_cli, train

    config = config_from_cli(args)
    card = train(args.dataset, args.output, config, resume=args.resume, progress=not args.quiet)
    print(f"model written to {Path(args.output).resolve()}")
    print(json.dumps(card.metrics, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from DiffusionSegLib.training.evaluate import evaluate

    bar = None if args.quiet else _Bar("cases", "evaluate", " cases")
    try:
        summary = evaluate(args.predictions_or_model, args.dataset, _segment_options(args), split=args.split,
                           out_json=args.output, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(summary["mean"], indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "real":
        from DiffusionSegLib.bench.real import cli

        return cli(args)
    from DiffusionSegLib.bench.synthetic import run_benchmark

    run_benchmark(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusionseg", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"diffusionseg {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands (diffusionseg COMMAND --help for its options)")

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
    _add_run_options(p)
    _add_crf_options(p, "refine the fused mask with DenseCRF", "skip DenseCRF refinement")
    p.add_argument("--keep-samples", action="store_true", help="also write each sampled mask")
    p.add_argument("--fusion", choices=("mean", "staple"), default="mean",
                   help="how the samples are fused: mean > 0.5 (default) or SimpleITK STAPLE")
    p.add_argument("--uncertainty", choices=("variance", "entropy"), default="variance",
                   help="uncertainty map: variance p(1-p) of the sample mean p (default) or binary entropy in bits")
    p.add_argument("--strict", action="store_true",
                   help="refuse an input that does not fit the model (exit 2, one line per reason) instead of "
                        "warning and running")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no time estimate (same as --progress none)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="bar: tqdm bar on stderr (default); json: one 'DIFFUSIONSEG_PROGRESS {...}' line "
                        "per event on stdout (stages load, sampling, crf, restore, write), for other programs")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("train", help="train a model on a dataset folder (dataset.json or imagesTr/labelsTr)")
    p.add_argument("dataset", help="dataset folder: dataset.json, or imagesTr/ and labelsTr/ (nnU-Net layout)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override one TrainConfig field, e.g. --set steps=2000 --set 'patch_size=[96,96]'")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the model folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95 of predictions (folder) or of a model on a dataset")
    p.add_argument("predictions_or_model", help="folder of predicted label maps, or a model folder/name")
    p.add_argument("dataset", help="dataset folder with reference labels (as for train)")
    p.add_argument("--split", default="test", help="test (default), validation or training")
    p.add_argument("-o", "--output", default=None, help="write per-case metrics as JSON here")
    # No --model: the model is the first argument (a --model here used to be accepted and ignored).
    _add_run_options(p, model=False)
    _add_crf_options(p, "score the DenseCRF-refined mask", "score the fused mask without DenseCRF refinement")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="seconds per image/volume, network evaluations and peak memory for (samples x steps) settings")
    _add_run_options(p)
    p.add_argument("--settings", default="1x1,5x10,10x10,5x25", help="comma list of SAMPLESxSTEPS")
    p.add_argument("--size", default="128x128", help="2D image size HxW for the per-image figures")
    p.add_argument("--volume", default=None, help="volume file for the per-volume figures (default: bundled sample)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per setting; the median is shown")
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
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="list bundled and installed models; install, download or clear user models",
                       description="Without a subcommand: list the models (bundled, $DIFFUSIONSEG_MODELS, installed).")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=cmd_models)
    models_sub = p.add_subparsers(dest="models_command", metavar="{install,download,clear}",
                                  title="subcommands (none: list the models)")
    m = models_sub.add_parser("install", help="check and install a model folder or .zip into the user models folder")
    m.add_argument("source", help="model folder (model.json + model.safetensors) or .zip archive of one")
    m.add_argument("--name", default=None, help="install under this name (default: the name in the model card)")
    m.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    m = models_sub.add_parser("download",
                              help="download a model .zip (http, https, file URL), check its sha256, install it")
    m.add_argument("url", help="address of the model .zip (http, https or file URL)")
    m.add_argument("--sha256", required=True, help="sha256 of the .zip as published with the model (64 hex digits)")
    m.add_argument("--name", default=None, help="install under this name (default: the name in the model card)")
    m.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    models_sub.add_parser("clear",
                          help="remove every installed model (bundled models and $DIFFUSIONSEG_MODELS are kept)")
    return parser


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head -1``): end quietly, as Unix tools do.

    stdout is pointed at the null device so that the interpreter's final flush cannot raise the
    same error again (and print "Exception ignored ... BrokenPipeError").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + getattr(signal, "SIGPIPE", 13)


class _Terminated(BaseException):
    """Raised by the SIGTERM handler: unwinds the run like KeyboardInterrupt, cleaning up on the way."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="diffusionseg: %(levelname)s: %(message)s")
    # SIGTERM (a cancel from the Slicer module, `timeout`, a job scheduler) would otherwise end the
    # process on the spot and leave the hidden staging folder in the output folder.
    try:
        previous, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
    except ValueError:  # not the main thread (main() called from a thread): keep the default
        previous, installed = None, False
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must land in the handler below
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except InputMismatchError as err:  # --strict: each reason is a refusal of its own
        for warning in err.warnings:
            print(f"diffusionseg: error: {warning.message}", file=sys.stderr)
        return 2
    except DiffusionSegError as err:
        print(f"diffusionseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusionseg: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("diffusionseg: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
