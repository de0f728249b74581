"""``diffusionseg evaluate``: Dice, IoU and HD95 per case and label, and their mean +/- std.

Two modes: a model (folder or name) is run on every case of the split; or a folder of predicted
label maps named like the cases (``<case>.nii.gz``, values as in the dataset's label files) is
scored as it is. A model's run also gives the Generalized Energy Distance of its sampled masks
against the case's reference (D2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')], d = 1 - IoU, with
its three terms; a dataset has one reference per case, so E[d(Y,Y')] is 0).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from DiffusionSegLib.core.errors import DatasetError, ModelLoadError
from DiffusionSegLib.training.metrics import dice, hd95, iou, precision, recall
from DiffusionSegLib.core.files import atomic_write_bytes


def label_array(case: Any, label_path: Path, image: Any) -> np.ndarray:
    """A label map (reference or prediction) as an integer array, checked to lie on the image's grid."""
    import SimpleITK as sitk

    from DiffusionSegLib.training.data import CaseFiles, check_geometry
    from DiffusionSegLib.pipeline.io import read_label

    label = read_label(label_path)
    check_geometry(image, label, CaseFiles(case.name, case.image, label_path))
    return sitk.GetArrayFromImage(label)


def _find_prediction(folder: Path, case: str) -> Path:
    from DiffusionSegLib.training.data import case_name

    for path in sorted(folder.iterdir()):
        if path.is_file() and case_name(path) == case:
            return path
    raise DatasetError(f"no prediction for case '{case}' in {folder}")


# progress(stage, done, total): stage "cases" counts scored cases; "sampling" (model mode) is the
# current case's sampling, as inference.segment_image reports it.
Progress = Callable[[str, int, int], None]
METRICS = ("dice", "iou", "precision", "recall", "hd95_mm")


def score_case(pred: dict[str, np.ndarray], ref: dict[str, np.ndarray], spacing_xyz: list[float]) -> dict[str, Any]:
    """Per-label Dice, IoU, precision, recall and HD95 (mm) of binary masks keyed by label name."""
    spacing = list(reversed(spacing_xyz))  # numpy axis order
    return {name: {"dice": dice(pred[name], ref[name]), "iou": iou(pred[name], ref[name]),
                   "precision": precision(pred[name], ref[name]), "recall": recall(pred[name], ref[name]),
                   "hd95_mm": hd95(pred[name], ref[name], spacing)} for name in ref}


def summarize(cases: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and (population) std of each metric per label over cases; HD95 over cases where defined."""
    out: dict[str, dict[str, float | None]] = {}
    for name in cases[0]["metrics"]:
        row: dict[str, float | None] = {}
        for metric in METRICS:
            values = [c["metrics"][name][metric] for c in cases if c["metrics"][name][metric] is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.pstdev(values) if len(values) > 1 else (0.0 if values else None)
        out[name] = row
    return out


def summarize_ged(cases: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean over cases of the GED and each of its terms, per label."""
    names = list(dict.fromkeys(name for c in cases for name in c.get("ged", {})))
    return {name: {term: round(statistics.fmean(c["ged"][name][term] for c in cases if name in c.get("ged", {})), 6)
                   for term in ("ged", "cross", "sample_diversity", "reference_diversity")} for name in names}


def evaluate(pred_or_model: str | Path, dataset: str | Path, options: Any = None, split: str = "test",
             out_json: str | Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Score a model or a prediction folder on a dataset split. Returns {"cases": [...], "mean": {...}}.

    ``progress("cases", done, total)`` is called before the first case and after each one; in model
    mode the sampling of each case is reported too (stage "sampling").
    """
    from DiffusionSegLib.training.data import default_labels, discover_cases
    from DiffusionSegLib.pipeline.io import read_image
    from DiffusionSegLib.models.store import resolve_model

    cases = [c for c in discover_cases(dataset, split) if c.label is not None]
    if not cases:
        raise DatasetError(f"{dataset}: no labelled cases in the '{split}' split")
    label_values = default_labels(dataset, cases)
    model_dir = None
    source = Path(pred_or_model)
    not_scored: list[str] = []
    if not (source.is_dir() and not (source / "model.json").exists()):
        model_dir = resolve_model(pred_or_model)
        # Checked before any case is segmented. A model may output more structures than a dataset
        # annotates (an organ model on a liver dataset): those are listed, not scored, not refused.
        from DiffusionSegLib.models.card import read_card

        card = read_card(model_dir)
        shown = [card.labels[i].name for i in card.output_label_indices()]
        not_scored = [n for n in shown if n not in label_values]
        if len(not_scored) == len(shown):
            raise ModelLoadError(f"none of the model labels {shown} is a label of dataset {dataset} "
                                 f"({', '.join(label_values)})")
    tasks: dict[str, str | None] = {}
    if model_dir is not None:
        import dataclasses

        from DiffusionSegLib.pipeline.settings import SegmentSettings

        # The samples are needed for the GED (not written anywhere).
        options = dataclasses.replace(options or SegmentSettings(), keep_samples=True)
        # A multi-task model runs each case with its dataset.json task unless the options name one (a case
        # with neither: the task its image decides, as in segment); every named task is checked before
        # the first case is segmented.
        for case in cases:
            tasks[case.name] = options.task if options.task is not None or not card.tasks else case.task
            if tasks[case.name] is not None:
                card.for_task(tasks[case.name])
    results = []
    report = progress or (lambda stage, done, total: None)
    report("cases", 0, len(cases))
    for index, case in enumerate(cases):
        image = read_image(case.image)
        ref_map = label_array(case, case.label, image)
        if model_dir is not None:
            from DiffusionSegLib.pipeline.segment import segment_image

            result = segment_image(image, model_dir, dataclasses.replace(options, task=tasks[case.name]), progress)
            pred = {lab.name: result.final_mask[i] for i, lab in enumerate(result.labels) if lab.name in label_values}
        else:
            pred_map = label_array(case, _find_prediction(source, case.name), image)
            pred = {name: np.isin(pred_map, values) for name, values in label_values.items()}
        ref = {name: np.isin(ref_map, label_values[name]) for name in pred}
        row = {"case": case.name, "metrics": score_case(pred, ref, list(image.GetSpacing()))}
        if model_dir is not None and result.report["model"]["task"] is not None:
            row["task"] = result.report["model"]["task"]
        if model_dir is not None:
            from DiffusionSegLib.pipeline.ensemble import ged_terms

            row["ged"] = {lab.name: ged_terms(result.samples[:, i:i + 1], ref[lab.name][None, None])[0].to_dict()
                          for i, lab in enumerate(result.labels) if lab.name in ref}
        results.append(row)
        report("cases", index + 1, len(cases))
    summary = {"dataset": str(dataset), "split": split, "source": str(pred_or_model),
               "mode": "model" if model_dir is not None else "predictions", "cases": results,
               "mean": summarize(results), "model_labels_not_in_dataset": not_scored}
    if model_dir is not None:
        summary["ged_mean"] = summarize_ged(results)
        summary["ged_definition"] = ("D2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')], d = 1 - IoU; S: the run's sampled "
                                     "masks, Y: the case's reference (one per case, so E[d(Y,Y')] = 0)")
    if out_json:
        atomic_write_bytes(out_json, json.dumps(summary, indent=2).encode())
    return summary


