"""Diffusion on masks: schedulers, the training loss, and the batched sampler.

The diffusion runs on the mask (labels scaled to [-1, 1]); the image is the condition passed
to the network at every step. Schedulers come from ``monai.networks.schedulers``: DDIM for short
chains (the default), DDPM only for the full chain (MONAI's DDPM step is only right there).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from DiffusionSegLib.device import auto_batch_size, keep_freed_memory_for_reuse, run_with_oom_backoff
from DiffusionSegLib.modelcard import ModelCard

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SAMPLERS = ("ddim", "ddpm")
ProgressFn = Callable[[int, int], None]


def make_scheduler(card: ModelCard, sampler: str = "ddim"):
    """MONAI scheduler for the card's noise schedule and prediction target."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    if card.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{card.prediction_type}' (use {', '.join(PREDICTION_TYPES)})")
    common = dict(
        num_train_timesteps=card.num_train_timesteps,
        schedule=card.beta_schedule,
        prediction_type=card.prediction_type,
        clip_sample=True,  # masks live in [-1, 1]; clipping x0 keeps few-step chains stable
    )
    if sampler == "ddim":
        return DDIMScheduler(**common)
    if sampler == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"unknown sampler '{sampler}' (use {', '.join(SAMPLERS)})")


def mask_to_signal(mask: torch.Tensor) -> torch.Tensor:
    """{0, 1} mask -> diffusion signal in [-1, 1]."""
    return mask.float() * 2.0 - 1.0


def signal_to_probability(x: torch.Tensor) -> torch.Tensor:
    """Diffusion signal in [-1, 1] -> soft mask in [0, 1]."""
    return ((x.float() + 1.0) / 2.0).clamp_(0.0, 1.0)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict at (x_t, t) for the scheduler's prediction type."""
    kind = scheduler.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, timesteps)


def diffusion_loss(
    net: torch.nn.Module,
    scheduler,
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain MSE diffusion loss on a batch.

    image: (B, C, *spatial) normalized condition; mask: (B, L, *spatial) in {0, 1}.
    timesteps: (B,) long; drawn uniformly from [0, T) when not given.
    Returns the scalar mean squared error between the prediction and the target.
    """
    x0 = mask_to_signal(mask)
    b = x0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator, device="cpu")
    timesteps = timesteps.to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
    x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
    prediction = net(x_t, image, timesteps)
    return F.mse_loss(prediction.float(), training_target(scheduler, x0, noise, timesteps))


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (fp16 where bf16 is missing); a no-op elsewhere unless asked on CPU."""
    if not amp:
        return torch.autocast(device_type=device.type, enabled=False)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def _bytes_per_item(card: ModelCard, spatial: tuple[int, ...]) -> int:
    """Rough activation memory of one item: widest feature map x a safety factor."""
    width = max(card.network.get("channels", [64]) or [64])
    return int(math.prod(spatial) * width * 4 * 24)


def sample_masks(
    net: torch.nn.Module,
    card: ModelCard,
    images: torch.Tensor,
    n_samples: int,
    steps: int,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int | None = None,
    amp: bool = False,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Draw ``n_samples`` masks for each image with a ``steps``-step chain.

    images: (B, C, *spatial) normalized, on the network's device (slices of a volume for 2D
    models). Samples and images are flattened into one list of N*B items and denoised in chunks
    of ``batch_size`` (chosen from free memory when None; halved on out-of-memory).
    The initial noise of every item comes from one CPU generator seeded with ``seed`` in a
    fixed item order, so DDIM (deterministic after x_T) gives identical output for the same
    seed whatever the batch size or device. DDPM also draws per-step noise from a per-chunk
    generator seeded from (seed, chunk start).
    Returns (N, B, L, *spatial) float32 soft masks in [0, 1] (threshold at 0.5 for binary samples).
    """
    if n_samples < 1 or steps < 1:
        raise ValueError("samples and steps must be >= 1")
    device = images.device
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    scheduler = make_scheduler(card, sampler)
    if sampler == "ddpm":
        if steps != card.num_train_timesteps:
            log.warning("DDPM runs the full %d-step chain (MONAI's DDPM step is only exact there); "
                        "use --sampler ddim for short chains.", card.num_train_timesteps)
        steps = card.num_train_timesteps
    if steps > card.num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {card.num_train_timesteps} training timesteps")
    scheduler.set_timesteps(steps, device=device)
    b, spatial = images.shape[0], tuple(images.shape[2:])
    n_items = n_samples * b
    shape = (n_items, card.out_channels, *spatial)
    x_T = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    out = torch.empty(shape, dtype=torch.float32, device="cpu")
    if batch_size is None:
        batch_size = auto_batch_size(device, _bytes_per_item(card, spatial), cap=64 if device.type != "cpu" else 32)
    done = 0

    def run(bs: int) -> None:
        nonlocal done
        chunks = range(done, n_items, bs)
        total = math.ceil(n_items / bs) * steps
        for ci, start in enumerate(chunks):
            stop = min(start + bs, n_items)
            idx = torch.arange(start, stop) % b  # item i = sample i // B of image i % B
            cond = images[idx.to(device)]
            x = x_T[start:stop].to(device)
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + start) if sampler == "ddpm" else None
            for k, t in enumerate(scheduler.timesteps):
                t_batch = torch.full((stop - start,), int(t), device=device, dtype=torch.long)
                with _autocast(device, amp):
                    pred = net(x, cond, t_batch)
                if sampler == "ddim":
                    x, _ = scheduler.step(pred.float(), int(t), x, eta=0.0)
                else:
                    x, _ = scheduler.step(pred.float(), int(t), x, generator=gen)
                if progress is not None:
                    progress(ci * steps + k + 1, total)
            out[start:stop] = signal_to_probability(x).cpu()
            done = stop  # an OOM retry resumes after the last finished chunk

    with torch.inference_mode():
        run_with_oom_backoff(run, batch_size)
    return out.reshape(n_samples, b, *shape[1:])
