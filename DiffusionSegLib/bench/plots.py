"""Figures of the real-data benchmark (``benchreal``): small PNGs written to ``OUT/figures/``.

- ``calibration.png``: reliability curve of the MedSegDiff probability map (fraction of voxels that are
  reference foreground, per predicted probability k/N of N samples), per task, with voxel counts.
- ``dice_vs_nfe.png``: Dice of the best MedSegDiff organ seed against network evaluations per slice
  (DDIM settings and the 1000-step DDPM reference).
- ``overlay_<task>.png``: one test slice per task: CT, reference contour, fused mask, ambiguity region.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def calibration_figure(results: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=90)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    drawn = False
    for task, data in results.get("tasks", {}).items():
        rel = (data.get("uncertainty_medsegdiff") or {}).get("reliability")
        if not rel:
            continue
        pts = [(p, o, v) for p, o, v in zip(rel["predicted"], rel["observed"], rel["voxels"]) if o is not None]
        ax.plot([p for p, _, _ in pts], [o for _, o, _ in pts], marker="o", label=f"{task} (ECE "
                f"{data['uncertainty_medsegdiff']['ece']:.3f})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("predicted probability p (share of samples)")
    ax.set_ylabel("observed foreground fraction")
    ax.set_title("MedSegDiff reliability (test cases, all seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def dice_nfe_figure(sampling: dict[str, Any], path: Path) -> Path | None:
    rows = sampling.get("rows", [])
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=90)
    # Labels scored 0 in every setting (e.g. a missed organ) would only flatten the axis: named in the title.
    labels = [lab for lab in rows[0]["dice"] if any(r["dice"][lab] > 0 for r in rows)]
    missed = [lab for lab in rows[0]["dice"] if lab not in labels]
    for lab in labels:
        for scope, marker in (("slab", "o"), ("volume", "s")):
            ddim = sorted((r for r in rows if r["scope"] == scope and r["sampler"] == "ddim"),
                          key=lambda r: r["nfe_per_slice"])
            if ddim:
                ax.plot([r["nfe_per_slice"] for r in ddim], [r["dice"][lab] for r in ddim], marker=marker,
                        label=f"{lab}, DDIM, {'2-slice slab' if scope == 'slab' else 'whole volume'}")
                for r in ddim:
                    ax.annotate(f"{r['samples']}x{r['steps']}", (r["nfe_per_slice"], r["dice"][lab]), fontsize=6,
                                xytext=(2, 2), textcoords="offset points")
        for r in (r for r in rows if r["sampler"] == "ddpm"):
            ax.scatter([r["nfe_per_slice"]], [r["dice"][lab]], marker="*", s=90, color="k",
                       label=f"{lab}, DDPM {r['steps']} steps x {r['samples']} (slab)")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per slice (samples x steps)")
    ax.set_ylabel("Dice")
    if missed:
        ax.text(0.02, 0.02, f"Dice 0 at every setting: {', '.join(missed)}", transform=ax.transAxes, fontsize=7)
    ax.set_title("Sampling cost, best MedSegDiff organ seed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def overlay_figure(example: Path, title: str, path: Path, n_samples: int) -> Path:
    plt = _plt()
    data = np.load(example)
    image = data["image"].astype(np.float32)
    ref, pk = data["reference"], data["probability_k"].astype(np.float32)
    n = float(n_samples)
    labels = [str(x) for x in data["labels"]]
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.0), dpi=80)
    lo, hi = np.percentile(image, [1, 99])
    colours = ("tab:red", "tab:blue", "tab:green")
    for ax, what in zip(axes, ("reference", "fused", "ambiguity")):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        for i, name in enumerate(labels):
            if what == "reference":
                mask = ref[i].astype(float)
            elif what == "fused":
                mask = (pk[i] * 2 > n).astype(float)
            else:
                mask = ((pk[i] > 0) & (pk[i] < n)).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colours[i % 3], linewidths=0.8)
        ax.set_title(f"{what}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title} (slice {int(data['slice'])}; " + ", ".join(
        f"{c.split(':')[-1]}={n_}" for c, n_ in zip(colours, labels)) + ")", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def make_figures(out_dir: str | Path) -> list[Path]:
    """Write every figure that the results in ``out_dir`` allow; returns the written paths."""
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    results = json.loads((out_dir / "results.json").read_text())
    written = [calibration_figure(results, figures / "calibration.png")]
    if (out_dir / "sampling.json").is_file():
        written.append(dice_nfe_figure(json.loads((out_dir / "sampling.json").read_text()), figures / "dice_vs_nfe.png"))
    for task in results.get("tasks", {}):
        best_key, best, n_samples = None, -1.0, 1
        for key in ("medsegdiff_s0", "medsegdiff_s1", "medsegdiff_s2"):
            f = out_dir / "runs" / task / key / "metrics.json"
            if f.is_file():
                m = json.loads(f.read_text())
                d = float(np.mean([c["metrics"][lab]["dice"] for c in m["cases"] for lab in c["metrics"]]))
                if d > best:
                    best_key, best, n_samples = key, d, int(m["samples"])
        if best_key is None:
            continue
        examples = sorted((out_dir / "runs" / task / best_key / "examples").glob("*.npz"))
        for ex in examples[-1:]:  # organs: the one test case; lesions: lung2 (the larger tumour)
            written.append(overlay_figure(ex, f"{task}: MedSegDiff {best_key}, {ex.stem}",
                                          figures / f"overlay_{task}.png", n_samples))
    return [p for p in written if p is not None]
