"""Whole-image inference: image -> preprocessed batch -> N sampled masks -> ensemble -> CRF -> input grid.

This module orchestrates; each step lives in its own module (io, preprocess, diffusion,
ensemble, crf). Nothing here reads or writes files except through ``segment_file``'s reader.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from DiffusionSegLib import __version__
from DiffusionSegLib.pipeline.result import SegmentationResult

log = logging.getLogger(__name__)

# progress(stage, done, total): stage is "load", "sampling", "crf", "restore". For "sampling", done
# and total count network evaluations (one slice or patch through the network once), so that
# total = samples x steps x slices; the other stages count their own units (1 of 1, samples).
StageProgress = Callable[[str, int, int], None]
# Called once before sampling with what does not fit (inputcheck.InputWarning list) / the estimate.
WarningsHook = Callable[[list], None]
EstimateHook = Callable[[Any], None]

# What the network predicts, in words (report.json): the card's prediction_type is jargon.
PREDICTION_TARGETS = {"sample": "clean mask (x0)", "epsilon": "added noise (epsilon)",
                      "v_prediction": "velocity (v, a mix of noise and mask)"}
_SAMPLER_NAMES = {"ddim": "DDIM (deterministic after the first noise)",
                  "ddpm": "DDPM (ancestral, random at every step)",
                  "none": "none (supervised model: one forward pass)"}
_UNCERTAINTY_DEFINITIONS = {"variance": "variance p(1-p) of the sample mean p, 0 (samples agree) to 0.25",
                            "entropy": "binary entropy of the sample mean p in bits, 0 (samples agree) to 1"}


@dataclass
class SegmentOptions:
    """Run settings; None means the model card's default."""

    samples: int | None = None
    steps: int | None = None
    sampler: str | None = None
    seed: int = 0
    device: str = "auto"
    crf: bool | None = None  # DenseCRF refinement; None = the card's default_crf
    crf_backend: str = "auto"
    fusion: str = "mean"  # "mean" (mean > 0.5) or "staple" (SimpleITK STAPLE)
    uncertainty: str = "variance"  # "variance" or "entropy"
    keep_samples: bool = False
    postprocess: bool = True  # the card's organ post-processing (largest connected component)
    amp: bool | None = None  # None: autocast on CUDA only
    batch_size: int | None = None  # None: chosen from free memory
    strict: bool = False  # input warnings (inputcheck) refuse the run (InputMismatchError) before sampling


FUSIONS = ("mean", "staple")
UNCERTAINTY_KINDS = ("variance", "entropy")


def check_options(opts: SegmentOptions, num_train_timesteps: int | None = None) -> None:
    """Raise SettingsError for a setting no run can use; None always means the card's default.

    Called before the model is loaded (``num_train_timesteps`` None: card-free checks) and again
    with the card's T, so a bad setting fails in well under a second, never after sampling.
    """
    from DiffusionSegLib.methods.diffusion import SAMPLERS
    from DiffusionSegLib.core.errors import SettingsError

    def positive(name: str, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SettingsError(f"{name} must be a whole number >= 1 (or unset for the model's default), got {value!r}")

    positive("samples", opts.samples)
    positive("steps", opts.steps)
    positive("batch size", opts.batch_size)
    if isinstance(opts.seed, bool) or not isinstance(opts.seed, int) or opts.seed < 0:
        raise SettingsError(f"seed must be a whole number >= 0, got {opts.seed!r}")
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise SettingsError(f"unknown sampler {opts.sampler!r} (use {', '.join(SAMPLERS)})")
    if opts.fusion not in FUSIONS:
        raise SettingsError(f"unknown fusion {opts.fusion!r} (use {', '.join(FUSIONS)})")
    if opts.uncertainty not in UNCERTAINTY_KINDS:
        raise SettingsError(f"unknown uncertainty {opts.uncertainty!r} (use {', '.join(UNCERTAINTY_KINDS)})")
    if num_train_timesteps is not None and opts.steps is not None and opts.steps > num_train_timesteps:
        raise SettingsError(f"steps ({opts.steps}) cannot exceed the model's {num_train_timesteps} training timesteps")


def _model_grid_to_batch(maps: np.ndarray, spatial_dims: int) -> np.ndarray:
    """(L, *vol) on the model grid -> the batch layout restore() expects.

    2D models: vol = (S, H, W) slices -> (S, L, H, W). 3D models: (L, D, H, W) -> (1, L, D, H, W).
    """
    if spatial_dims == 2:
        return np.ascontiguousarray(np.moveaxis(maps, 0, 1))
    return maps[None]


def _restore_binary(prepared: Any, maps: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Binary (L, *vol) on the model grid -> binary (L, *input spatial).

    Linear interpolation of the 0/1 map then > 0.5 gives smoother borders than nearest neighbour
    when the model grid is coarser than the input.
    """
    from DiffusionSegLib.pipeline.preprocess import restore

    soft = restore(prepared, _model_grid_to_batch(maps.astype(np.float32), spatial_dims), "linear")
    return (soft > 0.5).astype(np.uint8)


def _evaluation_progress(report_progress: StageProgress, total_evaluations: int) -> Callable[[int, int], None]:
    """Sampler progress (network calls of the current attempt) -> ("sampling", evaluations done, total).

    The sampler counts calls on chunks of items, restarting its count after an out-of-memory
    halving; what a user can check is network evaluations (samples x steps x slices). The share of
    each attempt's calls is mapped onto the evaluations still to do, so the count only grows and
    ends exactly at the total.
    """
    state = {"base": 0, "reported": 0, "done": 0, "total": None}

    def progress(done: int, total: int) -> None:
        if total != state["total"] or done < state["done"]:  # a new attempt after an OOM halving
            state["base"], state["total"] = state["reported"], total
        state["done"] = done
        left = total_evaluations - state["base"]
        reported = total_evaluations if done >= total else state["base"] + (left * done) // max(total, 1)
        state["reported"] = max(state["reported"], reported)
        report_progress("sampling", state["reported"], total_evaluations)

    return progress


def probe_seconds_per_evaluation(net: Any, card: Any, batch: Any, n_samples: int, batch_size: int | None,
                                 amp: bool) -> float:
    """Seconds per network evaluation on this device and input size, from one timed forward pass.

    The timed pass has the size of the sampler's chunks (``batch_size``, or what sample_masks picks
    from free memory): a CPU call has a cost that does not shrink with the batch, so a smaller probe
    would overstate the time several times. One item goes first, untimed, to pay the one-time
    start-up (thread pool, allocator, kernel selection). Cost: about one of the run's network calls
    (a default 5 x 10 run on 20 slices makes 40), announced, never used to schedule.
    """
    import torch

    from DiffusionSegLib.core.device import auto_batch_size, keep_freed_memory_for_reuse
    from DiffusionSegLib.core.device import autocast
    from DiffusionSegLib.methods.diffusion import bytes_per_item

    device = batch.device
    if device.type == "cpu":
        keep_freed_memory_for_reuse()  # as the sampler does, so the probe runs under the same allocator
    # The chunk size sample_masks will use (same rule, same cap).
    chunk = batch_size or auto_batch_size(device, bytes_per_item(card, tuple(batch.shape[2:])),
                                          cap=64 if device.type != "cpu" else 32)
    k = max(1, min(n_samples * batch.shape[0], chunk))
    cond = batch[torch.arange(k, device=device) % batch.shape[0]]
    noise = torch.Generator("cpu").manual_seed(0)
    x = torch.randn((k, card.out_channels, *batch.shape[2:]), generator=noise).to(device)
    t = torch.full((k,), card.num_train_timesteps - 1, device=device, dtype=torch.long)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), autocast(device, amp):
        net(x[:1], cond[:1], t[:1])
        sync()
        start = time.perf_counter()
        net(x, cond, t)
        sync()
    return (time.perf_counter() - start) / k


def segment_image(
    image: Any,
    model_dir: str | Path,
    options: SegmentOptions | None = None,
    progress: StageProgress | None = None,
    on_warnings: WarningsHook | None = None,
    on_estimate: EstimateHook | None = None,
) -> SegmentationResult:
    """Segment one SimpleITK image (2D/3D, scalar or RGB) with the model in ``model_dir``.

    Every array of the result is on exactly the input's grid (size, origin, spacing, direction).
    Before the model is loaded the input is checked against the model card (inputcheck): the
    warnings go to ``on_warnings`` (default: logged), and ``options.strict`` turns them into an
    InputMismatchError. With ``on_estimate``, one timed forward pass measures this device and the
    sampling time is announced (inputcheck.RunEstimate) before sampling starts.
    """
    import torch

    from DiffusionSegLib.pipeline import crf

    from DiffusionSegLib.pipeline import ensemble
    from DiffusionSegLib.core.device import resolve_device
    from DiffusionSegLib.methods.diffusion import sample_masks
    from DiffusionSegLib.pipeline.inputcheck import InputMismatchError, RunEstimate, check_input, input_modality
    from DiffusionSegLib.pipeline.io import validate_image
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.models.store import load_model
    from DiffusionSegLib.pipeline.preprocess import prepare, restore

    opts = options or SegmentOptions()
    report_progress = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 4)
        clock = now

    check_options(opts)
    validate_image(image, "input image")
    # The card alone (no weights) is enough to refuse a setting or an input in well under a second.
    card = read_card(model_dir)
    check_options(opts, card.num_train_timesteps)
    warnings = check_input(image, card)
    if warnings and opts.strict:
        raise InputMismatchError(warnings)
    if warnings:
        if on_warnings is not None:
            on_warnings(warnings)
        else:
            for warning in warnings:
                log.warning("the input does not fit the model: %s", warning.message)
    device = resolve_device(opts.device)
    net, card = load_model(model_dir, device)
    n_samples = card.default_samples if opts.samples is None else opts.samples
    sampler = opts.sampler or card.default_sampler
    if opts.steps is not None:
        steps = opts.steps
    else:  # DDPM's reference is its full chain; DDIM's default is the card's short chain
        steps = card.num_train_timesteps if sampler == "ddpm" else card.default_steps
    if not getattr(net, "is_diffusion", True):
        # Supervised model: one deterministic forward pass; extra samples would be identical copies.
        if (opts.samples or 1) > 1 or (opts.steps or 1) > 1:  # None and 1 both mean "one"
            log.info("model '%s' (%s) is deterministic: 1 sample, 1 forward pass", card.name, card.method)
        n_samples, steps, sampler = 1, 1, "none"
    amp = (device.type == "cuda") if opts.amp is None else opts.amp
    lap("load_model")
    report_progress("load", 1, 1)

    prepared = prepare(image, card, net.size_divisor)
    batch = torch.from_numpy(prepared.batch).to(device)
    lap("preprocess")

    estimate = None
    if on_estimate is not None and getattr(net, "is_diffusion", True):
        per_evaluation = probe_seconds_per_evaluation(net, card, batch, n_samples, opts.batch_size, amp)
        estimate = RunEstimate(n_samples, steps, int(batch.shape[0]), per_evaluation, str(device),
                               "slices" if card.spatial_dims == 2 else "volumes")
        lap("estimate")
        on_estimate(estimate)

    sampling_progress = _evaluation_progress(report_progress, n_samples * steps * int(batch.shape[0]))
    if getattr(net, "is_diffusion", True):
        soft = sample_masks(
            net, card, batch, n_samples=n_samples, steps=steps, sampler=sampler, seed=opts.seed,
            batch_size=opts.batch_size, amp=amp, progress=sampling_progress,
        ).numpy()  # (N, B, L, *spatial)
    else:
        from DiffusionSegLib.methods.unet.network import predict_supervised

        soft = predict_supervised(net, batch, opts.batch_size, amp, sampling_progress).numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    lap("sampling")

    # Context classes (card.shown_labels) were sampled with the rest and are dropped here.
    shown = card.output_label_indices()
    labels = [card.labels[i] for i in shown]
    soft = soft[:, :, shown]
    # Model grid, label-first: (N, L, *vol) with vol = (S, H, W) for 2D models, (D, H, W) for 3D.
    samples_model = np.moveaxis(soft > 0.5, 2, 1).astype(np.uint8)
    if card.spatial_dims == 3:
        samples_model = samples_model[:, :, 0]
    refined = None
    crf_backend = "none"
    use_crf = card.default_crf if opts.crf is None else opts.crf
    if use_crf:
        report_progress("crf", 0, 1)
        image_model = np.moveaxis(prepared.batch, 1, 0) if card.spatial_dims == 2 else prepared.batch[0]
        # The torch backend runs where the samples were drawn (the GPU when there is one).
        # DenseCRF refines the chosen fusion's soft map (mean or STAPLE posterior), so the final mask
        # follows --fusion; the torch backend runs where the samples were drawn.
        refined_model, crf_backend = crf.refine(
            ensemble.fused_probability(samples_model, opts.fusion), image_model, card.spatial_dims,
            backend=opts.crf_backend, device=str(device), normalization=card.normalization,
        )
        lap("crf")
        refined = _restore_binary(prepared, refined_model, card.spatial_dims)
        report_progress("crf", 1, 1)

    # Each sample is brought to the input grid, so every ensemble statistic (and every volume in
    # mL) is computed where the radiologist reads it, not on the padded model grid.
    report_progress("restore", 0, n_samples)
    samples = np.stack([_restore_binary(prepared, s, card.spatial_dims) for s in samples_model])
    lap("restore")

    fused = ensemble.fused_mask(samples, method=opts.fusion)
    removed: dict[str, dict[str, float]] = {}
    if opts.postprocess and card.largest_component:
        from DiffusionSegLib.pipeline.postprocess import keep_largest_component

        names = [lab.name for lab in labels]
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        fused, removed["fused"] = keep_largest_component(fused, names, card.largest_component, voxel_ml)
        if refined is not None:
            refined, removed["crf"] = keep_largest_component(refined, names, card.largest_component, voxel_ml)
    result = SegmentationResult(
        reference=image,
        labels=labels,
        probability=ensemble.probability(samples),
        fused=fused,
        consistency=ensemble.consistency(samples),
        ambiguity=ensemble.ambiguity(samples),
        uncertainty=ensemble.uncertainty(samples, kind=opts.uncertainty),
        refined=refined,
        samples=samples if opts.keep_samples else None,
        sample_diversity=[float(d) for d in ensemble.sample_diversity(samples)],
    )
    lap("ensemble")
    result.report = build_report(result, card, device, opts, n_samples, steps, sampler, crf_backend,
                                 prepared.batch.shape[0], timings, warnings=warnings, estimate=estimate,
                                 item_shape=list(prepared.batch.shape[2:]), input_modality=input_modality(image))
    result.report["postprocessing"] = {
        "largest_component": list(card.largest_component) if opts.postprocess else [],
        ("removed_ml" if image.GetDimension() == 3 else "removed_mm2"):
            {mask: {k: round(v * (1.0 if image.GetDimension() == 3 else 1000.0), 4) for k, v in per.items()}
             for mask, per in removed.items()},
        "note": "applied to the fused and CRF masks only; samples, consistency, ambiguity and uncertainty are as sampled",
    }
    return result


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


def build_report(result: SegmentationResult, card: Any, device: Any, opts: SegmentOptions, n_samples: int,
                 steps: int, sampler: str, crf_backend: str, n_items: int, timings: dict[str, float], *,
                 warnings: list | tuple = (), estimate: Any = None, item_shape: list[int] | None = None,
                 input_modality: dict[str, str] | None = None) -> dict:
    """JSON-able report of a run: settings, cost (NFE), timings, diversity, region sizes, input fit.

    Per-label figures are keyed by label name first (``sample_diversity[label]``,
    ``volumes_ml[label][region]``), the label values as in the label maps are in ``label_map``.
    """
    from DiffusionSegLib.pipeline import ensemble

    ref = result.reference
    spacing = list(ref.GetSpacing())
    is_3d = ref.GetDimension() == 3
    regions = {"fused": result.fused, "consistency": result.consistency, "ambiguity": result.ambiguity}
    if result.refined is not None:
        regions["crf"] = result.refined
    per_region = {}
    for region, mask in regions.items():
        values = ensemble.volumes_ml(mask, spacing)
        if not is_3d:  # a 2D image has areas: volumes_ml of a 2D grid is mm^2 / 1000
            values = [v * 1000.0 for v in values]
        per_region[region] = values
    sizes = {lab.name: {region: round(float(values[i]), 4) for region, values in per_region.items()}
             for i, lab in enumerate(result.labels)}
    evaluations = n_samples * steps * n_items
    sampling_s = timings.get("sampling")
    modality = {"model": card.modality, "input": (input_modality or {}).get("modality", "unknown"),
                "input_determined_from": (input_modality or {}).get("source", "")}
    return {
        "diffusionseg_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
        "model": {"name": card.name, "method": card.method, "modality": card.modality,
                  "spatial_dims": card.spatial_dims, "in_channels": card.in_channels, "spacing_mm": card.spacing,
                  "normalization": card.normalization, "prediction_type": card.prediction_type,
                  "prediction_target": PREDICTION_TARGETS.get(card.prediction_type, card.prediction_type),
                  "weights_sha256": card.weights_sha256},
        "modality": modality,
        "warnings": [w.to_dict() for w in warnings],
        "label_map": {"0": "background", **{str(i + 1): lab.name for i, lab in enumerate(result.labels)}},
        "device": str(device),
        "samples": n_samples,
        "steps": steps,
        "sampler": sampler,
        "sampler_description": _SAMPLER_NAMES.get(sampler, sampler),
        "seed": opts.seed,
        "nfe_per_image": n_samples * steps,
        "network_evaluations": evaluations,
        "slices_or_patches": n_items,
        "model_grid_item_shape": item_shape,
        "seconds_per_network_evaluation": round(sampling_s / evaluations, 6) if sampling_s and evaluations else None,
        "estimate": estimate.to_dict() if estimate is not None else None,
        "fusion": opts.fusion,
        "final_mask": ("crf: DenseCRF of the " + opts.fusion + " fusion") if result.refined is not None
                      else ("fused: " + opts.fusion + " fusion"),
        "uncertainty_kind": opts.uncertainty,
        "uncertainty_definition": _UNCERTAINTY_DEFINITIONS.get(opts.uncertainty, opts.uncertainty),
        "crf_backend": crf_backend,
        "sample_diversity": {lab.name: round(d, 6) for lab, d in zip(result.labels, result.sample_diversity)},
        "sample_diversity_definition": "mean pairwise (1 - IoU) between sampled masks: the E[d(S,S')] term of the GED",
        ("volumes_ml" if is_3d else "areas_mm2"): sizes,
        "input": {"size": list(ref.GetSize()), "spacing": spacing, "origin": list(ref.GetOrigin()),
                  "direction": list(ref.GetDirection()), "channels": ref.GetNumberOfComponentsPerPixel()},
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 4),
    }


def segment_file(path: str | Path, model_dir: str | Path, options: SegmentOptions | None = None,
                 progress: StageProgress | None = None, on_warnings: WarningsHook | None = None,
                 on_estimate: EstimateHook | None = None) -> SegmentationResult:
    """Read ``path`` (any image SimpleITK reads, a DICOM folder, PNG/JPEG) and segment it (see segment_image)."""
    from DiffusionSegLib.pipeline.io import read_image

    start = time.perf_counter()
    image = read_image(path)
    read_s = round(time.perf_counter() - start, 4)
    result = segment_image(image, model_dir, options, progress, on_warnings, on_estimate)
    result.report["input"]["path"] = str(path)
    result.report["timings_s"] = {"read": read_s, **result.report["timings_s"]}
    result.report["total_s"] = round(result.report["total_s"] + read_s, 4)
    return result
