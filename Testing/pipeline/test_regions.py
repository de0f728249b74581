"""Regions found by thresholds (pipeline/regions.py) and the card's ``region_components``: a lung
lesion model keeps only the pieces that touch the chest cavity."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import make_model, segment_with_and_without_postprocessing
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.pipeline.regions import lung_region, slice_hulls, threshold_lung_mask
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings


def _chest(lungs: bool = True) -> np.ndarray:
    """(z, y, x) = (6, 64, 64) HU: air around a 40 HU body (rows 8-55, columns 4-59), two -850 HU
    lungs (rows 16-47; columns 10-27 and 36-53; 155 mL each at 3 x 3 x 5 mm) with the mediastinum (columns 28-35) between them."""
    ct = np.full((6, 64, 64), -1000.0, np.float32)
    ct[:, 8:56, 4:60] = 40.0
    if lungs:
        ct[:, 16:48, 10:28] = -850.0
        ct[:, 16:48, 36:54] = -850.0
    return ct


def test_slice_hulls_close_the_gap_between_two_blobs_slice_by_slice():
    mask = np.zeros((2, 7, 9), bool)
    mask[0, 1:4, 0:2] = True
    mask[0, 1:4, 6:8] = True  # two 3 x 2 blocks: the hull is the 3 x 8 box
    mask[1, 5, 5] = True  # one pixel: kept as it is
    hull = slice_hulls(mask)
    expected = np.zeros((2, 7, 9), bool)
    expected[0, 1:4, 0:8] = True
    expected[1, 5, 5] = True
    np.testing.assert_array_equal(hull, expected)


def test_the_lung_region_holds_lungs_and_mediastinum_and_grows_by_the_margin_in_plane_only():
    ct = _chest()
    region = lung_region(ct, (5.0, 3.0, 3.0), margin_mm=6.0)  # 2 voxels in-plane
    assert region[:, 16:48, 10:54].all()  # both lungs and the mediastinum between them
    # 6 mm = 2 voxels out from each side (a disk: the box's corners stay out), no further
    assert region[:, 14:50, 10:54].all() and region[:, 16:48, 8:56].all() and not region[:, 14, 8].any()
    assert not region[:, 13, 30].any() and not region[:, 30, 7].any()
    assert not region[:, :8].any() and not region[:, :, :4].any()  # outside the body
    assert lung_region(_chest(lungs=False), (5.0, 3.0, 3.0)) is None  # no lungs: no region


def _abdomen_with_lung_bases() -> np.ndarray:
    """(z, y, x) = (12, 64, 64) HU at 3 x 3 x 5 mm: a 40 HU body (rows 8-55, columns 4-59); on the top
    3 slices two -800 HU lung bases (rows 16-35; columns 10-23 and 40-53: 38 mL each, under the 100 mL
    that keeps stray air out); on slices 0-8 a -1000 HU bowel loop (rows 40-51, columns 14-49: 170 mL)."""
    ct = np.full((12, 64, 64), -1000.0, np.float32)
    ct[:, 8:56, 4:60] = 40.0
    ct[9:, 16:36, 10:24] = -800.0
    ct[9:, 16:36, 40:54] = -800.0
    ct[:9, 40:52, 14:50] = -1000.0
    return ct


def test_the_lung_region_of_an_abdominal_scan_is_its_lung_bases_not_its_bowel_gas():
    """example_ct's defect: its lung bases (42, 62 mL) were under the lung finder's 100 mL and its bowel
    gas (238 mL) was taken for the lungs, so the region dropped every lung-base lesion. Gas (median at or
    below -950 HU) is not lung, and lungs of 20 mL count."""
    region = lung_region(_abdomen_with_lung_bases(), (5.0, 3.0, 3.0))
    assert region is not None
    assert region[9:, 16:36, 10:54].all()  # both lung bases and the gap between them
    assert not region[:9].any()  # the bowel slices: no lungs there
    bowel_only = _abdomen_with_lung_bases()
    bowel_only[9:] = 40.0
    assert lung_region(bowel_only, (5.0, 3.0, 3.0)) is None  # gas alone is no chest: nothing to confine to
    # The dataset builders' finder is unchanged (their published crops stay): by default gas of 100 mL counts.
    assert threshold_lung_mask(bowel_only, (5.0, 3.0, 3.0))[:9, 40:52, 14:50].all()


def _inside_and_outside(net, card, images, n_samples, steps, **kwargs):
    """Stand-in sampler: every sample marks a blob in the mediastinum and one in the body wall more than
    10 mm below the lungs' hull (model grid = input grid: the test model has no spacing)."""
    import torch

    out = torch.zeros((n_samples, images.shape[0], 1, images.shape[-2], images.shape[-1]))
    out[..., 28:34, 29:34] = 1.0  # mediastinum
    out[..., 52:56, 40:46] = 1.0  # body wall, rows 52-55: 15 mm and more below the hull (row 47)
    return out


def test_the_card_confines_a_label_to_the_lungs_and_says_when_it_cannot(tmp_path, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    monkeypatch.setattr(diffusion, "sample_masks", _inside_and_outside)
    model = make_model(tmp_path / "lungs", region_components={"lesion": "lungs"}, normalization={
        "kind": "ct_window", "center": -600, "width": 1500})
    image = sitk.GetImageFromArray(_chest())
    image.SetSpacing((3.0, 3.0, 5.0))
    on, off = segment_with_and_without_postprocessing(image, model, samples=2, steps=1)
    assert off.fused[0].sum() == 6 * (30 + 24)
    assert on.fused[0].sum() == 6 * 30 and on.fused[0, :, 28:34, 29:34].all()
    post = on.report["postprocessing"]
    assert post["region_components"] == {"lesion": "lungs"} and post["region_notes"] == []
    assert post["removed_ml"]["fused"]["lesion"] == round(6 * 24 * 3 * 3 * 5 / 1000.0, 4)

    # A scan with no lungs: nothing confined, and the report says why.
    no_lungs = sitk.GetImageFromArray(_chest(lungs=False))
    no_lungs.SetSpacing((3.0, 3.0, 5.0))
    kept = segment_image(no_lungs, model, SegmentSettings(samples=2, steps=1, crf=False))
    assert kept.fused[0].sum() == 6 * (30 + 24)
    assert kept.report["postprocessing"]["region_notes"] == ["region lungs not found in the input (no lungs found): lesion not confined to it"]


@pytest.mark.parametrize("regions, words", [({"lesion": "liver"}, "unknown region 'liver'"),
                                            ({"tumour": "lungs"}, "names 'tumour', not a label")])
def test_a_bad_region_in_the_card_is_refused_before_sampling(tmp_path, monkeypatch, regions, words):
    from DiffusionSegLib.methods import diffusion

    def never(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(diffusion, "sample_masks", never)
    model = make_model(tmp_path / "bad", region_components=regions)
    with pytest.raises(ModelLoadError, match=words):
        segment_image(sitk.GetImageFromArray(_chest()), model, SegmentSettings(samples=2, steps=1, crf=False))


def test_a_fine_scan_finds_its_region_on_a_coarser_grid_and_gets_it_back_on_its_own():
    """0.75 mm pixels: the region is found every 2nd pixel (1.5 mm) and repeated back to 512 x 512-like grids."""
    from DiffusionSegLib.core.enums import Region
    from DiffusionSegLib.pipeline.regions import find_region

    fine = np.repeat(np.repeat(_chest(), 4, axis=1), 4, axis=2)[:, :255, :255]  # odd size: the repeat is cropped
    image = sitk.GetImageFromArray(fine)
    image.SetSpacing((0.75, 0.75, 5.0))
    region = find_region(Region.LUNGS, image)
    assert region.shape == fine.shape
    assert region[:, 64:192, 40:216].all()  # both lungs and the mediastinum (rows 16-47, columns 10-53 x 4)
    assert not region[:, :20].any() and not region[:, :, :12].any() and not region[:, 215:].any()
