"""MR intensity augmentation: gamma and a bias field on the training items of chosen tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.training import data
from DiffusionSegLib.training.loop import TrainConfig


def test_gamma_keeps_each_channels_range_and_matches_the_hand_computed_values():
    # Channel 0 spans [0, 2]: 1 -> (1/2)^2 * 2 = 0.5. Channel 1 spans [-1, 3]: 1 -> (2/4)^2 * 4 - 1 = 0.
    image = np.array([[[0.0, 1.0, 2.0]], [[-1.0, 1.0, 3.0]]], np.float32)
    out = data.vary_intensity(image, data.Augmentation(prob=1.0, gamma=(2.0, 2.0)), np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, [[[0.0, 0.5, 2.0]], [[-1.0, 0.0, 3.0]]], atol=1e-6)
    # a drawn gamma: the range and the order of the values stay (a monotone change of contrast)
    noisy = np.random.default_rng(1).normal(size=(1, 16, 16)).astype(np.float32)
    drawn = data.vary_intensity(noisy, data.Augmentation(prob=1.0, gamma=(0.7, 1.5)), np.random.default_rng(2))
    assert np.isclose(drawn.min(), noisy.min()) and np.isclose(drawn.max(), noisy.max())
    assert np.array_equal(np.argsort(drawn, axis=None), np.argsort(noisy, axis=None))
    assert not np.allclose(drawn, noisy)


def test_the_bias_field_is_a_smooth_positive_factor_above_the_minimum_in_2d_and_3d():
    aug = data.Augmentation(prob=1.0, bias_field=0.3)
    image = np.full((1, 64, 64), 2.0, np.float32)
    image[0, 0, 0] = 0.0  # the minimum stays where it is; the rest is multiplied by exp(field)
    out = data.vary_intensity(image, aug, np.random.default_rng(0))
    factor = out[0, 1:] / 2.0
    assert out[0, 0, 0] == 0.0 and factor.min() > 0.0
    assert factor.max() / factor.min() > 1.2  # it shades the patch...
    assert np.abs(np.diff(factor, axis=1)).max() < 0.05  # ...slowly: no step between neighbours
    volume = np.full((1, 8, 32, 32), 1.0, np.float32)
    volume[0, 0, 0, 0] = 0.0
    assert data.vary_intensity(volume, aug, np.random.default_rng(0)).shape == volume.shape


def test_off_transforms_draw_nothing_and_change_nothing():
    image = np.random.default_rng(0).normal(size=(1, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(5)
    assert np.array_equal(data.vary_intensity(image, data.Augmentation(prob=1.0), rng), image)
    assert rng.random() == np.random.default_rng(5).random()  # the stream did not move


def _case(name: str, task: str) -> data.Case:
    """A lesion on a smooth ramp: a gamma or a bias field changes the item."""
    image = np.linspace(-1.0, 1.0, 16 * 16, dtype=np.float32).reshape(1, 1, 16, 16)
    mask = np.zeros((1, 1, 16, 16), np.uint8)
    mask[0, 0, 6:10, 6:10] = 1
    return data.Case(name, image, mask, task)


def _items(tasks: tuple[str, ...], gamma: tuple[float, float] | None, case_task: str = "lung") -> np.ndarray:
    aug = data.Augmentation(prob=1.0, rotate_deg=0.0, scale=0.0, intensity_scale=0.0, intensity_shift=0.0,
                            noise_std=0.0, gamma=gamma, bias_field=0.3 if gamma else 0.0, intensity_tasks=tasks)
    sampler = data.PatchSampler([_case("c", case_task)], 2, (16, 16), augmentation=aug, seed=4)
    return sampler.batch(6)[0]


def test_only_the_named_tasks_items_change():
    plain = _items((), None)
    assert np.array_equal(_items(("brain",), (0.7, 1.5)), plain)  # a lung case: not a brain item
    changed = _items(("lung",), (0.7, 1.5))
    assert all(not np.allclose(a, b) for a, b in zip(changed, plain))
    assert not np.allclose(_items((), (0.7, 1.5)), plain)  # no task named: every item


def test_training_settings_are_checked_and_reach_the_sampler(tmp_path):
    base = {"method": "unisegdiff", "tasks": {"lung": {"modality": "CT"}, "brain": {"modality": "MR"}},
            "default_task": "lung"}
    good = TrainConfig.from_dict({**base, "gamma_augment": [0.7, 1.5], "bias_field_augment": 0.3,
                                  "intensity_augment_tasks": ["brain"]})
    good.check()
    for bad, message in [({"gamma_augment": [1.5, 0.7]}, "gamma_augment"), ({"gamma_augment": [0, 1]}, "gamma_augment"),
                         ({"gamma_augment": [1.0]}, "gamma_augment"), ({"bias_field_augment": -0.1}, "bias_field_augment"),
                         ({"intensity_augment_tasks": ["breast"]}, "breast")]:
        with pytest.raises(DiffusionSegError, match=message):
            TrainConfig.from_dict({**base, **bad}).check()
    with pytest.raises(DiffusionSegError, match="mask-supervised"):
        TrainConfig.from_dict({"method": "diffseg", "gamma_augment": [0.7, 1.5]}).check()
    assert json.loads(json.dumps(good.gamma_augment)) == [0.7, 1.5]


@pytest.mark.usefixtures("one_thread")
def test_a_training_run_passes_the_settings_to_its_sampler(tmp_path):
    from helpers import short_run_losses

    losses = short_run_losses(tmp_path, {"plain": {}, "again": {},
                                         "gamma": {"gamma_augment": [0.5, 2.0], "bias_field_augment": 0.3}})
    assert losses[0] == losses[1] and losses[2] != losses[0]  # same seed: only the augmentation differs
