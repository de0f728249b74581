"""inputcheck: what about an input does not fit the model card, and the run-time estimate.

Synthetic inputs stand for the cases users meet: a CT in Hounsfield units (fits), an MR-like volume
and a PNG-like picture given to a CT model, RGB photos, crops and volumes in the wrong unit.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.pipeline.inputcheck import (
    MODALITY_TAG,
    InputWarning,
    RunEstimate,
    check_input,
    format_duration,
    input_modality,
    model_grid_items,
)
from DiffusionSegLib.models.card import LabelInfo, ModelCard


def ct_card(**fields) -> ModelCard:
    """A card like the bundled model's: 2D CT at 3 mm, CT window, 96 x 96 training crops (288 mm)."""
    values = dict(name="ct_test", modality="CT", spacing=[3.0, 3.0], patch_size=[96, 96], in_channels=1,
                  normalization={"kind": "ct_window", "center": 50, "width": 400}, labels=[LabelInfo("liver")])
    values.update(fields)
    return ModelCard(**values)


def body_ellipse(shape: tuple[int, int, int]) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return ((yy - shape[1] / 2) / (0.4 * shape[1])) ** 2 + ((xx - shape[2] / 2) / (0.45 * shape[2])) ** 2 < 1


def ct_volume(shape=(12, 160, 160), spacing=(2.5, 2.5, 5.0), padding: float | None = -3024) -> sitk.Image:
    """Air at -1000 HU around a soft-tissue body (0..80 HU) with a bone (700 HU), scan-circle padding."""
    rng = np.random.default_rng(0)
    body = body_ellipse(shape)
    arr = np.where(body, rng.normal(40, 20, shape), rng.normal(-1000, 10, shape))
    arr[:, shape[1] // 2 - 5: shape[1] // 2 + 5, shape[2] // 2 - 5: shape[2] // 2 + 5] = 700
    if padding is not None:
        zz, yy, xx = np.indices(shape)
        arr[((yy - shape[1] / 2) ** 2 + (xx - shape[2] / 2) ** 2) > (0.5 * shape[1]) ** 2] = padding
    image = sitk.GetImageFromArray(arr.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-200.0, -200.0, 100.0))
    return image


def mr_volume(shape=(12, 160, 160), spacing=(2.5, 2.5, 5.0)) -> sitk.Image:
    """MR-like: dark background near 0, tissue a few hundred arbitrary units, no negative values."""
    rng = np.random.default_rng(1)
    arr = np.where(body_ellipse(shape), rng.uniform(300, 900, shape), rng.uniform(0, 15, shape))
    image = sitk.GetImageFromArray(arr.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-200.0, -200.0, 100.0))
    return image


def png_like(rgb: bool = False, grey_rgb: bool = False) -> sitk.Image:
    """What SimpleITK returns for a PNG: 8-bit, spacing 1, origin 0, identity direction."""
    rng = np.random.default_rng(2)
    grey = np.where(body_ellipse((1, 120, 140))[0], rng.integers(90, 200, (120, 140)), 0).astype(np.uint8)
    if rgb:
        pixels = rng.integers(0, 256, (120, 140, 3), dtype=np.uint8)
        if grey_rgb:
            pixels = np.repeat(grey[..., None], 3, axis=-1)
        return sitk.GetImageFromArray(pixels, isVector=True)
    return sitk.GetImageFromArray(grey)


def codes(warnings: list[InputWarning]) -> list[str]:
    return [w.code for w in warnings]


def test_a_ct_in_hounsfield_units_fits_the_ct_model():
    assert check_input(ct_volume(), ct_card()) == []
    assert check_input(ct_volume(padding=None), ct_card()) == []
    assert input_modality(ct_volume())["modality"] == "CT"


def test_the_bundled_sample_fits_the_default_model():
    from DiffusionSegLib.pipeline.io import read_image
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.models.store import resolve_model

    from helpers import REPO

    card = read_card(resolve_model(None))
    if card.modality != "CT":
        pytest.skip("the default model is not a CT model")
    sample = read_image(REPO / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz")
    assert check_input(sample, card) == []


def test_an_mr_like_volume_given_to_the_ct_model_is_named():
    warnings = check_input(mr_volume(), ct_card())
    assert codes(warnings) == ["modality"]
    assert "CT" in warnings[0].message and "-1000" in warnings[0].message
    assert input_modality(mr_volume())["modality"] == "not CT"


def test_the_dicom_modality_tag_is_trusted_first():
    mr = mr_volume()
    mr.SetMetaData(MODALITY_TAG, "MR")
    warnings = check_input(mr, ct_card())
    assert codes(warnings) == ["modality"] and "DICOM" in warnings[0].message and "MR" in warnings[0].message
    assert input_modality(mr) == {"modality": "MR", "source": "DICOM Modality tag (0008,0060)"}
    # Tagged CT whose values are not HU (rescale intercept lost): an intensity warning, not a modality one.
    raw = mr_volume()
    raw.SetMetaData(MODALITY_TAG, "CT")
    assert codes(check_input(raw, ct_card())) == ["intensity"]
    # A CT given to an MR model.
    ct = ct_volume()
    assert codes(check_input(ct, ct_card(modality="MR", normalization={"kind": "zscore"}))) == ["modality"]
    ct.SetMetaData(MODALITY_TAG, "CT")
    assert "DICOM" in check_input(ct, ct_card(modality="MR"))[0].message


def test_a_png_like_picture_given_to_the_ct_model_has_no_hu_and_no_spacing():
    warnings = check_input(png_like(), ct_card())
    assert codes(warnings) == ["modality", "spacing"]
    assert "8-bit" in warnings[0].message
    assert "no pixel spacing" in warnings[1].message and "3 x 3 mm" in warnings[1].message
    # A model that works on the pixel grid (no card spacing) does not care about a missing spacing.
    assert "spacing" not in codes(check_input(png_like(), ct_card(spacing=None)))


def test_rgb_inputs_and_channel_counts():
    assert codes(check_input(png_like(rgb=True), ct_card())) == ["channels", "spacing"]
    assert "RGB" in check_input(png_like(rgb=True), ct_card())[0].message
    # A grey picture saved as RGB is reduced to one channel by preprocessing: no channel warning.
    assert "channels" not in codes(check_input(png_like(rgb=True, grey_rgb=True), ct_card()))
    rgb_card = ct_card(modality="RGB", in_channels=3, normalization={"kind": "rgb"}, spacing=None, patch_size=None)
    assert check_input(png_like(rgb=True), rgb_card) == []
    assert codes(check_input(png_like(), rgb_card)) == ["channels"]


def test_a_tiny_crop_and_a_volume_larger_than_a_body():
    crop = ct_volume(shape=(6, 40, 40), spacing=(0.7, 0.7, 1.0))  # 28 mm: far under half a 288 mm crop
    warnings = check_input(crop, ct_card())
    assert "field_of_view" in codes(warnings)
    assert "28 x 28 mm" in next(w.message for w in warnings if w.code == "field_of_view")
    huge = ct_volume(spacing=(25.0, 25.0, 50.0))  # spacing in cm read as mm: 4 m wide
    assert codes(check_input(huge, ct_card())) == ["field_of_view"]
    assert "unit" in check_input(huge, ct_card())[0].message and "25, 25, 50" in check_input(huge, ct_card())[0].message


def test_a_crop_narrower_than_the_training_view_warns():
    """The warning starts below the training crop's width (288 mm here), not at half of it: lung models lost
    about 0.1 Dice on crops of 60-70 % of theirs (docs/BENCHMARKS.md, "A small field of view")."""
    narrow = ct_volume(shape=(6, 80, 80), spacing=(2.5, 2.5, 5.0))  # 200 mm: 69 % of 288 mm
    warnings = check_input(narrow, ct_card())
    assert codes(warnings) == ["field_of_view"]
    assert "200 x 200 mm, less than the 288 mm views of CT slices" in warnings[0].message
    assert check_input(ct_volume(shape=(6, 120, 120), spacing=(2.5, 2.5, 5.0)), ct_card()) == []  # 300 mm


def test_field_of_view_uses_the_models_slice_plane():
    # A long thin column: 40 x 40 mm axially, 400 mm head to foot. A 2D axial model sees 40 x 40 mm
    # slices, too little context, although the volume's largest extent is 400 mm.
    column = ct_volume(shape=(160, 16, 16), spacing=(2.5, 2.5, 2.5))
    assert "field_of_view" in codes(check_input(column, ct_card()))
    # The same voxels stored with z as the first file axis (sagittal-like direction): reorientation to
    # the card's LPS finds the same axial plane.
    array = sitk.GetArrayFromImage(column)  # (z, y, x)
    turned = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (1, 2, 0))))  # file axes: z, x, y
    turned.SetSpacing((2.5, 2.5, 2.5))
    turned.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))  # file i -> patient z, j -> x, k -> y (columns)
    assert "field_of_view" in codes(check_input(turned, ct_card()))


def test_warnings_are_plain_sentences_with_stable_codes():
    for image in (mr_volume(), png_like(), png_like(rgb=True)):
        for warning in check_input(image, ct_card()):
            assert warning.code in {"modality", "intensity", "spacing", "field_of_view", "channels"}
            assert warning.message and "\n" not in warning.message and "``" not in warning.message
            assert warning.to_dict() == {"code": warning.code, "message": warning.message}


def test_format_duration():
    assert format_duration(0.2) == "1 s"
    assert format_duration(42) == "42 s"
    assert format_duration(190) == "3 min"
    assert format_duration(3 * 3600 + 1800) == "3.5 h"
    assert format_duration(30 * 3600) == "30 h"


def test_run_estimate_counts_network_evaluations_and_says_them():
    estimate = RunEstimate(samples=5, steps=10, items=20, seconds_per_evaluation=0.18, device="cpu")
    assert estimate.network_evaluations == 1000
    assert estimate.seconds == pytest.approx(180.0)
    text = estimate.text()
    assert text.startswith("about 3 min on cpu (5 samples x 10 steps x 20 slices = 1000 network evaluations")
    assert estimate.to_dict()["seconds"] == 180.0
    # 200 samples: the multi-hour run the estimate exists for.
    assert RunEstimate(200, 10, 20, 0.18, "cpu").text().startswith("about 2.0 h on cpu")
    assert "1 volume =" in RunEstimate(2, 3, 1, 0.5, "cuda:0", "volumes").text()


def test_model_grid_items_of_a_volume_and_a_picture():
    # 160 x 160 pixels at 2.5 mm -> 134 x 134 at the model's 3 mm; 12 axial slices.
    items, pixels = model_grid_items(ct_volume(), ct_card())
    assert items == 12 and pixels == 134 * 134
    assert model_grid_items(png_like(), ct_card()) == (1, 40 * 47)
    assert model_grid_items(ct_volume(), ct_card(spatial_dims=3, spacing=[3.0, 3.0, 5.0])) == (1, 134 * 134 * 12)
