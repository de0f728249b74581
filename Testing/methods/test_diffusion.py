"""Scheduler integration: loss targets and the sampler, checked with an oracle denoiser.

The oracle knows the clean mask (it is passed as the "image") and returns the exact target of
the prediction type, so a correct sampler must return exactly that mask for every type.
"""

import pytest
import torch

from DiffusionSegLib.methods.diffusion import diffusion_loss, item_seed, make_scheduler, mask_to_signal, sample_masks
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from helpers import REPO


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


class RecordingOracle(OracleDenoiser):
    """The oracle, also recording the noise each call's input implies at the timestep it is given.

    For a clean target x0 and input x_t at timestep t, eps(t) = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t).
    A deterministic DDIM chain driven by the exact x0 keeps x_t on the line through x0 and x_T, so
    eps(t) stays x_T at every call exactly when the sample is at the noise level t names.
    """

    def __init__(self, card: ModelCard):
        super().__init__(card)
        self.implied_noise: list[torch.Tensor] = []
        self.timesteps: list[int] = []

    def forward(self, x_t, image, t):
        ab = self.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.dim() - 1)))
        self.implied_noise.append((x_t - ab.sqrt() * image) / (1 - ab).sqrt())
        self.timesteps.append(int(t[0]))
        return super().forward(x_t, image, t)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 1), ("ddim", 2), ("ddim", 3), ("ddim", 5), ("ddim", 10),
                                           ("ddpm", 1000), ("ddpm", 20)])
def test_sampler_recovers_the_mask_for_each_prediction_type(kind, sampler, steps):
    # Unthresholded: the soft output must be the clean mask itself, not merely on the right side
    # of 0.5 (a mis-paired chain still lands on the right side with an exact oracle).
    card = _card(kind)
    masks = _masks()
    out = sample_masks(OracleDenoiser(card), card, mask_to_signal(masks), n_samples=2, steps=steps,
                       sampler=sampler, seed=3)
    assert out.shape == (2, 3, 2, 8, 6)
    torch.testing.assert_close(out, masks.expand(2, -1, -1, -1, -1), atol=1e-3, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 50])
def test_every_network_call_sees_the_noise_level_of_its_timestep(steps):
    card = _card("epsilon")
    masks = _masks()
    oracle = RecordingOracle(card)
    sample_masks(oracle, card, mask_to_signal(masks), n_samples=1, steps=steps, sampler="ddim", seed=3)
    assert len(oracle.timesteps) == steps
    assert oracle.timesteps[0] == card.num_train_timesteps - 1  # x_T ~ N(0, I) is the noisiest level
    assert oracle.timesteps == sorted(set(oracle.timesteps), reverse=True)
    # item i's x_T is the first draw of its own stream, seeded from (seed, i)
    x_T = torch.stack([torch.randn((2, 8, 6), generator=torch.Generator("cpu").manual_seed(item_seed(3, i)))
                       for i in range(3)])
    first = oracle.implied_noise[0]
    # At t = T - 1, sqrt(a) x0 is small but not zero: x_T is the noisy sample, not the implied noise.
    for k, eps in enumerate(oracle.implied_noise):
        torch.testing.assert_close(eps, first, atol=2e-3, rtol=0, msg=f"call {k} at t={oracle.timesteps[k]}")
    assert torch.allclose(first, x_T, atol=0.02)


def test_timestep_list_is_trailing_and_starts_at_pure_noise():
    from DiffusionSegLib.methods.diffusion import sampling_timesteps

    assert sampling_timesteps(1000, 1) == [999]
    assert sampling_timesteps(1000, 2) == [999, 499]
    assert sampling_timesteps(1000, 5) == [999, 799, 599, 399, 199]
    assert sampling_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert sampling_timesteps(50, 3) == [49, 32, 16]  # round(50 - i * 50 / 3) - 1


class NoisyDenoiser(torch.nn.Module):
    """A fixed function of each item's inputs, so different noise gives different outputs."""

    size_divisor = 1

    def forward(self, x_t, image, t):
        return torch.tanh(3 * x_t + image.mean(dim=(1, 2, 3), keepdim=True) + t.float().view(-1, 1, 1, 1) / 1000)


def test_same_seed_same_output_whatever_the_batch_size():
    card = _card("sample")
    images = torch.zeros((3, 1, 8, 8))
    a = sample_masks(NoisyDenoiser(), card, images, n_samples=4, steps=4, seed=7, batch_size=5)
    b = sample_masks(NoisyDenoiser(), card, images, n_samples=4, steps=4, seed=7, batch_size=1)
    c = sample_masks(NoisyDenoiser(), card, images, n_samples=4, steps=4, seed=8, batch_size=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_masks_for_every_sampler_and_batch_size(sampler):
    card = ModelCard(name="t", prediction_type="sample", num_train_timesteps=50)
    images = torch.linspace(-1, 1, 3 * 16).reshape(3, 1, 4, 4)
    runs = [sample_masks(NoisyDenoiser(), card, images, n_samples=3, steps=8, sampler=sampler, seed=5, batch_size=bs)
            for bs in (9, 4, 1)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])


class SharingDenoiser(NoisyDenoiser):
    """NoisyDenoiser that takes ``image_index`` as MedSegDiff does and records each call's sizes."""

    takes_image_index = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, image, t, image_index=None):
        self.calls.append((image.shape[0], x_t.shape[0]))
        return super().forward(x_t, image if image_index is None else image[image_index], t)


@pytest.mark.parametrize("batch_size", [10, 7, None])
def test_sampler_passes_each_slice_image_once_for_its_samples(batch_size):
    """N = 5 samples of 4 slices: a chunk of 10 items holds 2 slices, whose images go in once each;
    the masks are those of one image per item."""
    card = ModelCard(name="t", prediction_type="sample", num_train_timesteps=50)
    images = torch.linspace(-1, 1, 4 * 16).reshape(4, 1, 4, 4)
    sharing = SharingDenoiser()
    shared = sample_masks(sharing, card, images, n_samples=5, steps=3, seed=2, batch_size=batch_size)
    reference = sample_masks(NoisyDenoiser(), card, images, n_samples=5, steps=3, seed=2, batch_size=1)
    assert torch.equal(shared, reference)
    chunks = sharing.calls[::3]  # one record per step; the chunk's first step
    assert sum(items for _, items in chunks) == 20
    for n_images, n_items in chunks:
        assert n_images == -(-n_items // 5) or n_images == -(-n_items // 5) + 1  # a chunk may cut a slice's samples
    if batch_size == 10:
        assert chunks == [(2, 10), (2, 10)]


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


def test_starting_noise_is_drawn_per_item_so_its_memory_is_one_chunk(monkeypatch):
    """A 100-slice CT at 5 samples held every item's x_T at once (0.6 GB); now each chunk draws its own."""
    card = _card("sample")
    masks = _masks()  # (3, 2, 8, 6)
    drawn = []
    real_randn = torch.randn

    def recording_randn(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        drawn.append(tuple(out.shape))
        return out

    reference = sample_masks(OracleDenoiser(card), card, mask_to_signal(masks), n_samples=4, steps=2, seed=5,
                             batch_size=12)
    monkeypatch.setattr(torch, "randn", recording_randn)
    chunked = sample_masks(OracleDenoiser(card), card, mask_to_signal(masks), n_samples=4, steps=2, seed=5,
                           batch_size=2)
    assert drawn and max(drawn, key=lambda s: torch.Size(s).numel()) == (2, 8, 6)  # one item's (L, H, W) at a time
    torch.testing.assert_close(chunked, reference)


@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta", "sigmoid_beta"])
def test_own_noise_schedule_equals_monais_bit_for_bit(schedule):
    """Sampling computes alpha_bar itself (no MONAI import); it must be MONAI's, which training uses."""
    from types import SimpleNamespace

    from DiffusionSegLib.methods.diffusion import alphas_cumprod, make_scheduler

    card = SimpleNamespace(num_train_timesteps=1000, beta_schedule=schedule, prediction_type="sample")
    assert torch.equal(alphas_cumprod(card), make_scheduler(card).alphas_cumprod.float())


@pytest.mark.parametrize("dim", [7, 8, 16, 32])
def test_own_timestep_embedding_equals_monais(dim):
    """The trained weights expect MONAI's embedding layout (cosines first); ours must be equal."""
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    from DiffusionSegLib.methods.blocks import timestep_embedding

    t = torch.tensor([0, 1, 17, 333, 500, 999])
    assert torch.equal(timestep_embedding(t, dim), get_timestep_embedding(t, dim))


def test_segmenting_with_the_bundled_model_imports_no_monai(tmp_path):
    """Importing MONAI costs about 2.4 s of every run; MedSegDiff and UniSegDiff inference need none of it."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, SimpleITK as sitk\n"
            "from DiffusionSegLib.pipeline.segment import segment_image\n"
            "from DiffusionSegLib.pipeline.settings import SegmentSettings\n"
            "array = np.full((2, 40, 40), -1000, np.int16)\n"
            "array[:, 10:30, 8:32] = 40  # soft tissue in air\n"
            "image = sitk.GetImageFromArray(array)\n"
            "image.SetSpacing((3.0, 3.0, 3.0))\n"
            "for model in sys.argv[1:]:\n"
            "    segment_image(image, model, SegmentSettings(samples=2, steps=3))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))\n")
    models = [str(REPO / "Resources" / "Models" / name)
              for name in ("ct_abdomen_organs_2d", "ct_abdomen_organs_unisegdiff_2d")]
    run = subprocess.run([sys.executable, "-c", code, *models], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
