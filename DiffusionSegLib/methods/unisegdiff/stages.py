"""UniSegDiff's staged diffusion: stages of t, their prediction targets, the staged loss and sampler.

The abstract's claim: with one fixed target the training signal is spread unevenly over t. Here the
timesteps are split into stages, each with its own prediction target ("dynamic target adjustment")
and loss weight, and inference walks the stages with few network evaluations:

1. **coarse** (high noise): one jump from pure noise to the x0 estimate. The image decides almost
   everything here, so the N samples of an image share it (``coarse_shared``).
2. **probabilistic** (middle): each sample re-noises the coarse estimate to ``branch_t`` with its own
   noise and takes stochastic steps (eta > 0): this is where the samples differ.
3. **refinement** (low noise): deterministic steps (eta = 0); by default the target is the residual
   to the encoder's prior, a small correction rather than the whole mask.

Every choice is a key of ``card.method_settings`` (see ``UniSegDiffSettings.from_mapping``); the
defaults are the ones measured in docs/BENCHMARKS.md. Targets: ``sample`` (x0), ``epsilon``,
``v_prediction`` (MONAI's v) and ``residual`` (x0 minus the prior signal, 2 sigmoid(prior) - 1).
NFE per sample = ``steps`` + 1 / N with a shared coarse stage (+ 1 without).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from DiffusionSegLib.core.enums import Choice
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.methods.diffusion import sampling_timesteps
from DiffusionSegLib.methods.unisegdiff.network import prior_signal
from DiffusionSegLib.models.card import ModelCard


class StageTarget(Choice):
    """What the denoiser predicts inside one stage."""

    SAMPLE = "sample"  # the clean mask x0
    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    RESIDUAL = "residual"  # x0 - prior: the correction to the segmentation encoder's mask


class EncoderTraining(Choice):
    """What happens to the encoder once diffusion training starts (after its pretraining steps)."""

    FROZEN = "frozen"  # no gradient: the features stay those of the segmentation network
    FINETUNE = "finetune"  # trained on, at ``encoder_lr_scale`` x the learning rate, with its own loss kept


@dataclass(frozen=True)
class DiffusionStage:
    """Timesteps t_low <= t < t_high: the target predicted there, its loss weight, its sampling eta."""

    name: str
    t_low: int
    t_high: int
    target: StageTarget
    weight: float = 1.0
    eta: float = 0.0  # 0: deterministic DDIM steps; 1: ancestral (DDPM-like) steps


DEFAULT_STAGES: tuple[dict[str, Any], ...] = (
    {"name": "coarse", "t": [667, 1000], "target": "sample", "weight": 1.0, "eta": 0.0},
    {"name": "probabilistic", "t": [333, 667], "target": "sample", "weight": 1.0, "eta": 1.0},
    {"name": "refinement", "t": [0, 333], "target": "residual", "weight": 1.0, "eta": 0.0},
)


@dataclass(frozen=True)
class UniSegDiffSettings:
    """UniSegDiff's keys of ``card.method_settings`` (training and inference), checked."""

    stages: tuple[DiffusionStage, ...]
    encoder_pretrain_steps: int = 0  # first steps of a run: the encoder alone, as a segmentation network
    encoder_training: EncoderTraining = EncoderTraining.FINETUNE
    # 1.0: the lung-lesion convergence study (docs/BENCHMARKS.md) measured validation Dice 0.71 with the
    # encoder trained at the full rate from step 0 against 0.47 for 100 pretraining steps then 0.1x.
    encoder_lr_scale: float = 1.0
    prior_loss_weight: float = 1.0  # weight of the encoder's Dice + BCE while it is fine-tuned
    t_sampling: str = "uniform"  # "uniform" over [0, T), or "per_stage": each stage an equal share
    coarse_shared: bool = True
    branch_t: int | None = None  # None: the top of the first stochastic stage

    KEYS = ("stages", "encoder_pretrain_steps", "encoder_training", "encoder_lr_scale", "prior_loss_weight",
            "t_sampling", "coarse_shared", "branch_t")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], num_train_timesteps: int) -> "UniSegDiffSettings":
        """Parse and check; ValueError naming the key for anything that cannot work."""
        unknown = sorted(set(settings) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown UniSegDiff setting(s) {unknown} (known: {', '.join(cls.KEYS)})")
        stages = tuple(_parse_stage(s) for s in settings.get("stages", DEFAULT_STAGES))
        _check_stages(stages, num_train_timesteps)
        training = EncoderTraining.parse(settings.get("encoder_training", EncoderTraining.FINETUNE), "encoder_training")
        branch = settings.get("branch_t")
        out = cls(stages=stages, encoder_pretrain_steps=_number(settings, "encoder_pretrain_steps", 0, int),
                  encoder_training=training, encoder_lr_scale=_number(settings, "encoder_lr_scale", 1.0, float),
                  prior_loss_weight=_number(settings, "prior_loss_weight", 1.0, float),
                  t_sampling=str(settings.get("t_sampling", "uniform")),
                  coarse_shared=_flag(settings, "coarse_shared", True),
                  branch_t=None if branch is None else _number(settings, "branch_t", 0, int))
        if out.encoder_pretrain_steps < 0 or out.encoder_lr_scale < 0 or out.prior_loss_weight < 0:
            raise ValueError("encoder_pretrain_steps, encoder_lr_scale and prior_loss_weight must be >= 0")
        if out.t_sampling not in ("uniform", "per_stage"):
            raise ValueError(f"t_sampling {out.t_sampling!r} (use uniform or per_stage)")
        if out.branch_t is not None and not 0 <= out.branch_t < num_train_timesteps:
            raise ValueError(f"branch_t {out.branch_t} must lie in 0..{num_train_timesteps - 1}")
        return out

    @classmethod
    def of(cls, card: ModelCard) -> "UniSegDiffSettings":
        """The settings of a card; ModelLoadError naming the card when they cannot work."""
        try:
            return cls.from_mapping(card.method_settings, card.num_train_timesteps)
        except ValueError as err:
            raise ModelLoadError(f"model card '{card.name}': invalid UniSegDiff settings: {err}") from None

    def record(self) -> dict[str, Any]:
        """The settings as card JSON (every default spelled out, so a card says what it ran)."""
        data = dataclasses.asdict(self)
        data["stages"] = [{"name": s.name, "t": [s.t_low, s.t_high], "target": s.target.value, "weight": s.weight,
                           "eta": s.eta} for s in self.stages]
        data["encoder_training"] = self.encoder_training.value
        return data

    def stage_index(self, t: torch.Tensor) -> torch.Tensor:
        """Stage of each timestep: long (B,) -> long (B,)."""
        index = torch.zeros_like(t)
        for i, stage in enumerate(self.stages):
            index[(t >= stage.t_low) & (t < stage.t_high)] = i
        return index

    def stage_of(self, t: int) -> DiffusionStage:
        return next(s for s in self.stages if s.t_low <= t < s.t_high)

    def chain_start(self, num_train_timesteps: int) -> tuple[bool, int]:
        """(whether a coarse jump comes first, the chain's first t): the branch when it lies below the top."""
        branch = self.default_branch_t()
        top = num_train_timesteps - 1
        return (True, branch) if branch < top else (False, top)

    def fewest_steps(self, num_train_timesteps: int) -> int:
        """The fewest chain steps (below the coarse jump) that put a step in every stage the chain crosses."""
        start = self.chain_start(num_train_timesteps)[1]
        crossed = [s for s in self.stages if s.t_low <= start]
        for steps in range(1, start + 2):
            visited = {self.stage_of(t).name for t in chain_timesteps(start, steps)}
            if len(visited) == len(crossed):
                return steps
        return start + 1

    def default_branch_t(self) -> int:
        """Where the samples branch off the shared coarse estimate (see the module docstring)."""
        if self.branch_t is not None:
            return self.branch_t
        stochastic = [s for s in self.stages if s.eta > 0]
        if stochastic:
            return max(s.t_high for s in stochastic) - 1
        ordered = sorted(self.stages, key=lambda s: -s.t_high)
        return ordered[1].t_high - 1 if len(ordered) > 1 else ordered[0].t_high - 1


def _number(settings: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    """settings[key] as ``kind`` (int or float; a bool is neither); ValueError naming the key."""
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ValueError(f"{key} must be a {'whole number' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def _flag(settings: Mapping[str, Any], key: str, default: bool) -> bool:
    value = settings.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _parse_stage(data: Mapping[str, Any]) -> DiffusionStage:
    if isinstance(data, DiffusionStage):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"a stage must be an object with \"t\": [low, high], got {data!r}")
    name = str(data.get("name", "?"))
    unknown = sorted(set(data) - {"name", "t", "target", "weight", "eta"})
    if unknown:
        raise ValueError(f"stage {name!r}: unknown key(s) {unknown}")
    bounds = data.get("t")
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) for v in bounds):
        raise ValueError(f"stage {name!r}: \"t\" must be [low, high] whole timesteps, got {bounds!r}")
    low, high = int(bounds[0]), int(bounds[1])
    return DiffusionStage(str(data.get("name", f"t{low}-{high}")), low, high,
                          StageTarget.parse(data.get("target", "sample"), "stage target"),
                          _number(data, "weight", 1.0, float), _number(data, "eta", 0.0, float))


def _check_stages(stages: Sequence[DiffusionStage], num_train_timesteps: int) -> None:
    """The stages must tile [0, T) exactly, without gaps or overlaps."""
    if not stages:
        raise ValueError("stages: at least one stage")
    covered = sorted((s.t_low, s.t_high) for s in stages)
    edge = 0
    for low, high in covered:
        if low != edge or high <= low:
            raise ValueError(f"stages must tile 0..{num_train_timesteps} without gaps or overlaps, got {covered}")
        edge = high
    if edge != num_train_timesteps:
        raise ValueError(f"stages must end at num_train_timesteps {num_train_timesteps}, got {covered}")
    for s in stages:
        if s.weight < 0 or not 0 <= s.eta <= 1:
            raise ValueError(f"stage {s.name!r}: weight must be >= 0 and eta in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def stage_targets(kinds: Sequence[StageTarget], x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                  prior: torch.Tensor) -> torch.Tensor:
    """Per item, the target of its stage. x0, noise, prior (B, L, *S); alpha_bar (B,); kinds: one per item."""
    view = (-1,) + (1,) * (x0.dim() - 1)
    a, s = alpha_bar.view(view).sqrt(), (1.0 - alpha_bar).view(view).sqrt()
    table = {StageTarget.SAMPLE: lambda: x0, StageTarget.EPSILON: lambda: noise,
             StageTarget.V_PREDICTION: lambda: a * noise - s * x0, StageTarget.RESIDUAL: lambda: x0 - prior}
    return _per_item(kinds, table, x0)


def stage_x0(kinds: Sequence[StageTarget], prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
             prior: torch.Tensor) -> torch.Tensor:
    """The x0 each item's prediction implies (inverse of ``stage_targets``), clipped to [-1, 1]."""
    view = (-1,) + (1,) * (x_t.dim() - 1)
    a, s = alpha_bar.view(view).sqrt(), (1.0 - alpha_bar).view(view).sqrt()
    table = {StageTarget.SAMPLE: lambda: prediction, StageTarget.EPSILON: lambda: (x_t - s * prediction) / a,
             StageTarget.V_PREDICTION: lambda: a * x_t - s * prediction, StageTarget.RESIDUAL: lambda: prior + prediction}
    return _per_item(kinds, table, x_t).clamp(-1.0, 1.0)


def _per_item(kinds: Sequence[StageTarget], table: Mapping[StageTarget, Callable[[], torch.Tensor]],
              like: torch.Tensor) -> torch.Tensor:
    """Row i from ``table[kinds[i]]()``; each formula is evaluated once for the whole batch."""
    if len(set(kinds)) == 1:
        return table[kinds[0]]()
    out = torch.empty_like(like, dtype=torch.float32)
    for kind in set(kinds):
        rows = torch.tensor([k == kind for k in kinds], device=like.device)
        out[rows] = table[kind]()[rows].float()
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def draw_timesteps(settings: UniSegDiffSettings, batch: int, num_train_timesteps: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(batch,) long timesteps: uniform over [0, T), or a uniformly chosen stage then uniform inside it."""
    if settings.t_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    which = torch.randint(0, len(settings.stages), (batch,), generator=generator)
    u = torch.rand((batch,), generator=generator)
    lows = torch.tensor([s.t_low for s in settings.stages])[which]
    widths = torch.tensor([s.t_high - s.t_low for s in settings.stages])[which]
    return (lows + (u * widths).long().clamp(max=widths - 1)).long()


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice (MONAI's, over the batch per label) + BCE of the prior's logits against the {0, 1} mask (B, L, *S)."""
    from monai.losses import DiceLoss

    target = mask.float()
    dice = DiceLoss(sigmoid=True, batch=True)(logits.float(), target)
    return dice + F.binary_cross_entropy_with_logits(logits.float(), target)


def staged_errors(net: torch.nn.Module, settings: UniSegDiffSettings, alphas_cumprod: torch.Tensor,
                  image: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  encoder_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising pass on (x0, t, noise): (per-item squared error (B,), x0 estimate (B, L, *S), prior logits).

    x0 is the mask signal in [-1, 1]; t (B,) long; noise like x0. ``encoder_grad`` False runs the
    encoder without gradient (a frozen encoder).
    """
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        condition = net.encode(image)
    alpha_bar = alphas_cumprod.to(x0.device)[t]
    view = (-1,) + (1,) * (x0.dim() - 1)
    x_t = alpha_bar.view(view).sqrt() * x0 + (1 - alpha_bar).view(view).sqrt() * noise
    kinds = [settings.stages[i].target for i in settings.stage_index(t).tolist()]
    prior = prior_signal(condition.prior_logits)
    prediction = net.denoise(x_t, condition, t).float()
    target = stage_targets(kinds, x0, noise, alpha_bar, prior.detach())
    errors = (prediction - target).pow(2).flatten(1).mean(1)
    with torch.no_grad():
        estimate = stage_x0(kinds, prediction.detach(), x_t, alpha_bar, prior.detach())
    return errors, estimate, condition.prior_logits


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def stream_seed(seed: int, image: int, stream: int) -> int:
    """Seed of one random stream of one image: stream 0 its shared coarse noise, k >= 1 sample k - 1's."""
    return int(np.random.SeedSequence([seed, image, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def chain_timesteps(branch_t: int, steps: int) -> list[int]:
    """``steps`` timesteps from ``branch_t`` down, trailing spacing over [0, branch_t]: the first is branch_t."""
    span = branch_t + 1
    if not 1 <= steps <= span:
        raise ValueError(f"steps must be in 1..{span} below branch_t {branch_t}, got {steps}")
    return sampling_timesteps(span, steps)
