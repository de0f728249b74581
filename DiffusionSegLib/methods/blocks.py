"""Network blocks shared by the diffusion methods' networks (MedSegDiff, UniSegDiff).

``TimeResBlock`` is a residual block whose features are shifted per channel by the timestep
embedding; ``ResBlock`` is the same block without time (image encoders that see no noise level).
These networks need nothing from MONAI at inference: importing it costs about 2.4 s of every run
(``python3 -X importtime``), so the convolution choice and the timestep embedding are here.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

_CONVOLUTIONS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv1d / Conv2d / Conv3d for 1, 2 or 3 spatial dimensions."""
    if spatial_dims not in _CONVOLUTIONS:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return _CONVOLUTIONS[spatial_dims]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Ho et al. 2020): (B,) -> (B, dim) float32.

    Frequencies max_period^(-k / half) for k < half = dim // 2; cosines first, then sines, and a
    zero column when dim is odd (the layout the trained weights expect: equal to MONAI's
    ``get_timestep_embedding``, tested).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def upsample_conv(h: torch.Tensor, conv: nn.Module, size: tuple[int, ...]) -> torch.Tensor:
    """conv(nearest-neighbour upsampling of h to ``size``): (B, Cin, *s) -> (B, Cout, *size).

    When ``size`` is exactly twice h's size and conv is a 3-wide, stride-1, zero-padded
    convolution, the upsampled tensor is never made: per axis, output 2m sees h[m-1], h[m], h[m]
    (taps w0, w1 + w2 on h[m-1], h[m]) and output 2m+1 sees h[m], h[m], h[m+1] (taps w0 + w1, w2 on
    h[m], h[m+1]); so one 2-wide convolution of the zero-padded h with 2^d * Cout output channels
    (one group per output parity) gives every output. 4/9 of the multiply-adds in 2D (8/27 in 3D),
    the same numbers up to float rounding. Any other size or convolution: interpolate, then conv.
    """
    dims = h.dim() - 2
    weight = getattr(conv, "weight", None)
    if (tuple(size) != tuple(2 * n for n in h.shape[2:]) or weight is None or weight.shape[2:] != (3,) * dims
            or tuple(conv.stride) != (1,) * dims or tuple(conv.padding) != (1,) * dims
            or tuple(conv.dilation) != (1,) * dims or conv.groups != 1 or conv.padding_mode != "zeros"):
        return conv(F.interpolate(h, size=size, mode="nearest"))
    parities = list(itertools.product((0, 1), repeat=dims))
    kernels = []
    for parity in parities:
        k = weight
        for axis, odd in enumerate(parity):  # fold the 3 taps of this axis into 2
            a, b, c = k.unbind(2 + axis)
            k = torch.stack((a + b, c) if odd else (a, b + c), dim=2 + axis)
        kernels.append(k)
    bias = None if conv.bias is None else conv.bias.repeat(len(parities))
    padded = F.pad(h, (1, 1) * dims)
    convolve = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    phases = convolve(padded, torch.cat(kernels), bias)  # (B, 2^d Cout, *(s + 1))
    cout, s = weight.shape[0], h.shape[2:]
    # Parity p of each axis starts at offset p of the (s + 1)-long output; interleave them.
    pieces = [phases[(slice(None), slice(i * cout, (i + 1) * cout),
                      *(slice(odd, odd + n) for odd, n in zip(parity, s)))] for i, parity in enumerate(parities)]
    grid = torch.stack(pieces, dim=2).view(h.shape[0], cout, *([2] * dims), *s)  # (B, Cout, 2,.., *s)
    order = [0, 1] + [x for axis in range(dims) for x in (2 + dims + axis, 2 + axis)]
    return grid.permute(order).reshape(h.shape[0], cout, *size)


def norm_groups_for(channels: int, wanted: int) -> int:
    """Largest group count <= wanted that divides channels (GroupNorm needs a divisor)."""
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


def _residual_tail(norm: nn.Module, conv: nn.Module, h: torch.Tensor, skip: torch.Tensor,
                   inplace: bool) -> torch.Tensor:
    """conv(SiLU(norm(h))) + skip: the second half of both residual blocks, (B, C, *S) -> (B, C, *S).

    Without autograd (sampling) SiLU and the residual sum write into the fresh tensors that norm
    and conv return: the same numbers, about 10 % less time on a CPU, where each new full-size
    tensor costs as much as the arithmetic on it. Training keeps them out of place, as backward
    needs SiLU's input.
    """
    h = conv(F.silu(norm(h), inplace=inplace))
    return h.add_(skip) if inplace else h + skip


class TimeResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added per channel in between, residual skip."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, time_dim: int, norm_groups: int):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.norm1 = nn.GroupNorm(norm_groups_for(in_channels, norm_groups), in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels))
        self.norm2 = nn.GroupNorm(norm_groups_for(out_channels, norm_groups), out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, *S), temb: (B, T) -> (B, Cout, *S)."""
        inplace = not torch.is_grad_enabled()  # see _residual_tail
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        shift = self.time_proj(temb).view(*h.shape[:2], *([1] * (h.dim() - 2)))
        h = h.add_(shift) if inplace else h + shift
        return _residual_tail(self.norm2, self.conv2, h, self.skip(x), inplace)


class Stage(nn.Module):
    """``num_blocks`` TimeResBlocks at one resolution."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, num_blocks: int, time_dim: int,
                 norm_groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            TimeResBlock(spatial_dims, in_channels if i == 0 else out_channels, out_channels, time_dim, norm_groups)
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual skip, no time input (for image encoders)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.norm1 = nn.GroupNorm(norm_groups_for(in_channels, norm_groups), in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups_for(out_channels, norm_groups), out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, *S) -> (B, Cout, *S)."""
        inplace = not torch.is_grad_enabled()  # see _residual_tail
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        return _residual_tail(self.norm2, self.conv2, h, self.skip(x), inplace)
