"""Whole-image inference: image -> preprocessed batch -> N sampled masks -> ensemble -> CRF -> input grid.

This module orchestrates; each step lives in its own module (io, preprocess, the card's method,
ensemble, crf, postprocess, report). Nothing here reads or writes files except through ``segment_file``'s reader.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from DiffusionSegLib.core.enums import CrfMode, Fusion, Stage
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.pipeline.result import SegmentationResult
from DiffusionSegLib.pipeline.settings import SegmentSettings

log = logging.getLogger(__name__)

# progress(stage, done, total): stage is a core.enums.Stage (load, sampling, crf, restore). For sampling, done
# and total count network evaluations (one slice or patch through the network once), so that
# total = samples x steps x slices; the other stages count their own units (1 of 1, samples).
StageProgress = Callable[[str, int, int], None]
# Called once before sampling with what does not fit (inputcheck.InputWarning list) / the estimate.
WarningsHook = Callable[[list], None]
EstimateHook = Callable[[Any], None]


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

    return restore(prepared, _model_grid_to_batch(maps.astype(np.float32), spatial_dims), "linear", threshold=0.5)


def _restore_and_ensemble(prepared: Any, samples_model: np.ndarray, spatial_dims: int,
                          opts: SegmentSettings) -> tuple[dict[str, Any], dict[str, float]]:
    """Every sample on the input grid and the ensemble statistics, one label at a time.

    samples_model: (N, L, *vol) uint8 on the model grid. Returns ``counts`` (L, *input; how many
    samples mark each voxel, from which ``SegmentationResult`` derives probability, consistency,
    ambiguity and uncertainty), ``fused`` (L, *input) uint8, ``sample_diversity`` (L floats) and,
    with ``keep_samples``, ``samples`` (N, L, *input); plus the seconds spent restoring and
    computing statistics. One label's N restored samples are held at a time, not all labels' (a
    512 x 512 x 100 CT with 9 labels and 5 samples: 131 MB instead of 1.2 GB); every statistic is
    per label, so the numbers are those of the whole-array computation.
    """
    from DiffusionSegLib.pipeline import ensemble
    from DiffusionSegLib.pipeline.preprocess import stack_filled

    n, n_labels = samples_model.shape[:2]
    mean_fusion = Fusion.parse(opts.fusion, "fusion") == Fusion.MEAN  # then the counts decide the fused mask
    maps: dict[str, Any] = {"sample_diversity": []}
    seconds = {"restore": 0.0, "ensemble": 0.0}
    for label in range(n_labels):
        start = time.perf_counter()
        restored = stack_filled((_restore_binary(prepared, samples_model[k, label:label + 1], spatial_dims)
                                 for k in range(n)), n)  # (N, 1, *input) uint8
        middle = time.perf_counter()
        counts = ensemble.sample_counts(restored)
        per_label = {"counts": counts,
                     "fused": ensemble.fused_mask_from_counts(counts, n) if mean_fusion
                     else ensemble.fused_mask(restored, method=opts.fusion)}
        if opts.keep_samples:
            per_label["samples"] = restored
        for name, array in per_label.items():
            if name not in maps:  # allocated once the input grid's shape and the dtype are known
                lead = (n, n_labels) if name == "samples" else (n_labels,)
                maps[name] = np.empty(lead + array.shape[(2 if name == "samples" else 1):], dtype=array.dtype)
            if name == "samples":
                maps[name][:, label] = array[:, 0]
            else:
                maps[name][label] = array[0]
        maps["sample_diversity"].append(float(ensemble.sample_diversity(restored)[0]))
        seconds["restore"] += middle - start
        seconds["ensemble"] += time.perf_counter() - middle
    return maps, {k: round(v, 4) for k, v in seconds.items()}


def _member_shares(samples: int, members: int) -> list[int]:
    """How many of ``samples`` each of ``members`` networks draws: as even as possible, the first ones
    one more; members beyond ``samples`` draw none and are left out (e.g. 5 over 3 -> [2, 2, 1])."""
    used = max(1, min(samples, members))
    return [samples // used + (1 if k < samples % used else 0) for k in range(used)]


def _sample_members(method: Any, members: list[Any], plans: list[Any], card: Any, batch: Any, opts: SegmentSettings,
                    amp: bool, report_progress: StageProgress, total_evaluations: int) -> np.ndarray:
    """Each member draws its plan's samples (member k with seed + k, so members do not share noise);
    (N, B, L, *spatial) uint8, the members' samples one after the other. Progress counts all members.

    A member with ``card.member_flips`` axes draws on the mirrored batch (B, C, *spatial) and its masks
    are mirrored back, so every sample lies on the batch's grid."""
    import torch

    flips = card.member_flip_axes()
    parts = []
    done_before = 0
    for k, (member, member_plan) in enumerate(zip(members, plans)):
        share = member_plan.samples * member_plan.steps * int(batch.shape[0])
        own = _evaluation_progress(
            lambda stage, done, total, base=done_before: report_progress(stage, base + done, total_evaluations), share)
        axes = flips[k] if k < len(flips) else ()
        drawn = method.sample(member, card, torch.flip(batch, [2 + a for a in axes]) if axes else batch, member_plan,
                              seed=opts.seed + k, batch_size=opts.batch_size, amp=amp, progress=own)
        parts.append((torch.flip(drawn, [3 + a for a in axes]) if axes else drawn).numpy())  # (n, B, L, *spatial)
        done_before += share
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


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
        report_progress(Stage.SAMPLING, state["reported"], total_evaluations)

    return progress


def _crop_to_card_region(image: Any, card: Any, crop: bool) -> tuple[Any, Any, dict[str, Any], dict[Any, Any]]:
    """The part of ``image`` a run samples: (image or its crop, the crop's box or None, report entry,
    {region: find_region_why's answer} for reuse). The card's ``crop_to_region`` decides (pipeline/crop.py);
    ``crop`` False, a region not found or a box that leaves out less than ``crop_min_removed`` of the
    slice: the whole image, and the entry says why."""
    region = card.crop_region()
    if region is None:
        return image, None, {}, {}
    if not crop:
        return image, None, {"region": str(region), "note": "crop turned off (--no-crop): the whole image was sampled"}, {}
    from DiffusionSegLib.pipeline.crop import box_report, crop_image, find_box

    mask, why, box, removed = find_box(region, image)
    if box is None:
        note = f"region {region} not found in the input ({why or 'empty'}): the whole image was sampled"
        return image, None, {"region": str(region), "note": note}, {region: (mask, why)}
    entry = {"region": str(region), **box_report(box, image), "removed_fraction": round(removed, 3)}
    if removed < card.crop_min_removed:  # already cut to the region: a re-cut only moves the sampling grid
        entry["note"] = (f"the box leaves out {removed:.0%} of the slice, less than crop_min_removed "
                         f"({card.crop_min_removed:.0%}): the input is taken as already cut to the region, "
                         "and the whole image was sampled")
        return image, None, entry, {region: (mask, why)}
    entry["note"] = "sampled inside this box only; every output is zero outside it"
    return crop_image(image, box), box, entry, {region: (mask, why)}


def segment_image(
    image: Any,
    model_dir: str | Path,
    settings: SegmentSettings | None = None,
    progress: StageProgress | None = None,
    on_warnings: WarningsHook | None = None,
    on_estimate: EstimateHook | None = None,
) -> SegmentationResult:
    """Segment one SimpleITK image (2D/3D, scalar or RGB) with the model in ``model_dir``.

    Every array of the result is on exactly the input's grid (size, origin, spacing, direction).
    Before the model is loaded the settings and the input are checked against the model card
    (inputcheck): the warnings go to ``on_warnings`` (default: logged), and ``settings.strict`` turns
    them into an InputMismatchError. With ``on_estimate``, one timed network call measures this
    device and the sampling time is announced (inputcheck.RunEstimate) before sampling starts.
    The card's method (``methods.registry``) draws the masks; nothing here depends on which it is.
    """
    import torch

    from DiffusionSegLib.core.device import release_freed_memory, resolve_device
    from DiffusionSegLib.methods.registry import get_method, load_members, load_model
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.pipeline import crf, ensemble
    from DiffusionSegLib.pipeline.inputcheck import InputMismatchError, RunEstimate, check_input, input_modality
    from DiffusionSegLib.pipeline.io import validate_image
    from DiffusionSegLib.pipeline.preprocess import prepare
    from DiffusionSegLib.pipeline.report import build_report

    opts = settings or SegmentSettings()
    report_progress = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 4)
        clock = now

    opts.check()
    validate_image(image, "input image")
    # The card alone (no weights) is enough to refuse a setting or an input in well under a second.
    card = read_card(model_dir)
    # A multi-task model: the named task, else the one the input's modality or the card decides.
    modality = input_modality(image)
    task, task_source = card.resolve_task(opts.task, modality["modality"])
    card = card.for_task(task)
    opts.check(card.num_train_timesteps)
    try:
        method = get_method(card.method)
    except ValueError as err:
        raise ModelLoadError(f"model '{card.name}': {err}") from None
    crf_mode = card.crf_mode() if opts.crf is None else opts.crf  # a bad card default fails here, not after sampling
    card.labels_by_region()  # so does a bad region_components
    card.member_flip_axes()  # and bad member_flips
    card.crop_region()  # and a bad crop_to_region
    warnings = check_input(image, card)
    if warnings and opts.strict:
        raise InputMismatchError(warnings)
    if warnings:
        if on_warnings is not None:
            on_warnings(warnings)
        else:
            for warning in warnings:
                log.warning("the input does not fit the model: %s", warning.message)
    # The region to sample in is found before the weights load (a threshold for the lungs: well under a second).
    work, box, crop_entry, known_regions = _crop_to_card_region(image, card, opts.crop)
    if crop_entry:
        lap("crop")
    device = resolve_device(opts.device)
    net, card = load_model(model_dir, device, card=card)  # the task's card, read once above
    plan = method.plan(card, opts.samples, opts.steps, opts.sampler)
    if plan.note:
        log.info("%s", plan.note)
    # A deep ensemble splits the N samples over its members (fewer samples than members: the first N).
    shares = _member_shares(plan.samples, 1 + len(card.members))
    if len(shares) < 1 + len(card.members):
        log.info("%d sample(s) for %d ensemble members: only the first %d draw", plan.samples, 1 + len(card.members),
                 len(shares))
    # load_model has checked every member's sha256; the ones that draw no sample are not loaded.
    members = [net] + load_members(model_dir, card, device, count=len(shares) - 1, checked=True)
    plans = [method.plan(card, n, opts.steps, opts.sampler) for n in shares]
    if len(members) > 1:  # the coarse jump (UniSegDiff) is shared within a member only
        total = sum(p.samples * p.nfe_per_sample for p in plans)
        plan = dataclasses.replace(plan, evaluations_per_sample=total / plan.samples)
    amp = (device.type == "cuda") if opts.amp is None else opts.amp
    lap("load_model")
    report_progress(Stage.LOAD, 1, 1)

    prepared = prepare(work, card, net.size_divisor)
    batch = torch.from_numpy(prepared.batch).to(device)
    lap("preprocess")

    estimate = None
    if on_estimate is not None:
        per_evaluation = method.seconds_per_evaluation(net, card, batch, plan, opts.batch_size, amp)
        estimate = RunEstimate(plan.samples, plan.steps, int(batch.shape[0]), per_evaluation, str(device),
                               "slices" if card.spatial_dims == 2 else "volumes")
        lap("estimate")
        on_estimate(estimate)

    masks = _sample_members(method, members, plans, card, batch, opts, amp, report_progress,
                            plan.samples * plan.steps * int(batch.shape[0]))  # (N, B, L, *spatial) uint8
    if device.type == "cuda":
        torch.cuda.synchronize()
    release_freed_memory()  # what follows allocates whole-volume arrays: let them go back to the OS when freed
    lap("sampling")
    n_samples = plan.samples

    # Context classes (card.shown_labels) were sampled with the rest and are dropped here.
    shown = card.output_label_indices()
    labels = [card.labels[i] for i in shown]
    # Model grid, label-first: (N, L, *vol) with vol = (S, H, W) for 2D models, (D, H, W) for 3D; one
    # copy (the list index copies), and the sampler's array is let go at once.
    samples_model = np.moveaxis(masks, 2, 1)[:, shown]
    del masks
    if card.spatial_dims == 3:
        samples_model = samples_model[:, :, 0]
    refined = None
    crf_backend = "none"
    if crf_mode != CrfMode.OFF:
        report_progress(Stage.CRF, 0, 1)
        image_model = prepared.image_for_crf
        # The torch backend runs where the samples were drawn (the GPU when there is one).
        common = dict(backend=opts.crf_backend, device=str(device), normalization=prepared.normalization)
        if crf_mode == CrfMode.PUBLISHED:
            # DiffSeg: K = 3 rounds, each on the mean of H = 4 random samples (drawn with the run's
            # seed, so the same seed gives the same mask), the refined masks averaged.
            refined_model, crf_backend = crf.refine_from_samples(samples_model, image_model, card.spatial_dims,
                                                                 repeats=3, subset=4, seed=opts.seed, **common)
        else:
            # The chosen fusion's soft map (mean or STAPLE posterior), so the final mask follows --fusion.
            refined_model, crf_backend = crf.refine(ensemble.fused_probability(samples_model, opts.fusion),
                                                    image_model, card.spatial_dims, **common)
        lap("crf")
        refined = _restore_binary(prepared, refined_model, card.spatial_dims)
        report_progress(Stage.CRF, 1, 1)

    # Each sample is brought to the input grid, so every ensemble statistic (and every volume in
    # mL) is computed where the radiologist reads it, not on the padded model grid.
    report_progress(Stage.RESTORE, 0, n_samples)
    maps, stage_seconds = _restore_and_ensemble(prepared, samples_model, card.spatial_dims, opts)
    timings.update(stage_seconds)
    if box is not None:  # back on the whole input grid, zero where nothing was sampled
        from DiffusionSegLib.pipeline.crop import paste

        shape = tuple(reversed(image.GetSize()))  # spatial, array order
        maps = {name: paste(value, box, shape) if isinstance(value, np.ndarray) else value
                for name, value in maps.items()}
        refined = None if refined is None else paste(refined, box, shape)
    clock = time.perf_counter()
    report_progress(Stage.RESTORE, n_samples, n_samples)

    fused = maps["fused"]
    removed: dict[str, dict[str, float]] = {}
    region_notes: list[str] = []
    if opts.postprocess and card.has_postprocessing():
        from DiffusionSegLib.pipeline.postprocess import apply_card_filters
        from DiffusionSegLib.pipeline.regions import find_card_regions

        names = [lab.name for lab in labels]
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        regions, region_notes = find_card_regions(image, card, known_regions)
        for mask_name, mask in (("fused", fused), ("crf", refined)):
            if mask is not None:  # in place: both arrays were made by this run
                removed[mask_name] = apply_card_filters(mask, maps["counts"], n_samples, names, card, regions, voxel_ml)
    result = SegmentationResult(
        reference=image,
        labels=labels,
        counts=maps["counts"],
        n_samples=n_samples,
        fused=fused,
        uncertainty_kind=opts.uncertainty,
        refined=refined,
        samples=maps.get("samples"),
        sample_diversity=maps["sample_diversity"],
    )
    timings["ensemble"] = round(timings["ensemble"] + time.perf_counter() - clock, 4)  # + post-processing
    result.report = build_report(result, card, device, opts, plan, crf_mode, crf_backend,
                                 prepared.batch.shape[0], timings, warnings=warnings, estimate=estimate,
                                 item_shape=list(prepared.batch.shape[2:]), input_modality=modality)
    result.report["model"]["task_source"] = task_source
    result.report["ensemble"] = {"members": len(members), "samples_per_member": shares,
                                 "member_flips": [list(a) for a in card.member_flip_axes()[:len(members)]],
                                 "note": "one network" if len(members) == 1 else
                                 "deep ensemble: the samples are split over the member networks, so every "
                                 "statistic describes the ensemble"}
    if crop_entry:
        result.report["crop"] = crop_entry
    result.report["postprocessing"] = {
        "largest_component": list(card.largest_component) if opts.postprocess else [],
        "consistent_components": list(card.consistent_components) if opts.postprocess else [],
        "region_components": dict(card.region_components) if opts.postprocess else {},
        "region_notes": region_notes,
        ("removed_ml" if image.GetDimension() == 3 else "removed_mm2"):
            {mask: {k: round(v * (1.0 if image.GetDimension() == 3 else 1000.0), 4) for k, v in per.items()}
             for mask, per in removed.items()},
        "note": "applied to the fused and CRF masks only; samples, consistency, ambiguity and uncertainty are as sampled",
    }
    return result


def segment_file(path: str | Path, model_dir: str | Path, settings: SegmentSettings | None = None,
                 progress: StageProgress | None = None, on_warnings: WarningsHook | None = None,
                 on_estimate: EstimateHook | None = None) -> SegmentationResult:
    """Read ``path`` (any image SimpleITK reads, a DICOM folder, PNG/JPEG) and segment it (see segment_image)."""
    from DiffusionSegLib.pipeline.io import read_image

    start = time.perf_counter()
    image = read_image(path)
    read_s = round(time.perf_counter() - start, 4)
    result = segment_image(image, model_dir, settings, progress, on_warnings, on_estimate)
    result.report["input"]["path"] = str(path)
    result.report["timings_s"] = {"read": read_s, **result.report["timings_s"]}
    result.report["total_s"] = round(result.report["total_s"] + read_s, 4)
    return result
