"""The brain region of a head MR from the bundled brain atlas (pipeline/brain_atlas.py, Region.BRAIN):
the atlas file, the rigid registration on a head with a known pose, the refusals, and the card filter
that keeps a piece only when at least half of it lies in the brain."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from DiffusionSegLib.core.enums import Region
from DiffusionSegLib.pipeline import brain_atlas
from DiffusionSegLib.pipeline.postprocess import components_touching
from DiffusionSegLib.pipeline.regions import find_card_regions
from helpers import synthetic_head_mr, tilted_pose

_POSE = tilted_pose()


def test_the_bundled_atlas_is_the_file_the_script_makes_and_a_changed_one_is_refused(tmp_path):
    atlas = sitk.ReadImage(str(brain_atlas.ATLAS_PATH))
    assert atlas.GetSpacing() == (3.0, 3.0, 3.0) and atlas.GetPixelID() == sitk.sitkUInt8
    brain_ml = float((sitk.GetArrayViewFromImage(atlas) > brain_atlas.BRAIN_LEVEL).sum()) * 27 / 1000
    assert 1500 < brain_ml < 2300  # an adult brain with its sulci
    assert (brain_atlas.ATLAS_PATH.parent / "NOTICE.txt").read_text().count("Copyright (C) 1993-2009 Louis Collins") == 1
    copy = tmp_path / brain_atlas.ATLAS_PATH.name
    shutil.copyfile(brain_atlas.ATLAS_PATH, copy)
    blob = bytearray(copy.read_bytes())
    blob[-9] ^= 0xFF
    copy.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="not the file shipped"):
        brain_atlas.load_atlas(copy)
    with pytest.raises(FileNotFoundError):
        brain_atlas.load_atlas(tmp_path / "missing.nii.gz")


def test_the_registration_runs_on_one_itk_thread_and_restores_the_setting(monkeypatch):
    """Several ITK threads sum the metric in a varying order: the same head gave brains a few voxels
    apart between runs. The metric reads the global default, so that is what must be 1 during Execute."""
    seen = []
    execute = sitk.ImageRegistrationMethod.Execute

    def recording(self, fixed, moving):
        seen.append(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())
        return execute(self, fixed, moving)

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "Execute", recording)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    atlas = brain_atlas.load_atlas()
    brain_atlas.register_rigid(atlas, atlas)
    assert seen == [1] and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


def test_a_damaged_atlas_gives_no_region_and_says_why(monkeypatch, tmp_path):
    head, _ = synthetic_head_mr(_POSE)
    monkeypatch.setattr(brain_atlas, "ATLAS_PATH", tmp_path / "missing.nii.gz")
    found, why = brain_atlas.find_brain(head)
    assert found is None and why.startswith("the brain atlas cannot be used (brain atlas missing")


def test_downsampling_keeps_origin_and_direction_and_rounds_to_bytes():
    template = sitk.GetImageFromArray(np.pad(np.full((30, 30, 30), 200.0, np.float32), 15))
    template.SetOrigin((-5.0, 3.0, 7.0))
    small = brain_atlas.downsample_template(template, 3.0)
    assert small.GetSize() == (20, 20, 20) and small.GetSpacing() == (3.0, 3.0, 3.0)
    assert small.GetOrigin() == template.GetOrigin() and small.GetPixelID() == sitk.sitkUInt8
    values = sitk.GetArrayFromImage(small)
    assert values[10, 10, 10] == 200 and values[0, 0, 0] == 0  # the middle of the block, the corner


def test_a_head_in_another_pose_gets_the_atlas_brain_back():
    """The registration recovers a known rotation and shift: the brain found overlaps the brain the
    synthetic head was made with (Dice >= 0.9), on the head's own grid."""
    head, brain = synthetic_head_mr(_POSE)
    found, why = brain_atlas.find_brain(head)
    assert why == "" and found.shape == brain.shape
    dice = 2 * (found & brain).sum() / (found.sum() + brain.sum())
    assert dice >= 0.9, dice
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    again, _ = brain_atlas.find_brain(head)
    assert np.array_equal(again, found)  # the same head, the same brain (one ITK thread while registering)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads  # and the thread setting restored
    identity, _ = brain_atlas.find_brain(synthetic_head_mr(sitk.Euler3DTransform())[0])
    assert 2 * (identity & found).sum() / (identity.sum() + found.sum()) < 0.9  # the pose mattered


@pytest.mark.parametrize("case, words", [("slab", "spans 50 mm"), ("flat", "3D scalar"), ("noise", "does not match"),
                                         ("constant", "could not be registered|does not match")])
def test_inputs_the_atlas_cannot_be_placed_on_get_no_region_and_a_reason(case, words):
    if case == "slab":
        image, _ = synthetic_head_mr(sitk.Euler3DTransform(), size=(128, 150, 10))  # 10 slices of 5 mm
    elif case == "flat":
        image = sitk.GetImageFromArray(np.random.default_rng(1).normal(0, 1, (64, 64)).astype(np.float32))
    else:
        values = np.random.default_rng(2).normal(100, 30, (40, 80, 80)) if case == "noise" else np.full((40, 80, 80), 7.0)
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.SetSpacing((2.0, 2.0, 4.0))
    found, why = brain_atlas.find_brain(image)
    assert found is None
    assert pytest.importorskip("re").search(words, why), why


def test_a_piece_is_kept_when_at_least_half_of_it_lies_in_the_brain():
    region = np.zeros((1, 8, 8), bool)
    region[:, :, :4] = True
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 0, 2:6] = True  # 2 of 4 inside: kept
    mask[0, 3, 3:7] = True  # 1 of 4 inside: dropped
    mask[0, 6, 0:2] = True  # wholly inside: kept
    kept = components_touching(mask, region, min_inside=0.5)
    expected = mask.copy()
    expected[0, 3] = False
    np.testing.assert_array_equal(kept.astype(bool), expected)
    assert components_touching(mask, region).sum() == mask.sum()  # touching: all three


def test_a_card_with_the_brain_region_drops_pieces_outside_the_brain(tmp_path):
    from helpers import make_model

    head, brain = synthetic_head_mr(_POSE)
    model = make_model(tmp_path / "brain", region_components={"lesion": "brain"})
    from DiffusionSegLib.models.card import read_card

    (regions, notes) = find_card_regions(head, read_card(model))
    assert notes == [] and len(regions) == 1
    region, labels, min_inside = regions[0]
    assert labels == ["lesion"] and min_inside == 0.5 and region.shape == brain.shape
    # A blob in the brain's middle and one in the scalp: the card's filters keep the first only.
    from DiffusionSegLib.pipeline.postprocess import apply_card_filters

    masks = np.zeros((1, *brain.shape), np.uint8)
    z, y, x = (int(np.median(a)) for a in np.nonzero(brain))
    masks[0, z - 1:z + 2, y - 3:y + 3, x - 3:x + 3] = 1
    scalp = ndimage.binary_dilation(brain, iterations=5) & ~ndimage.binary_dilation(brain, iterations=3)
    sz, sy, sx = (a[0] for a in np.nonzero(scalp))
    masks[0, sz, sy:sy + 2, sx:sx + 2] = 1  # on the scalp rim: at most a corner of it can touch the brain
    inside = masks.copy()
    inside[0, sz, sy:sy + 2, sx:sx + 2] = 0
    removed = apply_card_filters(masks, masks * 3, 3, ["lesion"], read_card(model), regions, 0.001)
    np.testing.assert_array_equal(masks, inside)
    assert removed["lesion"] > 0
    slab, _ = synthetic_head_mr(sitk.Euler3DTransform(), size=(128, 150, 10))
    assert find_card_regions(slab, read_card(model)) == ([], [
        "region brain not found in the input (the image spans 50 mm along one axis, under the 100 mm the brain "
        "atlas needs to be placed): lesion not confined to it"])
    assert Region.parse("brain", "region") == Region.BRAIN
