"""DiffSeg: difference of the lesion and healthy denoisers, the threshold rules, the objective and the settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DiffusionSegLib.core.errors import DiffusionSegError, ModelLoadError
from DiffusionSegLib.methods.diffseg.difference import (DiffSegSettings, difference_maps, otsu_threshold,
                                                        output_timesteps, threshold_maps)
from DiffusionSegLib.methods.diffseg.network import DiffusionDifferenceNet
from DiffusionSegLib.methods.registry import get_method
from DiffusionSegLib.models.card import ModelCard

METHOD = get_method("diffseg")


def card(**settings) -> ModelCard:
    return ModelCard(name="tiny_diffseg", method="diffseg", in_channels=1,
                     normalization={"kind": "ct_window", "center": 0, "width": 2000},
                     network={"channels": [8, 16], "norm_num_groups": 4}, default_samples=4, default_steps=1,
                     method_settings={"smoothing_px": 0.0, **settings})


class Oracle(torch.nn.Module):
    """Returns a fixed clean image per class, whatever x_t and t: healthy -> ``healthy``, lesion -> ``lesion``."""

    def __init__(self, healthy: torch.Tensor, lesion: torch.Tensor):
        super().__init__()
        self.healthy, self.lesion = healthy, lesion

    def forward(self, x_t, t, classes):
        chosen = torch.where(classes.reshape(-1, 1, 1, 1).bool(), self.lesion, self.healthy)
        return chosen.expand_as(x_t).clone()


def scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(healthy image, lesion image, lesion region) 1x1x16x16: a 0.8-bright 4x5 blob on a -0.6 background."""
    healthy = torch.full((1, 1, 16, 16), -0.6)
    lesion = healthy.clone()
    region = torch.zeros((1, 1, 16, 16), dtype=torch.bool)
    region[..., 5:9, 3:8] = True
    lesion[region] = 0.8
    return healthy, lesion, region


def test_outputs_spread_evenly_over_the_noise_levels():
    assert output_timesteps([60, 150], 4) == [60, 90, 120, 150]
    assert output_timesteps([60, 150], 1) == [105]


def test_otsu_splits_two_clusters_between_them():
    values = np.array([0.0] * 60 + [0.1] * 20 + [1.0] * 15 + [1.1] * 5)
    level = otsu_threshold(values)
    assert 0.1 <= level < 1.0
    assert otsu_threshold(np.full(10, 0.3)) == pytest.approx(0.3)  # constant: nothing above it


def test_the_difference_is_where_the_denoisers_disagree_for_every_output_and_chain_length():
    healthy, lesion, region = scene()
    net = Oracle(healthy, lesion)
    images = lesion.repeat(2, 1, 1, 1)
    for steps in (1, 3):  # a DDIM chain from t_k ends on the x0 both denoisers return
        d = difference_maps(net, card(), images, [60, 150], steps=steps, seed=0)
        assert d.shape == (2, 2, 1, 16, 16)
        expected = torch.where(region, torch.tensor(1.4), torch.tensor(0.0)).expand(2, 2, 1, 16, 16)
        torch.testing.assert_close(d, expected, atol=1e-5, rtol=0)


def test_denoisers_that_agree_give_an_empty_mask_whatever_the_noise():
    healthy, _, _ = scene()
    net = Oracle(healthy, healthy)
    c = card()
    masks = METHOD.sample(net, c, healthy.repeat(3, 1, 1, 1), METHOD.plan(c, 5, None, None), seed=1)
    assert masks.shape == (5, 3, 1, 16, 16) and masks.dtype == torch.uint8 and masks.sum() == 0


def test_otsu_rule_recovers_the_region_and_the_healthy_rule_uses_the_calibrated_level():
    healthy, lesion, region = scene()
    net = Oracle(healthy, lesion)
    c = card(threshold="otsu")
    masks = METHOD.sample(net, c, lesion, METHOD.plan(c, 3, None, None), seed=0)
    assert torch.equal(masks.bool(), region.expand(3, 1, 1, 16, 16))
    # healthy rule: a level of 2.0 at every t lies above the 1.4 difference: nothing is lesion
    c = card(threshold="healthy", healthy_thresholds={"t": [60, 150], "value": [2.0, 2.0]})
    assert METHOD.sample(net, c, lesion, METHOD.plan(c, 3, None, None)).sum() == 0
    # otsu_over_healthy: the larger of Otsu's level and the calibrated one (here 0.5 < 1.4: the region)
    c = card(threshold="otsu_over_healthy", healthy_thresholds={"t": [60, 150], "value": [0.5, 0.5]})
    assert torch.equal(METHOD.sample(net, c, lesion, METHOD.plan(c, 3, None, None)).bool(),
                       region.expand(3, 1, 1, 16, 16))


def test_the_healthy_level_is_interpolated_between_calibrated_noise_levels():
    settings = DiffSegSettings(threshold="healthy", healthy_thresholds={"t": [60, 150], "value": [0.1, 0.4]})
    d = torch.tensor([0.2, 0.24, 0.26, 0.3]).reshape(1, 1, 1, 1, 4)
    masks = threshold_maps(d, [105], settings)  # level at t=105: 0.1 + 0.3 * 45 / 90 = 0.25
    assert masks.flatten().tolist() == [0, 0, 1, 1]


def test_one_threshold_per_output_over_the_whole_input_so_a_lesion_free_slice_stays_empty():
    d = torch.zeros((1, 2, 1, 4, 4))
    d[0, 0, 0, :2, :2] = 1.0  # slice 0 has a lesion-like difference, slice 1 only small noise
    d[0, 1, 0] = torch.linspace(0.0, 0.02, 16).reshape(4, 4)  # Otsu of this slice alone would split it
    masks = threshold_maps(d, [100], DiffSegSettings(threshold="otsu"))
    assert masks[0, 0, 0, :2, :2].all() and masks[0, 0].sum() == 4 and masks[0, 1].sum() == 0


def test_the_masks_depend_on_the_seed_only_not_on_the_batch_size():
    torch.manual_seed(0)
    c = card(threshold="otsu")
    net = METHOD.build_network(c).eval()
    with torch.no_grad():  # MONAI zero-initializes the output layer: give the denoisers different outputs
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    plan = METHOD.plan(c, 4, None, None)
    a = METHOD.sample(net, c, images, plan, seed=3, batch_size=2)
    b = METHOD.sample(net, c, images, plan, seed=3, batch_size=5)
    assert torch.equal(a, b) and a.sum() > 0
    assert not torch.equal(a, METHOD.sample(net, c, images, plan, seed=4))


def test_the_objective_is_the_x0_error_of_each_items_own_class():
    healthy, lesion, _ = scene()
    net = Oracle(healthy, lesion)
    c = card()
    state = METHOD.prepare_training(c)
    images = torch.cat([healthy, lesion])
    g = torch.Generator().manual_seed(0)
    # Each class's denoiser returns its own image: item 0 (healthy) and item 1 (lesion) are exact.
    assert float(METHOD.training_loss(net, state, images, torch.tensor([0, 1]), g)) == pytest.approx(0.0)
    # Swapped classes: the error is the 1.4 blob of 20 pixels in each of the two items.
    expected = 1.4**2 * 20 / 256
    assert float(METHOD.training_loss(net, state, images, torch.tensor([1, 0]), g)) == pytest.approx(expected)


def test_separate_denoisers_route_each_item_to_its_class():
    torch.manual_seed(0)
    net = DiffusionDifferenceNet(channels=(8, 16), norm_num_groups=4, shared=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 6, 7, 8])
    out = net(x, t, torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(out[[1, 2]], net.lesion(x[[1, 2]], t[[1, 2]]))
    torch.testing.assert_close(out[[0, 3]], net.healthy(x[[0, 3]], t[[0, 3]]))


def test_unbounded_normalization_and_bad_settings_are_refused():
    c = card()
    c.normalization = {"kind": "zscore"}
    with pytest.raises(DiffusionSegError, match="normalization"):
        METHOD.prepare_training(c)
    with pytest.raises(ModelLoadError, match="beyond the trained range"):
        DiffSegSettings.from_card(card(noise_levels=[60, 600]))
    with pytest.raises(ModelLoadError, match="unknown DiffSeg settings"):
        DiffSegSettings.from_card(card(noise_level=[60, 150]))
    with pytest.raises(ModelLoadError, match="threshold"):
        DiffSegSettings.from_card(card(threshold="median"))


def test_the_plan_is_one_step_per_output_and_the_card_asks_for_the_published_crf():
    defaults = METHOD.card_defaults(5, 10)
    assert defaults["default_steps"] == 1 and defaults["default_crf"] == "published"
    plan = METHOD.plan(card(), None, None, "ddpm")
    assert (plan.samples, plan.steps, plan.sampler.value) == (4, 1, "ddim") and "deterministically" in plan.note
