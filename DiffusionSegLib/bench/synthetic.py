"""``diffusionseg bench``: seconds per image and per volume, NFE and peak memory per setting.

Figures are printed as a Markdown table (and optionally JSON) so they can be pasted into
docs/BENCHMARKS.md together with the command that produced them.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_VOLUME = Path(__file__).resolve().parents[2] / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"5x10,1x1" -> [(5, 10), (1, 1)] as (samples, steps)."""
    out = []
    for item in text.split(","):
        n, k = item.lower().split("x")
        out.append((int(n), int(k)))
    return out


def synthetic_image(card: Any, size: tuple[int, int], seed: int = 0):
    """A 2D test image on the model's own grid (no resampling): a bright disk on noise.

    Intensities follow the card's normalization so the network sees a realistic range.
    """
    import SimpleITK as sitk

    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disk = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 4) ** 2
    kind = card.normalization.get("kind")
    base, fg, noise = (0.0, 60.0, 20.0) if kind == "ct_window" else (50.0, 180.0, 15.0)
    arr = base + fg * disk + rng.normal(0, noise, (h, w))
    if card.in_channels == 3:
        arr = np.clip(arr, 0, 255)
        img = sitk.GetImageFromArray(np.repeat(arr[..., None], 3, axis=2).astype(np.uint8), isVector=True)
    else:
        img = sitk.GetImageFromArray(arr.astype(np.float32))
    if card.spacing:
        img.SetSpacing([float(s) for s in card.spacing[:2]])
    return img


def peak_memory_mb(device: Any) -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU), in MiB."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def time_run(image: Any, model_dir: Path, options: Any, repeats: int) -> dict[str, Any]:
    """Median wall time of ``repeats`` runs of segment_image (after one warm-up run)."""
    import torch

    from DiffusionSegLib.pipeline.segment import segment_image

    # Warm-up (model load, allocator, pydensecrf import); input warnings (a synthetic image is not a
    # real CT) are logged by this run only, not once per timed repeat.
    segment_image(image, model_dir, options)
    times, report = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        report = segment_image(image, model_dir, options, on_warnings=lambda warnings: None).report
        times.append(time.perf_counter() - start)
    device = torch.device(report["device"])
    return {"seconds": statistics.median(times), "min_seconds": min(times), "report": report,
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


def run_benchmark(args: Any) -> list[dict[str, Any]]:
    """Run the benchmark described by the CLI arguments; print a Markdown table; return the rows."""
    import torch

    from DiffusionSegLib.pipeline.settings import SegmentSettings
    from DiffusionSegLib.pipeline.io import read_image
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.models.store import resolve_model

    model_dir = resolve_model(args.model)
    card = read_card(model_dir)
    h, w = (int(v) for v in args.size.lower().split("x"))
    image2d = synthetic_image(card, (h, w))
    volume_path = Path(args.volume) if args.volume else SAMPLE_VOLUME
    volume = read_image(volume_path) if volume_path.exists() else None
    rows: list[dict[str, Any]] = []

    def options(n: int, k: int, batch_size: int | None = None, crf: bool | None = None) -> SegmentSettings:
        """crf None: the model card's default, so the rows measure what a user's run costs."""
        return SegmentSettings(samples=n, steps=k, sampler=args.sampler or "ddim", seed=args.seed,
                               device=args.device, crf=crf, batch_size=batch_size)

    def add(kind: str, n: int, k: int, res: dict[str, Any], note: str = "") -> None:
        rep = res["report"]
        row = {"input": kind, "samples": n, "steps": k, "nfe_per_image": n * k,
               "network_evaluations": rep["network_evaluations"], "seconds": round(res["seconds"], 3),
               "min_seconds": round(res["min_seconds"], 3), "peak_memory_mb": res["peak_memory_mb"],
               "crf_backend": rep["crf_backend"], "device": rep["device"], "note": note,
               "stage_seconds": rep["timings_s"]}
        rows.append(row)
        print(f"| {kind} | {n} x {k} | {n * k} | {row['seconds']:.3f} | {row['peak_memory_mb']:.0f} | "
              f"{row['crf_backend']} | {note} |", flush=True)

    threads = torch.get_num_threads()
    print(f"# diffusionseg bench: model {card.name}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {threads} threads")
    print("| input | samples x steps | NFE/image | seconds (median) | peak MiB | CRF | note |")
    print("|---|---|---|---|---|---|---|")
    size_name = f"2D {h}x{w}"
    for n, k in parse_settings(args.settings):
        add(size_name, n, k, time_run(image2d, model_dir, options(n, k, args.batch_size), args.repeats))
    # The same work one sample at a time shows what batching samples together buys.
    n, k = parse_settings(args.settings)[min(1, len(parse_settings(args.settings)) - 1)]
    add(size_name, n, k, time_run(image2d, model_dir, options(n, k, batch_size=1), args.repeats),
        "one item per network call")
    if volume is not None:
        size = "x".join(str(s) for s in volume.GetSize())
        for n, k in [(1, 1), (n, k)]:
            add(f"volume {size}", n, k, time_run(volume, model_dir, options(n, k, args.batch_size), 1),
                volume_path.name)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows
