"""Draw the extension/module icon (128x128 PNG): noisy mask contours converging to a clean one.

The design shows what the extension does: several sampled masks (noisy, spread out) stacked over
the fused one (clean, bright). Deterministic (fixed seed). Run from the repository root:
    python3 scripts/make_icons.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [ROOT / "Resources" / "Icons" / "DiffusionSeg.png", ROOT / "DiffusionSeg" / "Resources" / "Icons" / "DiffusionSeg.png"]


def blob(theta: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Radius of a smooth organ-like closed curve, plus low-frequency noise of amplitude ``noise``."""
    r = 1.0 + 0.18 * np.cos(2 * theta - 0.6) + 0.08 * np.sin(3 * theta + 0.3)
    for k in range(2, 7):
        r += noise / k * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r


def draw(path: Path) -> None:
    rng = np.random.default_rng(7)
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((-1.5, -1.5), 3.0, 3.0, boxstyle="round,pad=0,rounding_size=0.45",
                                facecolor="#1d2433", edgecolor="none"))
    theta = np.linspace(0, 2 * np.pi, 400)
    # Sampled masks: noisier and fainter first, each a little closer to the final contour.
    for i, noise in enumerate([0.55, 0.42, 0.30, 0.20, 0.10]):
        r = 0.85 * blob(theta, rng, noise)
        ax.plot(r * np.cos(theta), r * np.sin(theta), color="#f0a040", alpha=0.35 + 0.12 * i, lw=1.6)
    # The fused mask: filled and outlined.
    r = 0.85 * blob(theta, rng, 0.0)
    ax.fill(r * np.cos(theta), r * np.sin(theta), color="#e05a2a", alpha=0.45)
    ax.plot(r * np.cos(theta), r * np.sin(theta), color="#ffe3b0", lw=2.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, transparent=True)
    plt.close(fig)


if __name__ == "__main__":
    for target in TARGETS:
        draw(target)
        print(target)
