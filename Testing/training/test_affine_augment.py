"""The strength of the random affine (rotation, scale) as training settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.training import data
from DiffusionSegLib.training.loop import TrainConfig


def _masks(rotate_deg: float, scale: float) -> np.ndarray:
    """(6, 1, 32, 32) masks of a bar off-centre, every item through the affine (prob 1), no other change."""
    image = np.zeros((1, 1, 32, 32), np.float32)
    mask = np.zeros((1, 1, 32, 32), np.uint8)
    mask[0, 0, 8:24, 12:16] = 1  # a vertical bar: a rotation turns it, a scale lengthens or shortens it
    image[mask.astype(bool)] = 1.0
    aug = data.Augmentation(prob=1.0, rotate_deg=rotate_deg, scale=scale, intensity_scale=0.0,
                            intensity_shift=0.0, noise_std=0.0)
    sampler = data.PatchSampler([data.Case("c", image, mask)], 2, (32, 32), foreground_fraction=1.0,
                                augmentation=aug, seed=3)
    return sampler.batch(6)[1]


def test_zero_strength_keeps_the_mask_and_a_strong_affine_moves_it():
    plain = _masks(0.0, 0.0)
    assert plain.shape == (6, 1, 32, 32)
    assert all(int(m.sum()) == 64 for m in plain)  # the 16 x 4 bar, only shifted by the crop
    rows = [np.flatnonzero(m[0].any(axis=1)) for m in plain]
    assert all(r.size == 16 for r in rows)  # still 16 rows tall: not turned, not scaled
    strong = _masks(60.0, 0.4)
    heights = [np.flatnonzero(m[0].any(axis=1)).size for m in strong]
    assert any(h != 16 for h in heights)  # turned or scaled


def test_the_settings_are_checked():
    TrainConfig.from_dict({"rotate_augment_deg": 30, "scale_augment": 0.3}).check()
    for bad, message in [({"rotate_augment_deg": -1}, "rotate_augment_deg"),
                         ({"rotate_augment_deg": 181}, "rotate_augment_deg"),
                         ({"rotate_augment_deg": math.nan}, "rotate_augment_deg"),
                         ({"scale_augment": -0.1}, "scale_augment"), ({"scale_augment": 1.0}, "scale_augment")]:
        with pytest.raises(DiffusionSegError, match=message):
            TrainConfig.from_dict(bad).check()
    defaults = TrainConfig()
    assert (defaults.rotate_augment_deg, defaults.scale_augment) == (10.0, 0.1)  # earlier runs are unchanged


@pytest.mark.usefixtures("one_thread")
def test_a_training_run_passes_the_strengths_to_its_sampler(tmp_path):
    from helpers import short_run_losses

    losses = short_run_losses(tmp_path, {"plain": {}, "again": {},
                                         "strong": {"rotate_augment_deg": 90, "scale_augment": 0.5}})
    assert losses[0] == losses[1] and losses[2] != losses[0]  # same seed: only the affine's strength differs
