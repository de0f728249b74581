"""``diffusionseg models``: list the models; install, download or clear user models."""

from __future__ import annotations

import argparse
import json
import logging

from DiffusionSegLib.core.errors import DiffusionSegError

log = logging.getLogger("diffusionseg")


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("models", help="list bundled and installed models; install, download or clear user models",
                       description="Without a subcommand: list the models (bundled, $DIFFUSIONSEG_MODELS, installed).")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=run)
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


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "models_command", None)
    if action == "install":
        return _install(args)
    if action == "download":
        return _download(args)
    if action == "clear":
        return _clear(args)
    return _list(args)


def _list(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models.catalogue import catalogue, summary_line
    from DiffusionSegLib.models.store import DEFAULT_MODEL, list_models, search_dirs

    found = list_models()
    try:
        listed = {e["name"]: e for e in catalogue()}
    except DiffusionSegError as err:  # a broken catalogue must not hide the models themselves
        log.warning("%s", err)
        listed = {}
    if args.json:
        print(json.dumps([{"name": p.name, "origin": o, "path": str(p), "method": c.method,
                           "modality": c.modality, "labels": [lab.name for lab in c.labels],
                           "spatial_dims": c.spatial_dims, "members": 1 + len(c.members), "metrics": c.metrics,
                           "tasks": list(c.tasks), "default_task": c.default_task,
                           "catalogue": listed.get(p.name)} for o, p, c in found], indent=2))
        return 0
    if not found:
        print("no models found in: " + ", ".join(str(d) for _, d in search_dirs()))
    for origin, path, card in found:
        default = " (default)" if path.name == DEFAULT_MODEL else ""
        labels = ", ".join(card.labels[i].name for i in card.output_label_indices())
        networks = f" ensemble of {1 + len(card.members)}" if card.members else ""
        print(f"{path.name}{default} [{origin}] {card.method}{networks} {card.spatial_dims}D {card.modality}: {labels}"
              f"  {path}")
        if card.tasks:  # a multi-task model: --task chooses among these
            default_task = f" (default {card.default_task})" if card.default_task else ""
            print(f"    tasks: {', '.join(card.tasks)}{default_task}")
        figures = summary_line(listed[path.name]) if path.name in listed else ""
        if figures:
            print(f"    measured: {figures} (Resources/Models.json)")
    return 0


def _install(args: argparse.Namespace) -> int:
    from DiffusionSegLib.methods.registry import load_model
    from DiffusionSegLib.models.store import install_model

    path = install_model(args.source, name=args.name, overwrite=args.overwrite, load_check=load_model)
    print(f"installed model {path.name} in {path}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from DiffusionSegLib.methods.registry import load_model
    from DiffusionSegLib.models.store import download_model

    bars: list = []  # the tqdm bar, created on the first callback when the size is known

    def progress(done: int, total: int) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=total or None, desc="download", unit="B", unit_scale=True, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        path = download_model(args.url, args.sha256, name=args.name, overwrite=args.overwrite,
                              progress=None if args.quiet else progress, load_check=load_model)
    finally:
        for bar in bars:
            bar.close()
    print(f"installed model {path.name} in {path}")
    return 0


def _clear(args: argparse.Namespace) -> int:
    from DiffusionSegLib.models.store import clear_installed_models, user_models_dir

    removed = clear_installed_models()
    print(f"removed {removed} installed model{'s' if removed != 1 else ''} from {user_models_dir()}")
    return 0
