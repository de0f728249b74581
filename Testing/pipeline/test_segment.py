"""Whole-pipeline behaviour on in-memory images: geometry, determinism, outputs, report."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import make_model
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.models.card import LabelInfo


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
    result = segment_image(image, resampling_model, SegmentSettings(samples=3, steps=2, keep_samples=True))
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
    opts = SegmentSettings(samples=3, steps=2, seed=11, crf=False)
    a = segment_image(image, tiny_model, opts)
    b = segment_image(image, tiny_model, SegmentSettings(samples=3, steps=2, seed=11, crf=False, batch_size=2))
    c = segment_image(image, tiny_model, SegmentSettings(samples=3, steps=2, seed=12, crf=False))
    assert np.array_equal(a.probability, b.probability)
    assert a.report["sample_diversity"] == b.report["sample_diversity"]
    assert not np.array_equal(a.probability, c.probability)


def test_rgb_2d_image_keeps_its_geometry(tiny_rgb_model):
    rgb = np.random.default_rng(1).integers(0, 255, (37, 45, 3), dtype=np.uint8)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing((0.05, 0.05))
    image.SetOrigin((3.0, 4.0))
    result = segment_image(image, tiny_rgb_model, SegmentSettings(samples=2, steps=2))
    assert result.fused.shape == (2, 37, 45)
    assert "areas_mm2" in result.report and "volumes_ml" not in result.report


def test_3d_model_runs_on_a_volume_and_restores_it(tiny_3d_model):
    image = oblique_volume()
    result = segment_image(image, tiny_3d_model, SegmentSettings(samples=2, steps=2))
    assert result.fused.shape == (1, 9, 30, 26)
    assert result.report["slices_or_patches"] == 1


def test_staple_fusion_and_entropy(tiny_model):
    image = oblique_volume()
    result = segment_image(image, tiny_model, SegmentSettings(samples=3, steps=2, fusion="staple",
                                                             uncertainty="entropy", crf=False))
    p = result.probability
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    assert np.allclose(result.uncertainty, np.nan_to_num(h), atol=1e-5)
    assert result.refined is None and result.report["crf_backend"] == "none"


def test_image_smaller_than_the_model_input_is_padded_not_rejected(tmp_path):
    model = make_model(tmp_path / "patch64", patch_size=[64, 64])
    image = sitk.GetImageFromArray(np.random.default_rng(2).normal(size=(5, 7)).astype(np.float32))
    result = segment_image(image, model, SegmentSettings(samples=2, steps=1))
    assert result.fused.shape == (1, 5, 7)


@pytest.mark.parametrize("field,value", [("samples", 0), ("steps", 0), ("steps", -3), ("steps", 5000),
                                         ("samples", -1), ("batch_size", 0), ("seed", -1), ("sampler", "euler"),
                                         ("fusion", "vote"), ("uncertainty", "std")])
def test_out_of_range_settings_are_refused_before_sampling(tiny_model, monkeypatch, field, value):
    """0 is not "the card default" (None is), and steps above the model's T are a user error."""
    from DiffusionSegLib.methods import diffusion
    from DiffusionSegLib.core.errors import SettingsError

    def never(*args, **kwargs):
        raise AssertionError("sampling started with a bad setting")

    monkeypatch.setattr(diffusion, "sample_masks", never)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32))
    with pytest.raises(SettingsError, match=field.split("_")[0]):
        segment_image(image, tiny_model, SegmentSettings(**{field: value}))


def test_torch_crf_runs_on_the_sampling_device(tiny_model, monkeypatch):
    from DiffusionSegLib.pipeline import crf

    seen = {}
    real_refine = crf.refine

    def recording_refine(*args, **kwargs):
        seen.update(kwargs)
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(crf, "refine", recording_refine)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32))
    result = segment_image(image, tiny_model, SegmentSettings(samples=2, steps=1, device="cpu",
                                                             crf_backend="torch-meanfield"))
    assert seen.get("device") == "cpu" == result.report["device"]


@pytest.mark.parametrize("fusion", ["mean", "staple"])
def test_the_crf_refines_the_chosen_fusion(tiny_model, monkeypatch, fusion):
    """With a CRF that changes nothing, the final mask must be the chosen fusion, STAPLE included."""
    from DiffusionSegLib.pipeline import crf
    from DiffusionSegLib.pipeline.ensemble import fused_mask

    def pass_through(probability, image, spatial_dims, **kwargs):
        return (np.asarray(probability) > 0.5).astype(np.uint8), "pass-through"

    monkeypatch.setattr(crf, "refine", pass_through)
    image = sitk.GetImageFromArray(np.random.default_rng(3).normal(size=(2, 32, 32)).astype(np.float32))
    opts = SegmentSettings(samples=6, steps=2, seed=1, fusion=fusion, keep_samples=True)
    result = segment_image(image, tiny_model, opts)
    staple, mean = (fused_mask(result.samples, m) for m in ("staple", "mean"))
    assert not np.array_equal(staple, mean)  # the case tells the two fusions apart
    np.testing.assert_array_equal(result.fused, staple if fusion == "staple" else mean)
    np.testing.assert_array_equal(result.final_mask, result.fused)
    assert result.report["final_mask"] == f"crf: DenseCRF of the {fusion} fusion"



# --- the input does not fit the model; before the long work; a readable report ----------------------


def mr_like_volume() -> sitk.Image:
    """MR-like intensities (0..900, no air at -1000) on a real geometry."""
    rng = np.random.default_rng(5)
    arr = np.where(rng.random((3, 24, 28)) < 0.7, rng.uniform(300, 900, (3, 24, 28)), rng.uniform(0, 10, (3, 24, 28)))
    image = sitk.GetImageFromArray(arr.astype(np.float32))
    image.SetSpacing((10.0, 10.0, 5.0))  # 240 x 280 mm: a body-sized view, so only the modality is off
    image.SetOrigin((-120.0, -140.0, 0.0))
    return image


@pytest.fixture(scope="module")
def tiny_ct_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "tiny_ct", modality="CT",
                      normalization={"kind": "ct_window", "center": 50, "width": 400},
                      labels=[LabelInfo("liver", (0.9, 0.5, 0.3)), LabelInfo("spleen", (0.6, 0.3, 0.7))])


def test_sampling_progress_counts_network_evaluations_to_the_total(tiny_model):
    """5 samples x 4 steps x 3 slices in chunks of 4 items: 60 network evaluations, not 16 chunk calls."""
    events = []
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32))
    result = segment_image(image, tiny_model, SegmentSettings(samples=5, steps=4, batch_size=4, crf=False),
                           progress=lambda stage, done, total: events.append((stage, done, total)))
    sampling = [(done, total) for stage, done, total in events if stage == "sampling"]
    assert {total for _, total in sampling} == {60} == {result.report["network_evaluations"]}
    assert sampling[-1] == (60, 60)
    assert [d for d, _ in sampling] == sorted(d for d, _ in sampling)


def test_evaluation_progress_stays_monotonic_over_an_out_of_memory_retry():
    from DiffusionSegLib.pipeline.segment import _evaluation_progress

    seen = []
    progress = _evaluation_progress(lambda stage, done, total: seen.append((done, total)), 100)
    for done in range(1, 5):  # first attempt: 10 calls planned, 4 done, then out of memory
        progress(done, 10)
    for done in range(1, 13):  # retry on the remaining items with half the chunk: 12 calls
        progress(done, 12)
    counts = [d for d, _ in seen]
    assert counts == sorted(counts) and seen[-1] == (100, 100) and {t for _, t in seen} == {100}


def test_report_is_readable_and_keyed_by_label(tiny_ct_model):
    import re

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32))
    rep = segment_image(image, tiny_ct_model, SegmentSettings(samples=2, steps=1)).report
    assert rep["label_map"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rep["created_utc"])
    assert set(rep["versions"]) == {"diffusionseg", "torch", "monai", "SimpleITK", "python"}
    assert rep["model"]["prediction_type"] == "sample" and rep["model"]["prediction_target"] == "clean mask (x0)"
    assert rep["modality"]["model"] == "CT" and rep["modality"]["input"] == "not CT"
    assert [w["code"] for w in rep["warnings"]] == ["modality"]
    # Both per-label figures are keyed by label name first; volumes then by region.
    assert set(rep["sample_diversity"]) == set(rep["volumes_ml"]) == {"liver", "spleen"}
    assert set(rep["volumes_ml"]["liver"]) == {"fused", "consistency", "ambiguity", "crf"}
    assert rep["seconds_per_network_evaluation"] > 0 and rep["model_grid_item_shape"] == [16, 16]
    assert rep["model"]["inference_window"] is None  # a 2D card without slice_windows: whole slices


def test_warnings_and_estimate_come_before_sampling(tiny_ct_model, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    order = []
    real = diffusion.sample_masks

    def recording(*args, **kwargs):
        order.append("sampling")
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "sample_masks", recording)
    estimates = []
    result = segment_image(mr_like_volume(), tiny_ct_model, SegmentSettings(samples=3, steps=2, crf=False),
                           on_warnings=lambda ws: order.append(("warnings", [w.code for w in ws])),
                           on_estimate=lambda e: (order.append("estimate"), estimates.append(e)))
    assert order == [("warnings", ["modality"]), "estimate", "sampling"]
    assert estimates[0].network_evaluations == 3 * 2 * 3 == result.report["estimate"]["network_evaluations"]
    assert estimates[0].seconds_per_evaluation > 0
    assert "3 samples x 2 steps x 3 slices = 18 network evaluations" in estimates[0].text()


def test_strict_refuses_before_the_model_is_loaded(tiny_ct_model, monkeypatch):
    from DiffusionSegLib.methods import registry
    from DiffusionSegLib.pipeline.inputcheck import InputMismatchError

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the input is refused")

    monkeypatch.setattr(registry, "load_model", never)
    with pytest.raises(InputMismatchError) as refused:
        segment_image(mr_like_volume(), tiny_ct_model, SegmentSettings(samples=1, steps=1, strict=True))
    assert [w.code for w in refused.value.warnings] == ["modality"]


def test_the_card_decides_whether_the_crf_runs_unless_the_run_says(tmp_path):
    no_crf_model = make_model(tmp_path / "no_crf_default", default_crf=False)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32))
    default = segment_image(image, no_crf_model, SegmentSettings(samples=2, steps=1))
    forced = segment_image(image, no_crf_model, SegmentSettings(samples=2, steps=1, crf=True))
    assert default.refined is None and default.report["crf_backend"] == "none"
    assert forced.refined is not None and forced.report["crf_backend"] != "none"


def test_the_published_crf_protocol_runs_when_the_card_or_the_run_asks(tmp_path, monkeypatch):
    """DiffSeg's protocol: 3 rounds on the mean of 4 random samples, drawn with the run's seed."""
    from DiffusionSegLib.pipeline import crf

    calls = []
    real = crf.refine_from_samples

    def recording(samples, image, spatial_dims, **kwargs):
        calls.append((samples.shape, kwargs))
        return real(samples, image, spatial_dims, **kwargs)

    monkeypatch.setattr(crf, "refine_from_samples", recording)
    model = make_model(tmp_path / "published_default", default_crf="published")
    image = sitk.GetImageFromArray(np.random.default_rng(4).normal(size=(2, 24, 24)).astype(np.float32))
    by_card = segment_image(image, model, SegmentSettings(samples=6, steps=2, seed=3))
    assert calls and calls[0][0][0] == 6  # all 6 samples offered, on the model grid
    assert {k: calls[0][1][k] for k in ("repeats", "subset", "seed")} == {"repeats": 3, "subset": 4, "seed": 3}
    assert by_card.report["crf_mode"] == "published" and by_card.refined is not None
    assert "DiffSeg protocol" in by_card.report["final_mask"]
    asked = segment_image(image, model, SegmentSettings(samples=6, steps=2, seed=3, crf="published"))
    np.testing.assert_array_equal(asked.refined, by_card.refined)  # same seed, same subsets, same mask
    plain = segment_image(image, model, SegmentSettings(samples=6, steps=2, seed=3, crf="mean"))
    assert plain.report["crf_mode"] == "mean" and len(calls) == 2
    off = segment_image(image, model, SegmentSettings(samples=6, steps=2, seed=3, crf="off"))
    assert off.refined is None and off.report["crf_mode"] == "off"


def test_a_card_with_an_unknown_crf_default_is_refused_before_sampling(tmp_path, monkeypatch):
    from DiffusionSegLib.core.errors import ModelLoadError
    from DiffusionSegLib.methods import registry

    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    model = make_model(tmp_path / "odd_crf", default_crf="bilateral")
    image = sitk.GetImageFromArray(np.zeros((1, 16, 16), np.float32) + np.arange(16, dtype=np.float32))
    with pytest.raises(ModelLoadError, match="unknown default_crf 'bilateral'"):
        segment_image(image, model, SegmentSettings(samples=1, steps=1))


def test_context_labels_are_sampled_but_only_shown_labels_are_output(tmp_path):
    from DiffusionSegLib.core.errors import ModelLoadError
    from DiffusionSegLib.models.card import LabelInfo

    labels = [LabelInfo("kidney"), LabelInfo("liver"), LabelInfo("spleen")]
    both = make_model(tmp_path / "all", labels=labels)
    shown = make_model(tmp_path / "shown", labels=labels, shown_labels=["liver", "spleen"])
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32))
    opts = SegmentSettings(samples=2, steps=2, crf=False)
    full, part = segment_image(image, both, opts), segment_image(image, shown, opts)
    assert [lab.name for lab in part.labels] == ["liver", "spleen"]
    assert part.fused.shape == (2, 2, 16, 16)
    np.testing.assert_array_equal(part.probability, full.probability[1:])  # same weights, same seed
    assert part.report["label_map"] == {"0": "background", "1": "liver", "2": "spleen"}
    bad = make_model(tmp_path / "bad", labels=labels, shown_labels=["pancreas"])
    with pytest.raises(ModelLoadError, match="pancreas"):
        segment_image(image, bad, opts)


@pytest.mark.parametrize("fusion, kind", [("mean", "variance"), ("staple", "entropy")])
def test_label_by_label_statistics_equal_those_of_all_samples_at_once(tiny_rgb_model, fusion, kind):
    """The pipeline restores and summarizes one label at a time (memory); the numbers must not change."""
    from DiffusionSegLib.pipeline import ensemble

    pixels = np.random.default_rng(6).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    image = sitk.GetImageFromArray(pixels, isVector=True)
    result = segment_image(image, tiny_rgb_model, SegmentSettings(samples=4, steps=2, seed=1, fusion=fusion,
                                                                 uncertainty=kind, keep_samples=True))
    samples = result.samples
    assert samples.shape[:2] == (4, 2)
    np.testing.assert_array_equal(result.probability, ensemble.probability(samples))
    np.testing.assert_array_equal(result.fused, ensemble.fused_mask(samples, fusion))
    np.testing.assert_array_equal(result.consistency, ensemble.consistency(samples))
    np.testing.assert_array_equal(result.ambiguity, ensemble.ambiguity(samples))
    np.testing.assert_array_equal(result.uncertainty, ensemble.uncertainty(samples, kind))
    assert result.sample_diversity == [float(d) for d in ensemble.sample_diversity(samples)]


def test_the_result_holds_sample_counts_not_float_maps(tiny_model):
    """Memory of a whole CT: per label and voxel the result stores one uint8 count and the fused
    mask (2 bytes), not float probability and uncertainty maps plus three masks (11 bytes)."""
    image = sitk.GetImageFromArray(np.random.default_rng(3).normal(size=(3, 20, 24)).astype(np.float32))
    result = segment_image(image, tiny_model, SegmentSettings(samples=3, steps=2, crf=False))
    stored = {name: value for name, value in vars(result).items() if isinstance(value, np.ndarray)}
    assert sorted(stored) == ["counts", "fused"]
    assert all(array.dtype == np.uint8 for array in stored.values())
    assert int(result.counts.max()) <= 3 and result.n_samples == 3
    voxels_per_label = int(np.prod(image.GetSize()))
    assert sum(array.nbytes for array in stored.values()) == 2 * len(result.labels) * voxels_per_label


def test_a_slice_windows_model_segments_a_whole_image_in_windows_and_says_so(tmp_path):
    """End to end: a UniSegDiff card with slice_windows samples a 40 x 48 slice in 16 x 16 windows; the
    outputs are on the input grid and report.json names the window."""
    model = make_model(tmp_path / "windowed", method="unisegdiff", patch_size=[16, 16], slice_windows=True)
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(2, 40, 48)).astype(np.float32))
    result = segment_image(image, model, SegmentSettings(samples=2, steps=3, crf=False))
    assert result.report["model"]["inference_window"] == [16, 16]
    assert result.report["model"]["window_overlap"] == 0.5
    assert result.report["model_grid_item_shape"] == [40, 48]
    assert result.fused.shape == (1, 2, 40, 48)  # (L, z, y, x) on the input grid
