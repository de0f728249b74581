"""A unified lesion model of CT and MR: the ``by_modality`` normalization of preprocess.

Each image gets the entry of its modality (DICOM Modality tag first, else the HU statistics of the
input check), the same way at training (training.data.load_case) and at inference (prepare); the
report names the entry; the input check takes every modality the card has an entry for.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionSegLib.core.errors import DatasetError, ModelLoadError
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.pipeline.inputcheck import MODALITY_TAG, check_input
from DiffusionSegLib.pipeline.io import array_with_channels, read_image
from DiffusionSegLib.pipeline.preprocess import modality_normalization, normalize, prepare

UNIFIED = {"kind": "by_modality", "CT": {"kind": "ct_window", "center": -300, "width": 1800},
           "MR": {"kind": "zscore"}, "default": "MR"}


def unified_card(**fields) -> ModelCard:
    values = dict(name="unified_lesions", modality="CT+MR", spatial_dims=2, in_channels=1, spacing=None,
                  normalization=UNIFIED, labels=[LabelInfo("lesion")])
    values.update(fields)
    return ModelCard(**values)


def ct_like(shape=(3, 40, 40), spacing=(1.0, 1.0, 2.0)) -> sitk.Image:
    """int16 HU: air at -1000 around a soft-tissue body near 40 HU, with a -300 and a 600 HU patch."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.indices(shape)
    body = ((yy - shape[1] / 2) / (0.4 * shape[1])) ** 2 + ((xx - shape[2] / 2) / (0.4 * shape[2])) ** 2 < 1
    arr = np.where(body, np.rint(rng.normal(40, 15, shape)), -1000).astype(np.int16)
    arr[:, 18:20, 18:20] = -300
    arr[:, 22:24, 22:24] = 600
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, -20.0, 0.0))
    return image


def mr_like(shape=(3, 40, 40), spacing=(1.0, 1.0, 2.0)) -> sitk.Image:
    """Positive MR-like intensities 0..800, no air."""
    arr = np.random.default_rng(1).uniform(0, 800, shape).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, -20.0, 0.0))
    return image


def zscore_by_hand(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    body = values[values > np.percentile(values, 1.0)]
    return (values - body.mean()) / body.std()


def normalized(image: sitk.Image, card: ModelCard) -> np.ndarray:
    return normalize(array_with_channels(image), card, image)[0]


def test_a_ct_like_image_gets_the_ct_window():
    image = ct_like()
    hu = sitk.GetArrayFromImage(image)
    out = normalized(image, unified_card())
    assert modality_normalization(image, unified_card()) == ("CT", UNIFIED["CT"])
    # Window -300 +- 900 HU onto [-1, 1]: -300 -> 0, 600 -> 1, air -1000 -> -700 / 900.
    assert np.all(out[hu == -300] == 0.0) and np.all(out[hu == 600] == 1.0)
    np.testing.assert_allclose(out[hu == -1000], -700.0 / 900.0, rtol=1e-6)
    np.testing.assert_allclose(out, (hu.astype(np.float64) + 300.0) / 900.0, rtol=1e-5, atol=1e-6)
    assert prepare(image, unified_card()).normalization_used == "CT"


def test_an_mr_like_image_gets_the_zscore():
    image = mr_like()
    out = normalized(image, unified_card())
    assert modality_normalization(image, unified_card()) == ("MR", {"kind": "zscore"})
    np.testing.assert_allclose(out, zscore_by_hand(sitk.GetArrayFromImage(image)), rtol=1e-4, atol=1e-4)
    prepared = prepare(image, unified_card())
    assert prepared.normalization_used == "MR" and prepared.normalization == {"kind": "zscore"}


def test_the_dicom_modality_tag_wins_over_hu_looking_values():
    image = ct_like()
    image.SetMetaData(MODALITY_TAG, "MR")
    out = normalized(image, unified_card())
    assert modality_normalization(image, unified_card())[0] == "MR"
    np.testing.assert_allclose(out, zscore_by_hand(sitk.GetArrayFromImage(image)), rtol=1e-4, atol=1e-4)
    # A tag without an entry of its own takes the default (MR), even on HU values.
    image.SetMetaData(MODALITY_TAG, "PT")
    assert modality_normalization(image, unified_card())[0] == "MR"
    # A tagged CT whose values look like MR still gets the CT window: the tag is trusted first.
    tagged = mr_like()
    tagged.SetMetaData(MODALITY_TAG, "CT")
    assert modality_normalization(tagged, unified_card())[0] == "CT"


def test_single_normalization_cards_are_unchanged_and_a_single_entry_needs_no_default():
    window = unified_card(normalization={"kind": "ct_window", "center": -300, "width": 1800}, modality="CT")
    assert modality_normalization(mr_like(), window) == (None, window.normalization)
    np.testing.assert_array_equal(normalize(array_with_channels(mr_like()), window),
                                  normalize(array_with_channels(mr_like()), window, mr_like()))
    assert prepare(mr_like(), window).normalization_used is None
    only_mr = unified_card(normalization={"kind": "by_modality", "MR": {"kind": "zscore"}})
    assert modality_normalization(ct_like(), only_mr) == ("MR", {"kind": "zscore"})


@pytest.mark.parametrize("settings, words", [
    ({**UNIFIED, "CT": UNIFIED, "default": "MR"}, "nested"),
    ({"kind": "by_modality", "CT": UNIFIED["CT"], "MR": UNIFIED["MR"]}, "needs a 'default'"),
    ({**UNIFIED, "default": "PT"}, "default 'PT' is not one of its entries"),
    ({**UNIFIED, "MR": {"kind": "histogram"}}, "entry 'MR': unknown normalization kind 'histogram'"),
    ({**UNIFIED, "CT": {"kind": "ct_window", "center": -300}}, "entry 'CT': ct_window needs"),
    ({**UNIFIED, "center": 40}, "unknown key 'center'"),
    ({**UNIFIED, "mr": {"kind": "zscore"}}, "unknown key 'mr'"),
    ({"kind": "by_modality", "default": "MR"}, "no entries"),
])
def test_malformed_by_modality_cards_are_refused_naming_the_card(settings, words):
    card = unified_card(normalization=settings)
    # Every image is refused, whichever entry it would have taken: the whole card is checked.
    for image in (ct_like(), mr_like()):
        with pytest.raises(ModelLoadError, match="model card 'unified_lesions'") as err:
            normalize(array_with_channels(image), card, image)
        assert words in str(err.value)
        with pytest.raises(ModelLoadError, match=words.replace("(", r"\(")):
            prepare(image, card)


def test_the_existing_kinds_keep_their_messages():
    ramp = np.linspace(0, 1, 101, dtype=np.float32)[None]
    with pytest.raises(ModelLoadError, match=r"^model card 'unified_lesions': unknown normalization kind 'histogram'$"):
        normalize(ramp, unified_card(normalization={"kind": "histogram"}))
    with pytest.raises(ModelLoadError, match=r"^model card 'unified_lesions': ct_window needs center and a positive"):
        normalize(ramp, unified_card(normalization={"kind": "ct_window", "center": 0, "width": 0}))


def write_case(root, name: str, image: sitk.Image, suffix: str = ".nii.gz"):
    from DiffusionSegLib.training.data import CaseFiles

    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    mask = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
    mask[:, 10:20, 12:24] = 1
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(image)
    image_path, label_path = root / "imagesTr" / f"{name}{suffix}", root / "labelsTr" / f"{name}{suffix}"
    sitk.WriteImage(image, str(image_path))
    sitk.WriteImage(label, str(label_path))
    return CaseFiles(name, image_path, label_path)


@pytest.mark.parametrize("case, expected", [("ct", "CT"), ("mr", "MR"), ("hu_tagged_mr", "MR")])
def test_training_and_inference_normalize_a_case_alike(tmp_path, case, expected):
    from DiffusionSegLib.training.data import load_case

    if case == "ct":
        files = write_case(tmp_path, case, ct_like())
    elif case == "mr":
        files = write_case(tmp_path, case, mr_like())
    else:  # HU values, tag MR: NRRD keeps the tag; resampling would drop it, so both must read it first
        tagged = ct_like()
        tagged.SetMetaData(MODALITY_TAG, "MR")
        files = write_case(tmp_path, case, tagged, ".nrrd")
    card = unified_card(spacing=[1.5, 1.5])  # a resampled model grid, not the file's
    trained = load_case(files, card, {"lesion": (1,)}).image  # (C, S, H, W)
    prepared = prepare(read_image(files.image), card)  # as the CLI reads it
    assert prepared.normalization_used == expected
    inferred = np.moveaxis(prepared.batch, 1, 0)[(slice(None), slice(None), *prepared.crop)]
    assert trained.shape == inferred.shape
    np.testing.assert_array_equal(trained, inferred)


def test_load_case_names_the_case_for_a_malformed_card(tmp_path):
    from DiffusionSegLib.training.data import load_case

    files = write_case(tmp_path, "ct", ct_like())
    card = unified_card(normalization={**UNIFIED, "default": "PT"})
    with pytest.raises(DatasetError, match="case ct: model card 'unified_lesions'"):
        load_case(files, card, {"lesion": (1,)})


def test_the_report_names_the_entry_used(tmp_path):
    from helpers import make_model

    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings

    model = make_model(tmp_path / "unified", modality="CT+MR", normalization=UNIFIED, default_crf=False)
    opts = SegmentSettings(samples=2, steps=1, crf=False)
    small = dict(shape=(2, 16, 16), spacing=(10.0, 10.0, 5.0))
    ct_report = segment_image(ct_like(**small), model, opts).report
    assert ct_report["normalization_used"] == "CT" and ct_report["model"]["normalization"] == UNIFIED
    assert segment_image(mr_like(**small), model, opts).report["normalization_used"] == "MR"
    plain = make_model(tmp_path / "plain", default_crf=False)
    assert segment_image(mr_like(**small), plain, opts).report["normalization_used"] is None


def test_the_input_check_takes_every_modality_with_an_entry():
    card = unified_card(spacing=[5.0, 5.0])
    body = dict(spacing=(5.0, 5.0, 5.0))  # 200 mm across: a body-sized view, only the modality is checked
    assert check_input(ct_like(**body), card) == []
    assert check_input(mr_like(**body), card) == []
    tagged_mr = ct_like(**body)
    tagged_mr.SetMetaData(MODALITY_TAG, "MR")
    assert check_input(tagged_mr, card) == []
    pet = mr_like(**body)
    pet.SetMetaData(MODALITY_TAG, "PT")
    warnings = check_input(pet, card)
    assert [w.code for w in warnings] == ["modality"]
    assert "PT (PET)" in warnings[0].message and "trained on CT+MR" in warnings[0].message
    # A tagged CT whose values are not HU would be windowed wrongly: still an intensity warning.
    raw = mr_like(**body)
    raw.SetMetaData(MODALITY_TAG, "CT")
    assert [w.code for w in check_input(raw, card)] == ["intensity"]
    # The field-of-view check still knows a CT+MR model is a body model.
    assert "field_of_view" in [w.code for w in check_input(ct_like(spacing=(0.5, 0.5, 1.0)), card)]
    # A single-modality card still warns: an MR-like volume given to a CT-only model.
    ct_only = unified_card(modality="CT", normalization=UNIFIED["CT"], spacing=[5.0, 5.0])
    assert [w.code for w in check_input(mr_like(**body), ct_only)] == ["modality"]
