"""Supervised MONAI UNet baseline, trained with Dice + BCE: one deterministic pass, not a diffusion model.

Its "samples" are one mask: consistency equals the mask, ambiguity is empty, sample diversity is 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from DiffusionSegLib.core.enums import Sampler
from DiffusionSegLib.methods.base import ProgressFn, SamplingPlan, SegmentationMethod

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard


class SupervisedUNetMethod(SegmentationMethod):
    name = "unet"
    title = "UNet (supervised)"
    draws_samples = False

    def network_class(self) -> type:
        from DiffusionSegLib.methods.unet.network import SupervisedUNet

        return SupervisedUNet

    def training_loss(self, net: "torch.nn.Module", state: Any, image: "torch.Tensor", mask: "torch.Tensor",
                      generator: "torch.Generator") -> "torch.Tensor":
        from DiffusionSegLib.methods.unet.network import supervised_loss

        return supervised_loss(net, image, mask)

    def card_defaults(self, default_samples: int, default_steps: int) -> dict[str, Any]:
        # One deterministic "sample" of one "step": more would repeat the same mask.
        return {**super().card_defaults(1, 1), "default_sampler": Sampler.DDIM.value}

    def plan(self, card: "ModelCard", samples: int | None, steps: int | None,
             sampler: Sampler | None) -> SamplingPlan:
        asked_more = (samples or 1) > 1 or (steps or 1) > 1  # None and 1 both mean "one"
        note = f"model '{card.name}' ({self.title}) is deterministic: 1 sample, 1 forward pass" if asked_more else ""
        return SamplingPlan(1, 1, Sampler.NONE, note)

    def sample(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor", plan: SamplingPlan,
               seed: int = 0, batch_size: int | None = None, amp: bool = False,
               progress: ProgressFn | None = None) -> "torch.Tensor":
        from DiffusionSegLib.methods.unet.network import predict_supervised

        window = card.inference_window()
        return predict_supervised(net, images, batch_size, amp, progress, binary=True, window=window,
                                  overlap=card.windows_overlap())

    def example_call(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor") -> "torch.Tensor":
        return net(images)


METHOD = SupervisedUNetMethod()
