"""Narrow fields of view in training (data.narrow_view, ``view_augment``): an item seen through a window
that holds its centre, the rest the case's darkest value and background, as tight crops are padded."""

from __future__ import annotations

import numpy as np
import pytest

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.training import data
from DiffusionSegLib.training.loop import TrainConfig


def test_the_window_holds_the_centre_and_the_rest_is_fill_and_background():
    image = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12) + 5.0
    mask = np.ones((1, 10, 12), np.uint8)
    fill = np.array([-1.0, -3.0], np.float32)
    for seed in range(20):
        out, out_mask = data.narrow_view(image, mask, fill, 0.5, np.random.default_rng(seed))
        kept = out_mask[0].astype(bool)
        rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
        # One rectangle, each side at least half the patch (5 of 10 rows, 6 of 12 columns), holding (5, 6).
        assert kept.sum() == rows.size * cols.size and rows.size >= 5 and cols.size >= 6
        assert rows[0] <= 5 <= rows[-1] and cols[0] <= 6 <= cols[-1]
        np.testing.assert_array_equal(out[:, kept], image[:, kept])
        assert (out[0, ~kept] == -1.0).all() and (out[1, ~kept] == -3.0).all()
    # view_min 1: the whole patch, unchanged
    same, same_mask = data.narrow_view(image, mask, fill, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(same, image)
    np.testing.assert_array_equal(same_mask, mask)


def _sampler(view_prob: float) -> data.PatchSampler:
    image = np.linspace(-1.0, 1.0, 3 * 32 * 32, dtype=np.float32).reshape(1, 3, 32, 32)
    mask = np.zeros((1, 3, 32, 32), np.uint8)
    mask[0, :, 12:20, 12:20] = 1
    aug = data.Augmentation(prob=0.0, rotate_deg=0.0, scale=0.0, view_prob=view_prob, view_min=0.25)
    return data.PatchSampler([data.Case("a", image, mask)], 2, (16, 16), foreground_fraction=1.0,
                             augmentation=aug, seed=3)


def test_the_sampler_narrows_items_with_the_cases_minimum_and_off_leaves_the_stream_as_it_was():
    images, masks = _sampler(1.0).batch(8)
    narrowed = 0
    for image, mask in zip(images, masks):
        outside = image[0] == -1.0  # the case's minimum (the ramp's first voxel is not in any item)
        narrowed += int(outside.any())
        assert not mask[0][outside].any()
    assert narrowed >= 6  # a window of the whole patch is possible, but rare
    off_a, off_b = _sampler(0.0).batch(8), data.PatchSampler(
        [data.Case("a", *(_sampler(0.0).images[0], _sampler(0.0).masks[0]))], 2, (16, 16), foreground_fraction=1.0,
        augmentation=data.Augmentation(prob=0.0, rotate_deg=0.0, scale=0.0), seed=3).batch(8)
    np.testing.assert_array_equal(off_a[0], off_b[0])  # view_prob 0 draws nothing


@pytest.mark.parametrize("fields", [{"view_augment": 1.5}, {"view_augment_min": 0.0}, {"view_augment": "a"}])
def test_bad_view_settings_are_refused(fields):
    with pytest.raises(DiffusionSegError, match="view_augment"):
        TrainConfig(**fields).check()


@pytest.mark.usefixtures("one_thread")
def test_a_training_run_passes_the_view_settings_to_its_sampler(tmp_path):
    from helpers import short_run_losses

    losses = short_run_losses(tmp_path, {"plain": {}, "again": {},
                                         "view": {"view_augment": 1.0, "view_augment_min": 0.3}})
    assert losses[0] == losses[1] and losses[2] != losses[0]  # same seed: only the narrowed items differ
