"""Some cases of a dataset as the test split of a folder of its own, for ``diffusionseg evaluate``.

    python3 scripts/make_eval_folder.py DATASET OUT [--cases validation|test|NAME,NAME,...]
                                        [--tasks TASK,TASK,...] [--overwrite]

``diffusionseg evaluate MODEL DIR --split test`` scores the test list of a folder. The unified lesion
dataset keeps its validation cases in the training list (``validation_cases`` names them) and its
test cases in one list for every site; this writes the chosen cases as the ``test`` list of OUT,
each entry with its ``task``, the images and labels as symbolic links to DATASET's files (nothing
copied). ``--cases validation`` (default): DATASET's ``validation_cases``; ``test``: its test list;
otherwise case names. ``--tasks`` keeps the cases of those tasks only (e.g. the test cases of the
trained sites). Written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.errors import DatasetError  # noqa: E402
from DiffusionSegLib.core.files import atomic_write_json, replace_folder  # noqa: E402
from DiffusionSegLib.training.data import case_name, read_dataset_json  # noqa: E402


def chosen_entries(meta: dict, cases: str, tasks: list[str] | None) -> list[dict]:
    """The dataset.json entries (``training`` and ``test`` lists) of the chosen cases, in their order."""
    entries = {case_name(Path(e["image"])): e for split in ("training", "test") for e in meta.get(split, [])
               if isinstance(e, dict) and "label" in e}
    if cases == "validation":
        names = list(meta.get("validation_cases", []))
    elif cases == "test":
        names = [case_name(Path(e["image"])) for e in meta.get("test", []) if isinstance(e, dict) and "label" in e]
    else:
        names = [n.strip() for n in cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise DatasetError(f"no labelled case named {', '.join(unknown)} in the dataset")
    chosen = [entries[n] for n in names if tasks is None or entries[n].get("task") in tasks]
    if not chosen:
        raise DatasetError(f"no case chosen (cases {cases!r}, tasks {tasks})")
    return chosen


def build(dataset: Path, out: Path, cases: str = "validation", tasks: list[str] | None = None,
          overwrite: bool = False) -> list[dict]:
    """Write OUT (imagesTs/ and labelsTs/ links, dataset.json); returns its test list."""
    dataset = dataset.resolve()
    meta = read_dataset_json(dataset)
    if meta is None:
        raise DatasetError(f"{dataset} has no dataset.json")
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} exists; pass --overwrite to replace it")
    chosen = chosen_entries(meta, cases, tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        test = []
        for entry in chosen:
            paths = {}
            for key, folder in (("image", "imagesTs"), ("label", "labelsTs")):
                source = (dataset / entry[key]).resolve()
                if not source.is_file():
                    raise DatasetError(f"{source} (the {key} of a chosen case) does not exist")
                (staging / folder).mkdir(exist_ok=True)
                (staging / folder / source.name).symlink_to(source)
                paths[key] = f"./{folder}/{source.name}"
            test.append({**paths, **({"task": entry["task"]} if "task" in entry else {})})
        names = {case_name(Path(e["image"])) for e in test}
        folder_meta = {"name": out.name, "labels": meta.get("labels", {}), "modality": meta.get("modality", {}),
                       "training": [], "test": test, "source": str(dataset),
                       "case_modality": {k: v for k, v in meta.get("case_modality", {}).items() if k in names}}
        atomic_write_json(staging / "dataset.json", folder_meta)
        staging.chmod(0o755)  # mkdtemp makes it private
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="dataset folder with dataset.json (e.g. data/unified_lesions_pv)")
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--cases", default="validation",
                        help="validation (the dataset's validation_cases), test (its test list) or NAME,NAME,...")
    parser.add_argument("--tasks", help="keep only the cases of these tasks: TASK,TASK,...")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    try:
        test = build(args.dataset, args.out, args.cases, tasks, args.overwrite)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(test)} test case(s): "
          + ", ".join(f"{case_name(Path(e['image']))} ({e.get('task', '-')})" for e in test))
    return 0


if __name__ == "__main__":
    sys.exit(main())
