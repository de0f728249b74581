"""Build the real-data organ dataset (TotalSegmentator sdist) and the bundled sample volume.

    python scripts/make_organ_dataset.py [--out data/organs] [--labels liver=5 spleen=1]
                                         [--sample Resources/Sample/ct_abdomen_sample.nii.gz]

Downloads the pinned sdist with pip into $DIFFUSIONSEG_DATA (default ~/.cache/diffusionseg/data)
when it is not cached yet, and checks its sha256 before using it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from DiffusionSegLib.bench import realdata  # noqa: E402
from DiffusionSegLib.core.errors import DiffusionSegError  # noqa: E402


def _label(text: str) -> tuple[str, int | list[int]]:
    """Parse "name=id", "name=a-b" or "name=a,b,c" (ids in TotalSegmentator's class_map['total']);
    a range or list merges those classes into one label (e.g. vertebrae=26-50)."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        if value.isdigit():
            return name, int(value)
        if "-" in value:
            low, high = (int(v) for v in value.split("-"))
            if low > high:
                raise ValueError
            return name, list(range(low, high + 1))
        return name, [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=id, name=a-b or name=a,b (e.g. liver=5), got {text!r}") from None


def _slab(text: str) -> tuple[int, int]:
    """Parse "start:stop" z slices of the training CT held out for validation."""
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected start:stop slices (e.g. 94:100), got {text!r}") from None
    return start, stop


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "organs", help="dataset folder to write")
    parser.add_argument("--labels", type=_label, nargs="+",
                        default=list(realdata.ORGAN_LABELS.items()),
                        help="organs as name=TotalSegmentator id (or a-b / a,b,c to merge classes), in output "
                             "label order (default: liver=5 spleen=1)")
    parser.add_argument("--validation-slab", type=_slab, default=None,
                        help="start:stop z slices of the training CT kept out of training as a validation case "
                             "(2 slices dropped on each side)")
    parser.add_argument("--no-sample", action="store_true", help="do not (re)write the bundled sample volume")
    parser.add_argument("--sample", type=Path, default=REPO / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz",
                        help="where to write the bundled sample volume (README.md goes next to it)")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        out = realdata.build_organ_dataset(args.out, dict(args.labels), validation_slab=args.validation_slab)
        built = time.perf_counter() - start
        dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
        print(f"dataset: {out} ({built:.1f} s)")
        for split in ("training", "validation", "test"):
            for entry in dataset.get(split, []):
                for key in ("image", "label"):
                    path = out / entry[key]
                    print(f"  {split:8s} {key:5s} {path} {_mb(path)}")
                counts = ", ".join(f"{name}={n}" for name, n in entry["label_voxels"].items())
                print(f"  {split:8s} voxels {counts}")
        print(f"  alignment checks: {json.dumps(dataset['alignment_checks'])}")
        print(f"  note: {dataset['note']}")
        if args.no_sample:
            return 0
        start = time.perf_counter()
        sample = realdata.make_sample_volume(args.sample)
        readme = realdata.write_sample_readme(sample)
        print(f"sample: {sample} {_mb(sample)} ({time.perf_counter() - start:.1f} s)")
        print(f"sample provenance: {readme}")
    except DiffusionSegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
