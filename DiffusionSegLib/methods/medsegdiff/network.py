"""MedSegDiff denoiser (Wu et al., MIDL 2023), re-derived from the paper's equations.

Two encoders, one for the image I and one for the noisy mask x_t, are fused by dynamic
conditional encoding at the middle stages, their features are added before the last encoding
stage (the bottleneck), and a convolutional decoder with FF-Parser-filtered skip connections
predicts the diffusion target. 2D and 3D (``spatial_dims``), any size that is a multiple of
``size_divisor``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from DiffusionSegLib.methods.blocks import Stage, conv_nd, norm_groups_for, timestep_embedding, upsample_conv


class DynamicConditionalEncoding(nn.Module):
    """A(m_I, m_x) = (LN(m_I) * LN(m_x)) * m_I, element-wise.

    LN is a layer norm over channels and space (GroupNorm with one group, learnable affine): it
    puts both features on a common scale whatever the noise level, so the product acts as an
    attention map of the current mask estimate over the image feature.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm_image = nn.GroupNorm(1, channels)
        self.norm_mask = nn.GroupNorm(1, channels)

    def forward(self, m_image: torch.Tensor, m_mask: torch.Tensor) -> torch.Tensor:
        return (self.norm_image(m_image) * self.norm_mask(m_mask)) * m_image


# One resized axis: (dim of the stacked (2, C, *ref) filter, lower bin, upper bin, upper weight).
_AxisTaps = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def _full_axis_taps(size: int, reference: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-interpolation taps that sample a full (two-sided) FFT axis of ``reference`` bins at
    the frequencies of the bins of a ``size``-point FFT.

    Bin k of an n-point FFT is the frequency k/n cycles/sample, negative (k - n)/n above n/2. It
    lies at reference position f * reference, taken modulo ``reference``: the DFT spectrum is
    periodic in f with period 1, so the bins form a circle and the last stored bin neighbours
    bin 0 (this is also how negative frequencies stay negative). Integer arithmetic keeps the
    positions exact, so DC lands on bin 0 and coinciding bins take the stored value unmixed.

    Returns (lower bin (size,), upper bin (size,), weight of the upper bin (size,) float64).
    """
    k = torch.arange(size, dtype=torch.int64)
    signed = torch.where(k > size // 2, k - size, k)  # fftfreq order: Nyquist of even sizes is -1/2
    numerator = signed * reference  # position = numerator / size reference bins
    lower = torch.div(numerator, size, rounding_mode="floor")
    weight = (numerator - lower * size).double() / size
    lower = torch.remainder(lower, reference)
    return lower, torch.remainder(lower + 1, reference), weight


def _rfft_axis_taps(size: int, reference: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`_full_axis_taps` for the half-spectrum (rfft) axis: bins k = 0..size//2 at k/size.

    The reference stores bins 0..reference//2; an odd reference stops short of f = 1/2, so
    frequencies above its last bin take that bin's value (clamped at the Nyquist edge).
    """
    last = reference // 2
    k = torch.arange(size // 2 + 1, dtype=torch.int64)
    numerator = k * reference
    lower = torch.div(numerator, size, rounding_mode="floor")
    weight = (numerator - lower * size).double() / size
    beyond = lower >= last
    lower = torch.where(beyond, torch.full_like(lower, last), lower)
    weight = torch.where(beyond, torch.zeros_like(weight), weight)
    return lower, torch.clamp(lower + 1, max=last), weight


class FFParser(nn.Module):
    """Learnable global frequency filter: m' = IFFT(W * FFT(m)), W complex per channel.

    W is stored on a reference grid (``reference_size`` per axis, rfft half-spectrum on the last
    axis) and sampled at run time at the physical frequencies (cycles/sample) of the actual
    spectrum's bins, linearly in frequency, so a filter learnt at one size acts on the same
    frequencies at any size: DC stays DC, Nyquist stays Nyquist, f = 0.25 stays 0.25.
    Initialised to W = 1 (identity).
    """

    def __init__(self, spatial_dims: int, channels: int, reference_size: int):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.reference_size = int(reference_size)
        shape = (channels, *([reference_size] * (spatial_dims - 1)), reference_size // 2 + 1)
        self.weight_real = nn.Parameter(torch.ones(shape))
        self.weight_imag = nn.Parameter(torch.zeros(shape))
        # Interpolation taps per (spatial size, device); indices and weights only, never filter
        # values, so every call reads the live parameters. Not a buffer: not part of the weights.
        self._taps: dict[tuple[tuple[int, ...], torch.device], list[_AxisTaps]] = {}

    def _axis_taps(self, spatial_size: Sequence[int], device: torch.device) -> list[_AxisTaps]:
        """Taps of every axis whose size differs from the reference (the others are used as stored)."""
        key = (tuple(int(n) for n in spatial_size), device)
        if key not in self._taps:
            taps = []
            last = len(key[0]) - 1
            for axis, n in enumerate(key[0]):
                if n == self.reference_size:
                    continue  # same bins, same frequencies: the stored values as they are
                make = _rfft_axis_taps if axis == last else _full_axis_taps
                lower, upper, weight = make(n, self.reference_size)
                taps.append((2 + axis, lower.to(device), upper.to(device), weight.float().to(device)))
            self._taps[key] = taps
        return self._taps[key]

    def _filter(self, spatial_size: Sequence[int]) -> torch.Tensor:
        """Complex filter (C, *S[:-1], S[-1]//2 + 1) for an input of spatial size S = ``spatial_size``.

        Takes the full sizes, not the rfft spectrum's: n = 2m and 2m + 1 share a half-spectrum
        length but not its bin frequencies.
        """
        w = torch.stack([self.weight_real, self.weight_imag])  # (2, C, *ref)
        # Separable linear interpolation, one axis at a time: the product of the per-axis linear
        # weights is the (bi/tri)linear interpolation in frequency; index_select keeps it differentiable.
        for dim, lower, upper, weight in self._axis_taps(spatial_size, w.device):
            view = [1] * w.dim()
            view[dim] = -1
            weight = weight.view(view)
            w = w.index_select(dim, lower) * (1 - weight) + w.index_select(dim, upper) * weight
        return torch.complex(w[0], w[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *S) -> (B, C, *S) filtered.

        Computed in float32 with autocast off: complex tensors cannot be built from bf16 parts.
        """
        axes = tuple(range(2, x.dim()))
        with torch.autocast(device_type=x.device.type, enabled=False):
            spectrum = torch.fft.rfftn(x.float(), dim=axes, norm="ortho")
            spectrum = spectrum * self._filter(x.shape[2:])
            out = torch.fft.irfftn(spectrum, s=x.shape[2:], dim=axes, norm="ortho")
        return out.to(x.dtype)


class Encoder(nn.Module):
    """Stem conv then one Stage per level except the last, downsampling between levels."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], num_blocks: int, time_dim: int,
                 norm_groups: int):
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.stem = conv(in_channels, channels[0], 3, padding=1)
        self.stages = nn.ModuleList(
            Stage(spatial_dims, channels[max(i - 1, 0)], channels[i], num_blocks, time_dim, norm_groups)
            for i in range(len(channels) - 1)
        )
        self.downs = nn.ModuleList(
            conv(channels[i], channels[i], 3, stride=2, padding=1) for i in range(len(channels) - 1)
        )


class MedSegDiffUNet(nn.Module):
    """MedSegDiff denoiser: net(x_t (B,L,*S), image (B,C,*S), t (B,)) -> (B,L,*S).

    Args name the science: ``dynamic_stages`` are the encoder levels where the dynamic
    conditional encoding fuses image and mask features (default: the middle two);
    ``dynamic_conditioning`` and ``ff_parser`` switch the two contributions off for ablations.
    """

    #: forward takes ``image_index``: the sampler passes each slice's image once for its N samples
    takes_image_index = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 96, 160),
        num_res_blocks: int = 1,
        norm_groups: int = 8,
        time_embed_dim: int | None = None,
        dynamic_conditioning: bool = True,
        dynamic_stages: Sequence[int] | None = None,
        ff_parser: bool = True,
        ff_reference_size: int = 64,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels")
        levels = len(channels)
        self.spatial_dims = spatial_dims
        self.size_divisor = 2 ** (levels - 1)
        self.base_channels = channels[0]
        time_dim = int(time_embed_dim or 4 * channels[0])
        if dynamic_stages is None:  # the middle two encoder levels (of those before the bottleneck)
            dynamic_stages = [i for i in range(levels - 1) if 0 < i < levels - 1][:2] or [0]
        self.dynamic_stages = [int(i) for i in dynamic_stages] if dynamic_conditioning else []
        if any(not 0 <= i < levels - 1 for i in self.dynamic_stages):
            raise ValueError(f"dynamic_stages {self.dynamic_stages} must lie in 0..{levels - 2} (encoder levels)")
        conv = conv_nd(spatial_dims)
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.image_encoder = Encoder(spatial_dims, in_channels, channels, num_res_blocks, time_dim, norm_groups)
        self.mask_encoder = Encoder(spatial_dims, out_channels, channels, num_res_blocks, time_dim, norm_groups)
        self.dynamic = nn.ModuleDict(
            {str(i): DynamicConditionalEncoding(channels[i]) for i in self.dynamic_stages}
        )
        self.bottleneck = Stage(spatial_dims, channels[-2], channels[-1], num_res_blocks + 1, time_dim, norm_groups)
        self.ff_parsers = nn.ModuleList(
            FFParser(spatial_dims, channels[i], max(4, ff_reference_size // 2**i)) if ff_parser else nn.Identity()
            for i in range(levels - 1)
        )
        self.up_convs = nn.ModuleList(conv(channels[i + 1], channels[i], 3, padding=1) for i in range(levels - 1))
        self.decoder = nn.ModuleList(
            Stage(spatial_dims, 2 * channels[i], channels[i], num_res_blocks, time_dim, norm_groups)
            for i in range(levels - 1)
        )
        self.out = nn.Sequential(nn.GroupNorm(norm_groups_for(channels[0], norm_groups), channels[0]), nn.SiLU(),
                                 conv(channels[0], out_channels, 3, padding=1))

    def load_image_encoder(self, backbone_state: Mapping[str, torch.Tensor]) -> list[str]:
        """Copy a pretrained 3D backbone's encoder (``pretrain3d.denoising.DenoisingBackbone``) into the
        image encoder: its ``stem``, ``encoder.i`` and ``downs.i`` become ``image_encoder.stem``,
        ``.stages.i`` and ``.downs.i`` for every level both have, and its ``time_mlp`` this network's
        (the pretrained stages then see the time embedding they were trained with). The architectures
        match when the first widths agree (e.g. backbone 16-32-64, MedSegDiff 16-32-64-128). Returns
        the names set; ValueError when a shape differs or nothing matches.
        """
        if self.spatial_dims != 3:
            raise ValueError("a pretrained 3D backbone initialises 3D networks only (spatial_dims 3)")
        mapping = {"stem.": "image_encoder.stem.", "time_mlp.": "time_mlp."}
        mapping.update({f"encoder.{i}.": f"image_encoder.stages.{i}." for i in range(len(self.image_encoder.stages))})
        mapping.update({f"downs.{i}.": f"image_encoder.downs.{i}." for i in range(len(self.image_encoder.downs))})
        own = self.state_dict()
        new: dict[str, torch.Tensor] = {}
        for key, value in backbone_state.items():
            prefix = next((p for p in mapping if key.startswith(p)), None)
            if prefix is None:
                continue  # the backbone's decoder and heads have no counterpart here
            target = mapping[prefix] + key[len(prefix):]
            if target not in own or own[target].shape != value.shape:
                found = "missing" if target not in own else f"shape {tuple(own[target].shape)}"
                raise ValueError(f"the pretrained backbone's {key} {tuple(value.shape)} does not fit this network's "
                                 f"{target} ({found}): use the backbone's widths for the first levels")
            new[target] = value
        if not any(k.startswith("image_encoder.stages.") for k in new):
            raise ValueError("the pretrained backbone has no encoder stage this network can take")
        self.load_state_dict(new, strict=False)
        return sorted(new)

    def forward(self, x_t: torch.Tensor, image: torch.Tensor, timesteps: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, L, *S), image (B, C, *S) or (U, C, *S) with ``image_index``, timesteps (B,) -> (B, L, *S).

        ``image_index`` (B,) long: item b's image is image[image_index[b]], so the N samples of one
        slice pass their image once. The image branch depends on the image and t alone until the
        first dynamic conditional encoding mixes the mask in, so up to there it runs once per image,
        not once per item (items of one image must then share t). Same numbers either way.
        """
        temb = self.time_mlp(timestep_embedding(timesteps, self.base_channels).to(x_t.dtype))
        temb_image = temb
        if image_index is not None:
            # One item of each image (any: they must share t, which the check below enforces).
            first = torch.zeros(image.shape[0], dtype=torch.long, device=image_index.device)
            first.scatter_(0, image_index, torch.arange(len(image_index), device=image_index.device))
            if not torch.equal(timesteps, timesteps[first][image_index]):
                raise ValueError("items that share an image must share a timestep")
            temb_image = temb[first]

        def per_item(h: torch.Tensor) -> torch.Tensor:
            return h if image_index is None else h[image_index]

        h_img = self.image_encoder.stem(image)
        h_msk = self.mask_encoder.stem(x_t)
        shared = image_index is not None  # h_img is still per image (U, ...), not per item (B, ...)
        skips = []
        for i in range(len(self.image_encoder.stages)):
            h_img = self.image_encoder.stages[i](h_img, temb_image if shared else temb)
            h_msk = self.mask_encoder.stages[i](h_msk, temb)
            if str(i) in self.dynamic:
                if shared:  # the mask enters the image branch here: one copy per item from now on
                    h_img, shared = per_item(h_img), False
                h_img = self.dynamic[str(i)](h_img, h_msk)
            skips.append(self.ff_parsers[i]((per_item(h_img) if shared else h_img) + h_msk))
            h_img = self.image_encoder.downs[i](h_img)
            h_msk = self.mask_encoder.downs[i](h_msk)
        if shared:
            h_img = per_item(h_img)
        h = self.bottleneck(h_img + h_msk, temb)  # the two encoders meet before the last stage
        for i in reversed(range(len(skips))):
            h = upsample_conv(h, self.up_convs[i], skips[i].shape[2:])  # nearest upsampling, then the conv
            h = self.decoder[i](torch.cat([h, skips[i]], dim=1), temb)
        return self.out(h)
