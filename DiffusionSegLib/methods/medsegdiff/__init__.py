"""MedSegDiff (Wu et al. 2023): conditional DPM with dynamic conditional encoding and the FF-Parser.

The network (``network.MedSegDiffUNet``) fuses the image encoder's features with the noisy mask's at
every level (dynamic conditional encoding) and filters them in Fourier space (FF-Parser).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from DiffusionSegLib.methods.dpm import ConditionalDPM

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard


class MedSegDiff(ConditionalDPM):
    name = "medsegdiff"
    title = "MedSegDiff"

    def build_network(self, card: "ModelCard") -> "torch.nn.Module":
        from DiffusionSegLib.methods.medsegdiff.network import MedSegDiffUNet

        return MedSegDiffUNet(spatial_dims=card.spatial_dims, in_channels=card.in_channels,
                              out_channels=card.out_channels, **card.network)


METHOD = MedSegDiff()
