"""Ensemble statistics against hand-computed numbers."""

import math

import numpy as np
import pytest

from DiffusionSegLib.pipeline import ensemble


def _three_samples() -> np.ndarray:
    """(N=3, L=2, 4): label 0 differs between samples, label 1 is empty in every sample."""
    label0 = np.array([[1, 1, 0, 0],
                       [1, 0, 1, 0],
                       [1, 1, 1, 0]], dtype=np.uint8)
    return np.stack([label0, np.zeros_like(label0)], axis=1)


def test_probability_fused_consistency_ambiguity():
    s = _three_samples()
    p = ensemble.probability(s)
    assert p.dtype == np.float32 and p.shape == (2, 4)
    np.testing.assert_allclose(p[0], [1, 2 / 3, 2 / 3, 0], rtol=1e-6)
    np.testing.assert_array_equal(p[1], 0)
    fused = ensemble.fused_mask(s)
    assert fused.dtype == np.uint8
    np.testing.assert_array_equal(fused, [[1, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ensemble.fused_mask(s, threshold=0.7), [[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ensemble.consistency(s), [[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(ensemble.ambiguity(s), [[0, 1, 1, 0], [0, 0, 0, 0]])
    assert ensemble.consistency(s).dtype == np.uint8 and ensemble.ambiguity(s).dtype == np.uint8


def test_uncertainty_variance_and_entropy():
    s = _three_samples()
    var = ensemble.uncertainty(s, "variance")
    assert var.dtype == np.float32 and var.shape == (2, 4)
    np.testing.assert_allclose(var[0], [0, 2 / 9, 2 / 9, 0], atol=1e-7)
    ent = ensemble.uncertainty(s, "entropy")
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # 0.9183 bits
    np.testing.assert_allclose(ent[0], [0, h, h, 0], atol=1e-6)
    np.testing.assert_array_equal(ent[1], 0)  # p = 0: 0 log 0 = 0, not NaN
    # Two samples disagreeing: p = 1/2 is the maximum of both measures.
    half = np.array([[[1]], [[0]]], dtype=np.uint8)
    assert ensemble.uncertainty(half, "variance")[0, 0] == pytest.approx(0.25)
    assert ensemble.uncertainty(half, "entropy")[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ensemble.uncertainty(s, "std")


def test_iou_distance():
    a = np.array([[1, 1], [0, 0]])
    b = np.array([[1, 0], [1, 0]])
    assert ensemble.iou_distance(a, b) == pytest.approx(1 - 1 / 3)
    assert ensemble.iou_distance(a, a) == 0.0
    assert ensemble.iou_distance(a, 1 - a) == 1.0
    assert ensemble.iou_distance(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0  # both empty: agree
    assert ensemble.iou_distance(a, np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError):
        ensemble.iou_distance(a, np.zeros(4))


def test_sample_diversity_hand_computed():
    # Pairs of label 0: d(0,1) = 1 - 1/3, d(0,2) = 1 - 2/3, d(1,2) = 1 - 2/3 -> mean 4/9.
    # Label 1: every pair is two empty masks -> 0.
    diversity = ensemble.sample_diversity(_three_samples())
    assert diversity == pytest.approx([4 / 9, 0.0])
    assert ensemble.sample_diversity(_three_samples()[:1]) == [0.0, 0.0]  # N = 1


def test_sample_diversity_matches_pair_loop_and_chunking(monkeypatch):
    rng = np.random.default_rng(3)
    s = (rng.random((6, 2, 5, 7, 3)) < rng.random((6, 2, 1, 1, 1))).astype(np.uint8)
    s[0, 1] = 0  # one empty sample among non-empty ones
    expected = [
        np.mean([ensemble.iou_distance(s[i, lab], s[j, lab]) for i in range(6) for j in range(i + 1, 6)])
        for lab in range(2)
    ]
    assert ensemble.sample_diversity(s) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(ensemble, "_CHUNK_VOXELS", 17)  # 105 voxels in 7 chunks
    assert ensemble.sample_diversity(s) == pytest.approx(expected, abs=1e-12)


def test_generalized_energy_distance_hand_computed():
    samples = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=np.uint8)[:, None]
    references = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=np.uint8)[:, None]
    # d(S1,S2) = 1/3, d(Y1,Y2) = 2/3; cross: 2/3, 1, 1/3, 3/4 -> mean 0.6875.
    # GED = 2 * 0.6875 - 1/3 - 2/3 = 0.375
    assert ensemble.generalized_energy_distance(samples, references) == pytest.approx([0.375])
    # One reference: E[d(Y, Y')] = 0; cross mean (2/3 + 1/3) / 2 -> GED = 1 - 1/3.
    assert ensemble.generalized_energy_distance(samples, references[:1]) == pytest.approx([2 / 3])
    with pytest.raises(ValueError):
        ensemble.generalized_energy_distance(samples, references[:, :, :3])


def test_staple_outvotes_the_disagreeing_rater():
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 1
    odd = np.zeros_like(a)
    odd[4:8, 0:3] = 1  # a third rater that disagrees almost everywhere it marks
    samples = np.stack([a, a, odd])[:, None]
    staple = ensemble.fused_mask(samples, method="staple")
    assert staple.dtype == np.uint8 and staple.shape == (1, 8, 8)
    np.testing.assert_array_equal(staple[0], a)
    np.testing.assert_array_equal(staple, ensemble.fused_mask(samples, method="mean"))


def _disk_raters(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n raters (n, 1, 12, 12) of a disk; for n >= 3 rater j alone flips voxel j of the first rows.

    Every flipped voxel is outvoted n - 1 to 1 and the raters are equally reliable, so STAPLE and
    the mean both give the disk. With n = 2 the raters are identical (no 1-to-1 ties).
    """
    yy, xx = np.mgrid[:12, :12]
    disk = ((yy - 6) ** 2 + (xx - 6) ** 2 < 16).astype(np.uint8)
    raters = np.repeat(disk[None, None], n, axis=0)
    if n >= 3:
        for j in range(n):
            y, x = divmod(j, 12)
            raters[j, 0, y, x] ^= 1
    return raters, disk


@pytest.mark.parametrize("n", [2, 6, 25])
def test_staple_accepts_any_number_of_samples(n):
    # SimpleITK's positional STAPLE Execute takes at most 5 images; 25 samples is the paper setting.
    raters, disk = _disk_raters(n)
    staple = ensemble.fused_mask(raters, method="staple")
    assert staple.shape == (1, 12, 12) and staple.dtype == np.uint8
    np.testing.assert_array_equal(staple[0], disk)
    np.testing.assert_array_equal(staple, ensemble.fused_mask(raters, method="mean"))


def _reliable_and_uninformative_raters() -> tuple[np.ndarray, np.ndarray]:
    """6 raters of 32 voxels (6, 1, 4, 8): 2 perfect raters and 4 uninformative ones.

    Voxel v has truth v // 16; the 4 noisy raters read the bits of v % 16, so over each half of the
    volume they run through all 16 patterns once: each is right half the time (sensitivity =
    specificity = 1/2) and independent of the others. Returns (raters, truth (4, 8)).
    """
    truth = np.repeat([0, 1], 16).astype(np.uint8)
    bits = (np.arange(32)[None] >> np.arange(3, -1, -1)[:, None]) & 1  # (4, 32): bits 3..0 of v
    raters = np.concatenate([np.stack([truth, truth]), bits.astype(np.uint8)])
    return raters.reshape(6, 1, 4, 8), truth.reshape(4, 8)


def test_staple_weights_reliable_raters_unlike_the_mean():
    raters, truth = _reliable_and_uninformative_raters()
    # STAPLE's EM fixed point: the perfect raters get p = q = 1, the noisy ones p = q = 1/2. A
    # noisy rater then multiplies both the foreground and the background likelihood by 1/2, so it
    # cancels, and the perfect raters decide every voxel: STAPLE returns the truth.
    np.testing.assert_array_equal(ensemble.fused_mask(raters, method="staple")[0], truth)
    # The mean > 0.5 needs 4 of 6 votes. Truth 1 (2 votes from the perfect raters): wrong where at
    # most one noisy rater says 1, patterns 0, 1, 2, 4, 8 -> voxels 16, 17, 18, 20, 24. Truth 0:
    # wrong where all four noisy raters say 1, pattern 15 -> voxel 15.
    mean = ensemble.fused_mask(raters, method="mean")[0].ravel()
    wrong = np.flatnonzero(mean != truth.ravel())
    np.testing.assert_array_equal(wrong, [15, 16, 17, 18, 20, 24])


def test_staple_single_sample_and_empty():
    raters, disk = _disk_raters(2)
    np.testing.assert_array_equal(ensemble.fused_mask(raters[:1], method="staple")[0], disk)  # N = 1
    for n in (1, 6, 25):  # all empty: STAPLE's estimate is NaN, the answer is empty
        empty = np.zeros((n, 2, 5, 6), np.uint8)
        np.testing.assert_array_equal(ensemble.fused_mask(empty, method="staple"), 0)


def test_staple_degenerate_labels():
    # STAPLE's estimate is NaN when raters never vary; all-empty and all-full labels must stay so.
    samples = np.zeros((3, 2, 4, 4), np.uint8)
    samples[:, 1] = 1
    np.testing.assert_array_equal(ensemble.fused_mask(samples, method="staple"), samples[0])
    with pytest.raises(ValueError):
        ensemble.fused_mask(samples, method="vote")


def test_volumes_ml_anisotropic_spacing():
    mask = np.zeros((2, 3, 4, 5), np.uint8)
    mask[0, 0, :, 0] = 1  # 4 voxels
    mask[1, :, 1, 1:3] = 1  # 6 voxels
    # voxel = 0.5 * 2 * 3 = 3 mm^3 -> 12 and 18 mm^3
    assert ensemble.volumes_ml(mask, (0.5, 2.0, 3.0)) == pytest.approx([0.012, 0.018])
    assert ensemble.volumes_ml(mask[:, 0], (0.5, 4.0)) == pytest.approx([0.008, 0.004])  # 4 and 2 px of 2 mm^2
    with pytest.raises(ValueError):
        ensemble.volumes_ml(mask, (1.0, 1.0))


def test_rejects_non_stack():
    with pytest.raises(ValueError):
        ensemble.probability(np.zeros((4, 4)))


def test_agreement_mask_counts_samples_hand_computed():
    from DiffusionSegLib.pipeline.ensemble import agreement_mask

    # 3 samples, 1 label, 4 voxels: voxel v is foreground in exactly v samples.
    samples = np.array([[[0, 1, 1, 1]], [[0, 0, 1, 1]], [[0, 0, 0, 1]]], dtype=np.uint8)
    assert agreement_mask(samples, 1).tolist() == [[0, 1, 1, 1]]  # union
    assert agreement_mask(samples, 2).tolist() == [[0, 0, 1, 1]]  # majority = mean > 0.5
    assert agreement_mask(samples, 3).tolist() == [[0, 0, 0, 1]]  # consistency
    assert np.array_equal(agreement_mask(samples, 3), ensemble.consistency(samples))
    assert agreement_mask(samples, 2).dtype == np.uint8
    for bad in (0, 4):
        with pytest.raises(ValueError, match="between 1 and the number of samples"):
            agreement_mask(samples, bad)


def test_every_statistic_follows_from_the_sample_counts():
    """The result keeps only the counts: each statistic from them equals the one from the samples."""
    s = _three_samples()
    counts = ensemble.sample_counts(s)
    assert counts.dtype == np.uint8
    np.testing.assert_array_equal(counts, [[3, 2, 2, 0], [0, 0, 0, 0]])
    assert np.array_equal(ensemble.probability_from_counts(counts, 3), ensemble.probability(s))
    assert np.array_equal(ensemble.consistency_from_counts(counts, 3), ensemble.consistency(s))
    assert np.array_equal(ensemble.ambiguity_from_counts(counts, 3), ensemble.ambiguity(s))
    for kind in ("variance", "entropy"):
        from_counts = ensemble.uncertainty_from_probability(ensemble.probability_from_counts(counts, 3), kind)
        assert np.array_equal(from_counts, ensemble.uncertainty(s, kind))
    # More samples than a uint8 counts: the counts widen instead of wrapping round.
    many = np.ones((300, 1, 2), np.uint8)
    assert ensemble.sample_counts(many).dtype == np.uint16 and ensemble.sample_counts(many).max() == 300


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.75])
def test_mean_fusion_from_counts_equals_fusing_the_samples(n, threshold):
    """Even N puts voxels exactly on the 0.5 threshold (not foreground); the lookup must agree."""
    samples = (np.random.default_rng(n).random((n, 2, 6, 7)) > 0.5).astype(np.uint8)
    from_counts = ensemble.fused_mask_from_counts(ensemble.sample_counts(samples), n, threshold)
    assert from_counts.dtype == np.uint8
    np.testing.assert_array_equal(from_counts, ensemble.fused_mask(samples, threshold=threshold))


def test_sample_diversity_of_masks_in_a_corner_of_a_large_grid():
    """The pairwise IoU is computed on the masks' bounding box: the numbers are the hand-computed ones."""
    masks = np.zeros((3, 1, 40, 50, 60), np.uint8)
    masks[0, 0, 30:32, 40:42, 50:52] = 1  # 8 voxels
    masks[1, 0, 30:32, 40:42, 50:51] = 1  # 4 of them
    masks[2, 0, 0, 0, 0] = 1  # far away: the box is nearly the whole grid
    # pairs: (0,1) 1 - 4/8, (0,2) 1, (1,2) 1 -> mean 5/6
    assert ensemble.sample_diversity(masks)[0] == pytest.approx(5 / 6)
    assert ensemble.sample_diversity(masks[:2])[0] == pytest.approx(0.5)
    assert ensemble.occupied_box(masks[0, 0]) == (slice(30, 32), slice(40, 42), slice(50, 52))
    assert ensemble.occupied_box(np.zeros((3, 3))) is None
