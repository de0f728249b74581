"""Choose a DiffSeg model's noise levels and threshold rule on the VALIDATION volumes (never the test ones).

    python scripts/choose_diffseg_setting.py MODEL data/lung_weak [--write]

For each noise-level range the N = 5 difference maps of every validation volume are computed once
on the model grid (``methods.diffseg.difference``); each threshold rule and healthy quantile is then
applied to them (the healthy table recalibrated on held-out healthy crops for each quantile, as
training does), the N masks fused by mean > 0.5 and scored against the validation masks
(``validation_masks/``, read by this script only, never by training): Dice, precision and recall
pooled over the volumes' voxels, and the mean Dice per volume. ``--write`` stores the best setting
(highest pooled Dice) in the model card's ``method_settings``. CRF is off here; its protocol is
compared afterwards with ``diffusionseg evaluate --crf``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.files import atomic_write_json  # noqa: E402
from DiffusionSegLib.methods.diffseg.difference import (DiffSegSettings, difference_maps,  # noqa: E402
                                                        healthy_differences, output_timesteps, quantile_table,
                                                        threshold_maps)
from DiffusionSegLib.methods.registry import load_model  # noqa: E402
from DiffusionSegLib.models.card import CARD_NAME  # noqa: E402
from DiffusionSegLib.training.data import CaseFiles, load_case, pad_to  # noqa: E402
from DiffusionSegLib.training.metrics import dice  # noqa: E402
from DiffusionSegLib.training.weak_labels import ImageLabelSampler, discover_weak_cases, load_weak_case  # noqa: E402

RANGES = ([60, 150], [150, 300], [250, 450], [350, 490])
RULES = ("healthy", "otsu", "otsu_over_healthy")
QUANTILES = (0.99, 0.999, 0.9999)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--crops", type=int, default=64, help="held-out healthy crops for each calibration")
    parser.add_argument("--masks", type=Path, default=None,
                        help="folder of the validation masks (same file name, or <case>.nii.gz); default DATASET/validation_masks")
    parser.add_argument("--write", action="store_true", help="store the best setting in the model card")
    args = parser.parse_args()
    import torch

    torch.set_grad_enabled(False)
    net, card = load_model(args.model)
    divisor = int(net.size_divisor)
    files = [f for f in discover_weak_cases(args.dataset, "validation") if f.label == 1]  # lesion cases score
    volumes = []
    for f in files:
        masks = args.masks or args.dataset / "validation_masks"
        mask_path = masks / f.image.name if (masks / f.image.name).is_file() else masks / f"{f.name}.nii.gz"
        case = load_case(CaseFiles(f.name, f.image, mask_path), card, {"lesion": (1,)})
        spatial = case.image.shape[-2:]
        padded = [math.ceil(n / divisor) * divisor for n in spatial]
        image = pad_to(case.image, padded, case.image.reshape(case.image.shape[0], -1).min(axis=1))
        crop = tuple(slice((p - n) // 2, (p - n) // 2 + n) for n, p in zip(spatial, padded))
        volumes.append((f.name, torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, 1, 0))), crop,
                        case.mask[0].astype(bool)))
    weak_cases = [load_weak_case(f, card) for f in discover_weak_cases(args.dataset, "validation")]
    healthy = torch.from_numpy(ImageLabelSampler(weak_cases, card.patch_shape(), None, seed=4,
                                                 lesion_fraction=0.0).batch(args.crops)[0])
    base = DiffSegSettings.from_card(card)
    calibration = healthy_differences(net, card, healthy)  # levels span the trained range: shared by every row
    tables = {q: quantile_table(*calibration, q) for q in QUANTILES}
    rows = []
    for levels in RANGES:
        card.method_settings = {**base.as_dict(), "noise_levels": levels, "healthy_thresholds": None}
        timesteps = output_timesteps(levels, args.samples)
        maps = [difference_maps(net, card, images, timesteps, seed=0) for _, images, _, _ in volumes]
        for rule in RULES:
            for q in (QUANTILES if rule != "otsu" else (None,)):
                settings = dataclasses.replace(DiffSegSettings.from_card(card), threshold=rule,
                                               healthy_quantile=q or base.healthy_quantile,
                                               healthy_thresholds=tables[q] if q else None)
                tp = fp = fn = 0
                per_volume = {}
                for (name, _, crop, ref), d in zip(volumes, maps):
                    masks = threshold_maps(d, timesteps, settings).float().mean(0)[:, 0] > 0.5  # (S, H, W)
                    fused = masks[(slice(None),) + crop].numpy()
                    per_volume[name] = round(dice(fused, ref), 4)
                    tp += int((fused & ref).sum())
                    fp += int((fused & ~ref).sum())
                    fn += int((~fused & ref).sum())
                row = {"noise_levels": levels, "threshold": rule, "healthy_quantile": q,
                       "dice_pooled": round(2 * tp / max(2 * tp + fp + fn, 1), 4),
                       "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
                       "dice_per_volume": per_volume, "mean_dice": round(float(np.mean(list(per_volume.values()))), 4),
                       "healthy_thresholds": settings.healthy_thresholds}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "healthy_thresholds"}), flush=True)
    best = max(rows, key=lambda r: r["dice_pooled"])
    print("best on validation:", json.dumps({k: v for k, v in best.items() if k != "healthy_thresholds"}))
    if args.write:
        card_path = args.model / CARD_NAME
        data = json.loads(card_path.read_text())
        data["method_settings"].update({"noise_levels": best["noise_levels"], "threshold": best["threshold"],
                                        "healthy_quantile": best["healthy_quantile"] or base.healthy_quantile,
                                        "healthy_thresholds": best["healthy_thresholds"]})
        data["metrics"]["setting_choice"] = {
            "split": "validation", "volumes": [v[0] for v in volumes], "samples": args.samples, "crf": "off",
            "criterion": "pooled Dice of the mean > 0.5 fusion on the model grid",
            "command": "python scripts/choose_diffseg_setting.py MODEL DATASET --write",
            "rows": [{k: v for k, v in r.items() if k != "healthy_thresholds"} for r in rows]}
        atomic_write_json(card_path, data)
        print(f"written to {card_path}")


if __name__ == "__main__":
    main()
