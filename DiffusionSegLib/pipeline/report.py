"""The report of a run (report.json): settings, cost in network evaluations, timings, sizes, input fit.

Every figure a user or a script reads about a run is named here once; the writers store it as it is.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any

from DiffusionSegLib import __version__
from DiffusionSegLib.core.enums import (CRF_DESCRIPTIONS, SAMPLER_DESCRIPTIONS,
                                        UNCERTAINTY_DEFINITIONS, CrfMode)
from DiffusionSegLib.methods.base import SamplingPlan
from DiffusionSegLib.methods.registry import get_method
from DiffusionSegLib.pipeline.result import SegmentationResult
from DiffusionSegLib.pipeline.preprocess import modality_normalization
from DiffusionSegLib.pipeline.settings import SegmentSettings


def _versions() -> dict[str, str]:
    """Versions of the software that produced a result: diffusionseg and what its numbers depend on."""
    from importlib import metadata

    versions = {"diffusionseg": __version__}
    for name, dist in (("torch", "torch"), ("monai", "monai"), ("SimpleITK", "SimpleITK")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def build_report(result: SegmentationResult, card: Any, device: Any, opts: SegmentSettings, plan: SamplingPlan,
                 crf_mode: CrfMode, crf_backend: str, n_items: int, timings: dict[str, float], *,
                 warnings: list | tuple = (), estimate: Any = None, item_shape: list[int] | None = None,
                 input_modality: dict[str, str] | None = None) -> dict:
    """JSON-able report of a run: settings, cost (NFE), timings, diversity, region sizes, input fit.

    Per-label figures are keyed by label name first (``sample_diversity[label]``,
    ``volumes_ml[label][region]``), the label values as in the label maps are in ``label_map``.
    ``normalization_used`` names the entry of a ``by_modality`` normalization the input got ("CT",
    "MR"), chosen from the input image as preprocessing chose it; None for a single normalization.
    """
    from DiffusionSegLib.pipeline import ensemble

    n_samples, steps, sampler = plan.samples, plan.steps, plan.sampler
    ref = result.reference
    spacing = list(ref.GetSpacing())
    is_3d = ref.GetDimension() == 3
    per_region = {}
    for region, mask in result.regions():
        values = ensemble.volumes_ml(mask, spacing)
        if not is_3d:  # a 2D image has areas: volumes_ml of a 2D grid is mm^2 / 1000
            values = [v * 1000.0 for v in values]
        per_region[region] = values
        del mask  # before the next region is computed
    sizes = {lab.name: {region: round(float(values[i]), 4) for region, values in per_region.items()}
             for i, lab in enumerate(result.labels)}
    nfe_per_image = plan.samples * plan.nfe_per_sample
    evaluations = nfe_per_image * n_items
    sampling_s = timings.get("sampling")
    modality = {"model": card.modality, "input": (input_modality or {}).get("modality", "unknown"),
                "input_determined_from": (input_modality or {}).get("source", "")}
    return {
        "diffusionseg_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
        "model": {"name": card.name, "method": card.method, "modality": card.modality,
                  "spatial_dims": card.spatial_dims, "in_channels": card.in_channels, "spacing_mm": card.spacing,
                  # 2.5D: neighbouring slices on each side seen as extra channels, and their distance
                  "context_slices": card.context_slices, "context_spacing_mm": card.slice_context()[1] or None,
                  "normalization": card.normalization, "prediction_type": card.prediction_type,
                  "prediction_target": get_method(card.method).target_description(card),
                  "weights_sha256": card.weights_sha256,
                  # the network's window (3D, or 2D with slice_windows; None: whole items) and its overlap
                  "inference_window": list(card.inference_window() or []) or None,
                  "window_overlap": card.windows_overlap(),
                  # a multi-task model: the run's task and the model's tasks (the task token the network saw)
                  "task": card.task, "tasks": list(card.tasks)},
        "modality": modality,
        "normalization_used": modality_normalization(ref, card)[0],
        "warnings": [w.to_dict() for w in warnings],
        "label_map": {"0": "background", **{str(i + 1): lab.name for i, lab in enumerate(result.labels)}},
        "device": str(device),
        "samples": n_samples,
        "steps": steps,
        "sampler": sampler.value,
        "sampler_description": SAMPLER_DESCRIPTIONS[sampler],
        "seed": opts.seed,
        "nfe_per_image": round(nfe_per_image, 4),
        "network_evaluations": round(evaluations, 4),
        "slices_or_patches": n_items,
        "model_grid_item_shape": item_shape,
        "seconds_per_network_evaluation": round(sampling_s / evaluations, 6) if sampling_s and evaluations else None,
        "estimate": estimate.to_dict() if estimate is not None else None,
        "fusion": opts.fusion.value,
        "final_mask": ("crf: " + CRF_DESCRIPTIONS[crf_mode].format(fusion=opts.fusion)) if result.refined is not None
                      else (f"fused: {opts.fusion} fusion"),
        "crf_mode": crf_mode.value,
        "uncertainty_kind": opts.uncertainty.value,
        "uncertainty_definition": UNCERTAINTY_DEFINITIONS[opts.uncertainty],
        "crf_backend": crf_backend,
        "sample_diversity": {lab.name: round(d, 6) for lab, d in zip(result.labels, result.sample_diversity)},
        "sample_diversity_definition": "mean pairwise (1 - IoU) between sampled masks: the E[d(S,S')] term of the GED",
        ("volumes_ml" if is_3d else "areas_mm2"): sizes,
        "input": {"size": list(ref.GetSize()), "spacing": spacing, "origin": list(ref.GetOrigin()),
                  "direction": list(ref.GetDirection()), "channels": ref.GetNumberOfComponentsPerPixel()},
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 4),
    }
