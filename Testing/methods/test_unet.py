"""Benchmark building blocks: the supervised MONAI UNet baseline and synthetic lung lesions."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.models.card import ModelCard
from DiffusionSegLib.methods.registry import build_network, get_method
from DiffusionSegLib.bench.synthetic_lesions import LesionDesign, insert_lesions
from DiffusionSegLib.training.loop import dice_score, train
from helpers import shape_image, train_config, write_shapes

# One torch thread: on the shared 2-core machine, 2 threads under load made 6 tiny steps take 44 s
# instead of 8 s (OpenMP threads wait on each other).
pytestmark = pytest.mark.usefixtures("one_thread")

UNET_NET = {"channels": [16, 32, 64], "num_res_units": 1}


@pytest.mark.parametrize("spatial_dims, size", [(2, (20, 28)), (3, (8, 12, 16))])
def test_unet_maps_images_to_one_logit_map_per_label(spatial_dims, size):
    card = ModelCard(name="u", method="unet", spatial_dims=spatial_dims, in_channels=3, network=UNET_NET)
    net = build_network(card)
    assert net.size_divisor == 4 and not get_method("unet").draws_samples
    with torch.no_grad():
        logits = net(torch.randn(2, 3, *size))
    assert logits.shape == (2, 1, *size)


def test_unet_baseline_learns_shapes_and_segments_deterministically(tmp_path):
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings

    write_shapes(tmp_path / "data", 40, seed=0)
    # Measured: validation Dice 0.854 after 300 steps at lr 3e-3 (0.74 at lr 1e-3), about 5 s.
    config = train_config(method="unet", network=UNET_NET, steps=300, lr=3e-3, batch_size=8, val_every=300,
                     checkpoint_every=300, val_cases=8, augment=False)
    card = train(tmp_path / "data", tmp_path / "model", config, progress=False)
    assert card.method == "unet" and card.default_samples == 1 and card.default_steps == 1
    assert card.metrics["validation_mean_dice"] >= 0.8

    rng = np.random.default_rng(123)
    scores = []
    for _ in range(4):
        image, mask = shape_image(rng)
        # Asking for samples/steps is harmless: a supervised model runs once.
        result = segment_image(sitk.GetImageFromArray(image), tmp_path / "model",
                               SegmentSettings(crf=False, device="cpu", samples=4, steps=5, seed=1))
        scores.append(dice_score(result.fused[0], mask))
        assert result.report["samples"] == 1 and result.report["nfe_per_image"] == 1
        assert result.sample_diversity == [0.0] and not result.ambiguity.any()
        again = segment_image(sitk.GetImageFromArray(image), tmp_path / "model",
                              SegmentSettings(crf=False, device="cpu", seed=2))
        assert np.array_equal(again.probability, result.probability)  # no noise, no seed dependence
    assert np.mean(scores) >= 0.8


def _lung_phantom() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like (z, y, x) volume: soft tissue at 40 HU around two aerated ellipsoidal lungs at -800 HU."""
    zz, yy, xx = np.mgrid[:24, :64, :64].astype(np.float32)
    lung = np.zeros((24, 64, 64), bool)
    for cx in (20.0, 44.0):
        lung |= ((zz - 12) / 10) ** 2 + ((yy - 32) / 22) ** 2 + ((xx - cx) / 9) ** 2 <= 1
    ct = np.where(lung, -800.0, 40.0).astype(np.float32)
    ct += np.random.default_rng(0).normal(0, 10, ct.shape).astype(np.float32)
    return ct, lung


def test_synthetic_lesions_stay_in_the_lung_and_are_reproducible():
    ct, lung = _lung_phantom()
    spacing = (2.5, 1.0, 1.0)
    design = LesionDesign(diameter_mm=(6.0, 14.0))
    made = insert_lesions(ct, lung, spacing, n_lesions=3, seed=7, design=design)
    assert 1 <= len(made.lesions) <= 3 and made.mask.any()
    assert not (made.mask.astype(bool) & ~lung).any(), "the label must be a subset of the lung"
    assert np.array_equal(made.ct[~lung], ct[~lung]), "CT outside the lung must not change"
    assert made.mask.sum() == sum(lesion.voxels for lesion in made.lesions)
    assert sum(le.volume_ml for le in made.lesions) == pytest.approx(made.mask.sum() * 2.5 / 1000, abs=0.005)
    # Solid lesion density inside the label, well above aerated lung.
    assert float(np.median(made.ct[made.mask > 0])) > -300
    again = insert_lesions(ct, lung, spacing, n_lesions=3, seed=7, design=design)
    assert np.array_equal(again.ct, made.ct) and np.array_equal(again.mask, made.mask)
    other = insert_lesions(ct, lung, spacing, n_lesions=3, seed=8, design=design)
    assert not np.array_equal(other.mask, made.mask)


def test_synthetic_lesions_reject_bad_input():
    ct, lung = _lung_phantom()
    with pytest.raises(ValueError, match="empty"):
        insert_lesions(ct, np.zeros_like(lung), (1, 1, 1), 1, seed=0)
    with pytest.raises(ValueError, match="same"):
        insert_lesions(ct, lung[:-1], (1, 1, 1), 1, seed=0)
    with pytest.raises(ValueError, match="diameter"):
        insert_lesions(ct, lung, (1, 1, 1), 1, seed=0, design=LesionDesign(diameter_mm=(5.0, 2.0)))
