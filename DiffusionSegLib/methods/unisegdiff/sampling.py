"""UniSegDiff's staged sampler: encoder once per image, a shared coarse jump, then per-sample steps.

Items are ordered image-major (item j = sample j % N of image j // N), so a chunk holds whole groups
of one image's samples and the encoder runs once per image of the chunk. Every random number comes
from a stream keyed by (seed, image, sample) (``stages.stream_seed``): the masks depend on the seed
only, whatever the batch size, the out-of-memory halving or the device.

With ``card.inference_window()`` (``slice_windows`` on a 2D card, or a 3D card) and images larger than
it, the network sees windows of the image (``windows.WindowGrid``): the encoder runs once per window,
and each denoiser call runs on the windows of the samples' noisy masks, its predictions blended back
into one full-size prediction per sample, so the noise, the chain and the output stay full-size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from DiffusionSegLib.core.device import (activation_bytes, auto_batch_size, autocast, for_each_chunk,
                                         keep_freed_memory_for_reuse)
from DiffusionSegLib.methods.diffusion import alphas_cumprod, denoise_step
from DiffusionSegLib.methods.unisegdiff.network import Condition, prior_signal
from DiffusionSegLib.methods.unisegdiff.stages import UniSegDiffSettings, chain_timesteps, stage_x0, stream_seed
from DiffusionSegLib.methods.windows import WindowGrid, needs_windows
from DiffusionSegLib.models.card import ModelCard


@dataclass
class Encoded:
    """The encoder's output for some images, whole or in windows, and the prior each image gets.

    condition: rows per image (whole) or per window (image-major, ``WindowGrid.split``);
    prior: (b, L, *S), the prior signal in [-1, 1] on the whole image grid.
    """

    condition: Condition
    prior: torch.Tensor
    grid: WindowGrid | None

    @classmethod
    def of(cls, net: torch.nn.Module, images: torch.Tensor, grid: WindowGrid | None) -> "Encoded":
        """Encode images (b, C, *S), window by window when ``grid`` is given."""
        if grid is None:
            condition = net.encode(images)
            return cls(condition, prior_signal(condition.prior_logits), None)
        condition = net.encode(grid.split(images))
        return cls(condition, grid.merge(prior_signal(condition.prior_logits)), grid)

    def select(self, index: torch.Tensor) -> "Encoded":
        """The encoding of images ``index`` (long (k,)), in that order."""
        rows = index if self.grid is None else self.grid.rows(index)
        return Encoded(self.condition.select(rows), self.prior.index_select(0, index), self.grid)

    def denoise(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The stage target for x (b, L, *S) at timesteps t (b,), rows matching this encoding's images."""
        if self.grid is None:
            return net.denoise(x, self.condition, t)
        windows = net.denoise(self.grid.split(x), self.condition, t.repeat_interleave(self.grid.count))
        return self.grid.merge(windows)


def window_grid(card: ModelCard, spatial: tuple[int, ...]) -> WindowGrid | None:
    """The windows the network sees items of size ``spatial`` in (``card.inference_window``), or None: whole."""
    window = card.inference_window()
    return WindowGrid.of(spatial, window, card.windows_overlap()) if needs_windows(spatial, window) else None


def network_evaluations(settings: UniSegDiffSettings, card: ModelCard, samples: int, steps: int) -> float:
    """Denoiser calls per sample: ``steps``, plus the coarse jump (shared by the N samples or not)."""
    if not settings.chain_start(card.num_train_timesteps)[0]:
        return float(steps)
    return steps + (1.0 / samples if settings.coarse_shared else 1.0)


def sample_staged(net: torch.nn.Module, card: ModelCard, images: torch.Tensor, n_samples: int, steps: int,
                  seed: int = 0, batch_size: int | None = None, amp: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Draw ``n_samples`` masks per image: images (B, C, *S) on the network's device.

    Returns (N, B, L, *S) uint8 masks in {0, 1} on the CPU.
    """
    if n_samples < 1 or steps < 1:
        raise ValueError("samples and steps must be >= 1")
    settings = UniSegDiffSettings.of(card)
    top = card.num_train_timesteps - 1
    coarse, branch = settings.chain_start(card.num_train_timesteps)  # coarse: one jump to the x0 estimate first
    timesteps = chain_timesteps(branch, steps)
    stages = [settings.stage_of(t) for t in timesteps]
    device = images.device
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    alphas = alphas_cumprod(card).to(device=device, dtype=torch.float32)
    b, spatial, labels = images.shape[0], tuple(images.shape[2:]), card.out_channels
    n_items = n_samples * b
    out = torch.empty((n_items, labels, *spatial), dtype=torch.uint8)
    grid = window_grid(card, spatial)
    # What one item costs the network: its whole image, or all its windows.
    pixels = math.prod(spatial) if grid is None else grid.count * math.prod(grid.window)
    if batch_size is None:
        batch_size = auto_batch_size(device, activation_bytes((pixels,), card.network.get("channels")),
                                     cap=64 if device.type != "cpu" else 32)
        # The CPU cap is in whole images; windows overlap, so fewer items hold as many pixels.
        batch_size = max(1, batch_size * math.prod(spatial) // pixels) if device.type == "cpu" else batch_size
    calls = len(timesteps) + int(coarse)

    def one_item_noise(generator: torch.Generator) -> torch.Tensor:
        return torch.randn((labels, *spatial), generator=generator)

    def denoise_chunk(start: int, stop: int, chunk: int, n_chunks: int) -> None:
        n = stop - start
        first = start // n_samples
        image_ids = torch.arange(first, (stop - 1) // n_samples + 1)
        local = (torch.arange(start, stop) // n_samples - first).to(device)
        gens = [torch.Generator("cpu").manual_seed(stream_seed(seed, j // n_samples, j % n_samples + 1))
                for j in range(start, stop)]
        with autocast(device, amp):
            per_image = Encoded.of(net, images[image_ids.to(device)], grid)
        items = per_image.select(local)
        prior = items.prior
        if coarse:
            target = [settings.stage_of(top).target]
            if settings.coarse_shared:  # one jump per image, from the image's own noise
                x_top = torch.stack([one_item_noise(torch.Generator("cpu").manual_seed(stream_seed(seed, int(i), 0)))
                                     for i in image_ids]).to(device)
                at_top = per_image
            else:
                x_top = torch.stack([one_item_noise(g) for g in gens]).to(device)
                at_top = items
            t_top = torch.full((x_top.shape[0],), top, device=device, dtype=torch.long)
            with autocast(device, amp):
                prediction = at_top.denoise(net, x_top, t_top).float()
            x0 = stage_x0(target * x_top.shape[0], prediction, x_top, alphas[t_top], at_top.prior)
            if settings.coarse_shared:
                x0 = x0.index_select(0, local)
            if progress is not None:
                progress(chunk * calls + 1, n_chunks * calls)
            a = alphas[branch]
            x = a.sqrt() * x0 + (1 - a).sqrt() * torch.stack([one_item_noise(g) for g in gens]).to(device)
        else:
            x = torch.stack([one_item_noise(g) for g in gens]).to(device)
        for k, (t, stage) in enumerate(zip(timesteps, stages)):
            t_batch = torch.full((n,), t, device=device, dtype=torch.long)
            with autocast(device, amp):
                prediction = items.denoise(net, x, t_batch).float()
            x0 = stage_x0([stage.target] * n, prediction, x, alphas[t_batch], prior)
            a_next = alphas[timesteps[k + 1]] if k + 1 < len(timesteps) else torch.ones((), device=device)
            noise = torch.stack([one_item_noise(g) for g in gens]).to(device) if stage.eta > 0 else None
            x = denoise_step(x0, x, alphas[t], a_next, "sample", stage.eta, noise)
            if progress is not None:
                progress(chunk * calls + int(coarse) + k + 1, n_chunks * calls)
        out[start:stop] = (x > 0).to(torch.uint8).cpu()

    with torch.inference_mode():
        for_each_chunk(n_items, batch_size, denoise_chunk)
    return out.view(b, n_samples, labels, *spatial).transpose(0, 1).contiguous()
