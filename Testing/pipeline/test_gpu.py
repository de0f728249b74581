"""CUDA-only checks: reduced precision against fp32, real out-of-memory back-off, same-seed determinism.

Skipped where no CUDA device exists (CI has none); run on a GPU machine with
``python3 -m pytest -q Testing/pipeline/test_gpu.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


@pytest.fixture(scope="module")
def sample_crop():
    """Ten slices of the bundled CT sample: enough anatomy, quick to sample."""
    import SimpleITK as sitk

    from DiffusionSegLib.bench.synthetic import SAMPLE_VOLUME

    image = sitk.ReadImage(str(SAMPLE_VOLUME))
    return image[:, :, 5:15]


def test_bf16_autocast_matches_fp32_on_the_default_model(sample_crop):
    """CUDA runs in bf16 by default; its masks must agree with the fp32 run on the same case."""
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.models.store import resolve_model

    model = resolve_model(None)
    runs = {amp: segment_image(sample_crop, model, SegmentSettings(device="cuda", amp=amp, crf=False, seed=3))
            for amp in (False, True)}
    fp32, bf16 = runs[False], runs[True]
    assert bf16.report["device"].startswith("cuda")
    for i, label in enumerate(fp32.labels):
        if fp32.fused[i].sum() > 100:  # labels the model finds on this crop
            assert _dice(fp32.fused[i], bf16.fused[i]) > 0.95, label.name
    assert np.abs(fp32.probability - bf16.probability).mean() < 0.02


def test_same_seed_same_device_gives_the_same_masks(sample_crop):
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.models.store import resolve_model

    model = resolve_model(None)
    a, b = (segment_image(sample_crop, model, SegmentSettings(device="cuda", crf=False, seed=11)) for _ in range(2))
    np.testing.assert_array_equal(a.fused, b.fused)
    np.testing.assert_array_equal(a.probability, b.probability)


def test_real_cuda_out_of_memory_halves_the_batch(caplog):
    """A batch that cannot fit raises a real CUDA OOM; the back-off halves it until it fits."""
    from DiffusionSegLib.core.device import run_with_oom_backoff

    total = torch.cuda.get_device_properties(0).total_memory
    item_bytes = total // 8  # 8 items would fill the whole card; with the cap below at most 2 fit
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.35)
    tried: list[int] = []

    def work(batch: int) -> int:
        tried.append(batch)
        x = torch.empty(batch * item_bytes // 4, dtype=torch.float32, device="cuda")
        x.fill_(1.0)
        del x
        return batch

    try:
        with caplog.at_level(logging.WARNING):
            fitted = run_with_oom_backoff(work, 64)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert tried[0] == 64 and fitted in (1, 2)
    assert tried == [64 >> i for i in range(len(tried))]
    assert "Out of memory" in caplog.text


def test_sampling_recovers_from_out_of_memory(sample_crop, caplog):
    """Inference asked for a batch that does not fit completes with a smaller one and the same masks."""
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.models.store import resolve_model

    model = resolve_model(None)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    reference = segment_image(sample_crop, model, SegmentSettings(device="cuda", crf=False, seed=5, amp=False,
                                                                 batch_size=8))
    # Room for about two batches of 8: the 50-item batch asked for below cannot fit.
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(2 * peak / torch.cuda.get_device_properties(0).total_memory)
    try:
        with caplog.at_level(logging.WARNING):
            squeezed = segment_image(sample_crop, model, SegmentSettings(device="cuda", crf=False, seed=5, amp=False,
                                                                        batch_size=4096))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "Out of memory" in caplog.text
    for i in range(len(reference.labels)):
        assert _dice(reference.fused[i], squeezed.fused[i]) > 0.99
