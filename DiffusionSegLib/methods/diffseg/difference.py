"""DiffSeg's inference: noise the image, denoise it as "lesion" and as "healthy", threshold the difference.

Output k of N uses its own noise level t_k (spread evenly over ``noise_levels``, the paper's figure
shows 60..150 of 1000) and its own noise. Both denoisers start from the SAME x_t, so the noise
cancels in their difference and what remains is what the class changes: the lesion. One output is
one mask; N outputs give the sample set every method gives (consistency, ambiguity, uncertainty).

Settings live in ``card.method_settings`` (``DiffSegSettings``); ``healthy_thresholds`` is the
table ``calibrate`` measures after training on healthy held-out slices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from DiffusionSegLib.core.device import (activation_bytes, auto_batch_size, autocast, for_each_chunk,
                                         keep_freed_memory_for_reuse)
from DiffusionSegLib.core.enums import DifferenceThreshold
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.methods.diffseg.network import HEALTHY, LESION
from DiffusionSegLib.methods.diffusion import alphas_cumprod, denoise_step
from DiffusionSegLib.models.card import ModelCard

ProgressFn = Callable[[int, int], None]
BOUNDED_NORMALIZATIONS = ("ct_window", "rgb", "minmax")  # the denoisers work on images in [-1, 1]


@dataclass
class DiffSegSettings:
    """DiffSeg's entries of ``card.method_settings`` (all optional; these are the defaults)."""

    noise_levels: list[int] = field(default_factory=lambda: [60, 150])  # t range of the N outputs (of T)
    threshold: str = DifferenceThreshold.OTSU_OVER_HEALTHY.value
    healthy_quantile: float = 0.999  # share of healthy pixels below the healthy threshold
    # {"t": [...], "value": [...]} measured by ``calibrate``; None = not calibrated (otsu only)
    healthy_thresholds: dict[str, list[float]] | None = None
    smoothing_px: float = 1.0  # gaussian sigma applied to the difference map (speckle of the noise)
    train_t_max: int = 500  # training draws t in [0, train_t_max): inference never goes higher

    @classmethod
    def from_card(cls, card: ModelCard) -> "DiffSegSettings":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(card.method_settings) - known)
        if unknown:
            raise ModelLoadError(f"model card '{card.name}': unknown DiffSeg settings {unknown}")
        settings = cls(**card.method_settings)
        settings.check(card)
        return settings

    def check(self, card: ModelCard) -> None:
        problems = []
        lo, hi = (int(self.noise_levels[0]), int(self.noise_levels[1])) if len(self.noise_levels) == 2 else (-1, -1)
        if not 1 <= lo <= hi < card.num_train_timesteps:
            problems.append(f"noise_levels {self.noise_levels} (two timesteps 1 <= low <= high < "
                            f"{card.num_train_timesteps})")
        elif hi >= self.train_t_max:
            problems.append(f"noise_levels {self.noise_levels} reach beyond the trained range t < {self.train_t_max}")
        try:
            DifferenceThreshold.parse(self.threshold, "threshold")
        except ValueError as err:
            problems.append(str(err))
        if not 0.5 <= self.healthy_quantile < 1.0:
            problems.append(f"healthy_quantile {self.healthy_quantile} (use 0.5 <= q < 1)")
        if self.smoothing_px < 0:
            problems.append(f"smoothing_px {self.smoothing_px} (must be >= 0)")
        table = self.healthy_thresholds
        if table is not None and (len(table.get("t", [])) != len(table.get("value", [])) or not table.get("t")):
            problems.append("healthy_thresholds needs equally long non-empty 't' and 'value' lists")
        if problems:
            raise ModelLoadError(f"model card '{card.name}': invalid DiffSeg settings: " + "; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_timesteps(noise_levels: Sequence[int], n_outputs: int) -> list[int]:
    """Noise level of each output: evenly spaced over [low, high], the middle one for a single output."""
    lo, hi = int(noise_levels[0]), int(noise_levels[1])
    if n_outputs == 1:
        return [int(round((lo + hi) / 2))]
    return [int(round(t)) for t in np.linspace(lo, hi, n_outputs)]


def _chain(t_start: int, steps: int) -> list[int]:
    """Timesteps of a ``steps``-step DDIM chain from t_start down; the last step ends at the clean image."""
    return [int(round(t_start * (1.0 - j / steps))) for j in range(steps)]


def _gaussian_blur(d: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of (B, 1, *S) over its spatial axes (reflect padding)."""
    if sigma <= 0:
        return d
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=d.dtype, device=d.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n_spatial = d.ndim - 2
    conv = F.conv2d if n_spatial == 2 else F.conv3d
    for axis in range(n_spatial):
        shape = [1, 1] + [1] * n_spatial
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * n_spatial
        pad[2 * (n_spatial - 1 - axis)] = pad[2 * (n_spatial - 1 - axis) + 1] = radius
        d = conv(F.pad(d, pad, mode="reflect" if d.shape[2 + axis] > radius else "replicate"), kernel.reshape(shape))
    return d


def _item_generator(seed: int, item: int) -> torch.Generator:
    """The CPU generator of item ``item``'s noise: a function of (seed, item) only, not of the chunking."""
    state = np.random.SeedSequence([seed, item, 7]).generate_state(1, dtype=np.uint64)[0] >> 1
    return torch.Generator("cpu").manual_seed(int(state))


def difference_maps(net: torch.nn.Module, card: ModelCard, images: torch.Tensor, timesteps: Sequence[int],
                    steps: int = 1, seed: int = 0, batch_size: int | None = None, amp: bool = False,
                    progress: ProgressFn | None = None) -> torch.Tensor:
    """|x0_lesion - x0_healthy| per output: (N, B, 1, *S) float32 on the CPU, N = len(timesteps).

    images: (B, C, *S) normalized to [-1, 1], on the network's device. Item i = output i // B of image
    i % B; its noise comes from its own generator, so the maps depend on the seed only (not on the
    batch size or an out-of-memory halving). ``steps`` = 1: one x0 jump from x_t (the default);
    more: a DDIM chain from t_k to the clean image for each denoiser. The channel-mean difference is
    smoothed by ``smoothing_px``.
    """
    settings = DiffSegSettings.from_card(card)
    device = images.device
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    alphas = alphas_cumprod(card).to(device=device, dtype=torch.float32)
    one = torch.ones((), device=device)
    b, spatial = images.shape[0], tuple(images.shape[2:])
    n_items = len(timesteps) * b
    out = torch.empty((n_items, 1, *spatial), dtype=torch.float32)
    if batch_size is None:  # two network passes (healthy, lesion) per item
        batch_size = auto_batch_size(device, 2 * activation_bytes(spatial, card.network.get("channels")),
                                     cap=32 if device.type != "cpu" else 16)
    shape_one = (images.shape[1], *spatial)

    def run_chunk(start: int, stop: int, chunk: int, n_chunks: int) -> None:
        idx = torch.arange(start, stop)
        x0 = images[(idx % b).to(device)]
        t_items = [int(timesteps[i // b]) for i in range(start, stop)]
        noise = torch.stack([torch.randn(shape_one, generator=_item_generator(seed, i)) for i in range(start, stop)])
        a = alphas[torch.tensor(t_items, device=device)].reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise.to(device)
        x_h, x_l = x_t, x_t
        chains = [_chain(t, steps) for t in t_items]
        k = stop - start
        classes = torch.cat([torch.full((k,), HEALTHY), torch.full((k,), LESION)]).to(device)
        for j in range(steps):
            t_now = torch.tensor([c[j] for c in chains], device=device, dtype=torch.long)
            a_now = alphas[t_now].reshape(a.shape)
            a_next = (alphas[torch.tensor([c[j + 1] for c in chains], device=device)].reshape(a.shape)
                      if j + 1 < steps else one)
            with autocast(device, amp):
                pred = net(torch.cat([x_h, x_l]), torch.cat([t_now, t_now]), classes).float()
            x_h = denoise_step(pred[:k], x_h, a_now, a_next, "sample")
            x_l = denoise_step(pred[k:], x_l, a_now, a_next, "sample")
            if progress is not None:
                progress(chunk * steps + j + 1, n_chunks * steps)
        d = (x_l - x_h).abs().mean(dim=1, keepdim=True)
        out[start:stop] = _gaussian_blur(d, settings.smoothing_px).cpu()

    with torch.inference_mode():
        for_each_chunk(n_items, batch_size, run_chunk)
    return out.reshape(len(timesteps), b, 1, *spatial)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): the bin edge maximizing the between-class variance.

    Values above the returned threshold form the upper class. A constant input returns its value.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)  # pixels at or below each bin
    w1 = w0[-1] - w0
    s0 = np.cumsum(counts * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))])  # the last bin leaves an empty upper class


def healthy_threshold(settings: DiffSegSettings, t: int) -> float | None:
    """The calibrated healthy threshold at noise level t (linear between measured levels), or None."""
    table = settings.healthy_thresholds
    if not table:
        return None
    return float(np.interp(t, table["t"], table["value"]))


def threshold_maps(differences: torch.Tensor, timesteps: Sequence[int], settings: DiffSegSettings) -> torch.Tensor:
    """(N, B, 1, *S) difference maps -> (N, B, 1, *S) uint8 masks, one threshold per output over all B items.

    One threshold per output over the whole input (every slice of a volume), not per slice: a slice
    without lesion must be able to come out empty.
    """
    rule = DifferenceThreshold(settings.threshold)
    masks = torch.empty(differences.shape, dtype=torch.uint8)
    for k, t in enumerate(timesteps):
        d = differences[k]
        healthy = healthy_threshold(settings, t)
        if rule == DifferenceThreshold.HEALTHY and healthy is None:
            raise ModelLoadError("threshold rule 'healthy' needs calibrated healthy_thresholds in the model card")
        level = healthy if rule == DifferenceThreshold.HEALTHY else otsu_threshold(d.numpy())
        if rule == DifferenceThreshold.OTSU_OVER_HEALTHY and healthy is not None:
            level = max(level, healthy)
        masks[k] = d > level
    return masks


def healthy_differences(net: torch.nn.Module, card: ModelCard, healthy_images: torch.Tensor,
                        levels: int = 7, seed: int = 0, batch_size: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Difference maps of healthy slices at calibration noise levels: (timesteps, (T, B, 1, *S)).

    healthy_images: (B, C, *S) normalized slices without lesion (held-out ones: the training slices
    were fitted, so their differences are optimistic). The levels span ``noise_levels`` and the
    trained range, so a run may choose other levels without recalibrating.
    """
    settings = DiffSegSettings.from_card(card)
    ts = sorted({int(t) for t in np.linspace(settings.noise_levels[0] // 2 or 1, settings.train_t_max - 1, levels)}
                | {int(t) for t in settings.noise_levels})
    return ts, difference_maps(net, card, healthy_images, ts, seed=seed, batch_size=batch_size)


def quantile_table(timesteps: Sequence[int], differences: torch.Tensor, quantile: float,
                   seed: int = 0) -> dict[str, list[float]]:
    """{"t": [...], "value": [...]}: the ``quantile`` of each level's healthy differences (T, B, 1, *S)."""
    rng = np.random.default_rng(seed)
    values = []
    for k in range(len(timesteps)):
        flat = differences[k].reshape(-1).numpy()
        if flat.size > 4_000_000:  # a quantile of 4 M pixels is exact to far below the noise here
            flat = rng.choice(flat, 4_000_000, replace=False)
        values.append(float(np.quantile(flat, quantile)))
    return {"t": [float(t) for t in timesteps], "value": values}


def calibrate(net: torch.nn.Module, card: ModelCard, healthy_images: torch.Tensor, quantile: float,
              seed: int = 0, batch_size: int | None = None) -> dict[str, list[float]]:
    """Healthy threshold table: the ``quantile`` of the difference on healthy slices (B, C, *S) per noise level."""
    ts, d = healthy_differences(net, card, healthy_images, seed=seed, batch_size=batch_size)
    return quantile_table(ts, d, quantile, seed)
