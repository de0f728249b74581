"""Diffusion on masks: schedulers, the training loss, and the batched sampler.

The diffusion runs on the mask (labels scaled to [-1, 1]); the image is the condition passed
to the network at every step. Training's ``add_noise`` and v target come from
``monai.networks.schedulers``; the noise schedule of the linear and scaled-linear betas
(``alphas_cumprod``) and the sampling chain (its timestep list and the DDIM / DDPM update) are owned
here: every network call pairs with the noise level the sample is really at, whatever the MONAI
version, and sampling imports no MONAI.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from DiffusionSegLib.core.device import (activation_bytes, auto_batch_size, autocast, for_each_chunk,
                                         keep_freed_memory_for_reuse)
from DiffusionSegLib.core.enums import PredictionType, Sampler
from DiffusionSegLib.methods.windows import in_windows, needs_windows
from DiffusionSegLib.models.card import ModelCard

log = logging.getLogger(__name__)

PREDICTION_TYPES = PredictionType.values()
SAMPLERS = (Sampler.DDIM.value, Sampler.DDPM.value)  # the chains this module walks
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


# Noise schedules computed here, so that sampling needs no MONAI import (2.4 s per run): beta_t
# evenly spaced from 1e-4 to 2e-2 (linear) or their square roots evenly spaced (scaled linear), the
# defaults of MONAI's schedulers, which the tests check these against bit for bit.
_OWN_SCHEDULES = {
    "linear_beta": lambda n: torch.linspace(1e-4, 2e-2, n, dtype=torch.float32),
    "scaled_linear_beta": lambda n: torch.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, n, dtype=torch.float32) ** 2,
}


def alphas_cumprod(card: ModelCard) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) of the card's schedule: (num_train_timesteps,) float32."""
    if card.beta_schedule not in _OWN_SCHEDULES:  # any other schedule MONAI knows
        return make_scheduler(card).alphas_cumprod.float()
    return schedule_alphas_cumprod(card.beta_schedule, card.num_train_timesteps)


def schedule_alphas_cumprod(beta_schedule: str, num_train_timesteps: int) -> torch.Tensor:
    """alpha_bar_t of ``linear_beta`` or ``scaled_linear_beta`` (betas 1e-4 .. 2e-2): (T,) float32."""
    if beta_schedule not in _OWN_SCHEDULES:
        raise ValueError(f"unknown beta schedule {beta_schedule!r} (use {', '.join(_OWN_SCHEDULES)})")
    return torch.cumprod(1.0 - _OWN_SCHEDULES[beta_schedule](num_train_timesteps), dim=0)


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


def bytes_per_item(card: ModelCard, spatial: tuple[int, ...]) -> int:
    """Rough activation memory of one item (``core.device.activation_bytes`` of the card's widths)."""
    return activation_bytes(spatial, card.network.get("channels"))


def sampling_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The chain's timesteps, noisiest first: "trailing" spacing t_i = round(T - i T / n) - 1.

    The chain starts at t = T - 1 (where x_T ~ N(0, I) really is) and every step ends at the next
    listed t, the last one at the clean signal, so each network call sees the noise level its
    input is at. Owned here, not taken from MONAI: MONAI 1.6 spaces ``set_timesteps`` with
    linspace while its ``step()`` jumps by T // n, which pairs short chains inconsistently.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ts = [int(round(num_train_timesteps - i * num_train_timesteps / steps)) - 1 for i in range(steps)]
    return ts


def predicted_x0_and_noise(
    prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str,
    clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, epsilon) implied by the network output at noise level ``alpha_bar`` (a 0-d tensor).

    x_t = sqrt(a) x0 + sqrt(1 - a) eps; the v target is v = sqrt(a) eps - sqrt(1 - a) x0.
    x0 is clipped to [-1, 1] (masks live there) and eps recomputed from the clipped x0, so the
    step below moves exactly along the line between the clipped estimate and x_t.
    """
    a, s = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        x0 = (x_t - s * prediction) / a
    elif prediction_type == "sample":
        x0 = prediction
    elif prediction_type == "v_prediction":
        x0 = a * x_t - s * prediction
    else:
        raise ValueError(f"unknown prediction_type '{prediction_type}' (use {', '.join(PREDICTION_TYPES)})")
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    eps = (x_t - a * x0) / s
    return x0, eps


def denoise_step(
    prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor,
    prediction_type: str, eta: float = 0.0, noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step x_t -> x_prev of the generalized DDIM update (Song et al. 2021, eq. 12).

    eta = 0: deterministic DDIM. eta = 1: ancestral DDPM on this chain (sigma^2 is the posterior
    variance (1 - a_prev) / (1 - a) * (1 - a / a_prev)), which on the full chain is DDPM exactly.
    ``noise`` (same shape as x_t) is needed when eta > 0. alpha_bar_prev = 1 ends at the clean signal.
    """
    x0, eps = predicted_x0_and_noise(prediction, x_t, alpha_bar, prediction_type)
    sigma2 = eta**2 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    x_prev = alpha_bar_prev.sqrt() * x0 + (1.0 - alpha_bar_prev - sigma2).clamp(min=0.0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("a stochastic step (eta > 0) needs noise")
        x_prev = x_prev + sigma2.sqrt() * noise
    return x_prev


def item_seed(seed: int, item: int) -> int:
    """Seed of item ``item``'s noise stream (its x_T, then its per-step noise): a function of (seed, item) only."""
    return int(np.random.SeedSequence([seed, item]).generate_state(1, dtype=np.uint64)[0] >> 1)


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
    binary: bool = False,
) -> torch.Tensor:
    """Draw ``n_samples`` masks for each image with a ``steps``-step chain.

    images: (B, C, *spatial) normalized, on the network's device (slices of a volume for 2D
    models). Samples and images are flattened into one list of N*B items (item i = sample i // B
    of image i % B) and denoised in chunks of ``batch_size`` (chosen from free memory when None;
    halved on out-of-memory), the N samples of a slice side by side. Sampler "ddim" is deterministic after x_T; "ddpm" is ancestral
    sampling on the same chain (eta = 1; ``steps`` = T is the original DDPM).
    Every random number is tied to its item, never to a chunk: item i's x_T and then its per-step
    noise come from its own CPU generator seeded from (seed, i), drawn when its chunk starts. So
    the masks depend on the seed only, whatever the batch size, the out-of-memory halving or the
    device, and the starting noise takes the memory of one chunk, not of every slice and sample.
    Returns (N, B, L, *spatial) float32 soft masks in [0, 1] (threshold at 0.5 for binary samples),
    or with ``binary`` the thresholded masks as uint8 {0, 1}, a quarter of the memory for long volumes.
    """
    if n_samples < 1 or steps < 1:
        raise ValueError("samples and steps must be >= 1")
    if steps > card.num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {card.num_train_timesteps} training timesteps")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}' (use {', '.join(SAMPLERS)})")
    if card.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type '{card.prediction_type}' (use {', '.join(PREDICTION_TYPES)})")
    device = images.device
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    eta = 1.0 if sampler == "ddpm" else 0.0
    timesteps = sampling_timesteps(card.num_train_timesteps, steps)
    alpha_bar = alphas_cumprod(card).to(device=device, dtype=torch.float32)
    # alpha_bar of each step's start and end; the last step ends at the clean signal (alpha_bar = 1).
    a_now = [alpha_bar[t] for t in timesteps]
    a_next = a_now[1:] + [torch.ones((), device=device)]
    b, spatial = images.shape[0], tuple(images.shape[2:])
    n_items = n_samples * b
    shape = (n_items, card.out_channels, *spatial)
    out = torch.empty(shape, dtype=torch.uint8 if binary else torch.float32, device="cpu")
    auto_batch = batch_size is None
    if auto_batch:
        batch_size = auto_batch_size(device, bytes_per_item(card, spatial), cap=64 if device.type != "cpu" else 32)

    window = card.inference_window()
    windowed, labels = needs_windows(spatial, window), card.out_channels
    overlap = card.windows_overlap()
    if windowed:  # memory is one window per item, not the whole volume
        batch_size = min(batch_size, 4)

    # Chunks walk the items slice-major (position p is sample p % N of image p // N), so a chunk
    # holds the N samples of consecutive slices and a network that takes ``image_index`` computes
    # each slice's image features once per step, not N times. Item i = sample * B + image keeps its
    # noise stream and its output slot whatever the order.
    share_images = bool(getattr(net, "takes_image_index", False)) and not windowed
    if share_images and auto_batch and batch_size > n_samples:
        batch_size -= batch_size % n_samples  # whole slices per chunk: none has its features computed twice

    def denoise_chunk(start: int, stop: int, chunk: int, n_chunks: int) -> None:
        position = torch.arange(start, stop)
        image_of = position // n_samples
        items = (position % n_samples) * b + image_of
        if share_images:
            first = int(image_of[0])
            cond, image_index = images[first:int(image_of[-1]) + 1], (image_of - first).to(device)
        else:
            cond, image_index = images[image_of.to(device)], None
        # Re-seeded at every chunk start, so an out-of-memory retry replays the same noise.
        gens = [torch.Generator("cpu").manual_seed(item_seed(seed, int(i))) for i in items]
        x = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)  # x_T
        for k, t in enumerate(timesteps):
            t_batch = torch.full((stop - start,), t, device=device, dtype=torch.long)
            with autocast(device, amp):
                if windowed:  # larger than the training crop (3D, or 2D with slice_windows): crop-sized windows
                    pred = in_windows(lambda patch: net(patch[:, :labels], patch[:, labels:],
                                                        t_batch[:1].expand(patch.shape[0])),
                                      torch.cat([x, cond], dim=1), window, x.shape[0], overlap)
                elif image_index is not None:
                    pred = net(x, cond, t_batch, image_index=image_index)
                else:
                    pred = net(x, cond, t_batch)
            noise = None
            if eta:
                noise = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)
            x = denoise_step(pred.float(), x, a_now[k], a_next[k], card.prediction_type, eta, noise)
            if progress is not None:
                progress(chunk * steps + k + 1, n_chunks * steps)
        soft = signal_to_probability(x).cpu()
        out[items] = (soft > 0.5).to(out.dtype) if binary else soft

    with torch.inference_mode():
        for_each_chunk(n_items, batch_size, denoise_chunk)
    return out.reshape(n_samples, b, *shape[1:])
