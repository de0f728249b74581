"""Diffusion pretraining of the 3D backbone (methods/pretrain3d/denoising.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DiffusionSegLib.methods.diffusion import schedule_alphas_cumprod
from DiffusionSegLib.methods.pretrain3d import denoising
from DiffusionSegLib.methods.pretrain3d.coordinates import CoordinateNet
from DiffusionSegLib.methods.pretrain3d.denoising import (DenoisingBackbone, PretrainConfig, PretrainObjective,
                                                          load_backbone, pretrain_backbone, pretraining_loss,
                                                          random_crops)


class Oracle(torch.nn.Module):
    """Knows the clean crop and the noise the loss will draw: returns the exact target of each objective."""

    def __init__(self, clean, noise, kind):
        super().__init__()
        self.clean, self.noise, self.kind = clean, noise, kind

    def forward(self, x, t):
        return {"image": self.noise if self.kind == "diffusion" else self.clean,
                "coordinates": torch.zeros(self.clean.shape[0], 3, *self.clean.shape[2:])}


def _volumes(n: int = 2, shape=(20, 24, 28)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return [np.clip(0.8 * np.exp(-((x - 0.2 * k) ** 2 + y ** 2 + z ** 2) * 3) - 0.4
                    + 0.05 * rng.standard_normal(shape), -1, 1).astype(np.float32) for k in range(n)]


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


def test_bad_objectives_and_missing_guidance_are_refused(tmp_path):
    with pytest.raises(ValueError, match="objective"):
        PretrainObjective(kind="contrastive").check()
    with pytest.raises(ValueError, match="coordinate model"):
        pretrain_backbone(_volumes(), PretrainConfig(objective=PretrainObjective(coordinate_weight=1.0), steps=1),
                          tmp_path)


def test_random_crops_pad_small_volumes_with_air():
    crops = random_crops([np.zeros((4, 40, 40), np.float32)], (8, 16, 16), 3, np.random.default_rng(0))
    assert crops.shape == (3, 1, 8, 16, 16)
    assert (crops[:, :, 4:] == -1.0).all() and (crops[:, :, :4] == 0.0).all()


def test_pretraining_learns_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """On two small synthetic volumes: 6 steps in one go, or a run stopped after its step-4 checkpoint
    and started again, give the same weights and log; the saved backbone loads back and a foreign config is refused."""
    volumes = _volumes()
    coords = CoordinateNet(channels=(4, 8), norm_groups=2).eval()
    objective = PretrainObjective(kind="diffusion", coordinate_weight=0.5)
    config = PretrainConfig(objective=objective, channels=(8, 16), patch=(8, 8, 8), batch=2, steps=6,
                            lr=3e-3, checkpoint_every=2)
    whole, log = pretrain_backbone(volumes, config, tmp_path / "whole", coords)
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["coordinates"] > 0 for r in log)

    real_save = denoising._save_checkpoint

    def save_then_die(folder, config, net, optimiser, rng, generator, log):
        real_save(folder, config, net, optimiser, rng, generator, log)
        if len(log) == 4:
            raise KeyboardInterrupt  # the session ends after the step-4 checkpoint

    monkeypatch.setattr(denoising, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(volumes, config, tmp_path / "split", coords)
    monkeypatch.undo()
    assert not (tmp_path / "split" / "backbone.json").exists()  # nothing final before the run is done
    resumed, resumed_log = pretrain_backbone(volumes, config, tmp_path / "split", coords)
    assert resumed_log == log
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    loaded, card = load_backbone(tmp_path / "whole")
    assert card["pretraining"]["objective"]["coordinate_weight"] == 0.5 and card["network"]["coordinate_head"]
    for a, b in zip(whole.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another configuration"):
        pretrain_backbone(volumes, PretrainConfig(**{**config.__dict__, "lr": 1e-3}), tmp_path / "whole", coords)


def test_denoising_loss_falls_over_training(tmp_path):
    config = PretrainConfig(objective=PretrainObjective(kind="restorative"), channels=(8, 16), patch=(8, 8, 8),
                            batch=4, steps=60, lr=3e-3, checkpoint_every=1000)
    _, log = pretrain_backbone(_volumes(), config, tmp_path)
    first, last = np.mean([r["image"] for r in log[:10]]), np.mean([r["image"] for r in log[-10:]])
    assert last < 0.5 * first


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
