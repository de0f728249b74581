"""Write the held-out figures of `diffusionseg evaluate -o FILE` into a model card (model.json).

The card's sha256 covers the weights only, so recording metrics does not invalidate the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.files import atomic_write_bytes  # noqa: E402
from DiffusionSegLib.models.card import CARD_NAME  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("metrics_json")
    parser.add_argument("--command", default="", help="the command that produced the figures")
    parser.add_argument("--reference-note", default="references are TotalSegmentator's own predictions, not manual "
                        "ground truth", help="where the reference masks come from")
    args = parser.parse_args()
    card_path = Path(args.model_dir) / CARD_NAME
    card = json.loads(card_path.read_text())
    summary = json.loads(Path(args.metrics_json).read_text())
    card["metrics"]["heldout"] = {
        "split": summary["split"],
        "cases": [c["case"] for c in summary["cases"]],
        "per_label": summary["mean"],
        "command": args.command,
        "reference_note": args.reference_note,
    }
    atomic_write_bytes(card_path, json.dumps(card, indent=2).encode())
    print(json.dumps(card["metrics"], indent=2))


if __name__ == "__main__":
    main()
