"""Assemble a deep-ensemble model folder from models of one recipe trained with other seeds.

    python3 scripts/make_ensemble_model.py -o OUT MODEL_SEED0 MODEL_SEED1 MODEL_SEED2 [--half]

The first model's card and weights become member 0, the others member_K.safetensors (sha256 in the
card); a run splits its N samples over the members (DiffusionSegLib.models.ensemble).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.errors import DiffusionSegError  # noqa: E402
from DiffusionSegLib.methods.registry import load_members, load_model  # noqa: E402
from DiffusionSegLib.models.ensemble import make_ensemble  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("models", type=Path, nargs="+", help="model folders, the first one's card is kept")
    parser.add_argument("--name", default=None, help="model name (default: the folder name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--half", action="store_true",
                        help="store the weights as float16 (half the size; loaded into float32), for a bundled model")
    args = parser.parse_args(argv)
    try:
        card = make_ensemble(args.out, args.models, args.name, args.overwrite, half=args.half)
        _, loaded = load_model(args.out)  # every member builds and loads before the folder is announced
        load_members(args.out, loaded)
    except DiffusionSegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: '{card.name}', {1 + len(card.members)} members ({card.method})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
