"""Loss, gradient norm and one-step x0 Dice per timestep bin of a trained diffusion model, as JSON and a plot.

    python scripts/timestep_profile.py MODEL DATASET --split validation --bins 10 -o profile.json --plot profile.png
    python scripts/timestep_profile.py DATASET --models A B --split test ...   # several models on one plot

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
from DiffusionSegLib.methods.registry import get_method, load_model  # noqa: E402
from DiffusionSegLib.training.data import default_labels, discover_cases, load_case  # noqa: E402
from DiffusionSegLib.training.timestep_profile import timestep_profile  # noqa: E402


def plot(profiles: dict[str, list[dict]], title: str, path: Path) -> None:
    """One panel per measure; one line per model (legend: its name and prediction target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for name, profile in profiles.items():
        centres = [(row["t_low"] + row["t_high"]) / 2 for row in profile]
        for ax, key in zip(axes, ("loss", "grad_norm", "x0_dice")):
            ax.plot(centres, [row[key] for row in profile], marker="o", label=name)
    for ax, label in zip(axes, ("loss (MSE to the target)", "gradient norm", "Dice of the one-step x0 estimate")):
        ax.set_xlabel("timestep t (0 = clean)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if len(profiles) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def profile_model(model: Path, dataset: Path, split: str, bins: int, repeats: int) -> dict:
    net, card = load_model(model)
    files = discover_cases(dataset, split)
    if not files:
        raise SystemExit(f"no {split} cases in {dataset}")
    labels = {name: values for name, values in default_labels(dataset, files).items()
              if name in [lab.name for lab in card.labels]}
    # The card's label order; labels the dataset lacks are all-background channels.
    ordered = {lab.name: labels.get(lab.name, ()) for lab in card.labels}
    cases = [load_case(f, card, ordered) for f in files]
    profile = timestep_profile(net, card, cases, bins=bins, repeats=repeats)
    return {"model": str(model), "name": card.name, "method": card.method,
            "prediction_target": get_method(card.method).target_description(card),
            "split": split, "cases": [f.name for f in files], "profile": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="MODEL DATASET, or DATASET with --models")
    parser.add_argument("--models", type=Path, nargs="+", help="several models, one line each on the plot")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-o", "--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if args.models:
        if len(args.paths) != 1:
            parser.error("with --models give the DATASET only")
        models, dataset = args.models, args.paths[0]
    elif len(args.paths) == 2:
        models, dataset = [args.paths[0]], args.paths[1]
    else:
        parser.error("give MODEL DATASET, or DATASET --models A B ...")
    summaries = [profile_model(m, dataset, args.split, args.bins, args.repeats) for m in models]
    text = json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=1)
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    if args.plot:
        labels = {f"{s['name']} ({s['prediction_target']})" if len(summaries) == 1 else s["name"]: s["profile"]
                  for s in summaries}
        plot(labels, f"per-timestep profile, {args.split} split of {dataset.name}", args.plot)
    print(text)


if __name__ == "__main__":
    main()
