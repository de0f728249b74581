"""Measure an organ model on one split: Dice per label with and without the card's post-processing,
and the false-positive components (pieces touching no reference voxel) of the final mask.

    python scripts/measure_organ_model.py MODEL_DIR DATASET --split validation [-o out.json]

The validation split decides (e.g. which labels get largest-component post-processing); the test
split is run once, for the figures that are reported. References of the TotalSegmentator dataset
are that tool's own predictions, not manual ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.training.data import default_labels, discover_cases  # noqa: E402
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings  # noqa: E402
from DiffusionSegLib.pipeline.io import read_image, read_label  # noqa: E402
from DiffusionSegLib.training.metrics import dice, false_positive_components  # noqa: E402
from DiffusionSegLib.core.files import atomic_write_bytes  # noqa: E402


def measure(model: Path, dataset: Path, split: str, largest_component: list[str] | None) -> dict:
    """Per case and label: Dice of fused / final with and without post-processing, stray pieces (mL)."""
    import SimpleITK as sitk

    from DiffusionSegLib.models.card import read_card

    read_card(model)  # a folder that is not a model fails here, before any case is read
    if largest_component is not None:  # try a post-processing choice on a copy of the card only
        staged = Path(tempfile.mkdtemp(prefix=f"measure-{model.name}-"))
        for f in model.iterdir():
            if f.is_file() and f.name != "model.json":
                (staged / f.name).symlink_to(f.resolve())
        card_json = json.loads((model / "model.json").read_text())
        card_json["largest_component"] = largest_component
        (staged / "model.json").write_text(json.dumps(card_json))
        model = staged
    cases = discover_cases(dataset, split)
    label_values = default_labels(dataset, cases)
    out = []
    for case in cases:
        image = read_image(case.image)
        ref_map = sitk.GetArrayFromImage(read_label(case.label))
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        row = {"case": case.name, "labels": {}}
        results = {pp: segment_image(image, model, SegmentSettings(seed=0, postprocess=pp)) for pp in (False, True)}
        for i, lab in enumerate(results[True].labels):  # the labels the model outputs (card.shown_labels)
            if lab.name not in label_values:
                continue
            ref = np.isin(ref_map, label_values[lab.name])
            entry = {"reference_ml": round(float(ref.sum() * voxel_ml), 2)}
            for pp, res in results.items():
                tag = "post" if pp else "raw"
                entry[f"dice_fused_{tag}"] = round(dice(res.fused[i], ref), 4)
                entry[f"dice_final_{tag}"] = round(dice(res.final_mask[i], ref), 4)
                entry[f"fp_components_ml_{tag}"] = [round(v, 2) for v in
                                                    false_positive_components(res.final_mask[i], ref, voxel_ml)][:5]
            row["labels"][lab.name] = entry
        row["report_postprocessing"] = results[True].report.get("postprocessing")
        out.append(row)
    return {"model": str(model), "dataset": str(dataset), "split": split, "options": "card defaults, seed 0",
            "cases": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--largest-component", nargs="*", default=None,
                        help="labels to post-process instead of the card's list (for the validation choice)")
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args()
    summary = measure(args.model, args.dataset, args.split, args.largest_component)
    text = json.dumps(summary, indent=1)
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    print(text)


if __name__ == "__main__":
    main()
