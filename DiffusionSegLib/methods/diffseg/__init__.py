"""DiffSeg (Shuai et al.): weakly supervised lesion masks from the difference of two diffusion denoisers.

Training reads image-level labels only (``training.weak_labels``: lesion / healthy per image or
slice, never a mask). Both denoisers predict the clean image x0 from x_t: the lesion one learns
lesion images, the healthy one healthy images. Why healthy images and not "lesion -> healthy"
pairs: with image-level labels there is no healthy version of a lesion image to learn the mapping
from; a denoiser that has never seen a lesion replaces one by the anatomy it expects, which is the
mapping wanted. At inference (``difference``) an image is noised to t_k, denoised by both, and the
lesion is where they differ; N noise levels (60..150 of 1000 by default) and seeds give N masks.
The published DenseCRF protocol fuses them by default (the card's ``default_crf``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from DiffusionSegLib.core.enums import CrfMode, Sampler, Supervision
from DiffusionSegLib.methods.base import ProgressFn, SamplingPlan, SegmentationMethod

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard


class DiffSeg(SegmentationMethod):
    name = "diffseg"
    title = "DiffSeg"
    draws_samples = True
    supervision = Supervision.IMAGE_LABELS

    def network_class(self) -> type:
        from DiffusionSegLib.methods.diffseg.network import DiffusionDifferenceNet

        return DiffusionDifferenceNet

    # -- training -------------------------------------------------------------------------------

    def prepare_training(self, card: "ModelCard") -> Any:
        """(noise schedule, highest training t); refuses an unbounded normalization (x0 lives in [-1, 1])."""
        from DiffusionSegLib.core.errors import DiffusionSegError
        from DiffusionSegLib.methods.diffseg.difference import BOUNDED_NORMALIZATIONS, DiffSegSettings
        from DiffusionSegLib.methods.diffusion import make_scheduler

        kind = (card.normalization or {}).get("kind")
        if kind not in BOUNDED_NORMALIZATIONS:
            raise DiffusionSegError(f"DiffSeg denoises images in [-1, 1]: use a normalization of kind "
                                    f"{', '.join(BOUNDED_NORMALIZATIONS)} (the card says {kind!r})")
        return make_scheduler(card), DiffSegSettings.from_card(card).train_t_max

    def training_loss(self, net: "torch.nn.Module", state: Any, image: "torch.Tensor", target: "torch.Tensor",
                      generator: "torch.Generator") -> "torch.Tensor":
        """x0 MSE of the denoiser of each item's class: image (B, C, *S) in [-1, 1], target (B,) class labels."""
        import torch
        import torch.nn.functional as F

        scheduler, t_max = state
        b = image.shape[0]
        t = torch.randint(0, t_max, (b,), generator=generator, device="cpu").to(image.device)
        noise = torch.randn(image.shape, generator=generator, device="cpu").to(image.device)
        x_t = scheduler.add_noise(original_samples=image, noise=noise, timesteps=t)
        return F.mse_loss(net(x_t, t, target.long()).float(), image.float())

    def card_defaults(self, default_samples: int, default_steps: int) -> dict[str, Any]:
        # One x0 jump per output is the method (a longer chain per output is a run-time choice: --steps).
        # The published DenseCRF fusion (K = 3 rounds on means of H = 4 random outputs) is part of the method.
        return {**super().card_defaults(default_samples, 1), "default_crf": CrfMode.PUBLISHED.value}

    def calibrate(self, net: "torch.nn.Module", card: "ModelCard", healthy_images: "torch.Tensor") -> None:
        """Measure the healthy threshold table on held-out healthy slices into ``card.method_settings``."""
        from DiffusionSegLib.methods.diffseg.difference import DiffSegSettings, calibrate

        settings = DiffSegSettings.from_card(card)
        settings.healthy_thresholds = calibrate(net, card, healthy_images, settings.healthy_quantile)
        card.method_settings = settings.as_dict()

    # -- inference ------------------------------------------------------------------------------

    def plan(self, card: "ModelCard", samples: int | None, steps: int | None,
             sampler: Sampler | None) -> SamplingPlan:
        note = ""
        if sampler is not None and Sampler(sampler) != Sampler.DDIM:
            note = f"model '{card.name}' ({self.title}) denoises deterministically from each noise level (DDIM)"
        return SamplingPlan(card.default_samples if samples is None else samples,
                            card.default_steps if steps is None else steps, Sampler.DDIM, note)

    def sample(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor", plan: SamplingPlan,
               seed: int = 0, batch_size: int | None = None, amp: bool = False,
               progress: ProgressFn | None = None) -> "torch.Tensor":
        from DiffusionSegLib.methods.diffseg.difference import (DiffSegSettings, difference_maps, output_timesteps,
                                                                threshold_maps)

        if card.spatial_dims != 2 or card.out_channels != 1:
            raise ValueError("DiffSeg models are 2D with one output label (lesion)")
        settings = DiffSegSettings.from_card(card)
        timesteps = output_timesteps(settings.noise_levels, plan.samples)
        differences = difference_maps(net, card, images, timesteps, steps=plan.steps, seed=seed,
                                      batch_size=batch_size, amp=amp, progress=progress)
        return threshold_maps(differences, timesteps, settings)

    def item_bytes(self, card: "ModelCard", spatial: tuple[int, ...]) -> int:
        return 2 * super().item_bytes(card, spatial)  # the healthy and the lesion pass

    def example_call(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor") -> "torch.Tensor":
        """Both denoisers on ``images`` at the middle noise level: one output step."""
        import torch

        from DiffusionSegLib.methods.diffseg.difference import DiffSegSettings, output_timesteps

        k = images.shape[0]
        t = output_timesteps(DiffSegSettings.from_card(card).noise_levels, 1)[0]
        classes = torch.cat([torch.zeros(k), torch.ones(k)]).long().to(images.device)
        timesteps = torch.full((2 * k,), t, device=images.device, dtype=torch.long)
        return net(torch.cat([images, images]), timesteps, classes)


METHOD = DiffSeg()
