"""Post-processing of the fused mask (largest component, consistent components): hand-computed cases and
the run report."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import make_model, segment_with_and_without_postprocessing
from DiffusionSegLib.pipeline.postprocess import (components_touching, keep_consistent_components,
                                                  keep_largest_component, largest_component)


def test_keeps_only_the_largest_piece_and_reports_what_it_removed():
    masks = np.zeros((2, 4, 8, 8), np.uint8)
    masks[0, 0:2, 0:2, 0:3] = 1  # 12 voxels
    masks[0, 3, 6:8, 6:8] = 1  # 4 voxels, separate
    masks[1] = masks[0]  # label "b" is not processed
    out, removed = keep_largest_component(masks, ["a", "b"], ["a"], voxel_ml=0.008)  # 2 x 2 x 2 mm voxels
    assert out[0].sum() == 12 and out[0, 0:2, 0:2, 0:3].all()
    np.testing.assert_array_equal(out[1], masks[1])
    assert removed == {"a": 4 * 0.008}
    assert masks[0].sum() == 16  # the input is left alone by default
    # In place (what a run does with its own fused mask): the same numbers, no copy of the masks.
    same, removed_in_place = keep_largest_component(masks, ["a", "b"], ["a"], voxel_ml=0.008, in_place=True)
    assert same is masks and np.array_equal(masks, out) and removed_in_place == removed
    with pytest.raises(ValueError, match="uint8"):
        keep_largest_component(masks.astype(bool), ["a", "b"], ["a"], voxel_ml=0.008, in_place=True)


def test_pieces_touching_at_a_corner_are_one_component_and_empty_stays_empty():
    mask = np.zeros((5, 5), np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # diagonal chain: one component with 8-connectivity
    mask[4, 4] = 1
    mask[4, 3] = 1
    kept = largest_component(mask)
    assert kept.sum() == 3 and kept[2, 2] == 1 and kept[4, 4] == 0
    assert largest_component(np.zeros((3, 3, 3))).sum() == 0


def _two_blobs(net, card, images, n_samples, steps, **kwargs):
    """Stand-in sampler: every sample marks a big and a small blob in every slice, one voxel varying."""
    import torch

    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    out = torch.zeros((n_samples, b, 1, h, w))
    out[..., 2:12, 2:12] = 1.0
    out[..., 20:24, 20:24] = 1.0
    for k in range(n_samples):
        out[k, :, 0, 13, 13 + k] = 1.0  # sample-to-sample differences, so ambiguity is not empty
    return out


def test_the_card_decides_and_the_report_says_so(tmp_path, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    monkeypatch.setattr(diffusion, "sample_masks", _two_blobs)
    model = make_model(tmp_path / "lcc", largest_component=["lesion"])
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    on, off = segment_with_and_without_postprocessing(image, model, samples=3, steps=2)
    from scipy import ndimage

    n_on = ndimage.label(on.fused[0], structure=np.ones((3, 3, 3)))[1]
    n_off = ndimage.label(off.fused[0], structure=np.ones((3, 3, 3)))[1]
    assert n_off == 2
    assert n_on == 1
    removed = on.report["postprocessing"]["removed_ml"]["fused"]["lesion"]
    assert removed == round((off.fused.sum() - on.fused.sum()) * 2.0 / 1000.0, 4)
    np.testing.assert_array_equal(on.probability, off.probability)  # samples untouched
    np.testing.assert_array_equal(on.ambiguity, off.ambiguity)
    assert off.report["postprocessing"]["largest_component"] == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_largest_component_equals_labelling_the_whole_grid(seed):
    """Labelling only the mask's bounding box must keep the same piece, ties included (equal-sized
    pieces: the first in raster order of the whole grid)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    mask = np.zeros((12, 30, 40), np.uint8)
    mask[3:9, 5:25, 8:30] = rng.random((6, 20, 22)) > 0.62  # many small pieces, some of equal size
    mask[10, 28, 38] = 1
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel())[1:]
    expected = (components == int(np.argmax(sizes)) + 1).astype(np.uint8)
    np.testing.assert_array_equal(largest_component(mask), expected)
    assert largest_component(np.zeros((4, 5), np.uint8)).sum() == 0


def test_consistent_components_keep_whole_pieces_that_every_sample_marks_somewhere():
    """5 samples; fused = counts >= 3. Piece A has one voxel all 5 mark: kept whole, outline included.
    Piece B (bigger) is marked by 3 or 4 samples only: dropped. Label "b" is not processed."""
    counts = np.zeros((2, 6, 10), np.uint8)
    counts[0, 0:3, 0:3] = 3
    counts[0, 1, 1] = 5  # A: 9 voxels, one of them consistent
    counts[0, 3:6, 4:10] = 4  # B: 18 voxels, none consistent
    counts[1] = counts[0]
    fused = (counts >= 3).astype(np.uint8)
    out, removed = keep_consistent_components(fused, counts, 5, ["a", "b"], ["a"], voxel_ml=0.5)
    expected = np.zeros((6, 10), np.uint8)
    expected[0:3, 0:3] = 1
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[1], fused[1])
    assert removed == {"a": 18 * 0.5}
    assert fused[0].sum() == 27  # the input is left alone by default
    same, _ = keep_consistent_components(fused, counts, 5, ["a", "b"], ["a"], voxel_ml=0.5, in_place=True)
    assert same is fused and np.array_equal(fused, out)
    # One sample: every marked voxel is consistent, nothing goes.
    np.testing.assert_array_equal(keep_consistent_components(fused, fused, 1, ["a", "b"], ["a", "b"], 1.0)[0], fused)
    # Pieces touching at a corner are one piece: a core in one half keeps both halves.
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = 1
    core = np.zeros((4, 4), bool)
    core[0, 0] = True
    assert components_touching(mask, core).tolist() == (mask * (np.arange(4)[:, None] < 2)).tolist()
    assert components_touching(np.zeros((3, 3)), core[:3, :3]).sum() == 0


def _agreed_and_unagreed_blobs(net, card, images, n_samples, steps, **kwargs):
    """Stand-in sampler: every sample marks a small blob; a big blob is marked by all samples but the last."""
    import torch

    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    out = torch.zeros((n_samples, b, 1, h, w))
    out[..., 20:24, 20:24] = 1.0
    out[: n_samples - 1, :, :, 2:12, 2:12] = 1.0
    return out


def test_the_card_asks_for_consistent_components_and_the_report_says_so(tmp_path, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    monkeypatch.setattr(diffusion, "sample_masks", _agreed_and_unagreed_blobs)
    # Both filters: the consistent pieces first, then the largest of them (here the small blob, which a
    # largest-component filter alone would have dropped).
    model = make_model(tmp_path / "cc", consistent_components=["lesion"], largest_component=["lesion"])
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    on, off = segment_with_and_without_postprocessing(image, model, samples=3, steps=2)
    assert off.fused[0].sum() == 3 * (100 + 16)
    assert on.fused[0].sum() == 3 * 16 and on.fused[0, :, 20:24, 20:24].all()
    report = on.report["postprocessing"]
    assert report["consistent_components"] == ["lesion"] and report["largest_component"] == ["lesion"]
    assert report["removed_ml"]["fused"]["lesion"] == round(3 * 100 * 2.0 / 1000.0, 4)
    np.testing.assert_array_equal(on.probability, off.probability)  # samples untouched
    assert off.report["postprocessing"]["consistent_components"] == []
