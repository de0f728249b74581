"""Head-foot anchors of the coordinate model (issue 15, methods/pretrain3d/alignment.py and
``anchor_term`` / ``train_coordinates(anchors=...)``): the air profile and the lung base against values
computed by hand, and anchored training placing a scan's origin where its anchor says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DiffusionSegLib.methods.pretrain3d.alignment import (LEFT_LUNG, RIGHT_LUNG, air_profile, lung_base_levels,
                                                          lung_extent_mm, lung_halves, lung_run)
from DiffusionSegLib.methods.pretrain3d.coordinates import anchor_term, train_coordinates
from DiffusionSegLib.pipeline.regions import threshold_lung_mask

from helpers import blob_phantom


def test_air_profile_by_hand():
    hu = np.full((6, 20, 20), -1000.0)
    hu[:5, 2:12, 2:12] = 40.0  # the body: 10 x 10 = 100 voxels per slice
    hu[2:4, 4:8, 4:9] = -850.0  # a "lung" of 4 x 5 = 20 voxels, enclosed: 0.2 of the body
    hu[4, 5:7, 5:6] = -1000.0  # 2 voxels of bowel gas: 0.02
    hu[5, 2:4, 2:4] = 40.0  # the scan's end: 4 voxels, under a fifth of the largest cross-section
    hu[:, 16:18, :] = 40.0  # the table: a separate, smaller piece that must not count as body
    profile = air_profile(hu / 1000.0)
    np.testing.assert_allclose(profile[:5], [0.0, 0.0, 0.2, 0.2, 0.02])
    assert np.isnan(profile[5])
    with pytest.raises(ValueError, match="D, H, W"):
        air_profile(np.zeros((4, 4)))


def test_lung_base_levels_by_hand():
    spacing = 4.0
    both = [0.02] * 5 + [0.3] * 10 + [0.02] * 3  # lungs in slices 5-14: base 20 mm, apex 56 mm (height 36)
    bowel = [0.02] * 3 + [0.12] * 2 + [0.02] * 4 + [0.3] * 12 + [0.05] * 2  # bump at 3-4, lungs 9-20: base 36, height 44
    inside = [0.3] * 8 + [0.02] * 4  # starts inside the lungs: apex 28 mm, base 28 - median(36, 44, 4) = -8
    none = [0.02] * 10
    padded = [np.nan, 0.02, 0.3, 0.3, 0.02]  # the first slice is undefined: base at slice 2, 8 mm (height 4)
    open_top = [0.02, 0.3, 0.3]  # ends inside the lungs: base 4 mm, no apex (no height)
    assert lung_run(np.array(bowel)) == (9, 20)
    levels = lung_base_levels([np.array(p) for p in (both, bowel, inside, none, padded, open_top)], spacing)
    np.testing.assert_allclose(levels, [20.0, 36.0, -8.0, np.nan, 8.0, 4.0])
    # Without a scan showing both ends there is no lung height: a scan starting inside stays unplaced.
    assert np.isnan(lung_base_levels([np.array(inside)], spacing)[0])


def test_anchor_term_by_hand():
    t = torch.tensor([[5.0, 1.0, 1.0], [5.0, 1.0, 1.0]])
    centre = torch.tensor([[20.0, 0.0, 0.0], [20.0, 0.0, 0.0]])
    nan = float("nan")
    # View 1: p -> p - 20 + 5 = p - 15, the anchor 15: exact. View 2: anchor 10, off by 5 in z; y: p - 0 + 1
    # against p + 3 (anchor -3), off by 2.
    anchor = torch.tensor([[15.0, nan, nan], [10.0, -3.0, nan]])
    assert anchor_term(t, centre, anchor).item() == pytest.approx((0.0 + 5.0 + 2.0) / 2)
    free = torch.full((2, 3), nan)
    t.requires_grad_(True)
    value = anchor_term(t, centre, free)
    value.backward()  # nothing anchored: 0, and a gradient (of zeros) rather than NaN
    assert value.item() == 0.0 and torch.equal(t.grad, torch.zeros_like(t))


def test_anchored_training_puts_the_origin_where_the_anchor_says():
    """One phantom, its head-foot origin anchored 150 mm from its first slice. Anchored, the patches'
    estimates of where the origin lies (centre - t) come to within 30 mm of 150; with the same seed and
    no anchor nothing asks for 150, and they stay around the patch centres (30-62 mm)."""
    volume = blob_phantom((24, 24, 24))
    nan = float("nan")
    settings = dict(patch=(16, 16, 16), batch=4, lr=3e-3, channels=(4, 8, 16), output="offset", slab_probability=0.0,
                    steps=150, seed=1)
    anchored, log = train_coordinates([(volume, (4.0, 4.0, 4.0))], anchors=[[150.0, nan, nan]], **settings)
    free, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], **settings)
    assert "anchor" in log[0] and log[-1]["anchor"] < log[0]["anchor"]

    def origin_z(model) -> float:
        starts = [(z, y, x) for z in (0, 8) for y in (0, 8) for x in (0, 8)]
        patches = torch.from_numpy(np.stack([volume[z:z + 16, y:y + 16, x:x + 16] for z, y, x in starts])[:, None])
        centres = torch.tensor(starts, dtype=torch.float32) * 4.0 + 7.5 * 4.0
        with torch.no_grad():
            return (centres - model.translation(patches))[:, 0].mean().item()

    assert abs(origin_z(anchored) - 150.0) < 30.0, origin_z(anchored)
    assert abs(origin_z(free) - 150.0) > 60.0, origin_z(free)


def test_anchors_are_checked():
    volume = blob_phantom((16, 16, 16))
    with pytest.raises(ValueError, match="output='offset'"):
        train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=0, patch=(16, 16, 16), channels=(4, 8),
                          anchors=[[0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="one \\(z, y, x\\) per volume"):
        train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=0, patch=(16, 16, 16), channels=(4, 8), output="offset",
                          anchors=[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def test_lung_halves_split_at_the_body_centre_and_keep_a_common_stretch():
    """Two -850 HU lungs in a 40 HU body on a 4 mm grid: the one at low x is the right lung (LPS)."""
    hu = np.full((20, 40, 40), -1000.0)
    hu[:, 5:35, 4:36] = 40.0
    hu[6:16, 10:30, 7:18] = -850.0  # right lung: 10 slices x 20 x 11 voxels, 140.8 mL at 4 mm
    hu[8:18, 10:30, 22:33] = -850.0  # left lung, two slices higher
    body = hu > -500
    body[:] = True  # the centroid of a symmetric body is x = 19.5 either way
    lungs = threshold_lung_mask(hu, (4.0,) * 3)
    halves = lung_halves(lungs, 4.0, body)
    assert np.array_equal(np.argwhere(halves == RIGHT_LUNG)[:, 2].min(), 7)
    assert (halves == RIGHT_LUNG).sum() == 10 * 20 * 11 and (halves == LEFT_LUNG).sum() == 10 * 20 * 11
    # Levels relative to a lung base at slice 6 (24 mm): the lungs span 0 .. 44 mm above it.
    assert lung_extent_mm(halves, 4.0, 24.0) == (0.0, 44.0)
    kept = lung_halves(lungs, 4.0, body, z_range_mm=(8.0, 20.0), level_mm=24.0)  # slices 8-11
    assert sorted(set(np.flatnonzero(kept.reshape(20, -1).any(axis=1)).tolist())) == [8, 9, 10, 11]
    assert lung_extent_mm(np.zeros((3, 4, 4), np.int16), 4.0, 0.0) is None
    assert not lung_halves(np.zeros((4, 10, 10), bool), 4.0, np.ones((4, 10, 10), bool)).any()
