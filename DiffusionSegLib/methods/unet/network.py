"""Supervised baseline: MONAI ``UNet`` trained with Dice + binary cross-entropy.

Not a diffusion model. The network maps the image straight to one logit map per label::

    net(image) -> logits
      image:  (B, C, *spatial)  normalized image, C = input channels
      logits: (B, L, *spatial)  one independent sigmoid channel per label (labels may overlap,
                                as the diffusion models' channels may)

Inference is one forward pass, sigmoid > 0.5 (``predict_supervised``, a single "sample"), so the
ensemble outputs of a UNet model are trivial: consistency = the mask,
ambiguity empty, sample diversity 0, probability map binary (its sigmoid map exists, see
``predict_probability``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from torch import nn


class SupervisedUNet(nn.Module):
    """net(image (B,C,*S)) -> logits (B,L,*S): MONAI UNet, stride 2 between levels, residual units.

    ``size_divisor`` = 2 ** (levels - 1), like the diffusion networks of the same depth.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 96, 160),
        num_res_units: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels")
        self.size_divisor = 2 ** (len(channels) - 1)
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=[2] * (len(channels) - 1),
            num_res_units=num_res_units,
            norm=norm,
            dropout=dropout,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, C, *S) -> logits (B, L, *S)."""
        return self.unet(image)


_DICE = DiceLoss(sigmoid=True, batch=True)


def supervised_loss(net: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice + binary cross-entropy of the logits against a {0, 1} mask (equal weights).

    image (B, C, *S), mask (B, L, *S). Dice is computed over the whole batch per label
    (``batch=True``), so a batch item without foreground does not produce a 0/0 Dice; BCE is
    per voxel and label (sigmoid channels, not a softmax: labels are independent binary maps).
    """
    logits = net(image).float()
    target = mask.float()
    return _DICE(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def predict_supervised(net: nn.Module, images: torch.Tensor, batch_size: int | None = None, amp: bool = False,
                       progress: Callable[[int, int], None] | None = None, binary: bool = False,
                       window: tuple[int, ...] | None = None, overlap: float = 0.5) -> torch.Tensor:
    """One forward pass per image, sigmoid: the supervised counterpart of ``diffusion.sample_masks``.

    images: (B, C, *spatial) on the network's device. Deterministic (no noise, no seed).
    Returns (1, B, L, *spatial) float32 probabilities in [0, 1] on the CPU: the layout of
    ``sample_masks`` with a single "sample" (threshold at 0.5 for the mask). Chunks of
    ``batch_size`` images (from free memory when None), halved on out-of-memory. A 3D image larger
    than ``window`` goes through in windows overlapping by ``overlap``.
    """
    from DiffusionSegLib.core.device import (activation_bytes, auto_batch_size, autocast, for_each_chunk,
                                             keep_freed_memory_for_reuse)
    from DiffusionSegLib.methods.windows import in_windows

    device = images.device
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    b = images.shape[0]
    if batch_size is None:
        # Activation estimate like the diffusion sampler's: pixels x widest level x 4 bytes x safety factor.
        batch_size = auto_batch_size(device, activation_bytes(images.shape[2:], getattr(net.unet, "channels", None)),
                                     cap=64 if device.type != "cpu" else 32)
    chunks: list[torch.Tensor] = []

    def predict_chunk(start: int, stop: int, chunk: int, n_chunks: int) -> None:
        with autocast(device, amp):
            # A volume larger than ``window`` (the 3D training crop) goes through in crop-sized windows.
            logits = in_windows(net, images[start:stop], window, stop - start, overlap)
        probability = torch.sigmoid(logits.float()).cpu()
        chunks.append((probability > 0.5).to(torch.uint8) if binary else probability)
        if progress is not None:
            progress(stop, b)

    with torch.inference_mode():
        for_each_chunk(b, batch_size, predict_chunk)
    return torch.cat(chunks)[None]
