"""Device choice, out-of-memory back-off, and reduced-precision autocast against fp32."""

from __future__ import annotations

import logging
import os
import platform

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.core.device import auto_batch_size, is_out_of_memory, resolve_device, run_with_oom_backoff
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings


def test_out_of_memory_halves_the_batch_until_it_fits():
    tried = []

    def work(batch_size: int) -> int:
        tried.append(batch_size)
        if batch_size > 5:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch_size

    assert run_with_oom_backoff(work, 32) == 4
    assert tried == [32, 16, 8, 4]


def test_other_errors_are_not_retried():
    calls = []

    def work(batch_size: int) -> None:
        calls.append(batch_size)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_backoff(work, 8)
    assert calls == [8]
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(ValueError("out of memory"))


def _fake_accelerators(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda,mps,expected", [(True, False, "cuda"), (True, True, "cuda"), (False, True, "mps"),
                                               (False, False, "cpu")])
def test_auto_picks_the_gpu_when_there_is_one(monkeypatch, cuda, mps, expected):
    _fake_accelerators(monkeypatch, cuda, mps)
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"  # an explicit CPU request is honoured even with a GPU
    assert resolve_device("cuda:1").type == ("cuda" if cuda else "cpu")


def test_deterministic_kernels_are_switched_on_for_cuda_training(monkeypatch):
    from DiffusionSegLib.core.device import use_deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        use_deterministic_kernels(torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() == before[0]  # CPU: left as it is
        use_deterministic_kernels(torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_device_resolution_and_fallback(caplog):
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING):
            assert resolve_device("cuda").type == "cpu"
        assert "falling back to CPU" in caplog.text
    with pytest.raises(ValueError):
        resolve_device("tpu")
    assert auto_batch_size(torch.device("cpu"), 10**9, cap=16) == 16


def test_bf16_autocast_agrees_with_fp32(tiny_model):
    """The reduced-precision path (bf16 autocast; CUDA uses it by default) against fp32 on one case."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=(2, 32, 32)).astype(np.float32))
    fp32 = segment_image(image, tiny_model, SegmentSettings(samples=3, steps=3, crf=False, amp=False))
    bf16 = segment_image(image, tiny_model, SegmentSettings(samples=3, steps=3, crf=False, amp=True))
    # Voxels whose sample mean is unchanged by bf16 (a flip needs a logit within bf16 rounding of 0.5).
    assert np.mean(fp32.probability == bf16.probability) > 0.95


def test_the_chunk_loop_halves_on_out_of_memory_and_never_redoes_a_finished_chunk():
    from DiffusionSegLib.core.device import for_each_chunk

    calls: list[tuple[int, int, int, int]] = []
    done: list[int] = []

    def process(start: int, stop: int, chunk: int, n_chunks: int) -> None:
        calls.append((start, stop, chunk, n_chunks))
        if stop - start > 2 and start >= 8:  # chunks of 4 run out of memory from item 8 on
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        done.extend(range(start, stop))

    for_each_chunk(13, 4, process)
    assert done == list(range(13))  # every item once, in order
    assert calls[:3] == [(0, 4, 0, 4), (4, 8, 1, 4), (8, 12, 2, 4)]
    assert calls[3:] == [(8, 10, 0, 3), (10, 12, 1, 3), (12, 13, 2, 3)]  # resumed at 8 with chunks of 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="reads the resident set from /proc and tunes glibc's malloc")
def _heap_free_mib() -> int:
    """MiB of free blocks in glibc's heaps (mallinfo2, glibc >= 2.33); 0 where unknown."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                           "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return int(libc.mallinfo2().fordblks // 2**20)
    except (OSError, AttributeError):
        return 0


def test_after_sampling_freed_arrays_go_back_to_the_system(tiny_model):
    """The sampler keeps freed blocks in the process (speed); once a run has sampled, whole-volume
    arrays must be returned when freed, or the peak memory of a run grows with every array the
    restore, the ensemble and the writers make (docs/BENCHMARKS.md, *A whole CT*)."""
    from DiffusionSegLib.core import device

    def returned_on_free(mib: int) -> float:
        """MiB the resident set shrinks by when one touched array of ``mib`` MiB is freed."""
        block = np.ones(mib * 2**20, np.uint8)
        alive = _rss_mb()
        del block
        return alive - _rss_mb()

    device.keep_freed_memory_for_reuse()
    assert returned_on_free(256) < 16, "the sampler's setting keeps freed blocks (the premise of this test)"
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32))
    segment_image(image, tiny_model, SegmentSettings(samples=2, steps=1, crf=False))  # samples: tunes, then releases
    # Larger than all the free memory of the heap together (earlier tests in this process may have
    # left big holes), so no free block can hold it: a whole-volume array after sampling gets its
    # own mapping and is returned when freed.
    size = max(384, _heap_free_mib() + 64)
    assert returned_on_free(size) > size - 84
