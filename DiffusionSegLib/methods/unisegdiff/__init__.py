"""UniSegDiff: staged diffusion with stage-dependent targets and a segmentation-pretrained image encoder.

Re-derived from the abstract (the code and full paper are not available here); every choice is a
key of ``card.method_settings`` (``stages.UniSegDiffSettings``):

- **Encoder pretraining**: the first ``encoder_pretrain_steps`` optimizer steps of a run train only
  the image encoder and its segmentation head, as a plain segmentation network (Dice + BCE). Then the
  diffusion objective starts; the encoder is ``frozen`` or fine-tuned at ``encoder_lr_scale`` x the
  learning rate with its segmentation loss kept (``prior_loss_weight``).
- **Staged training**: t falls in one of the ``stages``; each has its own target (x0, epsilon, v, or
  the residual to the encoder's prior) and loss weight.
- **Staged inference** (``sampling.sample_staged``): one shared coarse x0 jump per image, then per
  sample ``steps`` denoiser calls from ``branch_t`` down, stochastic where the stage's eta > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from DiffusionSegLib.core.enums import Sampler
from DiffusionSegLib.methods.base import ProgressFn, SamplingPlan, SegmentationMethod

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.methods.unisegdiff.stages import UniSegDiffSettings
    from DiffusionSegLib.models.card import ModelCard


@dataclass
class Objective:
    """Training state: the settings, the noise schedule and the step the loop is at."""

    settings: "UniSegDiffSettings"
    alphas_cumprod: "torch.Tensor"
    num_train_timesteps: int
    step: int = 0

    @property
    def pretraining(self) -> bool:
        return self.step < self.settings.encoder_pretrain_steps


class UniSegDiff(SegmentationMethod):
    name = "unisegdiff"
    title = "UniSegDiff"
    draws_samples = True

    def network_class(self) -> type:
        from DiffusionSegLib.methods.unisegdiff.network import UniSegDiffNet

        return UniSegDiffNet

    # -- training -------------------------------------------------------------------------------

    def prepare_training(self, card: "ModelCard") -> Objective:
        from DiffusionSegLib.methods.diffusion import make_scheduler
        from DiffusionSegLib.methods.unisegdiff.stages import UniSegDiffSettings

        settings = UniSegDiffSettings.of(card)
        # The card says every setting it was trained with (idempotent: the same settings, spelled out).
        card.method_settings = settings.record()
        return Objective(settings, make_scheduler(card).alphas_cumprod.float(), card.num_train_timesteps)

    def parameter_groups(self, net: "torch.nn.Module") -> list[list["torch.nn.Parameter"]]:
        """[the encoder (with its segmentation head), the denoiser]."""
        encoder = {id(p) for p in net.encoder.parameters()}
        return [list(net.encoder.parameters()), [p for p in net.parameters() if id(p) not in encoder]]

    def start_step(self, state: Objective, step: int) -> Sequence[float]:
        from DiffusionSegLib.methods.unisegdiff.stages import EncoderTraining

        state.step = step
        if state.pretraining:
            return [1.0, 0.0]
        frozen = state.settings.encoder_training == EncoderTraining.FROZEN
        return [0.0 if frozen else state.settings.encoder_lr_scale, 1.0]

    def training_loss(self, net: "torch.nn.Module", state: Objective, image: "torch.Tensor", mask: "torch.Tensor",
                      generator: "torch.Generator") -> "torch.Tensor":
        """Pretraining: Dice + BCE of the encoder's prior. Then: the stage-weighted mean squared error of
        each item's stage target, plus ``prior_loss_weight`` x the prior's loss while the encoder trains."""
        import torch

        from DiffusionSegLib.methods.diffusion import mask_to_signal
        from DiffusionSegLib.methods.unisegdiff.stages import EncoderTraining, draw_timesteps, segmentation_loss

        settings = state.settings
        if state.pretraining:
            return segmentation_loss(net.encode(image).prior_logits, mask)
        x0 = mask_to_signal(mask)
        t = draw_timesteps(settings, x0.shape[0], state.num_train_timesteps, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device)
        frozen = settings.encoder_training == EncoderTraining.FROZEN
        loss, _, logits = self._staged_loss(net, state, image, x0, t, noise, encoder_grad=not frozen)
        if not frozen and settings.prior_loss_weight > 0:
            loss = loss + settings.prior_loss_weight * segmentation_loss(logits, mask)
        return loss

    @staticmethod
    def _staged_loss(net: "torch.nn.Module", state: Objective, image: "torch.Tensor", x0: "torch.Tensor",
                     t: "torch.Tensor", noise: "torch.Tensor", encoder_grad: bool = True):
        """(stage-weighted loss, x0 estimate, prior logits) of one denoising pass."""
        import torch

        from DiffusionSegLib.methods.unisegdiff.stages import staged_errors

        settings = state.settings
        errors, estimate, logits = staged_errors(net, settings, state.alphas_cumprod, image, x0, t, noise, encoder_grad)
        weights = torch.tensor([s.weight for s in settings.stages], device=x0.device)[settings.stage_index(t)]
        return (weights * errors).mean(), estimate, logits

    def timestep_loss(self, net: "torch.nn.Module", state: Objective, image: "torch.Tensor", mask: "torch.Tensor",
                      timesteps: "torch.Tensor", noise: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        from DiffusionSegLib.methods.diffusion import mask_to_signal

        loss, estimate, _ = self._staged_loss(net, state, image, mask_to_signal(mask), timesteps, noise)
        return loss, estimate

    # -- inference ------------------------------------------------------------------------------

    def plan(self, card: "ModelCard", samples: int | None, steps: int | None,
             sampler: Sampler | None) -> SamplingPlan:
        """``steps`` denoiser calls per sample below the coarse jump (SettingsError beyond the chain's length)."""
        from DiffusionSegLib.core.errors import SettingsError
        from DiffusionSegLib.methods.unisegdiff.sampling import network_evaluations
        from DiffusionSegLib.methods.unisegdiff.stages import UniSegDiffSettings

        settings = UniSegDiffSettings.of(card)
        samples = card.default_samples if samples is None else samples
        steps = card.default_steps if steps is None else steps
        longest = settings.chain_start(card.num_train_timesteps)[1] + 1
        if steps > longest:
            raise SettingsError(f"steps ({steps}) cannot exceed {longest} for model '{card.name}': its staged chain "
                                f"starts at t = {longest - 1}")
        fewest = settings.fewest_steps(card.num_train_timesteps)
        if steps < fewest:
            # A stage the chain skips never applies its target (the refinement's residual): on the organ
            # model's validation slab 5 x 2 gave mean Dice 0.54 against 0.92 at 5 x 3 (docs/BENCHMARKS.md).
            raise SettingsError(f"steps ({steps}) must be at least {fewest} for model '{card.name}': with fewer, "
                                f"its staged chain skips a stage")
        note = ""
        if sampler is not None and Sampler(sampler) != Sampler.DDIM:
            note = (f"model '{card.name}' ({self.title}) walks its own staged chain (stochastic only in its "
                    f"stochastic stages); sampler '{sampler}' is not used")
        return SamplingPlan(samples, steps, Sampler.DDIM, note,
                            evaluations_per_sample=network_evaluations(settings, card, samples, steps))

    def target_description(self, card: "ModelCard") -> str:
        from DiffusionSegLib.methods.unisegdiff.stages import UniSegDiffSettings

        stages = sorted(UniSegDiffSettings.of(card).stages, key=lambda s: -s.t_high)
        return "staged: " + ", ".join(f"{s.name} (t {s.t_low}-{s.t_high - 1}) {s.target.value}" for s in stages)

    def sample(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor", plan: SamplingPlan,
               seed: int = 0, batch_size: int | None = None, amp: bool = False,
               progress: ProgressFn | None = None) -> "torch.Tensor":
        from DiffusionSegLib.methods.unisegdiff.sampling import sample_staged

        return sample_staged(net, card, images, plan.samples, plan.steps, seed=seed, batch_size=batch_size, amp=amp,
                             progress=progress)

    def example_call(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor") -> "torch.Tensor":
        """The encoder and one denoiser call at the noisiest step on ``images`` (k, C, *spatial), in the
        windows a run would use."""
        from DiffusionSegLib.methods.unisegdiff.sampling import Encoded, window_grid

        encoded = Encoded.of(net, images, window_grid(card, tuple(images.shape[2:])))
        return self._denoise_once(net, card, images, encoded)

    @staticmethod
    def _denoise_once(net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor",
                      encoded: Any) -> "torch.Tensor":
        import torch

        noise = torch.randn((images.shape[0], card.out_channels, *images.shape[2:]),
                            generator=torch.Generator("cpu").manual_seed(0)).to(images.device)
        t = torch.full((images.shape[0],), card.num_train_timesteps - 1, device=images.device, dtype=torch.long)
        return encoded.denoise(net, noise, t)

    def item_seconds(self, net: "torch.nn.Module", card: "ModelCard", items: "torch.Tensor", plan: SamplingPlan,
                     timed: Callable[[Callable[[], Any]], tuple[Any, float]]) -> float:
        """The sampler runs the encoder once per image and the denoiser ``nfe_per_sample`` times per
        sample (the steps plus a share of the coarse jump): both timed (in the run's windows), spread over
        the samples x steps evaluations the estimate counts per image."""
        from DiffusionSegLib.methods.unisegdiff.sampling import Encoded, window_grid

        k, grid = items.shape[0], window_grid(card, tuple(items.shape[2:]))
        encoded, encode_s = timed(lambda: Encoded.of(net, items, grid))
        _, denoise_s = timed(lambda: self._denoise_once(net, card, items, encoded))
        per_image = encode_s / k + denoise_s / k * plan.nfe_per_sample * plan.samples
        return per_image / (plan.samples * plan.steps)


METHOD = UniSegDiff()
