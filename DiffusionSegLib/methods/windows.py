"""Network calls on images larger than the training crop: overlapping windows, Gaussian-blended.

A 3D model is trained on crops (``card.patch_shape()``); a whole CT does not fit in memory at once
and lies outside what the network saw. A 2D model whose card sets ``slice_windows`` sees each slice
the same way: its group normalisation then takes its statistics over a training-sized window, so
what lies far outside the anatomy (air, the table, the arms) cannot change them
(``ModelCard.inference_window``). ``in_windows`` runs one network call as MONAI's sliding-window
inference; ``WindowGrid`` splits items into their windows once and merges per-window outputs back, for
a sampler that reuses per-window features over many calls (UniSegDiff's encoder). Inputs no larger
than the crop are passed through unchanged (one call, same numbers).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Half-overlapping windows blended with a Gaussian weight: no seams where windows meet.
OVERLAP = 0.5
# Gaussian blending weight's standard deviation, as a fraction of the window (MONAI's and nnU-Net's 1/8).
SIGMA_SCALE = 0.125


def needs_windows(spatial: tuple[int, ...], window: tuple[int, ...] | None) -> bool:
    """True when an item of size ``spatial`` is larger than ``window`` along some axis (None: never)."""
    return window is not None and any(n > w for n, w in zip(spatial, window))


def in_windows(predict: Callable[["torch.Tensor"], "torch.Tensor"], inputs: "torch.Tensor",
               window: tuple[int, ...] | None, windows_per_call: int, overlap: float = OVERLAP) -> "torch.Tensor":
    """``predict(inputs)`` computed window by window when the items are larger than ``window``.

    inputs: (B, C, *spatial); predict maps (b, C, *window) -> (b, L, *window). Returns (B, L, *spatial).
    ``windows_per_call`` windows (from any of the B items) go through ``predict`` together;
    neighbouring windows overlap by ``overlap`` of the window (the card's ``window_overlap``).
    """
    if not needs_windows(tuple(inputs.shape[2:]), window):
        return predict(inputs)
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(inputs, list(window), max(1, windows_per_call), predict, overlap=overlap,
                                    mode="gaussian")


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """First index of each window along an axis of ``length``: steps of window x (1 - overlap), the last
    window flush with the end, so every index is covered. One window (at 0) when ``length <= window``."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((length - window) / step) + 1
    return sorted({min(i * step, length - window) for i in range(n)})


@dataclass(frozen=True)
class WindowGrid:
    """The windows of items of size ``spatial``: corners (one tuple per window, every axis) and size."""

    spatial: tuple[int, ...]
    window: tuple[int, ...]
    corners: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, spatial: tuple[int, ...], window: tuple[int, ...], overlap: float = OVERLAP) -> "WindowGrid":
        """The grid of ``window``-sized windows (clipped to ``spatial``) overlapping by ``overlap``."""
        size = tuple(min(n, w) for n, w in zip(spatial, window))
        axes = [window_starts(n, w, overlap) for n, w in zip(spatial, size)]
        return cls(tuple(spatial), size, tuple(itertools.product(*axes)))

    @property
    def count(self) -> int:
        """Windows per item (K)."""
        return len(self.corners)

    def _slices(self, corner: tuple[int, ...]) -> tuple[slice, ...]:
        return (slice(None), slice(None)) + tuple(slice(c, c + w) for c, w in zip(corner, self.window))

    def split(self, items: "torch.Tensor") -> "torch.Tensor":
        """(B, C, *spatial) -> (B * K, C, *window), item-major: row b * K + k is window k of item b."""
        import torch

        return torch.stack([items[self._slices(c)] for c in self.corners], dim=1).flatten(0, 1)

    def rows(self, items: "torch.Tensor") -> "torch.Tensor":
        """Long (b,) item indices -> long (b * K,) indices of their windows' rows in ``split``'s order."""
        import torch

        offsets = torch.arange(self.count, device=items.device)
        return (items[:, None] * self.count + offsets[None, :]).flatten()

    def weight(self, device: "torch.device | None" = None) -> "torch.Tensor":
        """(*window) float32 blending weight: a Gaussian peaked at the window's centre, > 0 everywhere."""
        import torch

        out = torch.ones(self.window, device=device)
        for axis, w in enumerate(self.window):
            x = torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2.0
            profile = torch.exp(-0.5 * (x / max(SIGMA_SCALE * w, 1e-6)) ** 2)
            shape = [1] * len(self.window)
            shape[axis] = w
            out = out * profile.view(shape)
        # Floor at a small fraction of the peak: a pixel seen only by window edges keeps a defined value.
        return out.clamp_min(1e-3 * float(out.max()))

    def merge(self, windows: "torch.Tensor") -> "torch.Tensor":
        """(B * K, L, *window) in ``split``'s order -> (B, L, *spatial), each pixel the weighted mean of
        the windows that hold it (float32)."""
        import torch

        b = windows.shape[0] // self.count
        per_item = windows.float().view(b, self.count, *windows.shape[1:])
        weight = self.weight(windows.device)
        total = torch.zeros((b, windows.shape[1], *self.spatial), device=windows.device)
        norm = torch.zeros(self.spatial, device=windows.device)
        for k, corner in enumerate(self.corners):
            where = self._slices(corner)
            total[where] += per_item[:, k] * weight
            norm[where[2:]] += weight
        return total / norm

