"""DiffSeg's two x0 denoisers of the IMAGE (not of a mask): one for lesion images, one for healthy ones.

``shared=True`` (the default): one MONAI ``DiffusionModelUNet`` with a learnt class embedding (0 =
healthy, 1 = lesion) added to its timestep embedding, so the two denoisers share every weight but
that embedding. Why: away from a lesion both must return the same anatomy; two separately trained
networks each make their own reconstruction errors there, and those errors show up in the
difference as false lesions. ``shared=False``: two independent UNets (the literal "two models").
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

HEALTHY, LESION = 0, 1


class DiffusionDifferenceNet(nn.Module):
    """net(x_t (B,C,*S), t (B,), classes (B,) in {0 healthy, 1 lesion}) -> x0 estimate (B,C,*S)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,  # the card's label count (1: lesion); the denoisers output the image
        channels: Sequence[int] = (32, 64, 64, 128),
        num_res_blocks: int = 1,
        num_head_channels: int = 8,
        norm_num_groups: int = 8,
        shared: bool = True,
    ):
        super().__init__()
        del out_channels  # the mask comes from the difference, not from a network output
        channels = [int(c) for c in channels]
        self.size_divisor = 2 ** (len(channels) - 1)
        self.shared = bool(shared)

        def unet(num_class_embeds: int | None) -> DiffusionModelUNet:
            # No attention in the levels (costly at full resolution on a CPU); MONAI's middle block
            # keeps one self-attention at the lowest resolution.
            return DiffusionModelUNet(
                spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels, channels=channels,
                attention_levels=[False] * len(channels), num_res_blocks=num_res_blocks,
                num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
                num_class_embeds=num_class_embeds,
            )

        if self.shared:
            self.unet = unet(2)
        else:
            self.healthy = unet(None)
            self.lesion = unet(None)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """x_t: (B, C, *S) noisy image in [-1, 1] units, timesteps (B,) long, classes (B,) long -> (B, C, *S)."""
        if self.shared:
            return self.unet(x_t, timesteps, class_labels=classes.long())
        out = torch.empty_like(x_t)
        for value, net in ((HEALTHY, self.healthy), (LESION, self.lesion)):
            chosen = classes == value
            if bool(chosen.any()):
                out[chosen] = net(x_t[chosen], timesteps[chosen]).to(out.dtype)
        return out
