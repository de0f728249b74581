"""Seconds and outputs of two checkouts of this repository on the same image, runs alternating.

    git worktree add /tmp/before <commit>
    python scripts/compare_checkouts.py /tmp/before . [--pairs 3] [--image CT] [--model M] [--samples 5 --steps 5]

On a shared or virtual machine the speed drifts over minutes, so a "before" figure from another day
says little; here each pair runs the old and the new code one right after the other (the order
swapped every pair), each in its own process importing its own checkout, and each process times
`segment_image` once after one untimed warm-up run (as `diffusionseg bench` does). Prints one JSON
line per run (checkout, total seconds, stage timings), then the medians and their ratio, and how the
last runs' outputs compare: Dice of the fused masks (all labels pooled), the ambiguity-region
sizes, whether the fused masks are identical, and with ``--compare-samples`` every sampled mask. The image defaults to the bundled sample and the model to the bundled default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Run inside each checkout: warm up, time one segment_image, keep the fused and ambiguity masks.
_CHILD = """
import json, sys, time
import numpy as np, SimpleITK as sitk
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings
image_path, model, samples, steps, out, keep = sys.argv[1:7]
image = sitk.ReadImage(image_path)
settings = SegmentSettings(samples=int(samples), steps=int(steps), keep_samples=keep == "1")
segment_image(image, model, settings, on_warnings=lambda w: None)
start = time.perf_counter()
result = segment_image(image, model, settings, on_warnings=lambda w: None)
seconds = time.perf_counter() - start
arrays = {"samples": result.samples} if result.samples is not None else {}
np.savez_compressed(out, fused=result.fused, ambiguity=result.ambiguity, **arrays)
print(json.dumps({"seconds": round(seconds, 3), "timings_s": result.report["timings_s"]}))
"""


def run(checkout: Path, args: argparse.Namespace, out: Path) -> dict:
    """One child process in ``checkout``: its own package first on the path."""
    env_path = str(checkout.resolve())
    done = subprocess.run([sys.executable, "-c", _CHILD, str(Path(args.image).resolve()), args.model,
                           str(args.samples), str(args.steps), str(out), "1" if args.compare_samples else "0"],
                          cwd=env_path, env={**_environment(), "PYTHONPATH": env_path},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path, help="checkout of the old code")
    p.add_argument("after", type=Path, help="checkout of the new code")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--image", default=str(repo / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"))
    p.add_argument("--model", default="ct_abdomen_organs_2d", help="model folder or bundled model name")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compare-samples", action="store_true",
                   help="also keep every sampled mask and say whether they are identical (slower)")
    args = p.parse_args()
    if not Path(args.model).exists():
        args.model = str(repo / "Resources" / "Models" / args.model)
    seconds: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {name: Path(tmp) / f"{name}.npz" for name in seconds}
        for pair in range(args.pairs):
            order = ("before", "after") if pair % 2 == 0 else ("after", "before")
            for name in order:
                figures = run(getattr(args, name), args, outputs[name])
                seconds[name].append(figures["seconds"])
                print(json.dumps({"pair": pair, "checkout": name, **figures}), flush=True)
        before, after = (np.load(outputs[name]) for name in ("before", "after"))
        overlap = np.logical_and(before["fused"], after["fused"]).sum()
        total = before["fused"].sum() + after["fused"].sum()
        summary = {
            "median_s": {name: statistics.median(values) for name, values in seconds.items()},
            "speed_ratio": round(statistics.median(seconds["before"]) / statistics.median(seconds["after"]), 3),
            "fused_dice": round(float(2 * overlap / total), 5) if total else 1.0,
            "ambiguity_voxels": {name: int(np.load(outputs[name])["ambiguity"].sum()) for name in seconds},
            "identical_fused": bool(np.array_equal(before["fused"], after["fused"])),
        }
        if args.compare_samples:
            summary["identical_samples"] = bool(np.array_equal(before["samples"], after["samples"]))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
