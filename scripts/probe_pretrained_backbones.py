"""Downstream test of 3D pretraining (issue 15): no pretraining vs restorative vs diffusion.

    python scripts/probe_pretrained_backbones.py data/organs_multi -o runs/probe --pretrain-steps 300 \
        --probe-steps 300 [--seeds 0,1,2] [--spacing 4] [--protocols frozen,fine-tuned]

Unlabelled pretraining and the probe's labels both come from the training CT of DATA (imagesTr/labelsTr
except the validation slab, which is not used); the probe is scored once on the held-out CT
(imagesTs/labelsTs), Dice per organ on the isotropic grid. For each seed, three backbones of the same
architecture: random (no pretraining), restorative and diffusion pretraining (``diffusionseg pretrain``'s
objectives, the same steps; "diffusion+coordinates" adds the anatomical-coordinate head trained on a frozen
``--coordinates`` model, the multi-task guidance); each gets a probe (``methods/pretrain3d/probe.py``) with the same steps:
a head on the frozen backbone and/or full fine-tuning (the "none" backbone fine-tuned is training from
scratch). Prints one JSON line per (seed, backbone, protocol) and writes them all to OUT/probe.json. Labels are
TotalSegmentator's own predictions (see DATA/dataset.json), not manual ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.cli.pretrain import isotropic_ct, to_isotropic  # noqa: E402
from DiffusionSegLib.core.files import atomic_write_json  # noqa: E402
from DiffusionSegLib.methods.registry import pretraining  # noqa: E402
from DiffusionSegLib.training.pretrain import pretrain_backbone  # noqa: E402


def load_case(image: Path, label: Path, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """(volume (D, H, W) in [-1, 1], labels (D, H, W) int64) on the same isotropic LPS grid."""
    volume = isotropic_ct(image, spacing)
    labels = sitk.GetArrayFromImage(to_isotropic(sitk.ReadImage(str(label)), spacing, labels=True)).astype(np.int64)
    if labels.shape != volume.shape:
        raise SystemExit(f"{label}: grid {labels.shape} differs from its CT's {volume.shape}")
    return volume, labels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--spacing", type=float, default=4.0)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--seeds", default="0")
    p.add_argument("--backbones", default="none,restorative,diffusion",
                   help="comma list of none, restorative, diffusion, and either objective with '+coordinates' "
                        "(anatomical guidance by the --coordinates model)")
    p.add_argument("--coordinates", type=Path, default=None,
                   help="anatomical coordinate model folder (scripts/train_coordinate_model.py, same --spacing)")
    p.add_argument("--coordinate-weight", type=float, default=1.0, help="weight of the coordinate loss")
    p.add_argument("--protocols", default="frozen",
                   help="comma list: frozen (a head on the frozen backbone) and/or fine-tuned (backbone trained "
                        "too, at --backbone-lr)")
    p.add_argument("--backbone-lr", type=float, default=1e-3, help="backbone learning rate when fine-tuned")
    p.add_argument("--probe-t", type=int, default=0,
                   help="noise level the features are read at (0: the clean image; see probe.noised_features)")
    args = p.parse_args()
    parts = pretraining()
    coordinate_net = None
    if any(kind.endswith("+coordinates") for kind in args.backbones.split(",")):
        if args.coordinates is None:
            raise SystemExit("a '+coordinates' backbone needs --coordinates DIR (scripts/train_coordinate_model.py)")
        coordinate_net, coordinate_card = parts.coordinates.load_coordinate_model(args.coordinates)
        try:
            parts.coordinates.grid_spacing(coordinate_card, args.spacing)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    meta = json.loads((args.data / "dataset.json").read_text())
    names = {int(k): v for k, v in meta["labels"].items()}
    classes = max(names) + 1
    validation = {Path(v["image"]).name for v in meta.get("validation", [])}
    train = [load_case(f, args.data / "labelsTr" / f.name, args.spacing)
             for f in sorted((args.data / "imagesTr").glob("*.nii.gz")) if f.name not in validation]
    test = [load_case(f, args.data / "labelsTs" / f.name, args.spacing)
            for f in sorted((args.data / "imagesTs").glob("*.nii.gz"))]
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for kind in args.backbones.split(","):
            start = time.perf_counter()
            if kind == "none":
                torch.manual_seed(seed)
                backbone = parts.denoising.DenoisingBackbone()
            else:
                # "KIND+coordinates": the same objective plus the anatomical-coordinate head (multi-task).
                objective, guided = kind.removesuffix("+coordinates"), kind.endswith("+coordinates")
                config = parts.denoising.PretrainConfig(
                    objective=parts.denoising.PretrainObjective(
                        kind=objective, coordinate_weight=args.coordinate_weight if guided else 0.0),
                    steps=args.pretrain_steps, seed=seed)
                backbone, _ = pretrain_backbone([v for v, _ in train], config,
                                                args.out / f"{kind.replace('+', '_')}_seed{seed}",
                                                coordinate_net if guided else None)
            pretrain_s = time.perf_counter() - start
            for protocol in args.protocols.split(","):
                row = evaluate(parts, protocol, backbone, train, test, classes, names, args, seed)
                row.update({"seed": seed, "backbone": kind, "pretrain_s": round(pretrain_s, 1)})
                print(json.dumps(row), flush=True)
                results.append(row)
    atomic_write_json(args.out / "probe.json", {"command": " ".join(sys.argv), "spacing_mm": args.spacing,
                                                "results": results,
                                                "note": "labels are TotalSegmentator's predictions"})
    return 0


def evaluate(parts, protocol: str, backbone, train, test, classes: int, names: dict[int, str],
             args: argparse.Namespace, seed: int) -> dict:
    """Train the downstream head (frozen backbone, or fine-tuned with it) and score it on the test cases."""
    start = time.perf_counter()
    volumes, labels = [v for v, _ in train], [lab for _, lab in train]
    if protocol == "frozen":
        head, losses = parts.probe.train_probe(backbone, volumes, labels, classes, steps=args.probe_steps, seed=seed,
                                               timestep=args.probe_t)
        used, t = backbone, args.probe_t
    elif protocol == "fine-tuned":
        used, head, losses = parts.probe.fine_tune(backbone, volumes, labels, classes, steps=args.probe_steps,
                                                   backbone_lr=args.backbone_lr, seed=seed)
        t = 0
    else:
        raise SystemExit(f"unknown protocol {protocol!r}: frozen or fine-tuned")
    dice = {}
    for volume, reference in test:
        prediction = parts.probe.predict_probe(used, head, volume, timestep=t, seed=seed)
        scores = parts.probe.dice_per_label(prediction, reference, classes)
        dice.update({names[i + 1]: None if d is None else round(d, 4) for i, d in enumerate(scores)})
    present = [d for name, d in dice.items() if d is not None and (test[0][1] == _index(names, name)).any()]
    return {"protocol": protocol, "probe_t": t, "downstream_s": round(time.perf_counter() - start, 1),
            "probe_loss_last50": round(float(np.mean(losses[-50:])), 4), "test_dice": dice,
            "mean_dice_present": round(float(np.mean(present)), 4) if present else None}


def _index(names: dict[int, str], name: str) -> int:
    return next(i for i, n in names.items() if n == name)


if __name__ == "__main__":
    raise SystemExit(main())
