"""Vanilla conditional DPM: the image concatenated to the noisy mask, a plain diffusion UNet (baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from DiffusionSegLib.methods.dpm import ConditionalDPM

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard


class VanillaDPM(ConditionalDPM):
    name = "vanilla_dpm"
    title = "Vanilla conditional DPM"

    def build_network(self, card: "ModelCard") -> "torch.nn.Module":
        from DiffusionSegLib.methods.vanilla_dpm.network import VanillaConditionalDPM

        return VanillaConditionalDPM(spatial_dims=card.spatial_dims, in_channels=card.in_channels,
                                     out_channels=card.out_channels, **card.network)


METHOD = VanillaDPM()
