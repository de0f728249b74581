"""Network calls on volumes larger than the training crop: overlapping windows, Gaussian-blended.

A 3D model is trained on crops (``card.patch_shape()``); a whole CT does not fit in memory at once
and lies outside what the network saw. ``in_windows`` runs one network call as MONAI's sliding-window
inference over the crop-sized windows of every item, so a 3D model differs from a 2D one only in
its card. Inputs no larger than the crop are passed through unchanged (one call, same numbers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Half-overlapping windows blended with a Gaussian weight: no seams where windows meet.
OVERLAP = 0.5


def needs_windows(spatial: tuple[int, ...], window: tuple[int, ...] | None) -> bool:
    """True when an item of size ``spatial`` is larger than ``window`` along some axis (3D models only)."""
    return window is not None and len(window) == 3 and any(n > w for n, w in zip(spatial, window))


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
