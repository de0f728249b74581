"""2.5D input (card ``context_slices``): neighbouring slices at physical offsets as extra channels,
the same at training (training.data.load_case) and inference (preprocess.prepare)."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.core.errors import DiffusionSegError, ModelLoadError
from DiffusionSegLib.methods.registry import load_model
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.pipeline.preprocess import add_slice_context, prepare
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.training import data
from DiffusionSegLib.training.loop import TrainConfig, train
from helpers import train_config

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = {"kind": "ct_window", "center": 0, "width": 2000}  # linear for |HU| < 1000: offsets stay visible


def _card(**kwargs) -> ModelCard:
    fields = dict(name="ctx", spatial_dims=2, labels=[LabelInfo("organ")], normalization=WINDOW,
                  spacing=[2.0, 2.0], context_slices=1, context_spacing=3.0)
    return ModelCard(**{**fields, **kwargs})


def _ramp(slice_mm: float, slices: int, size: int = 8) -> sitk.Image:
    """CT whose HU equal 10 x the slice's z position in mm (so an offset in mm is an offset in HU)."""
    z = np.arange(slices, dtype=np.float32) * slice_mm
    array = np.broadcast_to(10.0 * z[:, None, None], (slices, size, size)).astype(np.float32) - 200.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, slice_mm))
    return image


def test_neighbours_are_interpolated_at_physical_offsets_and_repeat_the_edge_slices():
    # slices valued 0, 10, 20, 30, 2 mm apart; neighbours 3 mm away = 1.5 slices (hand-computed)
    volume = np.broadcast_to(np.array([0.0, 10.0, 20.0, 30.0], np.float32)[None, :, None, None], (1, 4, 2, 2))
    out = add_slice_context(np.ascontiguousarray(volume), _card(), slice_axis=0, slice_spacing=2.0)
    assert out.shape == (3, 4, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [0, 0, 5, 15])   # -3 mm: clip(s - 1.5) = 0, 0, 0.5, 1.5
    np.testing.assert_allclose(out[1, :, 0, 0], [0, 10, 20, 30])  # the slice itself
    np.testing.assert_allclose(out[2, :, 0, 0], [15, 25, 30, 30])  # +3 mm
    # along another axis (coronal slices of a (z, y, x) volume), RGB: blocks of 3 channels, offset-major
    rgb = np.random.default_rng(0).normal(size=(3, 2, 5, 3)).astype(np.float32)
    coronal = add_slice_context(rgb, _card(context_spacing=1.0), slice_axis=1, slice_spacing=1.0)
    assert coronal.shape == (9, 2, 5, 3)
    np.testing.assert_array_equal(coronal[3:6], rgb)
    np.testing.assert_array_equal(coronal[0:3, :, 1:], rgb[:, :, :-1])
    np.testing.assert_array_equal(coronal[6:9, :, :-1], rgb[:, :, 1:])
    # a 2D picture has no neighbours: its slice fills every block; no context: the volume itself
    flat = rgb[:, 0]
    np.testing.assert_array_equal(add_slice_context(flat, _card(), None, 0.0), np.concatenate([flat] * 3))
    assert add_slice_context(volume, _card(context_slices=0), 0, 2.0) is volume


def test_the_card_checks_its_context_and_counts_the_network_channels():
    assert _card().network_in_channels == 3
    assert _card(in_channels=3, context_slices=2).network_in_channels == 15
    assert _card(context_slices=0).network_in_channels == 1
    assert _card(context_spacing=None).slice_context() == (1, 2.0)  # default: the in-plane spacing
    with pytest.raises(ModelLoadError, match="context_spacing"):
        _card(spacing=None, context_spacing=None).slice_context()
    with pytest.raises(ModelLoadError, match="2D models"):
        _card(spatial_dims=3, spacing=[2.0, 2.0, 2.0]).slice_context()
    with pytest.raises(ModelLoadError, match="integer >= 0"):
        _card(context_slices=-1).slice_context()
    with pytest.raises(DiffusionSegError, match="2.5D input needs mask supervision"):
        TrainConfig(method="diffseg", context_slices=1, spacing=[2.0, 2.0]).check()
    with pytest.raises(DiffusionSegError, match="2D models"):
        TrainConfig(spatial_dims=3, patch_size=[16, 16, 16], context_slices=1, context_spacing=2.0).check()
    TrainConfig(context_slices=1, spacing=[2.0, 2.0]).check()


@pytest.mark.parametrize("slice_mm", [1.0, 1.5])
def test_prepare_shows_the_same_physical_offsets_whatever_the_slice_thickness(slice_mm):
    image = _ramp(slice_mm, slices=12)
    plain = prepare(image, _card(context_slices=0))
    prepared = prepare(image, _card())
    assert prepared.batch.shape == (12, 3, *plain.batch.shape[2:])
    np.testing.assert_array_equal(prepared.batch[:, 1:2], plain.batch)  # the centre block is the slice itself
    np.testing.assert_array_equal(prepared.image_for_crf, plain.image_for_crf)  # the CRF sees the slice only
    # away from the ends, +-3 mm is +-30 HU = +-0.03 in the [-1, 1] window of width 2000 HU
    inner = slice(3, 9)
    np.testing.assert_allclose(prepared.batch[inner, 2] - prepared.batch[inner, 1], 0.03, atol=1e-5)
    np.testing.assert_allclose(prepared.batch[inner, 1] - prepared.batch[inner, 0], 0.03, atol=1e-5)


def test_training_cases_carry_the_same_context_as_inference(tmp_path):
    image = _ramp(2.5, slices=6)
    label = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > -150).astype(np.uint8))
    label.CopyInformation(image)
    for sub, img in (("imagesTr", image), ("labelsTr", label)):
        (tmp_path / sub).mkdir()
        sitk.WriteImage(img, str(tmp_path / sub / "c.nii.gz"))
    card = _card()
    case = data.load_case(data.discover_cases(tmp_path)[0], card, {"organ": (1,)})
    prepared = prepare(sitk.ReadImage(str(tmp_path / "imagesTr" / "c.nii.gz")), card)
    assert case.image.shape == (3, 6, 8, 8)
    inside = (slice(None), slice(None), *prepared.crop)
    np.testing.assert_array_equal(np.moveaxis(case.image, 1, 0), prepared.batch[inside])


def _volume_dataset(root) -> None:
    """Three 3D cases: a sphere-like organ in air-and-soft-tissue CT, 3 mm slices."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(3):
        z, y, x = np.indices((8, 32, 32))
        organ = ((z - 4) / 4.0) ** 2 + ((y - 14 - i) / 9.0) ** 2 + ((x - 16) / 8.0) ** 2 < 1
        array = np.where(organ, 60.0, -20.0) + rng.normal(0, 5, organ.shape)
        for sub, values, dtype in (("imagesTr", array, np.int16), ("labelsTr", organ, np.uint8)):
            img = sitk.GetImageFromArray(values.astype(dtype))
            img.SetSpacing((2.0, 2.0, 3.0))
            (root / sub).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / sub / f"c{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, "training": entries}))


def test_a_2p5d_model_trains_segments_and_refuses_a_card_without_its_context(tmp_path):
    _volume_dataset(tmp_path / "data")
    config = train_config(steps=2, val_every=2, checkpoint_every=2, val_cases=1, spacing=[2.0, 2.0],
                          normalization={"kind": "ct_window", "center": 40, "width": 400},
                          context_slices=1, context_spacing=3.0)
    model = tmp_path / "model"
    train(tmp_path / "data", model, config, progress=False)
    card = json.loads((model / "model.json").read_text())
    assert (card["in_channels"], card["context_slices"], card["context_spacing"]) == (1, 1, 3.0)
    net, _ = load_model(model, torch.device("cpu"))
    assert net.image_encoder.stem.in_channels == 3  # the slice and its two neighbours
    image = sitk.ReadImage(str(tmp_path / "data" / "imagesTr" / "c0.nii.gz"))
    result = segment_image(image, model, SegmentSettings(samples=2, steps=2))
    assert result.fused.shape == (1, 8, 32, 32)
    assert (result.report["model"]["context_slices"], result.report["model"]["context_spacing_mm"]) == (1, 3.0)
    # the same weights under a card that forgets the context: a mismatched model, refused on load
    card["context_slices"] = 0
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError):
        load_model(model, torch.device("cpu"))
