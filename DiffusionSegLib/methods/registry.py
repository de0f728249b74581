"""Denoising networks for segmentation diffusion (no files, no Slicer here).

Every network has the same call signature, so the sampler does not care which one it runs::

    net(x_t, image, timesteps) -> prediction
      x_t:       (B, L, *spatial)  noisy mask, labels scaled to [-1, 1], L = number of labels
      image:     (B, C, *spatial)  normalized image (the condition), C = input channels
      timesteps: (B,) long         diffusion step of each item
      returns    (B, L, *spatial)  the target of the card's prediction_type (epsilon, x0, v)

and an attribute ``size_divisor`` (int): spatial sizes must be multiples of it (the
preprocessing pads to it). ``spatial`` is (H, W) for spatial_dims=2 and (D, H, W) for 3.

Supervised methods (``SUPERVISED_METHODS``, network attribute ``is_diffusion = False``) are not
denoisers: ``net(image) -> logits`` (B, L, *spatial); inference and validation run them once with a
sigmoid (``networks.unet.predict_supervised``), and training uses their own loss (see ``networks.unet``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard

METHODS = ("medsegdiff", "vanilla_dpm", "unet")
SUPERVISED_METHODS = ("unet",)


def is_diffusion_method(method: str) -> bool:
    """True for the diffusion methods (sampled masks), False for supervised ones (one forward pass)."""
    return method not in SUPERVISED_METHODS


def build_network(card: "ModelCard") -> "torch.nn.Module":
    """Build the network the card describes (``card.method``; kwargs in ``card.network``)."""
    if card.method == "medsegdiff":
        from DiffusionSegLib.methods.medsegdiff.network import MedSegDiffUNet

        return MedSegDiffUNet(
            spatial_dims=card.spatial_dims,
            in_channels=card.in_channels,
            out_channels=card.out_channels,
            **card.network,
        )
    if card.method == "vanilla_dpm":
        from DiffusionSegLib.methods.vanilla_dpm.network import VanillaConditionalDPM

        return VanillaConditionalDPM(
            spatial_dims=card.spatial_dims,
            in_channels=card.in_channels,
            out_channels=card.out_channels,
            **card.network,
        )
    if card.method == "unet":
        from DiffusionSegLib.methods.unet.network import SupervisedUNet

        return SupervisedUNet(
            spatial_dims=card.spatial_dims,
            in_channels=card.in_channels,
            out_channels=card.out_channels,
            **card.network,
        )
    raise ValueError(f"unknown method '{card.method}' (known: {', '.join(METHODS)})")
