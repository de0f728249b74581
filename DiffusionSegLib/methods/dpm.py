"""Conditional denoising diffusion on masks, shared by the diffusion methods (MedSegDiff, vanilla DPM).

The objective is the plain MSE to the card's prediction target at a uniformly drawn timestep; N masks
are drawn by N chains of the owned DDIM / DDPM sampler (``methods.diffusion``). A method of this
family differs only in its network, so a subclass only says how to build it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from DiffusionSegLib.core.enums import Sampler
from DiffusionSegLib.methods.base import ProgressFn, SamplingPlan, SegmentationMethod

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard


class ConditionalDPM(SegmentationMethod):
    """net(x_t (B,L,*S), image (B,C,*S), t (B,)) -> prediction (B,L,*S) of the card's prediction_type."""

    draws_samples = True

    def prepare_training(self, card: "ModelCard") -> Any:
        from DiffusionSegLib.methods.diffusion import make_scheduler

        return make_scheduler(card)

    def training_loss(self, net: "torch.nn.Module", state: Any, image: "torch.Tensor", mask: "torch.Tensor",
                      generator: "torch.Generator") -> "torch.Tensor":
        from DiffusionSegLib.methods.diffusion import diffusion_loss

        return diffusion_loss(net, state, image, mask, generator=generator)

    def timestep_loss(self, net: "torch.nn.Module", state: Any, image: "torch.Tensor", mask: "torch.Tensor",
                      timesteps: "torch.Tensor", noise: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch.nn.functional as F

        from DiffusionSegLib.methods.diffusion import mask_to_signal, predicted_x0_and_noise, training_target

        x0 = mask_to_signal(mask)
        x_t = state.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        prediction = net(x_t, image, timesteps)
        loss = F.mse_loss(prediction.float(), training_target(state, x0, noise, timesteps))
        alpha = state.alphas_cumprod.to(x0.device)[timesteps].view((-1,) + (1,) * (x0.dim() - 1)).float()
        estimate, _ = predicted_x0_and_noise(prediction.detach().float(), x_t, alpha, state.prediction_type)
        return loss, estimate

    def plan(self, card: "ModelCard", samples: int | None, steps: int | None,
             sampler: Sampler | None) -> SamplingPlan:
        chosen = Sampler(sampler or card.default_sampler)
        if steps is None:  # DDPM's reference is its full chain; DDIM's default is the card's short chain
            steps = card.num_train_timesteps if chosen == Sampler.DDPM else card.default_steps
        return SamplingPlan(card.default_samples if samples is None else samples, steps, chosen)

    def sample(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor", plan: SamplingPlan,
               seed: int = 0, batch_size: int | None = None, amp: bool = False,
               progress: ProgressFn | None = None) -> "torch.Tensor":
        from DiffusionSegLib.methods.diffusion import sample_masks

        return sample_masks(net, card, images, n_samples=plan.samples, steps=plan.steps, sampler=plan.sampler.value,
                            seed=seed, batch_size=batch_size, amp=amp, progress=progress, binary=True)

    def example_call(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor",
                     image_index: "torch.Tensor | None" = None) -> "torch.Tensor":
        """One denoiser call at the noisiest step, on noise from a fixed generator; with
        ``image_index`` (k,), item j's image is images[image_index[j]] (the sampler's call)."""
        import torch

        k = images.shape[0] if image_index is None else image_index.shape[0]
        noise = torch.randn((k, card.out_channels, *images.shape[2:]),
                            generator=torch.Generator("cpu").manual_seed(0)).to(images.device)
        t = torch.full((k,), card.num_train_timesteps - 1, device=images.device, dtype=torch.long)
        if image_index is None:
            return net(noise, images, t)
        return net(noise, images, t, image_index=image_index)

    def item_seconds(self, net: "torch.nn.Module", card: "ModelCard", items: "torch.Tensor", plan: SamplingPlan,
                     timed: Callable[[Callable[[], Any]], tuple[Any, float]]) -> float:
        """Timed as the sampler calls the network: when it takes ``image_index``, the k items are
        the N samples of ceil(k / N) slices, each slice's image passed once (items[j] is slice j)."""
        import torch

        if not getattr(net, "takes_image_index", False):
            return super().item_seconds(net, card, items, plan, timed)
        index = torch.arange(items.shape[0], device=items.device) // plan.samples
        images = items[: int(index[-1]) + 1]
        return timed(lambda: self.example_call(net, card, images, index))[1] / items.shape[0]
