"""Dice vs training steps for UniSegDiff, its ablations, MedSegDiff and the vanilla DPM (issue 13).

Every run shares the data, budget, crops, augmentation, validation cases and seed list; only the
method, its network and its method settings differ. Each run is a plain ``diffusionseg train`` with
validation every ``--val-every`` steps; the table is read back from each model's training_log.json.

    python3 scripts/unisegdiff_convergence.py DATASET OUT --seeds 0 [--variants a,b] [--steps 400]
    python3 scripts/unisegdiff_convergence.py DATASET OUT --table   # print the tables only

DATASET must hold the validation cases named in ``VALIDATION`` among its training cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

VALIDATION = ["check_base", "check_chest"]
CHANNELS = [16, 32, 64, 128]
BASE = {
    "spatial_dims": 2, "patch_size": [64, 64], "spacing": [3.0, 3.0],
    "normalization": {"kind": "ct_window", "center": -600, "width": 1500}, "modality": "CT",
    "prediction_type": "sample", "batch_size": 8, "lr": 1e-3, "augment": True, "flips": False,
    "foreground_fraction": 0.67, "val_cases": VALIDATION, "val_samples": 3, "val_steps": 3, "device": "cpu",
    "default_samples": 5, "default_steps": 3,
}
UNISEG_NET = {"channels": CHANNELS, "denoiser_channels": CHANNELS, "num_res_blocks": 1, "norm_groups": 8}
SINGLE_STAGE = [{"name": "all", "t": [0, 1000], "target": "sample", "eta": 0.0}]
ALL_X0 = [{"name": "coarse", "t": [667, 1000], "target": "sample", "eta": 0.0},
          {"name": "probabilistic", "t": [333, 667], "target": "sample", "eta": 1.0},
          {"name": "refinement", "t": [0, 333], "target": "sample", "eta": 0.0}]
VARIANTS = {
    "unisegdiff": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 100}),
    "unisegdiff_no_staging": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 100, "stages": SINGLE_STAGE}),
    "unisegdiff_no_target_adjustment": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 100, "stages": ALL_X0}),
    "unisegdiff_no_pretrained_encoder": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 0, "encoder_lr_scale": 1.0}),
    "unisegdiff_frozen_encoder": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 100,
                                                            "encoder_training": "frozen"}),
    # The encoder trained with the denoiser from step 0 at the full rate (no separate pretraining)
    # and the same two ablations on top of it: measured better than 100 pretraining steps + 0.1x.
    "unisegdiff_pretrained_full_rate": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 100,
                                                                  "encoder_lr_scale": 1.0}),
    "unisegdiff_joint_no_staging": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 0, "encoder_lr_scale": 1.0,
                                                              "stages": SINGLE_STAGE}),
    "unisegdiff_joint_no_target_adjustment": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 0,
                                                                        "encoder_lr_scale": 1.0, "stages": ALL_X0}),
    # The default plus hard-negative items (background in the lesions' intensity band: vessels, pleura).
    "unisegdiff_hard_negatives": ("unisegdiff", UNISEG_NET, {"encoder_pretrain_steps": 0, "encoder_lr_scale": 1.0}),
    "medsegdiff": ("medsegdiff", {"channels": CHANNELS, "num_res_blocks": 1, "norm_groups": 8,
                                  "ff_reference_size": 64}, {}),
    "vanilla_dpm": ("vanilla_dpm", {"channels": CHANNELS, "num_res_blocks": 1, "num_head_channels": 8,
                                    "norm_num_groups": 8}, {}),
}


# Training settings (outside the method's) that a variant changes.
TRAINING_OVERRIDES = {"unisegdiff_hard_negatives": {"foreground_fraction": 0.67, "hard_negative_fraction": 0.2}}


def config(variant: str, seed: int, steps: int, val_every: int) -> dict:
    method, network, settings = VARIANTS[variant]
    return {**BASE, **TRAINING_OVERRIDES.get(variant, {}), "method": method, "network": network,
            "method_settings": settings, "steps": steps, "val_every": val_every, "checkpoint_every": val_every, "seed": seed,
            "name": f"lung_{variant}_s{seed}"}


def run(dataset: Path, out: Path, variant: str, seed: int, steps: int, val_every: int) -> None:
    folder = out / f"{variant}_s{seed}"
    if (folder / "training_log.json").is_file():
        print(f"{folder.name}: done already", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / f"{variant}_s{seed}.json"
    cfg.write_text(json.dumps(config(variant, seed, steps, val_every), indent=1))
    resume = ["--resume"] if (folder / "checkpoint").is_dir() else []
    print(f"{folder.name}: training", flush=True)
    subprocess.run([sys.executable, "-m", "DiffusionSegLib", "train", str(dataset), "-o", str(folder), "--config",
                    str(cfg), "-q", *resume], check=True, stdout=subprocess.DEVNULL)


def table(out: Path, threshold: float) -> str:
    rows: dict[str, list[dict]] = {}
    for log in sorted(out.glob("*_s*/training_log.json")):
        variant = log.parent.name.rsplit("_s", 1)[0]
        card = json.loads((log.parent / "model.json").read_text())
        rows.setdefault(variant, []).append({"log": json.loads(log.read_text()), "card": card})
    lines = []
    steps = sorted({v["step"] for runs in rows.values() for r in runs for v in r["log"]["validations"]})
    lines.append("| variant | seeds | " + " | ".join(str(s) for s in steps) + f" | first step with Dice >= {threshold} |"
                 " seconds per step |")
    lines.append("|---" * (len(steps) + 4) + "|")
    for variant in VARIANTS:
        if variant not in rows:
            continue
        runs = rows[variant]
        cells = []
        for s in steps:
            values = [v["mean_dice"] for r in runs for v in r["log"]["validations"] if v["step"] == s]
            cells.append(f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""))
        reach = []
        for r in runs:
            hit = [v["step"] for v in r["log"]["validations"] if v["mean_dice"] >= threshold]
            reach.append(str(hit[0]) if hit else "never")
        seconds = np.mean([r["card"]["training"]["duration_s"] / r["card"]["training"]["steps"] for r in runs])
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + f" | {', '.join(reach)} | {seconds:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.4, help="the fixed Dice of the convergence column")
    parser.add_argument("--table", action="store_true", help="print the table of the finished runs only")
    args = parser.parse_args()
    if not args.table:
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant in args.variants.split(","):
                run(args.dataset, args.out, variant, seed, args.steps, args.val_every)
    print(table(args.out, args.threshold))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
