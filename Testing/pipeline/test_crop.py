"""A card's ``crop_to_region`` (pipeline/crop.py): a run samples only the region's in-plane bounding box,
every slice kept, and writes every output back on the whole input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import make_model
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.pipeline.crop import crop_image, paste, region_box, removed_fraction
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings

CT_WINDOW = {"kind": "ct_window", "center": -600, "width": 1500}


def _chest(lungs: bool = True) -> sitk.Image:
    """(z, y, x) = (6, 64, 64) HU at 3 x 3 x 5 mm: air around a 40 HU body (rows 8-55, columns 4-59), two
    -850 HU lungs (rows 16-47; columns 10-27 and 36-53). Origin and direction not the identity."""
    ct = np.full((6, 64, 64), -1000.0, np.float32)
    ct[:, 8:56, 4:60] = 40.0
    if lungs:
        ct[:, 16:48, 10:28] = -850.0
        ct[:, 16:48, 36:54] = -850.0
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((3.0, 3.0, 5.0))
    image.SetOrigin((-90.0, 20.0, 300.0))
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


# The lungs' region: their hull (rows 16-47, columns 10-53) grown 10 mm in-plane, i.e. 3 pixels of 3 mm.
BOX = (slice(13, 51), slice(7, 57))


def test_region_box_is_the_in_plane_bounding_box_and_none_when_empty():
    mask = np.zeros((4, 10, 12), bool)
    mask[1, 2:4, 5] = True
    mask[3, 7, 1:3] = True
    assert region_box(mask) == (slice(2, 8), slice(1, 6))
    assert region_box(mask[3]) == (slice(7, 8), slice(1, 3))  # a 2D image's (y, x) region
    assert region_box(np.zeros((3, 5, 5), bool)) is None


def test_a_crop_keeps_every_voxel_where_it_was_and_paste_puts_it_back():
    image = _chest()
    cropped = crop_image(image, BOX)
    assert cropped.GetSize() == (50, 38, 6)
    # Voxel (i, j, k) of the crop is voxel (i + 7, j + 13, k) of the input, at the same physical point.
    for i, j, k in ((0, 0, 0), (49, 37, 5), (20, 5, 3)):
        assert np.allclose(cropped.TransformIndexToPhysicalPoint((i, j, k)),
                           image.TransformIndexToPhysicalPoint((i + 7, j + 13, k)))
    array = sitk.GetArrayFromImage(cropped)[None]  # (1, z, y, x), a label axis in front
    back = paste(array, BOX, (6, 64, 64))
    assert back.shape == (1, 6, 64, 64) and back.dtype == array.dtype
    np.testing.assert_array_equal(back[0][:, 13:51, 7:57], sitk.GetArrayFromImage(image)[:, 13:51, 7:57])
    assert not back[0][:, :13].any() and not back[0][:, :, 57:].any()
    two_d = crop_image(image[:, :, 2], BOX)  # a 2D image: (columns, rows)
    assert two_d.GetSize() == (50, 38)


def _mark_everything(seen):
    def sample(net, card, images, n_samples, steps, **kwargs):
        import torch

        seen.append(tuple(images.shape))
        return torch.ones((n_samples, images.shape[0], 1, images.shape[-2], images.shape[-1]))
    return sample


def test_a_card_that_crops_samples_the_box_only_and_answers_on_the_whole_grid(tmp_path, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(diffusion, "sample_masks", _mark_everything(seen))
    model = make_model(tmp_path / "crop", crop_to_region="lungs", normalization=CT_WINDOW)
    image = _chest()
    result = segment_image(image, model, SegmentSettings(samples=2, steps=1, crf=False, keep_samples=True))
    # Six slices of the box (no spacing: the input grid; LPS-reoriented, so rows and columns may swap).
    assert seen[0][0] == 6 and sorted(seen[0][-2:]) == [38, 50]
    inside = np.zeros((6, 64, 64), bool)
    inside[:, 13:51, 7:57] = True
    for array in (result.fused[0], result.counts[0], result.samples[0, 0], result.samples[1, 0]):
        assert array.shape == (6, 64, 64)
        np.testing.assert_array_equal(array > 0, inside)
    assert result.counts[0].max() == 2 and result.reference is image
    assert result.uncertainty_of(0)[~inside].max() == 0.0  # nothing sampled there: no uncertainty either
    crop = result.report["crop"]
    assert crop["region"] == "lungs" and crop["index_xyz"] == [7, 13, 0] and crop["size_xyz"] == [50, 38, 6]
    assert crop["input_size_xyz"] == [64, 64, 6]

    seen.clear()  # --no-crop: the whole image, and the report says so
    whole = segment_image(image, model, SegmentSettings(samples=2, steps=1, crf=False, crop=False))
    assert seen[0][-2:] == (64, 64) and whole.fused[0].all()
    assert "--no-crop" in whole.report["crop"]["note"]
    assert SegmentSettings(crop=False).to_argv() == ["--no-crop"]


def test_no_region_found_means_the_whole_image_is_sampled_with_a_note(tmp_path, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(diffusion, "sample_masks", _mark_everything(seen))
    model = make_model(tmp_path / "crop", crop_to_region="lungs", normalization=CT_WINDOW)
    result = segment_image(_chest(lungs=False), model, SegmentSettings(samples=2, steps=1, crf=False))
    assert seen[0][-2:] == (64, 64) and result.fused[0].all()
    assert result.report["crop"]["note"] == "region lungs not found in the input (no lungs found): the whole image was sampled"


def test_an_unknown_crop_region_is_refused_before_sampling(tmp_path, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    def never(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(diffusion, "sample_masks", never)
    model = make_model(tmp_path / "bad", crop_to_region="liver")
    with pytest.raises(ModelLoadError, match="unknown crop_to_region 'liver'"):
        segment_image(_chest(), model, SegmentSettings(samples=2, steps=1, crf=False))


def test_removed_fraction_is_the_share_of_the_slice_area_outside_the_box():
    # The test chest's box: 38 x 50 of 64 x 64 pixels, 1 - 1900 / 4096 = 0.5361 left out.
    assert removed_fraction(BOX, (64, 64)) == pytest.approx(1 - 1900 / 4096)
    assert removed_fraction((slice(0, 10), slice(0, 20)), (10, 20)) == 0.0


def test_an_input_already_cut_to_the_region_is_sampled_as_it_is(tmp_path, monkeypatch):
    """``crop_min_removed``: a box that leaves out less of the slice than that share does not crop, so an
    input already cut to the region is not cut again on a grid a few pixels off; a larger one crops."""
    from DiffusionSegLib.methods import diffusion

    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(diffusion, "sample_masks", _mark_everything(seen))
    image = _chest()  # the box leaves out 0.536 of each slice
    kept = make_model(tmp_path / "keep", crop_to_region="lungs", crop_min_removed=0.6, normalization=CT_WINDOW)
    result = segment_image(image, kept, SegmentSettings(samples=2, steps=1, crf=False))
    assert seen[0][-2:] == (64, 64) and result.fused[0].all()
    crop = result.report["crop"]
    assert crop["removed_fraction"] == 0.536 and crop["size_xyz"] == [50, 38, 6]
    assert "less than crop_min_removed (60%)" in crop["note"] and "whole image was sampled" in crop["note"]

    seen.clear()
    cut = make_model(tmp_path / "cut", crop_to_region="lungs", crop_min_removed=0.5, normalization=CT_WINDOW)
    result = segment_image(image, cut, SegmentSettings(samples=2, steps=1, crf=False))
    assert sorted(seen[0][-2:]) == [38, 50] and result.fused[0][:, :13].sum() == 0
    assert result.report["crop"]["note"].startswith("sampled inside this box only")


@pytest.mark.parametrize("share", [1.0, -0.1, "0.3", True])
def test_a_crop_min_removed_outside_zero_to_one_is_refused_before_sampling(tmp_path, monkeypatch, share):
    from DiffusionSegLib.methods import diffusion

    def never(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(diffusion, "sample_masks", never)
    model = make_model(tmp_path / "bad", crop_to_region="lungs", crop_min_removed=share, normalization=CT_WINDOW)
    with pytest.raises(ModelLoadError, match="crop_min_removed .* must be a fraction of the slice area"):
        segment_image(_chest(), model, SegmentSettings(samples=2, steps=1, crf=False))


def test_evaluate_takes_no_crop_like_segment():
    from DiffusionSegLib.cli.main import build_parser

    for command in (["segment", "in.nii.gz", "-o", "out"], ["evaluate", "model", "data"]):
        assert SegmentSettings.from_args(build_parser().parse_args([*command, "--no-crop"])).crop is False
        assert SegmentSettings.from_args(build_parser().parse_args(command)).crop is True
