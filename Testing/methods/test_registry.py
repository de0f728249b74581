"""The method interface: the registry, and every method's network, objective and sampling through it."""

from __future__ import annotations

import pytest
import torch

from DiffusionSegLib.core.enums import Sampler
from DiffusionSegLib.methods.base import SegmentationMethod
from DiffusionSegLib.methods.registry import Method, get_method
from DiffusionSegLib.models.card import LabelInfo, ModelCard

NETWORKS = {"medsegdiff": {"channels": [8, 16], "norm_groups": 4},
            "vanilla_dpm": {"channels": [8, 16], "norm_num_groups": 4},
            "unet": {"channels": [8, 16], "num_res_units": 1}}


def tiny_card(method: str, spatial_dims: int = 2) -> ModelCard:
    return ModelCard(name=f"tiny_{method}", method=method, spatial_dims=spatial_dims, in_channels=2,
                     labels=[LabelInfo("a"), LabelInfo("b")], network=NETWORKS[method],
                     default_samples=3, default_steps=4)


def test_the_registry_lists_each_method_once_under_its_own_name():
    assert set(Method.values()) == {"medsegdiff", "vanilla_dpm", "unet", "diffseg", "unisegdiff"}
    for name in Method.values():
        method = get_method(name)
        assert isinstance(method, SegmentationMethod) and method.name == name and method.title


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'unisegdiff3000' \\(use medsegdiff, vanilla_dpm, unet, diffseg, unisegdiff\\)"):
        get_method("unisegdiff3000")


@pytest.mark.parametrize("name", ["medsegdiff", "vanilla_dpm", "unet"])
@pytest.mark.parametrize("spatial_dims, size", [(2, (16, 12)), (3, (8, 8, 12))])
def test_every_method_trains_and_samples_through_the_interface(name, spatial_dims, size):
    method = get_method(name)
    card = tiny_card(name, spatial_dims)
    torch.manual_seed(0)
    net = method.build_network(card)
    image = torch.randn(2, 2, *size)
    mask = (torch.rand(2, 2, *size) > 0.5).float()
    loss = method.training_loss(net, method.prepare_training(card), image, mask, torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())

    with torch.no_grad():  # MONAI zero-initialises some output layers: perturb so the output depends on x_t
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.eval()
    plan = method.plan(card, None, None, None)
    out = method.sample(net, card, image, plan, seed=3)
    assert out.shape == (plan.samples, 2, 2, *size) and out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {0, 1}
    again = method.sample(net, card, image, plan, seed=3, batch_size=1)
    # Same seed, same masks whatever the batch size (a voxel at exactly 0.5 may round either way
    # in another batch's kernels: allow one in a thousand).
    assert (out != again).float().mean() <= 1e-3
    other_seed = method.sample(net, card, image, plan, seed=4)
    assert method.draws_samples == bool((out != other_seed).any())
    assert method.seconds_per_evaluation(net, card, image, plan, None, False) > 0


def test_diffusion_methods_take_the_cards_defaults_and_ddpm_walks_the_full_chain():
    card = tiny_card("medsegdiff")
    method = get_method("medsegdiff")
    assert method.draws_samples
    plan = method.plan(card, None, None, None)
    assert (plan.samples, plan.steps, plan.sampler) == (3, 4, Sampler.DDIM) and not plan.note
    full = method.plan(card, 2, None, Sampler.DDPM)
    assert (full.samples, full.steps, full.sampler) == (2, card.num_train_timesteps, Sampler.DDPM)


def test_a_deterministic_method_draws_one_mask_and_says_why_when_more_were_asked():
    card = tiny_card("unet")
    method = get_method("unet")
    assert not method.draws_samples
    assert method.plan(card, None, None, None).note == ""
    plan = method.plan(card, 5, 10, Sampler.DDIM)
    assert (plan.samples, plan.steps, plan.sampler) == (1, 1, Sampler.NONE)
    assert "deterministic" in plan.note
    assert method.card_defaults(5, 10)["default_samples"] == 1


def test_the_time_probe_calls_medsegdiff_as_the_sampler_does():
    """The sampler passes each slice's image once for its N samples; a probe passing one image per
    item would time work the run does not do (the image branch N times)."""
    card = tiny_card("medsegdiff")
    method = get_method("medsegdiff")
    net = method.build_network(card).eval()
    calls = []
    net.image_encoder.stem.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    plan = method.plan(card, 3, 2, None)
    images = torch.randn(4, 2, 16, 16)
    assert method.seconds_per_evaluation(net, card, images, plan, 9, False) > 0
    assert calls == [1, 3]  # the untimed warm-up item, then 9 items = 3 slices x 3 samples: 3 images
