"""Dice against the references and sampling time of a model at several (samples x steps) settings.

    python scripts/choose_default_setting.py MODEL DATASET --split validation --settings 5x10,5x5,5x3 --seeds 0,1

Chooses a model card's default setting on the VALIDATION split (never on the test split): the Dice of
the final mask per label (mean over seeds), its mean over the labels the split annotates, the
seconds spent sampling, the ambiguity volume relative to the first setting (the uncertainty output
must stay meaningful when the chain is shortened) and in voxels, the sample diversity, and the share
of the wrong voxels (final mask against the reference, labels the split annotates) that lie inside
the ambiguity region: how much of the error the uncertainty output shows a reader.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.pipeline.io import read_image, read_label  # noqa: E402
from DiffusionSegLib.pipeline.segment import segment_image  # noqa: E402
from DiffusionSegLib.pipeline.settings import SegmentSettings  # noqa: E402
from DiffusionSegLib.training.data import default_labels, discover_cases  # noqa: E402
from DiffusionSegLib.training.metrics import dice  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--settings", default="5x10,5x5,5x3", help="comma list of SAMPLESxSTEPS; the first is the reference")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    import SimpleITK as sitk

    cases = discover_cases(args.dataset, args.split)
    if not cases:
        raise SystemExit(f"no {args.split} cases in {args.dataset}")
    labels = default_labels(args.dataset, cases)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, reference_ambiguity = [], None
    for setting in args.settings.split(","):
        n, k = (int(v) for v in setting.lower().split("x"))
        per_label: dict[str, list[float]] = {}
        seconds, ambiguity, diversity = [], [], []
        wrong = wrong_in_ambiguity = 0
        for case in cases:
            image = read_image(case.image)
            ref_map = sitk.GetArrayFromImage(read_label(case.label))
            for seed in seeds:
                result = segment_image(image, args.model, SegmentSettings(samples=n, steps=k, seed=seed))
                seconds.append(result.report["timings_s"]["sampling"])
                ambiguity.append(float(result.ambiguity.sum()))
                for i, lab in enumerate(result.labels):
                    ref = np.isin(ref_map, labels.get(lab.name, []))
                    if ref.any():
                        per_label.setdefault(lab.name, []).append(dice(result.final_mask[i], ref))
                        errors = result.final_mask[i].astype(bool) != ref
                        wrong += int(errors.sum())
                        wrong_in_ambiguity += int((errors & result.ambiguity[i].astype(bool)).sum())
                        diversity.append(result.sample_diversity[i])
        dice_means = {name: round(float(np.mean(v)), 4) for name, v in per_label.items()}
        reference_ambiguity = reference_ambiguity or float(np.mean(ambiguity))
        rows.append({"setting": f"{n}x{k}", "network_evaluations_per_item": n * k,
                     "mean_dice": round(float(np.mean(list(dice_means.values()))), 4), "dice": dice_means,
                     "sampling_s_mean": round(float(np.mean(seconds)), 2),
                     "ambiguity_vs_first": round(float(np.mean(ambiguity)) / max(reference_ambiguity, 1.0), 3),
                     "ambiguity_voxels_mean": round(float(np.mean(ambiguity)), 1),
                     "sample_diversity_mean": round(float(np.mean(diversity)), 4) if diversity else None,
                     "wrong_voxels": wrong,
                     "wrong_in_ambiguity": round(wrong_in_ambiguity / wrong, 3) if wrong else None})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"model": str(args.model), "split": args.split, "cases": [c.name for c in cases],
                      "seeds": seeds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
