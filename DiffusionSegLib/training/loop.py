"""Training loop for diffusion segmentation models.

``train(dataset_dir, model_dir, config)`` reads a dataset folder (see ``data``), trains the
network the config describes with its method's objective (``methods.registry``: the diffusion
methods' MSE to the prediction target, the supervised UNet's Dice + BCE),
keeps an exponential moving average (EMA) of the weights, measures the Dice of the EMA weights
on held-out CASES every ``val_every`` steps (few-step DDIM ensembles, as inference runs), and
writes the best EMA weights with ``modelcard.save_model``.

Files in ``model_dir``::

    model.json, model.safetensors   the final model (best validated EMA weights; last EMA without validation)
    training_log.json               loss of every step and every validation result
    checkpoint/                     weights.safetensors (network, EMA, best EMA, torch RNG states),
                                    optimizer.pt (torch.save, read back with weights_only=True),
                                    state.json (step, config, sampler RNG state, history)

``train(..., resume=True)`` continues from ``checkpoint/``; on CPU the continuation is
bit-identical to an uninterrupted run (every random generator is restored).

Under ``torchrun --nproc_per_node=N`` the run is data-parallel over N processes (DDP; see
``training.distributed``): ``batch_size`` stays the global batch and rank 0 writes every file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from DiffusionSegLib.core.enums import Supervision
from DiffusionSegLib.core.errors import DatasetError, DiffusionSegError
from DiffusionSegLib.training.metrics import dice as dice_score  # public here: dice_score(pred, ref), both empty = 1.0
from DiffusionSegLib.core.files import atomic_write_bytes
from DiffusionSegLib.models.card import LabelInfo, ModelCard, array_patch_size, check_tasks, slice_context

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "config_from_cli", "validation_dice", "dice_score"]

CHECKPOINT_DIR = "checkpoint"
VAL_ITEMS = 64  # held-out items of an image-label method's validation loss
CALIBRATION_ITEMS = 64  # held-out healthy crops an image-label method calibrates on
LOG_NAME = "training_log.json"
# Fields that may change when a run is resumed: they schedule the run, they do not define the model or data.
RESUMABLE_CHANGES = ("steps", "val_every", "checkpoint_every", "device", "description", "limits")
DEFAULT_COLORS = ((0.86, 0.24, 0.18), (0.18, 0.55, 0.86), (0.22, 0.72, 0.31), (0.95, 0.76, 0.15),
                  (0.58, 0.34, 0.78), (0.95, 0.5, 0.2))


@dataclass
class TrainConfig:
    """Every setting of a training run (JSON-serializable with ``dataclasses.asdict``)."""

    name: str = ""  # model name; "" = the model folder's name
    method: str = "medsegdiff"  # methods.registry.Method: medsegdiff | vanilla_dpm | unet | diffseg | unisegdiff
    spatial_dims: int = 2
    network: dict[str, Any] = field(default_factory=dict)  # kwargs of networks.build_network
    patch_size: list[int] = field(default_factory=lambda: [128, 128])  # (H, W) or (H, W, D) as in ModelCard
    spacing: list[float] | None = None  # model grid in mm, SimpleITK (x, y[, z]) order; None = image grid
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "zscore"})
    modality: str = "CT"
    orientation: str | None = "LPS"  # 3D inputs are reoriented to this before slicing (see ModelCard)
    slice_axis: int = 0  # numpy axis of (z, y, x) along which a 2D model takes slices
    # 2.5D (2D models): neighbouring slices on each side as extra channels, every context_spacing mm
    # (None = spacing[0]); see ModelCard.context_slices
    context_slices: int = 0
    context_spacing: float | None = None
    labels: dict[str, Any] | None = None  # name -> value(s) in the label files; None = all of dataset.json
    label_colors: dict[str, list[float]] = field(default_factory=dict)  # name -> RGB in [0, 1]
    # x0 target: METHODS.md measured Dice 0.97 (x0) vs 0.33-0.55 (epsilon) at 5-50 DDIM steps after a short training.
    prediction_type: str = "sample"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear_beta"
    steps: int = 2000  # optimizer steps
    batch_size: int = 8
    lr: float = 1e-4  # AdamW, constant
    weight_decay: float = 1e-4
    ema_decay: float = 0.999  # reached after warm-up: decay_k = min(ema_decay, (1 + k) / (10 + k))
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    amp: bool | None = None  # bf16 autocast; None = on CUDA with bf16 support only
    foreground_fraction: float = 0.67  # share of items centred on foreground
    # Share of items centred on background that looks like foreground (intensity inside the
    # foreground's band): teaches the model to reject look-alikes; 0 = off (data.hard_negatives).
    hard_negative_fraction: float = 0.0
    # A multi-task model: task name -> weight of its share of the training items (every task named;
    # data.PatchSampler); empty = one pool of all cases, so a task with more cases or slices gets more items.
    task_weights: dict[str, float] = field(default_factory=dict)
    augment: bool = True
    flips: bool = False  # left-right flips (off: organs are lateralized)
    # Strength of the random affine (data.Augmentation): in-plane rotation up to +- this many degrees,
    # and a scale factor in 1 +- scale_augment per axis; more of both mimics other patients' sizes.
    rotate_augment_deg: float = 10.0
    scale_augment: float = 0.1
    # Contrast-phase augmentation (ct_window models): label name -> [low, high] HU added to that
    # organ's voxels, e.g. {"liver": [0, 80]} lets a model trained on non-contrast CT see enhanced livers.
    contrast_augment: dict[str, list[float]] = field(default_factory=dict)
    # Label noise: every label's boundary moved by a smooth random field of this standard deviation
    # (mm; 0 = off), so that a diffusion model's samples learn to differ along boundaries (data.Augmentation).
    boundary_jitter_mm: float = 0.0
    # MR intensity augmentation (training only, data.vary_intensity): a gamma drawn log-uniform in
    # [low, high] ([] = off) and a smooth multiplicative bias field of this log-amplitude (0 = off), on
    # the items of the tasks in intensity_augment_tasks (empty: every item), e.g. the brain task only.
    gamma_augment: list[float] = field(default_factory=list)
    bias_field_augment: float = 0.0
    intensity_augment_tasks: list[str] = field(default_factory=list)
    # Narrow fields of view (data.narrow_view): the share of items seen through a window of
    # view_augment_min..1 of the patch per axis, the rest air, as tight crops are padded in use (0 = off).
    view_augment: float = 0.0
    view_augment_min: float = 0.4
    largest_component: list[str] = field(default_factory=list)  # written to the card (postprocess.py)
    consistent_components: list[str] = field(default_factory=list)  # written to the card (postprocess.py)
    region_components: dict[str, str] = field(default_factory=dict)  # written to the card (regions.py)
    # A multi-task model: task name -> its card settings (ModelCard.tasks); every case's dataset.json
    # entry then names its task. Empty: one task.
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_task: str | None = None  # written to the card: the task of a run that names none (ModelCard.resolve_task)
    method_settings: dict[str, Any] = field(default_factory=dict)  # written to the card; the method checks them
    # A folder from ``diffusionseg pretrain``: its encoder initialises the image encoder (3D MedSegDiff)
    pretrained_backbone: str | None = None
    # Fine-tuning: a model folder (model.json + weights) whose network starts the run, member
    # ``fine_tune_member`` of an ensemble (0 = model.safetensors). Same method and network, or refused.
    fine_tune_from: str | None = None
    fine_tune_member: int = 0
    # written to the card: "off" | "mean" | "published" (true = "mean", false = "off"); None = the method's default
    default_crf: bool | str | None = None
    shown_labels: list[str] = field(default_factory=list)  # written to the card; empty = output every label
    val_every: int = 500
    val_cases: int | list[str] | None = None  # held-out CASES: names, a count, or None = 20% (at least 1)
    val_samples: int = 3
    val_steps: int = 5  # DDIM steps of validation sampling
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "auto"
    default_steps: int = 10  # inference defaults written to the model card
    default_samples: int = 5
    description: str = ""
    limits: str = ""

    def _augment_problems(self) -> list[str]:
        """What is wrong with the augmentation strengths (view, affine, gamma, bias field) and intensity_augment_tasks."""
        from DiffusionSegLib.methods.registry import Method, get_method

        problems = []
        view, view_min = self.view_augment, self.view_augment_min
        if not (_is_number(view) and _is_number(view_min) and 0.0 <= view <= 1.0 and 0.0 < view_min <= 1.0):
            problems.append(f"view_augment {self.view_augment} / view_augment_min {self.view_augment_min} (use a "
                            f"probability in [0, 1] and a share of the patch in (0, 1])")
        gamma = self.gamma_augment
        if gamma and not (len(gamma) == 2 and all(_is_number(g) for g in gamma) and 0 < gamma[0] <= gamma[1]):
            problems.append(f"gamma_augment {gamma} (use [low, high] with 0 < low <= high, e.g. [0.7, 1.5])")
        if not (_is_number(self.bias_field_augment) and self.bias_field_augment >= 0):
            problems.append(f"bias_field_augment {self.bias_field_augment} (use a log-amplitude >= 0, e.g. 0.3)")
        rotate, scale = self.rotate_augment_deg, self.scale_augment
        if not (_is_number(rotate) and 0 <= rotate <= 180):
            problems.append(f"rotate_augment_deg {rotate} (use degrees in [0, 180], e.g. 10)")
        if not (_is_number(scale) and 0 <= scale < 1):
            problems.append(f"scale_augment {scale} (use a fraction in [0, 1), e.g. 0.1 for factors 0.9-1.1)")
        unknown = sorted(set(self.intensity_augment_tasks) - set(self.tasks))
        if unknown:
            problems.append(f"intensity_augment_tasks names {', '.join(unknown)}, not a task of this model"
                            + (f" ({', '.join(sorted(self.tasks))})" if self.tasks else ""))
        if (gamma or self.bias_field_augment) and self.method in Method.values() \
                and get_method(self.method).supervision != Supervision.MASKS:
            problems.append(f"gamma_augment / bias_field_augment with method '{self.method}' (mask-supervised methods only)")
        return problems

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DiffusionSegError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def check(self) -> None:
        """Raise DiffusionSegError for settings that cannot work (before any data is read)."""
        from DiffusionSegLib.core.enums import CrfMode, PredictionType
        from DiffusionSegLib.methods.registry import Method, get_method

        problems = []
        if self.method not in Method.values():
            problems.append(f"method '{self.method}' (use {', '.join(Method.values())})")
        if self.spatial_dims not in (2, 3):
            problems.append(f"spatial_dims {self.spatial_dims} (use 2 or 3)")
        if len(self.patch_size) != self.spatial_dims or min(self.patch_size) < 1:
            problems.append(f"patch_size {self.patch_size} for a {self.spatial_dims}D model")
        if self.spacing is not None and len(self.spacing) not in (2, 3):
            problems.append(f"spacing {self.spacing}")
        if self.default_crf is not None and not isinstance(self.default_crf, bool) \
                and self.default_crf not in CrfMode.values():
            problems.append(f"default_crf {self.default_crf!r} (use {', '.join(CrfMode.values())}, true or false)")
        if self.prediction_type not in PredictionType.values():
            problems.append(f"prediction_type '{self.prediction_type}' (use {', '.join(PredictionType.values())})")
        if self.slice_axis not in (0, 1, 2):
            problems.append(f"slice_axis {self.slice_axis} (use 0, 1 or 2)")
        if self.context_slices:
            try:  # the check the card makes at inference
                slice_context(self.spatial_dims, self.context_slices, self.context_spacing, self.spacing)
            except ValueError as err:
                problems.append(str(err))
            if self.method in Method.values() and get_method(self.method).supervision != Supervision.MASKS:
                problems.append(f"context_slices with method '{self.method}' (2.5D input needs mask supervision)")
        if self.tasks:
            try:  # the check the card makes when it is read
                check_tasks(self.tasks, self.default_task)
            except ValueError as err:
                problems.append(str(err))
            if self.method in Method.values() and get_method(self.method).supervision != Supervision.MASKS:
                problems.append(f"tasks with method '{self.method}' (the task of a case comes with its mask)")
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "val_samples", "val_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)} (must be >= 1)")
        if not (self.boundary_jitter_mm >= 0.0 and math.isfinite(self.boundary_jitter_mm)):
            problems.append(f"boundary_jitter_mm {self.boundary_jitter_mm} (use a distance >= 0 in mm)")
        elif self.boundary_jitter_mm > 0 and self.method in Method.values() \
                and get_method(self.method).supervision != Supervision.MASKS:
            problems.append(f"boundary_jitter_mm with method '{self.method}' (it moves mask boundaries: needs masks)")
        problems += self._augment_problems()
        if not (0.0 <= self.foreground_fraction <= 1.0 and self.hard_negative_fraction >= 0.0
                and self.foreground_fraction + self.hard_negative_fraction <= 1.0):
            problems.append(f"foreground_fraction {self.foreground_fraction}, hard_negative_fraction "
                            f"{self.hard_negative_fraction} (each >= 0, together <= 1)")
        if self.task_weights:
            weights = self.task_weights
            if not self.tasks:
                problems.append("task_weights without tasks (it weights the tasks of a multi-task model)")
            elif set(weights) != set(self.tasks):
                problems.append(f"task_weights names {', '.join(sorted(weights))}; "
                                f"name every task: {', '.join(sorted(self.tasks))}")
            if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights.values()) \
                    or not any(w > 0 for w in weights.values()):
                problems.append(f"task_weights {weights} (weights >= 0, at least one > 0)")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay {self.ema_decay} (use 0 <= decay < 1)")
        if self.pretrained_backbone and self.spatial_dims != 3:
            problems.append("pretrained_backbone with a 2D model (a pretrained 3D backbone initialises 3D models)")
        elif self.pretrained_backbone and not Path(self.pretrained_backbone, "backbone.json").is_file():
            problems.append(f"pretrained_backbone {self.pretrained_backbone} (no backbone.json there: "
                            "a folder written by diffusionseg pretrain is needed)")
        if self.fine_tune_from and not Path(self.fine_tune_from, "model.json").is_file():
            problems.append(f"fine_tune_from {self.fine_tune_from} (no model.json there: a model folder is needed)")
        if isinstance(self.fine_tune_member, bool) or not isinstance(self.fine_tune_member, int) \
                or self.fine_tune_member < 0:
            problems.append(f"fine_tune_member {self.fine_tune_member!r} (0 = model.safetensors, K = member_K)")
        if problems:
            raise DiffusionSegError("invalid training settings: " + "; ".join(problems))


def config_from_cli(args: Any) -> TrainConfig:
    """TrainConfig from the ``train`` subcommand: base, then ``--set KEY=JSON`` overrides.

    Base: the checkpoint's own config when ``--resume`` finds one in ``--output``, else the
    ``--config`` JSON file, else the defaults; then ``--method``. A value that is not JSON is taken as a string
    (``--set method=vanilla_dpm``).
    """
    state_path = Path(args.output) / CHECKPOINT_DIR / "state.json"
    if getattr(args, "resume", False) and state_path.is_file():
        base = json.loads(state_path.read_text())["config"]
    elif getattr(args, "config", None):
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as err:
            raise DiffusionSegError(f"unreadable training config {args.config}: {err}") from err
    else:
        base = {}
    if getattr(args, "method", None):
        base["method"] = args.method
    for item in getattr(args, "set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise DiffusionSegError(f"--set expects KEY=VALUE, got '{item}'")
        try:
            base[key.strip()] = json.loads(raw)
        except ValueError:
            base[key.strip()] = raw
    return TrainConfig.from_dict(base)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validation_dice(net: Any, card: ModelCard, cases: Sequence[Any], n_samples: int, steps: int,
                    seed: int, device: Any, amp: bool = False) -> dict[str, Any]:
    """Dice per label of the fused mask on whole held-out cases at the model grid.

    Each case (``data.Case``, image (C, S, H, W) for 2D models or (C, D, H, W) for 3D) is padded
    as inference pads (per-channel minimum, to at least the patch size and a multiple of the
    network's size divisor), sampled ``n_samples`` times with ``steps`` DDIM steps by the card's
    method (one pass for a deterministic one), each sample thresholded at 0.5, fused by mean > 0.5, and compared
    with the reference over the whole volume (both empty = 1.0). Returns
    ``{"dice": {label: mean over cases}, "mean_dice": mean over labels, "per_case": {case: {label: dice}}}``.
    """
    import torch

    from DiffusionSegLib.core.enums import Sampler
    from DiffusionSegLib.methods.registry import get_method
    from DiffusionSegLib.training.data import pad_to

    divisor = int(getattr(net, "size_divisor", 1))
    method = get_method(card.method)
    plan = method.plan(card, n_samples, steps, Sampler.DDIM)
    n_spatial = card.spatial_dims
    minimum = card.patch_shape() or (1,) * n_spatial
    per_case: dict[str, dict[str, float]] = {}
    for case in cases:
        spatial = case.image.shape[-n_spatial:]
        padded_size = [math.ceil(max(n, p) / divisor) * divisor for n, p in zip(spatial, minimum)]
        image = pad_to(case.image, padded_size, case.image.reshape(case.image.shape[0], -1).min(axis=1))
        # 2D models: slices are the batch, (S, C, H, W); 3D: one item (1, C, D, H, W).
        batch = np.moveaxis(image, 1, 0) if n_spatial == 2 else image[None]
        batch_t = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        masks = method.sample(net, card, batch_t, plan, seed=seed, amp=amp).numpy()  # (N, B, L, *spatial)
        fused = masks.mean(axis=0) > 0.5  # (B, L, *spatial)
        fused = np.moveaxis(fused, 1, 0) if n_spatial == 2 else fused[0]  # (L, S|D, H, W) like case.mask
        crop = tuple(slice((p - n) // 2, (p - n) // 2 + n) for n, p in zip(spatial, padded_size))
        fused = fused[(slice(None), slice(None)) + crop] if n_spatial == 2 else fused[(slice(None),) + crop]
        per_case[case.name] = {lab.name: dice_score(fused[i], case.mask[i]) for i, lab in enumerate(card.labels)}
    dice = {lab.name: float(np.mean([d[lab.name] for d in per_case.values()])) for lab in card.labels}
    return {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "per_case": per_case}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _split_validation(dataset_dir: Path, cases: list, config: TrainConfig) -> tuple[list, list]:
    """(training cases, held-out cases): by case, never by slice.

    A dataset with its own validation split uses it. Otherwise ``val_cases`` names cases, or
    gives a count drawn with the run's seed; None = 20% of the cases (at least 1 when there are
    2 or more; a single-case dataset trains without validation).
    """
    from DiffusionSegLib.training.data import discover_cases

    own = discover_cases(dataset_dir, "validation")
    if own:
        return cases, own
    wanted = config.val_cases
    if isinstance(wanted, list):
        by_name = {c.name: c for c in cases}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise DiffusionSegError(f"val_cases not in the training split: {', '.join(missing)}")
        return [c for c in cases if c.name not in wanted], [by_name[n] for n in wanted]
    count = int(wanted) if wanted is not None else (max(1, round(0.2 * len(cases))) if len(cases) >= 2 else 0)
    if count >= len(cases):
        raise DiffusionSegError(f"val_cases={count} leaves no training case (the dataset has {len(cases)})")
    order = np.random.default_rng(config.seed).permutation(len(cases))
    held = set(order[:count].tolist())
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]


def _is_number(value: Any) -> bool:
    """A finite int or float: what a numeric setting read from JSON must be."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _augmentation(config: TrainConfig, **extra: Any) -> Any:
    """The run's data.Augmentation: switch, flips and affine strength from ``config``, plus ``extra`` fields
    (mask-supervised runs add the label-level ones), so every sampler gets the same affine."""
    from DiffusionSegLib.training.data import Augmentation

    return Augmentation(enabled=config.augment, flips=config.flips, rotate_deg=float(config.rotate_augment_deg),
                        scale=float(config.scale_augment), **extra)


def _label_offsets(config: TrainConfig, label_names: list[str]) -> tuple[tuple[float, float] | None, ...]:
    """``contrast_augment`` (HU per label name) as offsets in normalized units, per label index."""
    if not config.contrast_augment:
        return ()
    unknown = sorted(set(config.contrast_augment) - set(label_names))
    if unknown:
        raise DiffusionSegError(f"contrast_augment names labels the model does not have: {', '.join(unknown)}")
    norm = config.normalization or {}
    if norm.get("kind") != "ct_window":
        raise DiffusionSegError("contrast_augment is given in HU and needs a ct_window normalization")
    per_hu = 2.0 / float(norm["width"])  # the window maps width HU onto [-1, 1]
    out: list[tuple[float, float] | None] = []
    for name in label_names:
        bounds = config.contrast_augment.get(name)
        if bounds is not None and (len(bounds) != 2 or bounds[0] > bounds[1]):
            raise DiffusionSegError(f"contrast_augment[{name!r}] must be [low, high] HU, got {bounds}")
        out.append(None if bounds is None else (bounds[0] * per_hu, bounds[1] * per_hu))
    return tuple(out)


def _build_card(name: str, config: TrainConfig, in_channels: int, labels: Mapping[str, Any]) -> ModelCard:
    from DiffusionSegLib.methods.registry import get_method

    defaults = get_method(config.method).card_defaults(config.default_samples, config.default_steps)
    if config.default_crf is not None:
        defaults["default_crf"] = config.default_crf
    label_infos = [LabelInfo(n, tuple(config.label_colors.get(n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])))
                   for i, n in enumerate(labels)]
    return ModelCard(
        name=name, method=config.method, spatial_dims=config.spatial_dims, in_channels=in_channels,
        labels=label_infos, network=dict(config.network), modality=config.modality,
        spacing=list(config.spacing) if config.spacing is not None else None,
        normalization=dict(config.normalization), orientation=config.orientation, slice_axis=config.slice_axis,
        context_slices=config.context_slices, context_spacing=config.context_spacing,
        patch_size=list(config.patch_size), prediction_type=config.prediction_type,
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
        **defaults,
        largest_component=[n for n in config.largest_component if n in labels],
        consistent_components=[n for n in config.consistent_components if n in labels],
        region_components={n: r for n, r in config.region_components.items() if n in labels},
        method_settings=dict(config.method_settings), tasks={k: dict(v) for k, v in config.tasks.items()},
        default_task=config.default_task,
        shown_labels=[n for n in config.shown_labels if n in labels],
        description=config.description, limits=config.limits,
    )


def load_fine_tune_weights(net: Any, card: ModelCard, folder: str | os.PathLike, member: int = 0) -> dict[str, Any]:
    """Load member ``member`` of the model folder ``folder`` into ``net`` (the run's network, built from
    ``card``), after checking that the folder's model has the same method and network (widths, input
    channels, labels) and the weights their sha256. Returns what the card records; DiffusionSegError
    before any training otherwise."""
    from DiffusionSegLib.methods.registry import load_network
    from DiffusionSegLib.models.card import read_card

    source = read_card(folder)
    pairs = (("method", source.method, card.method), ("network", source.network, card.network),
             ("spatial_dims", source.spatial_dims, card.spatial_dims),
             ("input channels", source.network_in_channels, card.network_in_channels),
             ("labels", source.out_channels, card.out_channels))
    differs = [what for what, a, b in pairs if a != b]
    if differs:
        raise DiffusionSegError(f"cannot fine-tune from {folder}: its model differs from this run's in "
                                f"{', '.join(differs)}")
    if member > len(source.members):
        raise DiffusionSegError(f"cannot fine-tune from member {member} of {folder}: it has "
                                f"{len(source.members) + 1} network(s) (0-{len(source.members)})")
    net.load_state_dict(load_network(folder, source, member).state_dict(), strict=True)
    sha = source.weights_sha256 if member == 0 else source.member_files()[member - 1][1]
    return {"model": source.name, "folder": str(folder), "member": member, "weights_sha256": sha}


def _ema_update(ema: Any, net: Any, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net for floating tensors; other buffers are copied."""
    import torch

    with torch.no_grad():
        for e, p in zip(ema.state_dict().values(), net.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1.0 - decay)
            else:
                e.copy_(p)


def _cpu_state(module: Any) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


class _Run:
    """The state of one training run, with checkpoint save/restore."""

    def __init__(self, dataset_dir: Path, model_dir: Path, config: TrainConfig, device: Any):
        import torch

        from DiffusionSegLib.core.device import use_deterministic_kernels
        from DiffusionSegLib.core.enums import Sampler
        from DiffusionSegLib.methods.registry import get_method
        from DiffusionSegLib.training import distributed

        self.dataset_dir, self.model_dir, self.config = dataset_dir, model_dir, config
        self.method = get_method(config.method)
        self.val_batch: tuple[Any, Any] | None = None  # image-label methods: fixed held-out items
        if self.method.supervision == Supervision.IMAGE_LABELS:
            self._load_image_label_data()
        else:
            self._load_mask_data()
            try:  # validation sampling's settings, refused now rather than at the first validation
                self.method.plan(self.card, config.val_samples, config.val_steps, Sampler.DDIM)
            except DiffusionSegError as err:
                raise DiffusionSegError(f"invalid training settings: val_samples/val_steps: {err}") from err

        self.device = device
        use_deterministic_kernels(self.device)  # same seed, same run, on CUDA as well as on CPU
        self.amp = (self.device.type == "cuda" and torch.cuda.is_bf16_supported()) if config.amp is None else config.amp
        torch.manual_seed(config.seed)  # network initialisation
        self.net = self.method.build_network(self.card).to(self.device)
        divisor = int(getattr(self.net, "size_divisor", 1))
        if any(p % divisor for p in config.patch_size):
            raise DiffusionSegError(f"patch_size {config.patch_size} must be a multiple of {divisor} for this network")
        self.pretrained = None
        if config.pretrained_backbone:  # before the EMA copy, so the EMA starts from the pretrained weights too
            from DiffusionSegLib.training.pretrain import load_pretrained_encoder

            self.pretrained = load_pretrained_encoder(self.method, self.net, self.card, config.pretrained_backbone)
        self.fine_tuned = None
        if config.fine_tune_from:  # before the EMA copy, so the EMA starts from these weights too
            self.fine_tuned = load_fine_tune_weights(self.net, self.card, config.fine_tune_from,
                                                     config.fine_tune_member)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        # One group per part the method trains at its own rate (``start_step`` sets each group's factor).
        self.optimizer = torch.optim.AdamW([{"params": group} for group in self.method.parameter_groups(self.net)],
                                           lr=config.lr, weight_decay=config.weight_decay)
        self.objective = self.method.prepare_training(self.card)  # e.g. the noise schedule
        self.loss_generator = torch.Generator("cpu").manual_seed(config.seed + 1)
        # Under torchrun each rank trains on its rows of the global batch (see training.distributed);
        # a single process has rows [0, batch_size) and no DDP.
        self.main, self.world, self.rank = distributed.is_main(), distributed.world_size(), distributed.rank()
        rows = distributed.local_batch(config.batch_size, self.world)
        self.rows = slice(self.rank * rows, (self.rank + 1) * rows)
        self.loss_module = distributed.wrap(
            distributed.LossModule(self.method, self.net, self.objective, self.loss_generator), self.device,
            parts_may_rest=len(self.optimizer.param_groups) > 1)
        self.step = 0
        self.losses: list[float] = []
        self.validations: list[dict[str, Any]] = []
        # {"step", "mean_dice", "dice", "state"}; image-label methods: {"step", "validation_loss", "state"}
        self.best: dict[str, Any] | None = None
        self.elapsed_s = 0.0

    def _load_mask_data(self) -> None:
        """Cases with label maps, the validation split and the patch sampler (mask-supervised methods)."""
        from DiffusionSegLib.training import data

        dataset_dir, config = self.dataset_dir, self.config
        all_cases = data.discover_cases(dataset_dir, "training")
        train_files, val_files = _split_validation(dataset_dir, all_cases, config)
        labels = (data.check_label_selection(config.labels) if config.labels
                  else data.default_labels(dataset_dir, all_cases))
        self.label_values = labels
        self.card = _build_card(config.name or self.model_dir.name, config, data.image_channels(train_files[0]), labels)
        self.train_cases = data.load_cases(train_files, self.card, labels)
        # Held-out cases need not contain every label: an absent label predicted absent scores 1.0.
        self.val_cases = [data.load_case(f, self.card, labels) for f in val_files]
        self.sampler = data.PatchSampler(
            self.train_cases, config.spatial_dims, array_patch_size(config.patch_size, config.spatial_dims),
            config.foreground_fraction,
            _augmentation(config, label_offsets=_label_offsets(config, list(labels)),
                          boundary_jitter_mm=config.boundary_jitter_mm,
                          voxel_mm=tuple(reversed(self.card.spacing or ())),
                          gamma=tuple(config.gamma_augment) if config.gamma_augment else None,
                          bias_field=float(config.bias_field_augment),
                          intensity_tasks=tuple(config.intensity_augment_tasks),
                          view_prob=float(config.view_augment), view_min=float(config.view_augment_min)),
            seed=config.seed,
            hard_negative_fraction=config.hard_negative_fraction, task_channels=len(self.card.tasks),
            task_weights=config.task_weights or None)

    def _load_image_label_data(self) -> None:
        """Images with lesion / healthy labels only (never a mask), the split and the item sampler."""
        from DiffusionSegLib.training import distributed
        from DiffusionSegLib.training import weak_labels as weak
        from DiffusionSegLib.training.data import image_channels

        dataset_dir, config = self.dataset_dir, self.config
        if not weak.is_weak_dataset(dataset_dir):
            raise DatasetError(f"method '{config.method}' trains from image-level labels: {dataset_dir} needs "
                               f"{weak.CSV_NAME} or the folders lesion/ and healthy/")
        if config.spatial_dims != 2:
            raise DatasetError("image-level labels train 2D models (an item is a slice): set spatial_dims 2")
        all_files = weak.discover_weak_cases(dataset_dir, "training")
        own = weak.discover_weak_cases(dataset_dir, "validation")
        train_files, val_files = ((all_files, own) if own
                                  else weak.split_weak_validation(all_files, config.val_cases, config.seed))
        self.label_values = {"lesion": (weak.LESION,)}
        self.card = _build_card(config.name or self.model_dir.name, config, image_channels(train_files[0]),
                                self.label_values)
        self.train_cases = weak.load_weak_cases(train_files, self.card)
        self.val_cases = [weak.load_weak_case(f, self.card) for f in val_files]
        patch = array_patch_size(config.patch_size, 2)
        self.sampler = weak.ImageLabelSampler(self.train_cases, patch,
                                              _augmentation(config), seed=config.seed)
        if self.val_cases:
            try:  # the same held-out items at every validation, so the losses compare
                self.val_batch = weak.ImageLabelSampler(self.val_cases, patch, None, seed=config.seed + 2).batch(VAL_ITEMS)
            except DatasetError as err:
                if distributed.is_main():
                    log.warning("no validation loss: %s", err)

    def healthy_crops(self, count: int) -> Any:
        """(count, C, *patch) held-out healthy crops (training ones when nothing is held out), for calibration."""
        import torch

        from DiffusionSegLib.training.weak_labels import ImageLabelSampler

        patch = array_patch_size(self.config.patch_size, 2)
        source = [c for c in self.val_cases if not c.slice_labels.all()] or [
            c for c in self.train_cases if not c.slice_labels.all()]
        images, _ = ImageLabelSampler(source, patch, None, seed=self.config.seed + 4, lesion_fraction=0.0).batch(count)
        return torch.from_numpy(images).to(self.device)

    # -- one optimizer step ------------------------------------------------------------------

    def train_step(self) -> float:
        import contextlib

        import torch

        from DiffusionSegLib.training import distributed

        # Every rank draws the whole global batch (same sampler state everywhere) and keeps its rows.
        images, masks = self.sampler.batch(self.config.batch_size)
        image = torch.from_numpy(images[self.rows]).to(self.device)
        mask = torch.from_numpy(masks[self.rows]).to(self.device)
        factors = self.method.start_step(self.objective, self.step)
        if factors is not None:
            for group, factor in zip(self.optimizer.param_groups, factors, strict=True):
                group["lr"] = self.config.lr * factor
        self.loss_module.train()
        draws = (distributed.RowsOfGlobalDraws(self.loss_generator, image.shape[0], self.rank, self.world)
                 if self.world > 1 else contextlib.nullcontext())
        with draws, torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss_module(image, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over the ranks = the gradient of the global batch's mean
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.main:  # only rank 0 validates and saves, so only it keeps the average
            # EMA warm-up: early weights are poor, so the average forgets them quickly at first.
            _ema_update(self.ema, self.net, min(self.config.ema_decay, (1 + self.step) / (10 + self.step)))
        self.step += 1
        value = distributed.mean(float(loss.detach()))  # the same on every rank: all stop together below
        if not math.isfinite(value):
            raise DiffusionSegError(f"training diverged at step {self.step} (loss {value}); lower lr or disable amp")
        self.losses.append(value)
        return value

    def validate(self) -> dict[str, Any] | None:
        if self.method.supervision == Supervision.IMAGE_LABELS:
            return self._validate_loss()
        if not self.val_cases:
            return None
        result = validation_dice(self.ema, self.card, self.val_cases, self.config.val_samples,
                                 self.config.val_steps, self.config.seed, self.device, self.amp)
        record = {"step": self.step, **result}
        self.validations.append(record)
        if self.best is None or result["mean_dice"] > self.best["mean_dice"]:
            self.best = {"step": self.step, "mean_dice": result["mean_dice"], "dice": result["dice"],
                         "state": _cpu_state(self.ema)}
        return record

    def _validate_loss(self) -> dict[str, Any] | None:
        """Image-label methods have no mask to score: the EMA's loss on fixed held-out items, same noise each time."""
        import torch

        if self.val_batch is None:
            return None
        images, targets = self.val_batch
        generator = torch.Generator("cpu").manual_seed(self.config.seed + 3)
        losses = []
        with torch.no_grad():
            for start in range(0, len(images), self.config.batch_size):
                image = torch.from_numpy(images[start:start + self.config.batch_size]).to(self.device)
                target = torch.from_numpy(targets[start:start + self.config.batch_size]).to(self.device)
                losses.append(float(self.method.training_loss(self.ema, self.objective, image, target, generator)))
        record = {"step": self.step, "validation_loss": float(np.mean(losses))}
        self.validations.append(record)
        if self.best is None or record["validation_loss"] < self.best["validation_loss"]:
            self.best = {**record, "state": _cpu_state(self.ema)}
        return record

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write checkpoint/ via a fresh folder swapped in by rename (never a half-written checkpoint)."""
        import torch
        from safetensors.torch import save_file

        final = self.model_dir / CHECKPOINT_DIR
        tmp = self.model_dir / f".{CHECKPOINT_DIR}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {f"net.{k}": v for k, v in _cpu_state(self.net).items()}
        tensors.update({f"ema.{k}": v for k, v in _cpu_state(self.ema).items()})
        if self.best is not None:
            tensors.update({f"best.{k}": v for k, v in self.best["state"].items()})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.loss"] = self.loss_generator.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        state = {
            "step": self.step, "config": dataclasses.asdict(self.config), "dataset": str(self.dataset_dir),
            "train_cases": [c.name for c in self.train_cases], "val_cases": [c.name for c in self.val_cases],
            "sampler": self.sampler.get_state(), "losses": self.losses, "validations": self.validations,
            "best": None if self.best is None else {k: v for k, v in self.best.items() if k != "state"},
            "elapsed_s": self.elapsed_s,
        }
        _write_json(tmp / "state.json", state)
        old = self.model_dir / f".{CHECKPOINT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = json.loads((folder / "state.json").read_text())
        saved = TrainConfig.from_dict(state["config"])
        changed = [f.name for f in dataclasses.fields(TrainConfig)
                   if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(self.config, f.name)]
        if changed:
            raise DiffusionSegError(f"cannot resume: the checkpoint was trained with different {', '.join(changed)}")
        names = ([c.name for c in self.train_cases], [c.name for c in self.val_cases])
        if names != (state["train_cases"], state["val_cases"]):
            raise DiffusionSegError("cannot resume: the dataset's cases differ from the checkpoint's")
        tensors = load_file(str(folder / "weights.safetensors"))
        for prefix, module in (("net.", self.net), ("ema.", self.ema)):
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True))
        torch.set_rng_state(tensors["rng.torch"])
        self.loss_generator.set_state(tensors["rng.loss"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.sampler.set_state(state["sampler"])
        self.step, self.losses, self.validations = state["step"], state["losses"], state["validations"]
        self.elapsed_s = state["elapsed_s"]
        if state["best"] is not None:
            self.best = {**state["best"], "state": {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}}


def _finish_image_label_run(run: _Run, final_state: dict[str, Any]) -> None:
    """Card metrics of an image-label run, and the method's calibration on held-out healthy crops."""
    card, config = run.card, run.config
    card.training["validation_cases"] = [c.name for c in run.val_cases]
    card.metrics = {"validation": "none: no held-out items"} if run.best is None else {
        "validation_loss": round(run.best["validation_loss"], 6),
        "validation": {"cases": [c.name for c in run.val_cases], "step": run.best["step"], "items": VAL_ITEMS,
                       "criterion": "loss of the method's objective on fixed held-out items (no mask is read)"}}
    net = run.method.build_network(card).to(run.device).eval()
    net.load_state_dict(final_state)
    held_out = any(not c.slice_labels.all() for c in run.val_cases)
    run.method.calibrate(net, card, run.healthy_crops(CALIBRATION_ITEMS))
    card.metrics["calibration"] = {"items": CALIBRATION_ITEMS, "patch": list(config.patch_size),
                                   "source": "held-out healthy slices" if held_out else "training healthy slices "
                                   "(nothing held out: thresholds are optimistic)"}


def checkpoint_folder(model_dir: Path) -> Path | None:
    """The checkpoint to resume from; ``.checkpoint.old`` survives a crash between the two renames."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old"):
        if (model_dir / name / "state.json").is_file():
            return model_dir / name
    return None


def train(dataset_dir: str | os.PathLike, model_dir: str | os.PathLike, config: TrainConfig | None = None,
          progress: bool = True, resume: bool = False) -> ModelCard:
    """Train a model on ``dataset_dir`` and write it to ``model_dir``; returns its card.

    ``resume=True`` continues from ``model_dir/checkpoint/`` (the config may change only in
    ``RESUMABLE_CHANGES``, e.g. more ``steps``). Without ``resume`` an existing checkpoint is an
    error, so a finished or interrupted run is never overwritten by accident.

    Under ``torchrun`` with several processes the run is data-parallel (``training.distributed``):
    ``batch_size`` is the global batch, split evenly over the processes; rank 0 validates and writes
    every file, and every rank returns the card rank 0 wrote.
    """
    from DiffusionSegLib.core.device import resolve_device
    from DiffusionSegLib.training import distributed

    config = config or TrainConfig()
    config.check()
    distributed.local_batch(config.batch_size, distributed.world_size())  # before any process waits for another
    dataset_dir, model_dir = Path(dataset_dir).resolve(), Path(model_dir).resolve()
    existing = checkpoint_folder(model_dir)
    if resume and existing is None:
        raise DiffusionSegError(f"cannot resume: no checkpoint in {model_dir}")
    if not resume and existing is not None:
        raise DiffusionSegError(f"{model_dir} already holds a training checkpoint; resume it or choose another folder")
    device = distributed.device_for(resolve_device(config.device))
    with distributed.process_group(device):
        return _train(dataset_dir, model_dir, config, device, existing, progress)


def _train(dataset_dir: Path, model_dir: Path, config: TrainConfig, device: Any, existing: Path | None,
           progress: bool) -> ModelCard:
    """``train`` once the device is known and, under torchrun, the process group runs."""
    import torch
    from tqdm import tqdm

    from DiffusionSegLib.models.card import read_card, save_model
    from DiffusionSegLib.training import distributed

    # Every rank has checked the folder before this: constructing DDP in _Run waits for all of them,
    # so rank 0 cannot write a checkpoint that another rank would then find.
    run = _Run(dataset_dir, model_dir, config, device)
    if run.main:
        model_dir.mkdir(parents=True, exist_ok=True)
    if existing is not None:
        run.load_checkpoint(existing)  # every rank: the same weights, optimizer, sampler and generator states
        if run.main:
            log.info("resuming at step %d of %d", run.step, config.steps)

    bar = tqdm(total=config.steps, initial=run.step, desc="training", unit="step", disable=not (progress and run.main),
               dynamic_ncols=True)
    clock = time.perf_counter()
    try:
        while run.step < config.steps:
            run.train_step()
            last = run.step == config.steps
            if run.step % config.val_every == 0 or last:
                if run.main:
                    run.validate()
                distributed.barrier()
            postfix = {"loss": f"{np.mean(run.losses[-50:]):.4f}"}  # running mean: one batch is noisy
            if run.validations:
                last_val = run.validations[-1]
                postfix.update({"val_dice": f"{last_val['mean_dice']:.3f}"} if "mean_dice" in last_val
                               else {"val_loss": f"{last_val['validation_loss']:.4f}"})
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if run.step % config.checkpoint_every == 0 or last:
                run.elapsed_s += time.perf_counter() - clock
                clock = time.perf_counter()
                if run.main:
                    run.save_checkpoint()
                distributed.barrier()
    finally:
        bar.close()
    run.elapsed_s += time.perf_counter() - clock
    if not run.main:
        distributed.barrier()  # rank 0 writes the model meanwhile
        return read_card(model_dir)

    card = run.card
    final_state = run.best["state"] if run.best is not None else _cpu_state(run.ema)
    device_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else str(run.device)
    card.training = {
        "dataset": str(dataset_dir), "cases": len(run.train_cases), "case_names": [c.name for c in run.train_cases],
        "validation_cases": [c.name for c in run.val_cases],
        "labels": {name: list(values) for name, values in run.label_values.items()},
        "steps": run.step, "batch_size": config.batch_size, "duration_s": round(run.elapsed_s, 1),
        "device": device_name, "amp_bf16": run.amp, "torch_version": torch.__version__,
        "final_loss": float(np.mean(run.losses[-100:])), "weights": "EMA",
        "selected_step": run.best["step"] if run.best is not None else run.step,
        "config": dataclasses.asdict(config),
        **({"processes": run.world} if run.world > 1 else {}),  # data-parallel: batch_size is the global batch
        **({"pretrained_backbone": run.pretrained} if run.pretrained else {}),
        **({"fine_tuned_from": run.fine_tuned} if run.fine_tuned else {}),
    }
    if run.method.supervision == Supervision.IMAGE_LABELS:
        _finish_image_label_run(run, final_state)
    elif run.best is not None:
        card.metrics = {
            "validation_dice": {k: round(v, 4) for k, v in run.best["dice"].items()},
            "validation_mean_dice": round(run.best["mean_dice"], 4),
            "validation": {"cases": [c.name for c in run.val_cases], "step": run.best["step"],
                           "samples": config.val_samples, "steps": config.val_steps, "sampler": "ddim",
                           "fusion": "mean of binary samples > 0.5", "grid": "model grid, whole case"},
        }
    else:
        card.metrics = {"validation": "none: no held-out case"}
        log.warning("no held-out case: the model card has no validation Dice")
    _write_json(model_dir / LOG_NAME, {"losses": run.losses, "validations": run.validations})
    save_model(model_dir, final_state, card)
    distributed.barrier()
    return card
