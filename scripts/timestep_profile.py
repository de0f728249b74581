"""Loss, gradient norm and one-step x0 Dice per timestep bin of a trained diffusion model, as JSON and a plot.

    python scripts/timestep_profile.py MODEL DATASET --split validation --bins 10 -o profile.json --plot profile.png

The measurement behind UniSegDiff's claim that a fixed prediction target spreads the training signal
unevenly over the timesteps (DiffusionSegLib.training.timestep_profile). Validation cases only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.files import atomic_write_bytes  # noqa: E402
from DiffusionSegLib.methods.registry import load_model  # noqa: E402
from DiffusionSegLib.training.data import default_labels, discover_cases, load_case  # noqa: E402
from DiffusionSegLib.training.timestep_profile import timestep_profile  # noqa: E402


def plot(profile: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(row["t_low"] + row["t_high"]) / 2 for row in profile]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ("loss", "grad_norm", "x0_dice"),
                              ("loss (MSE to the target)", "gradient norm", "Dice of the one-step x0 estimate")):
        ax.plot(centres, [row[key] for row in profile], marker="o")
        ax.set_xlabel("timestep t (0 = clean)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-o", "--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    net, card = load_model(args.model)
    files = discover_cases(args.dataset, args.split)
    if not files:
        raise SystemExit(f"no {args.split} cases in {args.dataset}")
    labels = {name: values for name, values in default_labels(args.dataset, files).items()
              if name in [lab.name for lab in card.labels]}
    # The card's label order; labels the dataset lacks are all-background channels.
    ordered = {lab.name: labels.get(lab.name, ()) for lab in card.labels}
    cases = [load_case(f, card, ordered) for f in files]
    profile = timestep_profile(net, card, cases, bins=args.bins, repeats=args.repeats)
    summary = {"model": str(args.model), "method": card.method, "prediction_type": card.prediction_type,
               "split": args.split, "cases": [f.name for f in files], "profile": profile}
    text = json.dumps(summary, indent=1)
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    if args.plot:
        plot(profile, f"{card.name} ({card.method}, target {card.prediction_type}), {args.split} split", args.plot)
    print(text)


if __name__ == "__main__":
    main()
