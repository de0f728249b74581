"""The per-timestep profile of a diffusion model's training signal (loss, gradient, one-step x0 Dice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.training.data import Case
from DiffusionSegLib.training.timestep_profile import timestep_profile


class Oracle(torch.nn.Module):
    """Predicts x0 exactly: the test feeds the true mask signal in as the 'image'."""

    size_divisor = 1

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, image, t):
        return image + 0.0 * self.w


def cases() -> list[Case]:
    mask = np.zeros((1, 3, 12, 12), np.uint8)
    mask[:, :, 3:9, 4:10] = 1
    return [Case("c", (mask * 2.0 - 1.0).astype(np.float32), mask)]


def test_an_exact_x0_predictor_has_zero_loss_and_perfect_dice_in_every_bin():
    card = ModelCard(name="oracle", labels=[LabelInfo("a")], prediction_type="sample")
    profile = timestep_profile(Oracle(), card, cases(), bins=4)
    assert [(p["t_low"], p["t_high"]) for p in profile] == [(0, 249), (250, 499), (500, 749), (750, 999)]
    for row in profile:
        assert row["loss"] == pytest.approx(0.0, abs=1e-10) and row["grad_norm"] == 0.0
        assert row["x0_dice"] == pytest.approx(1.0)


def test_the_profile_of_a_real_network_is_finite_and_leaves_its_weights_alone():
    from DiffusionSegLib.methods.registry import build_network

    card = ModelCard(name="tiny", labels=[LabelInfo("a")], network={"channels": [8, 16], "norm_groups": 4},
                     prediction_type="sample")
    torch.manual_seed(0)
    net = build_network(card)
    before = [p.detach().clone() for p in net.parameters()]
    profile = timestep_profile(net, card, cases(), bins=5, seed=1)
    assert len(profile) == 5 and all(np.isfinite([r["loss"], r["grad_norm"], r["x0_dice"]]).all() for r in profile)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # weights untouched


def test_a_supervised_model_has_no_timesteps():
    card = ModelCard(name="u", method="unet", labels=[LabelInfo("a")])
    with pytest.raises(DiffusionSegError, match="not a diffusion model"):
        timestep_profile(Oracle(), card, cases())
