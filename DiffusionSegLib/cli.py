"""Command-line interface: ``diffusionseg segment|train|evaluate|bench|models [install|download|clear]``.

User errors (DiffusionSegError) and usage errors are printed as one line on stderr with exit
status 2; no output file is left behind (the writers are all-or-nothing). SIGTERM ends a run like
Ctrl+C does (temporary files removed), with exit status 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from DiffusionSegLib.errors import DiffusionSegError

log = logging.getLogger("diffusionseg")


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


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Sampling options shared by segment, evaluate and bench.

    Range checks here need no model; the bound that depends on the model card (steps <= its
    training timesteps) is checked by the library before sampling (errors.SettingsError).
    """
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


def _segment_options(args: argparse.Namespace):
    from DiffusionSegLib.inference import SegmentOptions

    return SegmentOptions(samples=args.samples, steps=args.steps, sampler=args.sampler, seed=args.seed,
                          device=args.device, crf=not getattr(args, "no_crf", False),
                          fusion=getattr(args, "fusion", "mean"),
                          uncertainty=getattr(args, "uncertainty", "variance"),
                          keep_samples=getattr(args, "keep_samples", False), batch_size=args.batch_size)


def _tqdm_progress(quiet: bool):
    """A progress callback drawing one tqdm bar for the sampling stage (stderr)."""
    if quiet:
        return None
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage != "sampling":
            return
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="sampling", unit="step", leave=False)
        b = bar["bar"]
        b.total = total
        b.update(done - b.n)
        if done >= total:
            b.close()

    return progress


# Prefix of the machine-readable progress lines of ``segment --progress json`` (stdout, one JSON
# object per line); background.SegmentJob, which parses them, owns it (it imports only the stdlib).
from DiffusionSegLib.background import PROGRESS_PREFIX  # noqa: E402


def _json_progress(stage: str, done: int, total: int) -> None:
    """Print one progress event as ``DIFFUSIONSEG_PROGRESS {"stage": ..., "done": ..., "total": ...}``.

    Flushed at once: the reader is another process waiting on a pipe, which Python block-buffers.
    """
    event = json.dumps({"stage": stage, "done": int(done), "total": int(total)})
    print(PROGRESS_PREFIX + event, flush=True)


def cmd_segment(args: argparse.Namespace) -> int:
    from DiffusionSegLib import inference
    from DiffusionSegLib.models import resolve_model
    from DiffusionSegLib.writers import OutputFolder

    mode = "none" if args.quiet else args.progress
    progress = _json_progress if mode == "json" else _tqdm_progress(mode == "none")
    model_dir = resolve_model(args.model)
    # The output folder is checked (user files, writable) and reserved before the minutes of
    # sampling, not after them; a run that fails leaves it as it was.
    with OutputFolder(args.output, overwrite=args.overwrite) as folder:
        result = inference.segment_file(args.input, model_dir, _segment_options(args), progress)
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
    from DiffusionSegLib.models import DEFAULT_MODEL, list_models, search_dirs

    from DiffusionSegLib.catalogue import catalogue, summary_line

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
        labels = ", ".join(lab.name for lab in card.labels)
        print(f"{path.name}{default} [{origin}] {card.method} {card.spatial_dims}D {card.modality}: {labels}  {path}")
        figures = summary_line(listed[path.name]) if path.name in listed else ""
        if figures:
            print(f"    measured: {figures} (Resources/Models.json)")
    return 0


def _models_install(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models import install_model

    path = install_model(args.source, name=args.name, overwrite=args.overwrite)
    print(f"installed model {path.name} in {path}")
    return 0


def _models_download(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models import download_model

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
    from DiffusionSegLib.models import clear_installed_models, user_models_dir

    removed = clear_installed_models()
    print(f"removed {removed} installed model{'s' if removed != 1 else ''} from {user_models_dir()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from DiffusionSegLib.training import config_from_cli, train

    config = config_from_cli(args)
    card = train(args.dataset, args.output, config, resume=args.resume, progress=not args.quiet)
    print(f"model written to {Path(args.output).resolve()}")
    print(json.dumps(card.metrics, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from DiffusionSegLib.evaluate import evaluate

    summary = evaluate(args.predictions_or_model, args.dataset, _segment_options(args), split=args.split,
                       out_json=args.output)
    print(json.dumps(summary["mean"], indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "real":
        from DiffusionSegLib.benchreal import cli

        return cli(args)
    from DiffusionSegLib.bench import run_benchmark

    run_benchmark(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusionseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment an image or volume; write masks, uncertainty, report, overview")
    p.add_argument("input", help="image file (NIfTI, NRRD, MHA, PNG, JPEG...) or a DICOM folder")
    p.add_argument("-o", "--output", required=True,
                   help="output folder; the outputs of an earlier run in it are replaced, so it holds exactly "
                        "this run's outputs")
    p.add_argument("--overwrite", action="store_true",
                   help="also write into a folder that holds files other than an earlier run's outputs: they "
                        "are kept, except a file at the path of one of this run's outputs, which is replaced")
    _add_run_options(p)
    p.add_argument("--no-crf", action="store_true", help="skip DenseCRF refinement")
    p.add_argument("--keep-samples", action="store_true", help="also write each sampled mask")
    p.add_argument("--fusion", choices=("mean", "staple"), default="mean", help="mean > 0.5 or SimpleITK STAPLE")
    p.add_argument("--uncertainty", choices=("variance", "entropy"), default="variance")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (same as --progress none)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="bar: tqdm bar on stderr (default); json: one 'DIFFUSIONSEG_PROGRESS {...}' line "
                        "per event on stdout (stages load, sampling, crf, restore, write), for other programs")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("train", help="train a model on a dataset folder (dataset.json or imagesTr/labelsTr)")
    p.add_argument("dataset")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override one TrainConfig field, e.g. --set steps=2000 --set 'patch_size=[96,96]'")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the model folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95 of predictions (folder) or of a model on a dataset")
    p.add_argument("predictions_or_model", help="folder of predicted label maps, or a model folder/name")
    p.add_argument("dataset")
    p.add_argument("--split", default="test", help="test (default), validation or training")
    p.add_argument("-o", "--output", default=None, help="write per-case metrics as JSON here")
    _add_run_options(p)
    p.add_argument("--no-crf", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="seconds per image/volume, NFE and peak memory for (samples x steps) settings")
    _add_run_options(p)
    p.add_argument("--settings", default="1x1,5x10,10x10,5x25", help="comma list of SAMPLESxSTEPS")
    p.add_argument("--size", default="128x128", help="2D image size HxW for the per-image figures")
    p.add_argument("--volume", default=None, help="volume file for the per-volume figures (default: bundled sample)")
    p.add_argument("--repeats", type=_positive_int, default=3)
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
    models_sub = p.add_subparsers(dest="models_command", metavar="{install,download,clear}")
    m = models_sub.add_parser("install", help="check and install a model folder or .zip into the user models folder")
    m.add_argument("source", help="model folder (model.json + model.safetensors) or .zip archive of one")
    m.add_argument("--name", default=None, help="install under this name (default: the name in the model card)")
    m.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    m = models_sub.add_parser("download",
                              help="download a model .zip (http, https, file URL), check its sha256, install it")
    m.add_argument("url")
    m.add_argument("--sha256", required=True, help="sha256 of the .zip as published with the model (64 hex digits)")
    m.add_argument("--name", default=None, help="install under this name (default: the name in the model card)")
    m.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    models_sub.add_parser("clear",
                          help="remove every installed model (bundled models and $DIFFUSIONSEG_MODELS are kept)")
    return parser


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
        return args.func(args)
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
