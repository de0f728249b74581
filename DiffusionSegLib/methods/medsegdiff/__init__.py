"""MedSegDiff (Wu et al. 2023): conditional DPM with dynamic conditional encoding and the FF-Parser.

The network (``network.MedSegDiffUNet``) fuses the image encoder's features with the noisy mask's at
every level (dynamic conditional encoding) and filters them in Fourier space (FF-Parser).
"""

from __future__ import annotations

from DiffusionSegLib.methods.dpm import ConditionalDPM


class MedSegDiff(ConditionalDPM):
    name = "medsegdiff"
    title = "MedSegDiff"

    def network_class(self) -> type:
        from DiffusionSegLib.methods.medsegdiff.network import MedSegDiffUNet

        return MedSegDiffUNet


METHOD = MedSegDiff()
