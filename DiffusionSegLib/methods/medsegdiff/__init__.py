"""MedSegDiff (Wu et al. 2023): conditional DPM with dynamic conditional encoding and the FF-Parser.

The network (``network.MedSegDiffUNet``) fuses the image encoder's features with the noisy mask's at
every level (dynamic conditional encoding) and filters them in Fourier space (FF-Parser).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from DiffusionSegLib.methods.dpm import ConditionalDPM

if TYPE_CHECKING:  # pragma: no cover
    import torch


class MedSegDiff(ConditionalDPM):
    name = "medsegdiff"
    title = "MedSegDiff"

    def network_class(self) -> type:
        from DiffusionSegLib.methods.medsegdiff.network import MedSegDiffUNet

        return MedSegDiffUNet

    def load_pretrained_encoder(self, net: "torch.nn.Module", backbone: "torch.nn.Module") -> list[str]:
        """The backbone's stem, encoder stages and downsamplings (and its time embedding) become the
        image encoder's; see ``MedSegDiffUNet.load_image_encoder``."""
        return net.load_image_encoder(backbone.state_dict())


METHOD = MedSegDiff()
