"""UniSegDiff's network: a segmentation-pretrainable image encoder that conditions a staged mask denoiser.

The encoder (``SegmentationEncoder``) is a plain UNet without any time input: it maps the image to
multi-scale features and a segmentation head's logits (the *prior*). It is trained first as an
ordinary segmentation network (Dice + BCE on the prior), then conditions the denoiser. Because it
never sees the noise level, a sampling run computes it once per image and reuses it at every step of
every sample (``UniSegDiffNet.encode`` / ``denoise``); only the smaller denoiser runs N x K times.

The denoiser takes the noisy mask x_t and the prior (as a signal in [-1, 1]) as input channels, adds
the encoder's feature of each resolution to its own before that level's time-conditioned blocks, and
predicts the stage's target (``stages.py``). 2D and 3D (``spatial_dims``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from DiffusionSegLib.methods.blocks import (ResBlock, Stage, conv_nd, norm_groups_for, timestep_embedding,
                                            upsample_conv)


class Condition(NamedTuple):
    """What the encoder makes of an image batch, reused at every denoising step.

    features[i]: (B, channels[i], *S / 2**i) for i < levels - 1 (decoder side, full resolution first);
    features[-1]: (B, channels[-1], *S / 2**(levels - 1)) (bottleneck). prior_logits: (B, L, *S).
    """

    features: list[torch.Tensor]
    prior_logits: torch.Tensor

    def select(self, index: torch.Tensor) -> "Condition":
        """The condition of items ``index`` (long (k,)): rows of every tensor."""
        return Condition([f.index_select(0, index) for f in self.features], self.prior_logits.index_select(0, index))


def prior_signal(prior_logits: torch.Tensor) -> torch.Tensor:
    """The prior as a mask signal in [-1, 1] (the diffusion's scale): 2 sigmoid(logits) - 1."""
    return 2.0 * torch.sigmoid(prior_logits.float()) - 1.0


def _res_stage(spatial_dims: int, in_channels: int, out_channels: int, num_blocks: int, norm_groups: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(spatial_dims, in_channels if i == 0 else out_channels, out_channels, norm_groups)
                           for i in range(num_blocks)))


class SegmentationEncoder(nn.Module):
    """Time-free UNet: image (B, C, *S) -> Condition (multi-scale features and the prior's logits)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 num_res_blocks: int, norm_groups: int):
        super().__init__()
        conv = conv_nd(spatial_dims)
        levels = len(channels)
        self.stem = conv(in_channels, channels[0], 3, padding=1)
        self.down_stages = nn.ModuleList(
            _res_stage(spatial_dims, channels[max(i - 1, 0)], channels[i], num_res_blocks, norm_groups)
            for i in range(levels - 1))
        self.downs = nn.ModuleList(conv(channels[i], channels[i], 3, stride=2, padding=1) for i in range(levels - 1))
        self.bottleneck = _res_stage(spatial_dims, channels[-2], channels[-1], num_res_blocks + 1, norm_groups)
        self.up_convs = nn.ModuleList(conv(channels[i + 1], channels[i], 3, padding=1) for i in range(levels - 1))
        self.up_stages = nn.ModuleList(
            _res_stage(spatial_dims, 2 * channels[i], channels[i], num_res_blocks, norm_groups) for i in range(levels - 1))
        self.head = nn.Sequential(nn.GroupNorm(norm_groups_for(channels[0], norm_groups), channels[0]), nn.SiLU(),
                                  conv(channels[0], out_channels, 1))

    def forward(self, image: torch.Tensor) -> Condition:
        h = self.stem(image)
        skips = []
        for stage, down in zip(self.down_stages, self.downs):
            h = stage(h)
            skips.append(h)
            h = down(h)
        h = self.bottleneck(h)
        features = [h]
        for i in reversed(range(len(skips))):
            h = self.up_stages[i](torch.cat([upsample_conv(h, self.up_convs[i], skips[i].shape[2:]), skips[i]], dim=1))
            features.insert(0, h)
        return Condition(features, self.head(h))


class UniSegDiffNet(nn.Module):
    """net(x_t (B,L,*S), image (B,C,*S), t (B,)) -> (B,L,*S), the target of t's stage.

    ``channels``: the encoder's widths per level; ``denoiser_channels``: the denoiser's (default: the
    same), usually narrower since it runs at every step. Both have the same number of levels.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 96, 160),
        denoiser_channels: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        norm_groups: int = 8,
        time_embed_dim: int | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        enc = [int(c) for c in channels]
        den = [int(c) for c in (denoiser_channels or channels)]
        if len(enc) < 2 or len(den) != len(enc):
            raise ValueError(f"channels {enc} and denoiser_channels {den} need the same number (>= 2) of levels")
        levels = len(den)
        self.size_divisor = 2 ** (levels - 1)
        self.base_channels = den[0]
        time_dim = int(time_embed_dim or 4 * den[0])
        conv = conv_nd(spatial_dims)
        self.encoder = SegmentationEncoder(spatial_dims, in_channels, out_channels, enc, num_res_blocks, norm_groups)
        self.time_mlp = nn.Sequential(nn.Linear(den[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = conv(2 * out_channels, den[0], 3, padding=1)  # x_t and the prior
        # 1x1 projections of the encoder's features onto the denoiser's widths, one per level.
        self.inject = nn.ModuleList(conv(enc[i], den[i], 1) for i in range(levels - 1))
        self.inject_bottleneck = conv(enc[-1], den[-2], 1)
        self.down_stages = nn.ModuleList(
            Stage(spatial_dims, den[i], den[i], num_res_blocks, time_dim, norm_groups) for i in range(levels - 1))
        self.downs = nn.ModuleList(conv(den[i], den[i + 1] if i + 1 < levels - 1 else den[i], 3, stride=2, padding=1)
                                   for i in range(levels - 1))
        self.bottleneck = Stage(spatial_dims, den[-2], den[-1], num_res_blocks + 1, time_dim, norm_groups)
        self.up_convs = nn.ModuleList(conv(den[i + 1], den[i], 3, padding=1) for i in range(levels - 1))
        self.up_stages = nn.ModuleList(
            Stage(spatial_dims, 2 * den[i], den[i], num_res_blocks, time_dim, norm_groups) for i in range(levels - 1))
        self.out = nn.Sequential(nn.GroupNorm(norm_groups_for(den[0], norm_groups), den[0]), nn.SiLU(),
                                 conv(den[0], out_channels, 3, padding=1))

    def encode(self, image: torch.Tensor) -> Condition:
        """image (B, C, *S) -> Condition; independent of t, so computed once per image in sampling."""
        return self.encoder(image)

    def denoise(self, x_t: torch.Tensor, condition: Condition, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t (B, L, *S), the items' Condition, timesteps (B,) -> the stage target (B, L, *S)."""
        temb = self.time_mlp(timestep_embedding(timesteps, self.base_channels).to(x_t.dtype))
        h = self.stem(torch.cat([x_t, prior_signal(condition.prior_logits).to(x_t.dtype)], dim=1))
        skips = []
        for i, (stage, down) in enumerate(zip(self.down_stages, self.downs)):
            h = stage(h + self.inject[i](condition.features[i]), temb)
            skips.append(h)
            h = down(h)
        h = self.bottleneck(h + self.inject_bottleneck(condition.features[-1]), temb)
        for i in reversed(range(len(skips))):
            h = self.up_stages[i](torch.cat([upsample_conv(h, self.up_convs[i], skips[i].shape[2:]), skips[i]], dim=1),
                                  temb)
        return self.out(h)

    def forward(self, x_t: torch.Tensor, image: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.denoise(x_t, self.encode(image), timesteps)
