"""Device choice and memory-aware batching (GPU when present, CPU otherwise)."""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_device(requested: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|mps`` (or ``cuda:N``) to an available device.

    An unavailable request falls back to CPU with a warning instead of failing, so a script
    written on a GPU workstation still runs on a laptop.
    """
    requested = (requested or "auto").lower()
    has_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if has_mps:
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(requested)
        log.warning("CUDA was requested but is not available; falling back to CPU.")
        return torch.device("cpu")
    if requested == "mps":
        if has_mps:
            return torch.device("mps")
        log.warning("MPS was requested but is not available; falling back to CPU.")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device '{requested}' (use auto, cpu, cuda or mps)")


def use_deterministic_kernels(device: torch.device) -> None:
    """Make a seeded training run repeatable on ``device``: process-wide, for the training process.

    On CUDA: cuDNN picks deterministic convolution algorithms (no autotuning), cuBLAS gets a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS first starts), and PyTorch's
    deterministic implementations are used wherever they exist; an op without one (some CUDA
    backward kernels) emits a warning instead of failing the run. CPU kernels are already
    deterministic for a fixed thread count, so CPU is left as it is.
    """
    if device.type != "cuda":
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (fp16 where bf16 is missing); a no-op elsewhere unless asked on CPU."""
    if not amp:
        return torch.autocast(device_type=device.type, enabled=False)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


_ALLOCATOR_TUNED = False


def keep_freed_memory_for_reuse() -> None:
    """Ask glibc's malloc to keep large freed blocks for reuse instead of returning them to the OS.

    PyTorch's CPU allocator frees every activation after use; with glibc's defaults each large
    tensor is a fresh mmap whose pages fault in again at the next denoising step. Measured on the
    2-core CI machine: 5 samples x 10 DDIM steps on a 128x128 image went from 2.3 s to 1.5 s.
    Process-wide, once; a no-op where glibc is not the C library (macOS, Windows, musl).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    _set_malloc_thresholds(1 << 30, trim_now=False)


def _set_malloc_thresholds(size: int, trim_now: bool) -> None:
    """glibc mallopt: blocks of ``size`` bytes and more get their own mapping, and a free heap top
    of more than ``size`` is given back; ``trim_now`` also returns the free pages at once."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter ids from <malloc.h>
        libc.mallopt(m_mmap_threshold, size)
        libc.mallopt(m_trim_threshold, size)
        if trim_now:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("glibc mallopt not available; CPU allocator left as it is")


def release_freed_memory() -> None:
    """Undo :func:`keep_freed_memory_for_reuse` once sampling is over and trim the heap.

    After sampling, the run allocates whole-volume arrays (restored samples, counts, the writers'
    maps) one after the other; with the sampler's setting each came from the heap and stayed in
    the process when freed, so the peak grew with the volume (docs/BENCHMARKS.md, *A whole CT*).
    With glibc's default threshold (128 KiB) an array larger than the free blocks the sampler left
    gets its own mapping and is returned when freed; ``malloc_trim`` gives back the free pages now.
    The next sampling call tunes the allocator again. No-op without glibc.
    """
    global _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    _set_malloc_thresholds(128 * 1024, trim_now=True)  # glibc's default thresholds


def activation_bytes(spatial: Sequence[int], channels: Sequence[int] | None) -> int:
    """Rough activation memory of one item through a network: pixels x widest level x 4 bytes x 24.

    ``channels`` are the network's level widths (None or empty: 64). Sizes batches to free memory.
    """
    width = max((int(c) for c in channels or ()), default=64)
    return int(math.prod(spatial) * width * 4 * 24)


def auto_batch_size(device: torch.device, bytes_per_item: int, cap: int = 64) -> int:
    """Largest batch that fits in about half the free memory of ``device`` (at least 1, at most ``cap``).

    ``bytes_per_item`` is an estimate of the activation memory of one network input.
    On CPU the batch is bounded by ``cap`` only: large CPU batches are what make sampling fast there.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(max(1, min(cap, (free // 2) // max(1, bytes_per_item))))
    return cap


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors (the only errors worth retrying with a smaller batch)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def run_with_oom_backoff(fn: Callable[[int], T], batch_size: int) -> T:
    """Call ``fn(batch_size)``; on out-of-memory halve the batch and retry down to 1."""
    while True:
        try:
            return fn(batch_size)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM we can recover from
            if not is_out_of_memory(err) or batch_size <= 1:
                raise
            batch_size = max(1, batch_size // 2)
            log.warning("Out of memory; retrying with batch size %d.", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def for_each_chunk(n_items: int, batch_size: int, process: Callable[[int, int, int, int], None]) -> None:
    """The one batched, out-of-memory-safe loop: ``process(start, stop, chunk, n_chunks)`` over [0, n_items).

    Items go in chunks of ``batch_size``. On out-of-memory the batch is halved and the loop resumes
    after the last finished chunk, so no finished item is computed twice (``chunk`` / ``n_chunks``
    count the chunks of the current attempt). ``process`` must leave no partial result behind when it
    raises: it stores a chunk's output only after the chunk is done.
    """
    done = 0

    def run(size: int) -> None:
        nonlocal done
        n_chunks = math.ceil((n_items - done) / size)
        for chunk, start in enumerate(range(done, n_items, size)):
            stop = min(start + size, n_items)
            process(start, stop, chunk, n_chunks)
            done = stop

    run_with_oom_backoff(run, batch_size)
