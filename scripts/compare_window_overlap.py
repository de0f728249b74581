"""How much a 3D model's fused masks change with the sliding-window overlap, next to how much they
change with the seed (issue 15).

    python3 scripts/compare_window_overlap.py MODEL CT [--overlap 0.25]

Segments CT with the model as it is (its card's ``window_overlap``, seed 0), with a copy whose card
says ``--overlap`` (seed 0), and as it is with seed 1; prints the seconds of each run and the fused-mask
Dice per label of "other overlap vs card" and of "seed 1 vs seed 0". Card defaults otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.pipeline.segment import segment_image  # noqa: E402
from DiffusionSegLib.pipeline.settings import SegmentSettings  # noqa: E402


def fused_dice(a, b) -> dict[str, float]:
    """Dice of the fused masks per label (labels empty in both are left out)."""
    dice = {}
    for i, label in enumerate(a.labels):
        x, y = a.fused[i] > 0, b.fused[i] > 0
        total = float(x.sum() + y.sum())
        if total:
            dice[label.name] = round(2.0 * float((x & y).sum()) / total, 4)
    return dice


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("ct")
    p.add_argument("--overlap", type=float, default=0.25)
    args = p.parse_args()
    image = sitk.ReadImage(args.ct)
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / args.model.name
        shutil.copytree(args.model, other, ignore=shutil.ignore_patterns("checkpoint*"))
        card = json.loads((other / "model.json").read_text())
        card["window_overlap"] = args.overlap
        (other / "model.json").write_text(json.dumps(card, indent=2))
        runs, seconds = {}, {}
        for name, model, seed in (("card", args.model, 0), ("other_overlap", other, 0), ("seed_1", args.model, 1)):
            start = time.perf_counter()
            runs[name] = segment_image(image, model, SegmentSettings(seed=seed, device="cpu"))
            seconds[name] = round(time.perf_counter() - start, 1)
    print(json.dumps({"overlap": args.overlap, "seconds": seconds,
                      "fused_dice_other_overlap_vs_card": fused_dice(runs["other_overlap"], runs["card"]),
                      "fused_dice_seed_1_vs_seed_0": fused_dice(runs["seed_1"], runs["card"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
