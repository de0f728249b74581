"""Whole-pipeline behaviour on in-memory images: geometry, determinism, outputs, report."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_model
from DiffusionSegLib.inference import SegmentOptions, segment_image


def oblique_volume() -> sitk.Image:
    """An anisotropic volume with a rotated direction and a bright ellipsoid."""
    zz, yy, xx = np.mgrid[:9, :30, :26]
    arr = 100.0 * (((xx - 13) / 8.0) ** 2 + ((yy - 15) / 10.0) ** 2 + ((zz - 4) / 3.0) ** 2 < 1)
    arr += np.random.default_rng(0).normal(0, 5, arr.shape)
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((0.9, 1.4, 3.5))
    img.SetOrigin((-20.0, 12.5, 7.0))
    c, s = np.cos(0.35), np.sin(0.35)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    img.SetDirection(rot.flatten().tolist())
    return img


@pytest.fixture(scope="module")
def resampling_model(tmp_path_factory):
    """A 2D model working at 2 mm in-plane, so the pipeline must resample and undo it."""
    return make_model(tmp_path_factory.mktemp("m") / "tiny_2mm", spacing=[2.0, 2.0])


def test_every_output_is_on_the_input_grid_for_an_oblique_anisotropic_volume(resampling_model):
    image = oblique_volume()
    result = segment_image(image, resampling_model, SegmentOptions(samples=3, steps=2, keep_samples=True))
    shape = sitk.GetArrayViewFromImage(image).shape
    for name in ("probability", "fused", "consistency", "ambiguity", "uncertainty", "refined"):
        assert getattr(result, name).shape == (1, *shape), name
    assert result.samples.shape == (3, 1, *shape)
    # The ensemble relations hold voxel by voxel.
    assert np.all(result.consistency <= result.fused)
    assert not np.any(result.consistency & result.ambiguity)
    assert np.allclose(result.probability, result.samples.mean(axis=0))
    assert np.allclose(result.uncertainty, result.probability * (1 - result.probability))
    rep = result.report
    assert rep["nfe_per_image"] == 6 and rep["network_evaluations"] == 6 * 9
    assert rep["input"]["direction"] == pytest.approx(list(image.GetDirection()))
    assert set(rep["timings_s"]) >= {"load_model", "preprocess", "sampling", "crf", "restore", "ensemble"}
    assert rep["crf_backend"] in ("pydensecrf", "torch-meanfield")


def test_same_seed_gives_identical_output_and_another_seed_differs(tiny_model):
    image = oblique_volume()
    opts = SegmentOptions(samples=3, steps=2, seed=11, crf=False)
    a = segment_image(image, tiny_model, opts)
    b = segment_image(image, tiny_model, SegmentOptions(samples=3, steps=2, seed=11, crf=False, batch_size=2))
    c = segment_image(image, tiny_model, SegmentOptions(samples=3, steps=2, seed=12, crf=False))
    assert np.array_equal(a.probability, b.probability)
    assert a.report["sample_diversity"] == b.report["sample_diversity"]
    assert not np.array_equal(a.probability, c.probability)


def test_rgb_2d_image_keeps_its_geometry(tiny_rgb_model):
    rgb = np.random.default_rng(1).integers(0, 255, (37, 45, 3), dtype=np.uint8)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing((0.05, 0.05))
    image.SetOrigin((3.0, 4.0))
    result = segment_image(image, tiny_rgb_model, SegmentOptions(samples=2, steps=2))
    assert result.fused.shape == (2, 37, 45)
    assert "areas_mm2" in result.report and "volumes_ml" not in result.report


def test_3d_model_runs_on_a_volume_and_restores_it(tiny_3d_model):
    image = oblique_volume()
    result = segment_image(image, tiny_3d_model, SegmentOptions(samples=2, steps=2))
    assert result.fused.shape == (1, 9, 30, 26)
    assert result.report["slices_or_patches"] == 1


def test_staple_fusion_and_entropy(tiny_model):
    image = oblique_volume()
    result = segment_image(image, tiny_model, SegmentOptions(samples=3, steps=2, fusion="staple",
                                                             uncertainty="entropy", crf=False))
    p = result.probability
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert np.allclose(result.uncertainty, np.nan_to_num(h), atol=1e-5)
    assert result.refined is None and result.report["crf_backend"] == "none"


def test_image_smaller_than_the_model_input_is_padded_not_rejected(tmp_path):
    model = make_model(tmp_path / "patch64", patch_size=[64, 64])
    image = sitk.GetImageFromArray(np.random.default_rng(2).normal(size=(5, 7)).astype(np.float32))
    result = segment_image(image, model, SegmentOptions(samples=2, steps=1))
    assert result.fused.shape == (1, 5, 7)


@pytest.mark.parametrize("field,value", [("samples", 0), ("steps", 0), ("steps", -3), ("steps", 5000),
                                         ("samples", -1), ("batch_size", 0), ("seed", -1), ("sampler", "euler"),
                                         ("fusion", "vote"), ("uncertainty", "std")])
def test_out_of_range_settings_are_refused_before_sampling(tiny_model, monkeypatch, field, value):
    """0 is not "the card default" (None is), and steps above the model's T are a user error."""
    from DiffusionSegLib import diffusion
    from DiffusionSegLib.errors import SettingsError

    def never(*args, **kwargs):
        raise AssertionError("sampling started with a bad setting")

    monkeypatch.setattr(diffusion, "sample_masks", never)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32))
    with pytest.raises(SettingsError, match=field.split("_")[0]):
        segment_image(image, tiny_model, SegmentOptions(**{field: value}))


def test_torch_crf_runs_on_the_sampling_device(tiny_model, monkeypatch):
    from DiffusionSegLib import crf

    seen = {}
    real_refine = crf.refine

    def recording_refine(*args, **kwargs):
        seen.update(kwargs)
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(crf, "refine", recording_refine)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32))
    result = segment_image(image, tiny_model, SegmentOptions(samples=2, steps=1, device="cpu",
                                                             crf_backend="torch-meanfield"))
    assert seen.get("device") == "cpu" == result.report["device"]


@pytest.mark.parametrize("fusion", ["mean", "staple"])
def test_the_crf_refines_the_chosen_fusion(tiny_model, monkeypatch, fusion):
    """With a CRF that changes nothing, the final mask must be the chosen fusion, STAPLE included."""
    from DiffusionSegLib import crf
    from DiffusionSegLib.ensemble import fused_mask

    def pass_through(probability, image, spatial_dims, **kwargs):
        return (np.asarray(probability) > 0.5).astype(np.uint8), "pass-through"

    monkeypatch.setattr(crf, "refine", pass_through)
    image = sitk.GetImageFromArray(np.random.default_rng(3).normal(size=(2, 32, 32)).astype(np.float32))
    opts = SegmentOptions(samples=6, steps=2, seed=1, fusion=fusion, keep_samples=True)
    result = segment_image(image, tiny_model, opts)
    staple, mean = (fused_mask(result.samples, m) for m in ("staple", "mean"))
    assert not np.array_equal(staple, mean)  # the case tells the two fusions apart
    np.testing.assert_array_equal(result.fused, staple if fusion == "staple" else mean)
    np.testing.assert_array_equal(result.final_mask, result.fused)
    assert result.report["final_mask"] == f"crf: DenseCRF of the {fusion} fusion"

