"""Boundary jitter (label noise): training masks whose boundaries move by a smooth random distance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.training import data
from DiffusionSegLib.training.loop import TrainConfig


def _disc(size: int = 64, radius: float = 15.0) -> np.ndarray:
    """(1, size, size) uint8 disc in the middle."""
    yy, xx = np.mgrid[:size, :size]
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius ** 2).astype(np.uint8)[None]


def _distance_mm(mask: np.ndarray, voxel: tuple[float, float]) -> np.ndarray:
    inside = mask.astype(bool)
    return ndimage.distance_transform_edt(~inside, sampling=voxel) - ndimage.distance_transform_edt(inside, sampling=voxel)


def test_zero_jitter_keeps_the_mask_and_empty_or_full_labels_never_change():
    """The sign convention: with no movement, the new mask (distance < 0) is exactly the old one."""
    mask = np.concatenate([_disc(), np.zeros((1, 64, 64), np.uint8), np.ones((1, 64, 64), np.uint8)])
    still = data.Augmentation(boundary_jitter_mm=1e-9, voxel_mm=(3.0, 3.0))
    assert np.array_equal(data.jitter_boundaries(mask, still, np.random.default_rng(0)), mask)
    moved = data.jitter_boundaries(mask, data.Augmentation(boundary_jitter_mm=6.0, voxel_mm=(3.0, 3.0)),
                                   np.random.default_rng(0))
    assert np.array_equal(moved[1:], mask[1:])  # empty and full labels stay as they are
    assert not np.array_equal(moved[0], mask[0])


def test_boundaries_move_both_ways_by_about_the_asked_distance_in_mm():
    """3 mm voxels, 6 mm jitter: voxels change near the boundary only (both grown and shrunk), and
    with 1 mm voxels the same jitter in mm reaches about 3x as many voxels from the boundary."""
    mask = _disc()
    for voxel in ((3.0, 3.0), (1.0, 1.0)):
        aug = data.Augmentation(boundary_jitter_mm=6.0, voxel_mm=voxel)
        grown = shrunk = 0
        reach = []
        for seed in range(8):
            moved = data.jitter_boundaries(mask, aug, np.random.default_rng(seed))[0].astype(bool)
            distance = _distance_mm(mask[0], voxel)
            changed = moved != mask[0].astype(bool)
            grown += int((moved & ~mask[0].astype(bool)).sum())
            shrunk += int((~moved & mask[0].astype(bool)).sum())
            reach.append(np.abs(distance[changed]).max())
        assert grown > 0 and shrunk > 0
        # A Gaussian field of std 6 mm: changes stay within a few standard deviations of the boundary.
        assert 6.0 <= max(reach) <= 30.0, (voxel, reach)


def test_jitter_follows_the_sampler_seed_and_its_saved_state():
    image = np.zeros((1, 2, 32, 32), np.float32)
    mask = np.zeros((1, 2, 32, 32), np.uint8)
    mask[0, :, 8:24, 8:24] = 1
    aug = data.Augmentation(prob=0.0, boundary_jitter_mm=3.0, voxel_mm=(1.0, 1.0))
    a = data.PatchSampler([data.Case("c", image, mask)], 2, (32, 32), augmentation=aug, seed=1)
    b = data.PatchSampler([data.Case("c", image, mask)], 2, (32, 32), augmentation=aug, seed=1)
    first = a.batch(3)[1]
    assert not np.array_equal(first[0], mask[:, 0]), "the jitter must reach the training items"
    state = a.get_state()
    second = a.batch(3)[1]
    b.set_state(json.loads(json.dumps(state)))
    assert np.array_equal(b.batch(3)[1], second)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("value, method, match", [(-1.0, "medsegdiff", "boundary_jitter_mm -1.0"),
                                                  (float("nan"), "medsegdiff", "boundary_jitter_mm nan"),
                                                  (3.0, "diffseg", "needs masks")])
def test_the_training_config_refuses_a_jitter_that_cannot_work(value, method, match):
    with pytest.raises(DiffusionSegError, match=match):
        TrainConfig(method=method, boundary_jitter_mm=value).check()
    TrainConfig(method="unisegdiff", boundary_jitter_mm=3.0).check()
