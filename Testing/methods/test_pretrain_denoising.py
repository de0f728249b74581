"""Diffusion pretraining of the 3D backbone (methods/pretrain3d/denoising.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DiffusionSegLib.methods.diffusion import schedule_alphas_cumprod
from DiffusionSegLib.methods.pretrain3d import denoising
from DiffusionSegLib.methods.pretrain3d.denoising import (DenoisingBackbone, PretrainObjective, pretraining_loss,
                                                          random_crops)


class Oracle(torch.nn.Module):
    """Knows the clean crop and the noise the loss will draw: returns the exact target of each objective."""

    def __init__(self, clean, noise, kind):
        super().__init__()
        self.clean, self.noise, self.kind = clean, noise, kind

    def forward(self, x, t):
        return {"image": self.noise if self.kind == "diffusion" else self.clean,
                "coordinates": torch.zeros(self.clean.shape[0], 3, *self.clean.shape[2:])}


@pytest.mark.parametrize("kind", ["diffusion", "restorative"])
def test_the_exact_target_costs_nothing(kind):
    """The loss's noise comes from the generator: an oracle that predicts it (diffusion) or the clean
    crop (restorative) scores 0; anything else scores more."""
    clean = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    objective = PretrainObjective(kind=kind)
    g = torch.Generator().manual_seed(4)
    if kind == "diffusion":
        torch.randint(0, 1000, (2,), generator=g)  # the loss draws t first
    noise = torch.randn(clean.shape, generator=g)
    losses = pretraining_loss(Oracle(clean, noise, kind), clean, None, objective, torch.Generator().manual_seed(4))
    assert float(losses["total"]) == pytest.approx(0.0, abs=1e-12)
    wrong = pretraining_loss(Oracle(clean, -noise, kind), clean, None, objective, torch.Generator().manual_seed(4))
    assert kind == "restorative" or float(wrong["image"]) == pytest.approx(float((4 * noise ** 2).mean()), rel=1e-5)


def test_restorative_input_is_the_fixed_corruption_and_the_level_is_not_told():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, t):
            seen["x"], seen["t"] = x, t
            return {"image": torch.zeros_like(x)}

    clean = torch.full((1, 1, 4, 4, 4), 0.5)
    pretraining_loss(Recorder(), clean, None, PretrainObjective(kind="restorative", restorative_t=250),
                     torch.Generator().manual_seed(1))
    a = schedule_alphas_cumprod("linear_beta", 1000)[250]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(seen["x"], a.sqrt() * clean + (1 - a).sqrt() * noise)
    assert seen["t"].tolist() == [0]


def test_backbone_shapes_heads_and_encoder_pyramid():
    net = DenoisingBackbone((8, 16, 32), norm_groups=4, coordinate_head=True)
    out = net(torch.randn(2, 1, 8, 16, 12), torch.tensor([3, 700]))
    assert out["image"].shape == (2, 1, 8, 16, 12) and out["coordinates"].shape == (2, 3, 8, 16, 12)
    assert [f.shape[1:] for f in net.encode(torch.randn(1, 1, 8, 16, 12))] == [(8, 8, 16, 12), (16, 4, 8, 6),
                                                                                (32, 2, 4, 3)]
    assert "coordinates" not in DenoisingBackbone((8, 16), norm_groups=4)(torch.randn(1, 1, 4, 4, 4),
                                                                            torch.tensor([1]))
    with pytest.raises(ValueError, match="multiple"):
        net.encode(torch.randn(1, 1, 6, 8, 8))


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="objective"):
        PretrainObjective(kind="contrastive").check()


def test_random_crops_pad_small_volumes_with_air():
    crops = random_crops([np.zeros((4, 40, 40), np.float32)], (8, 16, 16), 3, np.random.default_rng(0))
    assert crops.shape == (3, 1, 8, 16, 16)
    assert (crops[:, :, 4:] == -1.0).all() and (crops[:, :, :4] == 0.0).all()


def test_a_probe_on_a_frozen_backbone_learns_an_intensity_labelling():
    """Two 'organs' told apart by intensity: a probe on even a random backbone separates them, the
    backbone is not changed, and the whole-volume prediction has the volume's shape."""
    from DiffusionSegLib.methods.pretrain3d.probe import dice_per_label, predict_probe, train_probe

    rng = np.random.default_rng(0)
    volume = np.full((16, 20, 24), -1.0, np.float32)
    labels = np.zeros(volume.shape, np.int64)
    volume[2:14, 3:10, 4:20], labels[2:14, 3:10, 4:20] = 0.2, 1
    volume[2:14, 12:18, 4:20], labels[2:14, 12:18, 4:20] = 0.8, 2
    volume += 0.02 * rng.standard_normal(volume.shape).astype(np.float32)
    torch.manual_seed(0)
    backbone = DenoisingBackbone((8, 16), norm_groups=4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head, losses = train_probe(backbone, [volume], [labels], classes=3, steps=80, patch=(16, 16, 16), batch=2,
                               lr=3e-2)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    prediction = predict_probe(backbone, head, volume, patch=(16, 16, 16))
    assert prediction.shape == volume.shape
    assert min(dice_per_label(prediction, labels, 3)) > 0.5  # a random backbone: weak features, but separable
    with pytest.raises(ValueError, match="label values"):
        train_probe(backbone, [volume], [labels], classes=2, steps=1)


def test_fine_tuning_trains_a_copy_of_the_backbone_and_the_head():
    """Full fine-tuning: the backbone's copy moves (at its own lower rate), the original does not, and
    the tuned pair labels the volume."""
    from DiffusionSegLib.methods.pretrain3d.probe import dice_per_label, fine_tune, predict_probe

    volume = np.full((16, 20, 24), -1.0, np.float32)
    labels = np.zeros(volume.shape, np.int64)
    volume[2:14, 3:10, 4:20], labels[2:14, 3:10, 4:20] = 0.2, 1
    volume[2:14, 12:18, 4:20], labels[2:14, 12:18, 4:20] = 0.8, 2
    torch.manual_seed(0)
    backbone = DenoisingBackbone((8, 16), norm_groups=4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    tuned, head, losses = fine_tune(backbone, [volume], [labels], classes=3, steps=40, patch=(16, 16, 16),
                                    lr=3e-2, backbone_lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(before[k], v)]
    assert len(moved) > 0.9 * len(before)
    step = max((tuned.state_dict()[k] - before[k]).abs().max().item() for k in moved)
    assert step < 40 * 1e-3 * 1.01  # Adam moves a weight at most about lr per step: the backbone's rate
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    prediction = predict_probe(tuned, head, volume, patch=(16, 16, 16))
    assert min(dice_per_label(prediction, labels, 3)) > 0.5


def test_dice_per_label_hand_computed():
    from DiffusionSegLib.methods.pretrain3d.probe import dice_per_label

    reference = np.array([0, 1, 1, 2, 2, 0])
    prediction = np.array([1, 1, 0, 2, 2, 0])
    assert dice_per_label(prediction, reference, 4) == [pytest.approx(0.5), 1.0, None]


def test_probe_features_at_a_noise_level_are_those_of_the_noised_input():
    from DiffusionSegLib.methods.pretrain3d.probe import noised_features

    torch.manual_seed(0)
    net = DenoisingBackbone((8, 16), norm_groups=4).eval()
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(noised_features(net, x, 0), net.features(x))
        a = schedule_alphas_cumprod("linear_beta", 1000)[100]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        expected = net.features(a.sqrt() * x + (1 - a).sqrt() * noise, torch.tensor([100]))
        torch.testing.assert_close(noised_features(net, x, 100, torch.Generator().manual_seed(5)), expected)
