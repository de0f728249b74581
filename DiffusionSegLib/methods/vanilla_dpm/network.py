"""Vanilla conditional DPM for segmentation (Wolleb et al. 2022): the image concatenated with
the noisy mask along channels, denoised by MONAI's ``DiffusionModelUNet``.

It is the baseline MedSegDiff is compared against (same call signature, same sampler). The
default widths give about the parameter count of the default ``MedSegDiffUNet`` (2.9 M in 2D) and
the same ``size_divisor`` (8), so the ablation compares architectures, not model sizes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn


class VanillaConditionalDPM(nn.Module):
    """net(x_t (B,L,*S), image (B,C,*S), t (B,)) -> (B,L,*S) via one UNet on cat([x_t, image])."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64, 128),
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: int = 1,
        num_head_channels: int = 8,  # must divide channels[-1] and every attention level's width
        norm_num_groups: int = 8,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        # No attention in the levels by default: it is the costliest part at full resolution on a
        # CPU. MONAI's middle block always has one self-attention at the lowest resolution.
        attention = list(attention_levels) if attention_levels is not None else [False] * len(channels)
        self.size_divisor = 2 ** (len(channels) - 1)
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels + out_channels,
            out_channels=out_channels,
            channels=channels,
            attention_levels=attention,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            norm_num_groups=norm_num_groups,
        )

    def forward(self, x_t: torch.Tensor, image: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t: (B, L, *S) noisy mask, image: (B, C, *S), timesteps: (B,) long -> (B, L, *S)."""
        # The noisy mask goes first so output channel i lines up with input channel i.
        return self.unet(torch.cat([x_t, image], dim=1), timesteps)
