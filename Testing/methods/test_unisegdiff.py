"""UniSegDiff: the stage targets and their inverse, the settings, the staged sampler, the objective's phases
(encoder pretraining, frozen / fine-tuned encoder) through the real training loop, resume, the registry and
the timestep profile."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import write_shapes
from DiffusionSegLib.methods.registry import Method, get_method
from DiffusionSegLib.methods.unisegdiff.network import UniSegDiffNet
from DiffusionSegLib.methods.unisegdiff.sampling import network_evaluations, sample_staged
from DiffusionSegLib.methods.unisegdiff.stages import (DiffusionStage, StageTarget, UniSegDiffSettings,
                                                       chain_timesteps, draw_timesteps, segmentation_loss,
                                                       stage_targets, stage_x0)
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.training.data import Case
from DiffusionSegLib.training.loop import TrainConfig, train
from DiffusionSegLib.training.timestep_profile import timestep_profile

# One torch thread: the machine has 2 busy cores (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

METHOD = get_method("unisegdiff")
NET = {"channels": [8, 16], "norm_groups": 4}  # size_divisor 2
T = 1000


def card(**settings) -> ModelCard:
    return ModelCard(name="tiny_unisegdiff", method="unisegdiff", in_channels=1, labels=[LabelInfo("a")],
                     network=dict(NET), default_samples=3, default_steps=3, method_settings=settings)


def tiny_net(c: ModelCard | None = None, seed: int = 0) -> UniSegDiffNet:
    torch.manual_seed(seed)
    return METHOD.build_network(c or card()).eval()


def settings(**values) -> UniSegDiffSettings:
    return UniSegDiffSettings.from_mapping(values, T)


# ---------------------------------------------------------------------------------------------
# Targets and their inverse
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(StageTarget))
def test_every_target_maps_back_to_the_clean_mask(kind):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((4, 2, 3, 3), generator=g) * 2 - 1
    noise = torch.randn((4, 2, 3, 3), generator=g)
    prior = torch.rand((4, 2, 3, 3), generator=g) * 1.8 - 0.9
    a = torch.tensor([0.9999, 0.64, 0.3, 0.004])
    view = (-1, 1, 1, 1)
    x_t = a.sqrt().view(view) * x0 + (1 - a).sqrt().view(view) * noise
    kinds = [kind] * 4
    target = stage_targets(kinds, x0, noise, a, prior)
    torch.testing.assert_close(stage_x0(kinds, target, x_t, a, prior), x0, atol=1e-4, rtol=0)


def _scalar_case(alphas: list[float]):
    """x0 = 1, noise = 0.5, prior = 0.25 everywhere; x_t = sqrt(a) x0 + sqrt(1 - a) noise per item."""
    b = len(alphas)
    x0, noise, prior = torch.ones((b, 1, 2, 2)), torch.full((b, 1, 2, 2), 0.5), torch.full((b, 1, 2, 2), 0.25)
    a = torch.tensor(alphas)
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    return x0, noise, prior, a, x_t


@pytest.mark.parametrize("kind, value", [(StageTarget.SAMPLE, 1.0), (StageTarget.EPSILON, 0.5),
                                         (StageTarget.V_PREDICTION, -0.2),  # 0.8 * 0.5 - 0.6 * 1
                                         (StageTarget.RESIDUAL, 0.75)])  # 1 - 0.25
def test_each_target_by_hand_at_alpha_bar_064(kind, value):
    x0, noise, prior, a, x_t = _scalar_case([0.64])
    assert float(x_t[0, 0, 0, 0]) == pytest.approx(1.1)  # 0.8 * 1 + 0.6 * 0.5
    target = stage_targets([kind], x0, noise, a, prior)
    torch.testing.assert_close(target, torch.full_like(x0, value), atol=1e-6, rtol=0)
    torch.testing.assert_close(stage_x0([kind], target, x_t, a, prior), x0, atol=1e-6, rtol=0)


def test_a_batch_mixing_targets_gives_each_item_its_own_target_and_inverse():
    kinds = [StageTarget.V_PREDICTION, StageTarget.RESIDUAL, StageTarget.SAMPLE, StageTarget.EPSILON,
             StageTarget.V_PREDICTION]
    x0, noise, prior, a, x_t = _scalar_case([0.64, 0.36, 0.81, 0.36, 0.36])
    target = stage_targets(kinds, x0, noise, a, prior)
    # item 4: v at a = 0.36 is 0.6 * 0.5 - 0.8 * 1 = -0.5 (its own alpha, not item 0's)
    expected = torch.tensor([-0.2, 0.75, 1.0, 0.5, -0.5]).view(-1, 1, 1, 1).expand_as(x0)
    torch.testing.assert_close(target, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(stage_x0(kinds, target, x_t, a, prior), x0, atol=1e-6, rtol=0)
    # The implied x0 is clipped to the signal range [-1, 1].
    too_far = stage_x0(kinds, target + torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]).view(-1, 1, 1, 1), x_t, a, prior)
    assert float(too_far.max()) == 1.0 and float(too_far[1].min()) == 1.0


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_the_default_stages_tile_the_timesteps_and_branch_at_666():
    s = settings()
    assert sorted((st.t_low, st.t_high) for st in s.stages) == [(0, 333), (333, 667), (667, 1000)]
    assert [st.name for st in s.stages] == ["coarse", "probabilistic", "refinement"]
    assert [st.target for st in s.stages] == [StageTarget.SAMPLE, StageTarget.SAMPLE, StageTarget.RESIDUAL]
    assert s.default_branch_t() == 666  # the top of the stochastic stage [333, 667)
    assert settings(branch_t=500).default_branch_t() == 500
    assert s.stage_of(999).name == "coarse" and s.stage_of(0).name == "refinement"


def test_the_record_round_trips_through_json_and_from_mapping():
    for s in (settings(), settings(stages=[{"name": "lo", "t": [0, 400], "target": "epsilon", "weight": 2.0},
                                           {"name": "hi", "t": [400, 1000], "target": "v_prediction", "eta": 0.5}],
                                   encoder_pretrain_steps=7, encoder_training="frozen", encoder_lr_scale=0.5,
                                   prior_loss_weight=0.0, t_sampling="per_stage", coarse_shared=False, branch_t=123)):
        record = json.loads(json.dumps(s.record()))
        assert UniSegDiffSettings.from_mapping(record, T) == s
        assert set(record) == set(UniSegDiffSettings.KEYS)  # every default spelled out


def _stages(*spans, **extra) -> list[dict]:
    return [{"name": f"s{i}", "t": list(span), **extra} for i, span in enumerate(spans)]


@pytest.mark.parametrize("values, match", [
    (dict(stages=_stages((0, 500), (600, 1000))), "gaps or overlaps"),
    (dict(stages=_stages((0, 600), (500, 1000))), "gaps or overlaps"),
    (dict(stages=_stages((0, 0), (0, 1000))), "gaps or overlaps"),
    (dict(stages=_stages((0, 900))), "num_train_timesteps 1000"),
    (dict(stages=[]), "at least one stage"),
    (dict(stagez=[]), r"unknown UniSegDiff setting\(s\) \['stagez'\]"),
    (dict(stages=[{"t": [0, 1000], "targte": "sample"}]), "targte"),
    (dict(stages=[{"name": "all", "target": "sample"}]), '"t"'),
    (dict(stages=[{"t": [0, 1000], "target": "x0"}]), "stage target 'x0'"),
    (dict(stages=_stages((0, 1000), eta=1.5)), "eta in \\[0, 1\\]"),
    (dict(stages=_stages((0, 1000), eta=-0.1)), "eta in \\[0, 1\\]"),
    (dict(stages=_stages((0, 1000), weight=-1.0)), "weight must be >= 0"),
    (dict(t_sampling="stratified"), "t_sampling 'stratified'"),
    (dict(branch_t=1000), "branch_t 1000"),
    (dict(branch_t=-1), "branch_t -1"),
    (dict(encoder_training="thawed"), "encoder_training 'thawed'"),
    (dict(encoder_lr_scale=-0.1), "encoder_lr_scale"),
    (dict(encoder_pretrain_steps=-2), "encoder_pretrain_steps"),
])
def test_settings_that_cannot_work_are_refused_naming_the_problem(values, match):
    with pytest.raises(ValueError, match=match):
        settings(**values)


@pytest.mark.parametrize("values, match", [
    (dict(stages=[{"name": "all", "t": [0, 500, 1000]}]), '"t"'),  # not "too many values to unpack"
    (dict(encoder_pretrain_steps="ten"), "encoder_pretrain_steps"),  # not "invalid literal for int()"
])
def test_malformed_values_name_their_key(values, match):
    """``from_mapping`` promises a ValueError naming the key; Python's own unpack / int() messages name none."""
    with pytest.raises(ValueError, match=match):
        settings(**values)


def test_stage_index_of_the_boundaries():
    t = torch.tensor([0, 332, 333, 666, 667, 999])
    assert settings().stage_index(t).tolist() == [2, 2, 1, 1, 0, 0]


def test_per_stage_draws_give_each_stage_an_equal_share_inside_its_bounds():
    g = torch.Generator().manual_seed(0)
    s = settings(t_sampling="per_stage")
    t = draw_timesteps(s, 3000, T, g)
    assert t.dtype == torch.long and t.shape == (3000,)
    counts = torch.bincount(s.stage_index(t), minlength=3).tolist()
    assert all(850 < c < 1150 for c in counts), counts  # 1000 +- ~5 standard deviations
    # Unequal stages: each still gets a third, and the narrow ones are hit at both ends, never beyond.
    uneven = settings(t_sampling="per_stage", stages=_stages((0, 10), (10, 990), (990, 1000)))
    t = draw_timesteps(uneven, 3000, T, g)
    counts = torch.bincount(uneven.stage_index(t), minlength=3).tolist()
    assert all(850 < c < 1150 for c in counts), counts
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert set(t[t < 10].tolist()) == set(range(10)) and set(t[t >= 990].tolist()) == set(range(990, 1000))
    # Uniform draws over [0, T) instead: the narrow stages get about 1% each.
    t = draw_timesteps(settings(stages=_stages((0, 10), (10, 990), (990, 1000))), 3000, T, g)
    assert int((t < 10).sum()) < 100 and int((t >= 990).sum()) < 100


def test_the_chain_uses_trailing_spacing_from_the_branch():
    assert chain_timesteps(666, 3) == [666, 444, 221]  # round(667 - i * 667 / 3) - 1
    assert chain_timesteps(666, 1) == [666]
    assert chain_timesteps(999, 1000) == list(range(999, -1, -1))
    for branch, steps in ((666, 7), (999, 10), (100, 101)):
        chain = chain_timesteps(branch, steps)
        assert chain == [round(branch + 1 - i * (branch + 1) / steps) - 1 for i in range(steps)]
        assert chain[0] == branch and chain[-1] >= 0 and all(a > b for a, b in zip(chain, chain[1:]))
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.667 below branch_t 666, got 668"):
        chain_timesteps(666, 668)
    with pytest.raises(ValueError, match="got 0"):
        chain_timesteps(666, 0)


# ---------------------------------------------------------------------------------------------
# The staged sampler
# ---------------------------------------------------------------------------------------------


def _images(b: int = 2) -> torch.Tensor:
    return torch.randn((b, 1, 16, 16), generator=torch.Generator().manual_seed(5))


def test_masks_are_binary_and_depend_on_the_seed_only_not_on_the_batch_size():
    c = card()
    net = tiny_net(c)
    images = _images()
    masks = [sample_staged(net, c, images, 3, 3, seed=0, batch_size=bs) for bs in (1, 2, None)]
    first = masks[0]
    assert first.shape == (3, 2, 1, 16, 16) and first.dtype == torch.uint8 and first.device.type == "cpu"
    assert set(first.unique().tolist()) <= {0, 1} and 0 < int(first.sum()) < first.numel()
    assert all(torch.equal(first, m) for m in masks[1:])
    assert not torch.equal(first, sample_staged(net, c, images, 3, 3, seed=1))
    assert not torch.equal(first[0], first[1])  # each sample has its own stochastic stream
    # Through the method interface, the card's defaults
    plan = METHOD.plan(c, None, None, None)
    assert (plan.samples, plan.steps) == (3, 3)
    assert torch.equal(METHOD.sample(net, c, images, plan, seed=0, batch_size=2), first)


class _Counting:
    """Wraps ``net.encode`` and ``net.denoise``: the batch size and t of every call, and the spatial sizes seen."""

    def __init__(self, net: torch.nn.Module):
        self.encoded: list[int] = []
        self.denoised: list[tuple[int, list[int]]] = []
        self.seen: set[tuple[int, ...]] = set()
        encode, denoise = net.encode, net.denoise

        def counted_encode(image):
            self.encoded.append(image.shape[0])
            self.seen.add(tuple(image.shape[2:]))
            return encode(image)

        def counted_denoise(x_t, condition, t):
            assert x_t.shape[0] == t.shape[0] == condition.prior_logits.shape[0]
            self.denoised.append((x_t.shape[0], sorted(set(t.tolist()))))
            self.seen.add(tuple(x_t.shape[2:]))
            return denoise(x_t, condition, t)

        net.encode, net.denoise = counted_encode, counted_denoise


@pytest.mark.parametrize("shared", [True, False])
def test_one_encoder_pass_per_chunk_and_the_coarse_jump_counted_as_network_evaluations(shared):
    c = card(coarse_shared=shared)
    net = tiny_net(c)
    calls = _Counting(net)
    progress: list[tuple[int, int]] = []
    n, b, steps = 3, 2, 3
    sample_staged(net, c, _images(b), n, steps, seed=0, batch_size=n, progress=lambda d, t: progress.append((d, t)))
    chunks = 2  # batch_size = N: one image's samples per chunk
    assert calls.encoded == [1] * chunks  # the encoder once per chunk, on that chunk's one image
    assert len(calls.denoised) == chunks * (steps + 1)
    # Each chunk: the coarse jump at the top t (one item per image when shared), then the chain from 666.
    per_chunk = [calls.denoised[k * (steps + 1):(k + 1) * (steps + 1)] for k in range(chunks)]
    for chunk in per_chunk:
        assert chunk[0] == (1 if shared else n, [T - 1])
        assert chunk[1:] == [(n, [666]), (n, [444]), (n, [221])]
    items = sum(size for size, _ in calls.denoised)
    evaluations = network_evaluations(UniSegDiffSettings.of(c), c, n, steps)
    assert evaluations == pytest.approx(steps + 1 / n if shared else steps + 1)
    assert items / (n * b) == pytest.approx(evaluations)
    assert progress[-1] == (len(calls.denoised), len(calls.denoised))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_chunks_that_cut_an_images_samples_still_encode_once_and_jump_once_per_chunk():
    c = card()
    net = tiny_net(c)
    calls = _Counting(net)
    steps = 2
    sample_staged(net, c, _images(2), 3, steps, seed=0, batch_size=4)  # chunks: items 0-3 (2 images), 4-5
    assert calls.encoded == [2, 1]
    assert len(calls.denoised) == 2 * (steps + 1)
    assert [size for size, _ in calls.denoised] == [2, 4, 4, 1, 2, 2]


def test_a_single_stage_setting_walks_the_whole_chain_without_a_coarse_jump():
    c = card(stages=[{"name": "all", "t": [0, 1000], "target": "sample"}])
    net = tiny_net(c)
    calls = _Counting(net)
    steps = 4
    masks = sample_staged(net, c, _images(2), 2, steps, seed=0, batch_size=4)
    assert masks.shape == (2, 2, 1, 16, 16)
    assert calls.encoded == [2]
    assert calls.denoised == [(4, [t]) for t in chain_timesteps(T - 1, steps)]  # 999, 749, 499, 249
    assert network_evaluations(UniSegDiffSettings.of(c), c, 2, steps) == steps


def test_the_plan_walks_the_staged_chain_whatever_sampler_is_asked():
    c = card()
    plan = METHOD.plan(c, 4, 3, "ddpm")
    assert (plan.samples, plan.steps, plan.sampler.value) == (4, 3, "ddim") and "ddpm" in plan.note
    assert METHOD.plan(c, None, None, "ddim").note == ""
    out = METHOD.example_call(tiny_net(c), c, _images(2))
    assert out.shape == (2, 1, 16, 16)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def test_segmentation_loss_by_hand():
    """Dice pooled over the batch per label, averaged over labels, plus the mean BCE."""
    ln3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25, sigmoid(0) = 0.5
    logits = torch.tensor([[[[0.0, ln3]], [[ln3, ln3]]],  # item 0: label 0, label 1
                           [[[-ln3, 0.0]], [[-ln3, -ln3]]]])  # item 1
    mask = torch.tensor([[[[1, 0]], [[1, 1]]],
                         [[[1, 1]], [[0, 0]]]], dtype=torch.uint8)
    # label 0: intersection 0.5 + 0.25 + 0.5 = 1.25, sum p 2.0, sum mask 3 -> Dice 0.5
    # label 1: intersection 1.5, sum p 2.0, sum mask 2 -> Dice 0.75 (item 1 alone would score 0)
    dice_term = ((1 - 0.5) + (1 - 0.75)) / 2
    bce = (6 * math.log(2.0) + 4 * math.log(4.0 / 3.0)) / 8
    assert float(segmentation_loss(logits, mask)) == pytest.approx(dice_term + bce, abs=1e-5)


def _batch():
    g = torch.Generator().manual_seed(3)
    image = torch.randn((2, 1, 16, 16), generator=g)
    mask = (torch.rand((2, 1, 16, 16), generator=g) > 0.6).to(torch.uint8)
    return image, mask


def test_the_parameter_groups_split_the_network_into_encoder_and_denoiser():
    net = tiny_net()
    encoder, denoiser = METHOD.parameter_groups(net)
    assert {id(p) for p in encoder} == {id(p) for p in net.encoder.parameters()}
    assert not {id(p) for p in encoder} & {id(p) for p in denoiser}
    assert len(encoder) + len(denoiser) == len(list(net.parameters()))


def test_the_learning_rate_factors_follow_the_phases():
    state = METHOD.prepare_training(card(encoder_pretrain_steps=2, encoder_lr_scale=0.25))
    assert [list(METHOD.start_step(state, k)) for k in range(4)] == [[1.0, 0.0], [1.0, 0.0], [0.25, 1.0], [0.25, 1.0]]
    frozen = METHOD.prepare_training(card(encoder_pretrain_steps=1, encoder_training="frozen"))
    assert [list(METHOD.start_step(frozen, k)) for k in range(3)] == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    # A resumed run starts at its own step, not at 0.
    assert list(METHOD.start_step(METHOD.prepare_training(card(encoder_pretrain_steps=2)), 5)) == [1.0, 1.0]


def test_while_pretraining_the_loss_is_the_encoders_segmentation_loss():
    c = card(encoder_pretrain_steps=2)
    net = tiny_net(c).train()
    state = METHOD.prepare_training(c)
    image, mask = _batch()
    METHOD.start_step(state, 1)
    loss = METHOD.training_loss(net, state, image, mask, torch.Generator().manual_seed(0))
    expected = segmentation_loss(net.encode(image).prior_logits, mask)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in METHOD.parameter_groups(net)[1])  # the denoiser takes no part
    METHOD.start_step(state, 2)  # diffusion from here on: another loss
    diffusion = METHOD.training_loss(net, state, image, mask, torch.Generator().manual_seed(0))
    assert float(diffusion.detach()) != pytest.approx(float(expected.detach()), rel=1e-3)


@pytest.mark.parametrize("training", ["frozen", "finetune"])
def test_after_pretraining_a_frozen_encoder_gets_no_gradient_and_a_finetuned_one_does(training):
    c = card(encoder_training=training)
    net = tiny_net(c).train()
    state = METHOD.prepare_training(c)
    METHOD.start_step(state, 0)
    image, mask = _batch()
    METHOD.training_loss(net, state, image, mask, torch.Generator().manual_seed(0)).backward()
    encoder, denoiser = METHOD.parameter_groups(net)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in denoiser)
    encoder_grads = [p.grad for p in encoder if p.grad is not None and p.grad.abs().sum() > 0]
    assert (len(encoder_grads) > 0) == (training == "finetune")


def test_the_stage_weights_scale_the_diffusion_loss():
    def loss(weight: float) -> float:
        c = card(encoder_training="frozen", stages=[{**s, "weight": weight} for s in
                                                     UniSegDiffSettings.from_mapping({}, T).record()["stages"]])
        state = METHOD.prepare_training(c)
        METHOD.start_step(state, 0)
        image, mask = _batch()
        return float(METHOD.training_loss(tiny_net(c).train(), state, image, mask,
                                          torch.Generator().manual_seed(0)).detach())

    assert loss(2.0) == pytest.approx(2 * loss(1.0), rel=1e-5) and loss(1.0) > 0 and loss(0.0) == 0.0


# ---------------------------------------------------------------------------------------------
# Through the training loop: which weights move in which phase, and resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("unisegdiff_shapes")
    write_shapes(root, 4, seed=0)
    return root


def loop_config(method_settings: dict, **kwargs) -> TrainConfig:
    base = dict(method="unisegdiff", network=dict(NET), patch_size=[16, 16], batch_size=2, lr=1e-2, steps=1,
                val_every=1, checkpoint_every=1, val_cases=1, val_samples=1, val_steps=3, seed=0, device="cpu",
                augment=False, method_settings=method_settings)
    return TrainConfig(**{**base, **kwargs})


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """(encoder, denoiser) tensors of ``prefix`` ("net." for the raw weights), keyed as in the state dict."""
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return ({k: v for k, v in own.items() if k.startswith("encoder.")},
            {k: v for k, v in own.items() if not k.startswith("encoder.")})


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[k], b[k]) for k in a)


def _largest_change(after: dict, before: dict) -> float:
    return max(float((after[k].float() - before[k].float()).abs().max()) for k in after)


@pytest.mark.parametrize("method_settings, encoder_factor, denoiser_factor", [
    ({"encoder_pretrain_steps": 1}, 1.0, 0.0),  # pretraining: the encoder alone, at the full rate
    ({"encoder_training": "frozen"}, 0.0, 1.0),  # diffusion with a frozen encoder
    ({"encoder_training": "finetune", "encoder_lr_scale": 0.1}, 0.1, 1.0),
])
def test_one_optimizer_step_moves_only_the_parts_the_phase_trains(shapes, tmp_path, method_settings, encoder_factor,
                                                                  denoiser_factor):
    config = loop_config(method_settings)
    trained_card = train(shapes, tmp_path / "m", config, progress=False)
    # The raw network after the step (not the EMA / best weights the model folder holds) ...
    after = load_file(str(tmp_path / "m" / "checkpoint" / "weights.safetensors"))
    # ... against the same network initialised as the loop initialises it.
    torch.manual_seed(config.seed)
    initial = {f"net.{k}": v for k, v in METHOD.build_network(trained_card).state_dict().items()}
    for part_after, part_before, factor in zip(_split(after, "net."), _split(initial, "net."),
                                               (encoder_factor, denoiser_factor)):
        assert _same(part_after, part_before) == (factor == 0)
        # Adam's first step moves each weight by lr * factor (times sign(grad)): the largest move shows
        # the rate the loop gave the group (weight decay adds lr * 1e-4 * |w|, far below).
        assert _largest_change(part_after, part_before) == pytest.approx(config.lr * factor, rel=0.02)


def test_resume_across_the_end_of_pretraining_continues_bit_identically(shapes, tmp_path):
    settings_ = {"encoder_pretrain_steps": 2}
    train(shapes, tmp_path / "straight", loop_config(settings_, steps=4, val_every=2, checkpoint_every=2),
          progress=False)
    train(shapes, tmp_path / "resumed", loop_config(settings_, steps=2, val_every=2, checkpoint_every=2),
          progress=False)
    train(shapes, tmp_path / "resumed", loop_config(settings_, steps=4, val_every=2, checkpoint_every=2),
          progress=False, resume=True)
    logs = [json.loads((tmp_path / m / "training_log.json").read_text()) for m in ("straight", "resumed")]
    assert len(logs[0]["losses"]) == 4 and logs[0]["losses"] == logs[1]["losses"]
    weights = [load_file(str(tmp_path / m / "checkpoint" / "weights.safetensors")) for m in ("straight", "resumed")]
    for prefix in ("ema.", "net."):
        for part_straight, part_resumed in zip(_split(weights[0], prefix), _split(weights[1], prefix)):
            assert _same(part_straight, part_resumed), prefix
    final = [load_file(str(tmp_path / m / "model.safetensors")) for m in ("straight", "resumed")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    # The card says every setting it was trained with.
    card_json = json.loads((tmp_path / "resumed" / "model.json").read_text())
    assert card_json["method_settings"] == settings(**settings_).record()


# ---------------------------------------------------------------------------------------------
# Registry and timestep profile
# ---------------------------------------------------------------------------------------------


def test_the_registry_lists_unisegdiff():
    assert "unisegdiff" in Method.values()
    method = get_method("unisegdiff")
    assert method.title == "UniSegDiff" and method.name == "unisegdiff" and method.draws_samples
    assert method.network_class() is UniSegDiffNet


def test_the_timestep_profile_runs_on_a_tiny_unisegdiff_model():
    c = card()
    net = tiny_net(c)
    mask = np.zeros((1, 2, 12, 12), np.uint8)
    mask[:, :, 3:9, 4:10] = 1
    image = (mask * 2.0 - 1.0).astype(np.float32) + np.random.default_rng(0).normal(0, 0.3, mask.shape).astype(
        np.float32)
    before = [p.detach().clone() for p in net.parameters()]
    profile = timestep_profile(net, c, [Case("c", image, mask)], bins=3, seed=1, repeats=1)
    assert [(r["t_low"], r["t_high"]) for r in profile] == [(0, 332), (333, 666), (667, 999)]
    for row in profile:
        assert np.isfinite([row["loss"], row["grad_norm"], row["x0_dice"]]).all()
        assert row["loss"] > 0 and row["grad_norm"] > 0 and 0 <= row["x0_dice"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_a_chain_too_short_to_visit_every_stage_is_refused():
    """Default stages, branch at 666: 2 steps are t = 666, 333, both in the probabilistic stage, so the
    refinement's residual target is never applied (organ model, validation: Dice 0.54 at 5 x 2 vs 0.92 at 5 x 3)."""
    from DiffusionSegLib.core.errors import SettingsError

    c = card()
    assert chain_timesteps(666, 2) == [666, 333] and chain_timesteps(666, 3) == [666, 444, 221]
    assert UniSegDiffSettings.of(c).fewest_steps(c.num_train_timesteps) == 3
    with pytest.raises(SettingsError, match="at least 3"):
        METHOD.plan(c, 5, 2, None)
    assert METHOD.plan(c, 5, 3, None).steps == 3
    # one stage only (all x0): any chain visits it
    one = card(stages=[{"name": "all", "t": [0, 1000], "target": "sample"}])
    assert UniSegDiffSettings.of(one).fewest_steps(one.num_train_timesteps) == 1


def test_the_time_estimate_counts_the_encoder_once_per_image_and_the_denoiser_per_step():
    """Hand-computed: k = 4 items, encoder 2.0 s, denoiser 1.0 s per timed call; 5 samples x 3 steps with
    a shared coarse jump = 3.2 denoiser calls per sample. Per image: 2.0/4 + 1.0/4 x 3.2 x 5 = 4.5 s,
    spread over the 15 evaluations the estimate counts: 0.3 s each (the old probe timed both per
    evaluation: (2.0 + 1.0) / 4 = 0.75 s, 2.5x too long)."""
    c = card()
    net = tiny_net(c)
    plan = METHOD.plan(c, 5, 3, None)
    assert plan.nfe_per_sample == pytest.approx(3.2)
    seconds = iter([2.0, 1.0])
    calls = []

    def timed(call):
        calls.append(call())
        return calls[-1], next(seconds)

    with torch.inference_mode():
        assert METHOD.item_seconds(net, c, _images(4), plan, timed) == pytest.approx(0.3)
    assert calls[1].shape == (4, 1, 16, 16)  # the second timed call is the denoiser's output


# ---------------------------------------------------------------------------------------------
# Slice windows: the network sees training-sized windows of a slice, not the whole slice
# ---------------------------------------------------------------------------------------------


def windowed_card(**settings) -> ModelCard:
    return ModelCard(name="tiny_unisegdiff", method="unisegdiff", in_channels=1, labels=[LabelInfo("a")],
                     network=dict(NET), default_samples=3, default_steps=3, method_settings=settings,
                     patch_size=[8, 8], window_overlap=0.5, slice_windows=True)


@pytest.mark.parametrize("shared", [True, False])
def test_with_slice_windows_the_network_sees_only_training_sized_windows_and_the_masks_are_whole(shared):
    c = windowed_card(coarse_shared=shared)
    net = tiny_net(c)
    shapes = _Counting(net)
    images = torch.randn((2, 1, 12, 20), generator=torch.Generator().manual_seed(5))
    masks = [sample_staged(net, c, images, 3, 3, seed=0, batch_size=bs) for bs in (1, 4, None)]
    assert shapes.seen == {(8, 8)}  # windows at rows 0, 4 and columns 0, 4, 8, 12
    first = masks[0]
    assert first.shape == (3, 2, 1, 12, 20) and first.dtype == torch.uint8
    assert 0 < int(first.sum()) < first.numel()
    assert all(torch.equal(first, m) for m in masks[1:])  # the seed decides, not the chunking
    whole = sample_staged(tiny_net(c), card(coarse_shared=shared), images, 3, 3, seed=0)
    assert not torch.equal(first, whole)


def test_slice_windows_change_nothing_for_a_slice_no_larger_than_the_window():
    images = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    net = tiny_net(card())
    torch.testing.assert_close(sample_staged(net, windowed_card(), images, 2, 3, seed=3),
                               sample_staged(net, card(), images, 2, 3, seed=3), rtol=0, atol=0)


def test_with_slice_windows_what_is_added_far_away_does_not_change_the_prediction_here():
    """The defect windows guard: a whole slice goes through group normalisation at once, so air added
    beside the anatomy changes the prediction everywhere. Windowed, a pixel depends only on the windows
    holding it: columns 0-3 lie in the windows starting at column 0 only, for 16 columns and for 24."""
    from DiffusionSegLib.methods.unisegdiff.sampling import Encoded, window_grid

    c = windowed_card()
    net = tiny_net(c)
    generator = torch.Generator().manual_seed(2)
    image, x = torch.randn((1, 1, 8, 16), generator=generator), torch.randn((1, 1, 8, 16), generator=generator)
    air = torch.full((1, 1, 8, 8), -3.0)
    padded_image, padded_x = torch.cat([image, air], dim=3), torch.cat([x, torch.zeros(1, 1, 8, 8)], dim=3)
    t = torch.tensor([500])
    with torch.inference_mode():
        def predict(use_card, img, noisy):
            return Encoded.of(net, img, window_grid(use_card, tuple(img.shape[2:]))).denoise(net, noisy, t)

        windowed = predict(c, image, x)[..., :4], predict(c, padded_image, padded_x)[..., :4]
        whole = predict(card(), image, x)[..., :4], predict(card(), padded_image, padded_x)[..., :4]
    torch.testing.assert_close(windowed[0], windowed[1], rtol=1e-5, atol=1e-5)
    assert float((whole[0] - whole[1]).abs().max()) > 1e-3  # whole slices: the air changes these columns


def test_the_time_estimate_times_the_windows_a_run_uses():
    c = windowed_card()
    net = tiny_net(c)
    shapes = _Counting(net)
    plan = METHOD.plan(c, 2, 3, None)
    with torch.inference_mode():
        out = METHOD.example_call(net, c, torch.randn(2, 1, 12, 20))
    assert out.shape == (2, 1, 12, 20) and shapes.seen == {(8, 8)}
    with torch.inference_mode():
        assert METHOD.item_seconds(net, c, torch.randn(2, 1, 12, 20), plan, lambda call: (call(), 1.0)) > 0
