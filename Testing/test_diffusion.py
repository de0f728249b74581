"""Scheduler integration: loss targets and the sampler, checked with an oracle denoiser.

The oracle knows the clean mask (it is passed as the "image") and returns the exact target of
the prediction type, so a correct sampler must return exactly that mask for every type.
"""

import pytest
import torch

from DiffusionSegLib.diffusion import diffusion_loss, make_scheduler, mask_to_signal, sample_masks
from DiffusionSegLib.modelcard import LabelInfo, ModelCard


class OracleDenoiser(torch.nn.Module):
    """Predicts the exact epsilon / x0 / v for x_t given the clean signal as the condition."""

    size_divisor = 1

    def __init__(self, card: ModelCard):
        super().__init__()
        self.kind = card.prediction_type
        self.alphas_cumprod = make_scheduler(card, "ddpm").alphas_cumprod

    def forward(self, x_t, image, t):
        x0 = image
        ab = self.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        if self.kind == "epsilon":
            return eps
        if self.kind == "sample":
            return x0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def _card(kind: str) -> ModelCard:
    return ModelCard(name="oracle", prediction_type=kind, labels=[LabelInfo("a"), LabelInfo("b")])


def _masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand((3, 2, 8, 6), generator=g) > 0.5).float()  # (B, L, H, W), non-square


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_loss_is_zero_for_the_exact_target(kind):
    card = _card(kind)
    masks = _masks()
    loss = diffusion_loss(OracleDenoiser(card), make_scheduler(card), mask_to_signal(masks), masks,
                          generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("ddim", 1), ("ddpm", 1000)])
def test_sampler_recovers_the_mask_for_each_prediction_type(kind, sampler, steps):
    card = _card(kind)
    masks = _masks()
    out = sample_masks(OracleDenoiser(card), card, mask_to_signal(masks), n_samples=2, steps=steps,
                       sampler=sampler, seed=3)
    assert out.shape == (2, 3, 2, 8, 6)
    assert torch.equal((out > 0.5).float(), masks.expand(2, -1, -1, -1, -1))


class NoisyDenoiser(torch.nn.Module):
    """A fixed random function of its inputs, so different noise gives different outputs."""

    size_divisor = 1

    def forward(self, x_t, image, t):
        return torch.tanh(3 * x_t + image.mean() + t.float().view(-1, 1, 1, 1) / 1000)


def test_same_seed_same_output_whatever_the_batch_size():
    card = _card("sample")
    images = torch.zeros((3, 1, 8, 8))
    a = sample_masks(NoisyDenoiser(), card, images, n_samples=4, steps=4, seed=7, batch_size=5)
    b = sample_masks(NoisyDenoiser(), card, images, n_samples=4, steps=4, seed=7, batch_size=1)
    c = sample_masks(NoisyDenoiser(), card, images, n_samples=4, steps=4, seed=8, batch_size=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddpm_is_deterministic_for_a_seed():
    card = ModelCard(name="t", prediction_type="sample", num_train_timesteps=50)
    images = torch.zeros((2, 1, 4, 4))
    a = sample_masks(NoisyDenoiser(), card, images, n_samples=2, steps=50, sampler="ddpm", seed=1)
    b = sample_masks(NoisyDenoiser(), card, images, n_samples=2, steps=50, sampler="ddpm", seed=1)
    assert torch.equal(a, b)


def test_bad_settings_are_rejected():
    card = _card("sample")
    with pytest.raises(ValueError):
        sample_masks(NoisyDenoiser(), card, torch.zeros((1, 1, 4, 4)), n_samples=0, steps=5)
    with pytest.raises(ValueError):
        sample_masks(NoisyDenoiser(), card, torch.zeros((1, 1, 4, 4)), n_samples=1, steps=5000)
    with pytest.raises(ValueError):
        make_scheduler(ModelCard(name="x", prediction_type="noise"))
