"""Vanilla conditional DPM: the image concatenated to the noisy mask, a plain diffusion UNet (baseline)."""

from __future__ import annotations

from DiffusionSegLib.methods.dpm import ConditionalDPM


class VanillaDPM(ConditionalDPM):
    name = "vanilla_dpm"
    title = "Vanilla conditional DPM"

    def network_class(self) -> type:
        from DiffusionSegLib.methods.vanilla_dpm.network import VanillaConditionalDPM

        return VanillaConditionalDPM


METHOD = VanillaDPM()
