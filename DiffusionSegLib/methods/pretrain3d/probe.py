"""Frozen-backbone probe: the downstream test of a pretrained 3D backbone (issue 15).

The published protocol trains only a small non-linear head on the frozen backbone's features, on few
labelled cases: the better the pretraining, the more the features already separate the organs.
``train_probe`` fits two 1x1x1 convolutions (features -> 32 -> labels + background) with
cross-entropy on random crops; ``predict_probe`` labels a whole volume by Gaussian-blended sliding
windows. ``fine_tune`` is the other protocol: the same head, with the backbone trained too at a
lower rate. Volumes are (D, H, W) normalised by ``coordinates.ct_window``, label maps (D, H, W) int with
0 = background.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from DiffusionSegLib.methods.pretrain3d.coordinates import BACKGROUND, air_padded_windows
from DiffusionSegLib.methods.pretrain3d.denoising import DenoisingBackbone


class ProbeHead(nn.Module):
    """(B, C, D, H, W) features -> (B, classes, D, H, W) logits: 1x1x1 conv, SiLU, 1x1x1 conv."""

    def __init__(self, in_channels: int, classes: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_channels, hidden, 1), nn.SiLU(), nn.Conv3d(hidden, classes, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def _crop_starts(labels: np.ndarray, patch: Sequence[int], rng: np.random.Generator,
                 foreground_fraction: float) -> list[int]:
    """A crop start; with ``foreground_fraction`` the crop is centred on a random labelled voxel."""
    shape = labels.shape
    if rng.random() < foreground_fraction and labels.any():
        voxels = np.flatnonzero(labels)
        centre = np.unravel_index(int(voxels[int(rng.integers(len(voxels)))]), shape)
        return [int(np.clip(c - p // 2, 0, max(n - p, 0))) for c, p, n in zip(centre, patch, shape)]
    return [int(rng.integers(max(n - p, 0) + 1)) for n, p in zip(shape, patch)]


def _padded(array: np.ndarray, patch: Sequence[int], value: float) -> np.ndarray:
    pad = [(0, max(0, p - n)) for p, n in zip(patch, array.shape)]
    return np.pad(array, pad, constant_values=value) if any(b for _, b in pad) else array


def noised_features(backbone: DenoisingBackbone, x: torch.Tensor, timestep: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The backbone's features of x (B, 1, D, H, W) read at noise level ``timestep``: for t > 0 the input
    is noised to t of the linear schedule first (diffusion features carry the most semantics at
    intermediate levels); t = 0 reads the clean image. -> (B, C_0, D, H, W)."""
    if timestep <= 0:
        return backbone.features(x)
    from DiffusionSegLib.methods.diffusion import schedule_alphas_cumprod

    a = schedule_alphas_cumprod("linear_beta", 1000)[timestep]
    noise = torch.randn(x.shape, generator=generator)
    t = torch.full((x.shape[0],), timestep, dtype=torch.long)
    return backbone.features(a.sqrt() * x + (1 - a).sqrt() * noise, t)


def train_probe(backbone: DenoisingBackbone, volumes: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                classes: int, steps: int = 300, patch: Sequence[int] = (32, 32, 32), batch: int = 2,
                lr: float = 1e-2, seed: int = 0, foreground_fraction: float = 0.67,
                timestep: int = 0) -> tuple[ProbeHead, list[float]]:
    """Fit a ``ProbeHead`` on the frozen backbone's features (read at ``timestep``, see
    ``noised_features``); returns (head in eval mode, loss per step).

    ``classes`` counts the background: label values 0..classes-1. The backbone is never updated.
    """
    backbone = backbone.eval().requires_grad_(False)
    head, losses = _fit(backbone, None, volumes, labels, classes, steps, patch, batch, lr, seed,
                        foreground_fraction, timestep)
    return head, losses


def fine_tune(backbone: DenoisingBackbone, volumes: Sequence[np.ndarray], labels: Sequence[np.ndarray],
              classes: int, steps: int = 300, patch: Sequence[int] = (32, 32, 32), batch: int = 2,
              lr: float = 1e-2, backbone_lr: float = 1e-3, seed: int = 0,
              foreground_fraction: float = 0.67) -> tuple[DenoisingBackbone, ProbeHead, list[float]]:
    """Full fine-tuning, the other published downstream protocol: the same head and crops as
    ``train_probe``, but a copy of the backbone is trained too, at ``backbone_lr`` (lower than the
    head's ``lr``, so the pretrained features are adapted rather than overwritten). Features are read
    at t = 0. Returns (the tuned copy in eval mode, head in eval mode, loss per step); ``backbone``
    itself is left as it was.
    """
    import copy

    tuned = copy.deepcopy(backbone).train().requires_grad_(True)
    head, losses = _fit(tuned, backbone_lr, volumes, labels, classes, steps, patch, batch, lr, seed,
                        foreground_fraction, 0)
    return tuned.eval().requires_grad_(False), head, losses


def _fit(backbone: DenoisingBackbone, backbone_lr: float | None, volumes: Sequence[np.ndarray],
         labels: Sequence[np.ndarray], classes: int, steps: int, patch: Sequence[int], batch: int, lr: float,
         seed: int, foreground_fraction: float, timestep: int) -> tuple[ProbeHead, list[float]]:
    """The downstream loop: cross-entropy of the head on the backbone's features of random crops;
    the backbone is trained too when ``backbone_lr`` is given (else it must be frozen)."""
    if len(volumes) != len(labels) or any(v.shape != lab.shape for v, lab in zip(volumes, labels)):
        raise ValueError("every volume needs a label map of its own shape")
    if any(int(lab.max()) >= classes or int(lab.min()) < 0 for lab in labels):
        raise ValueError(f"label values must lie in 0..{classes - 1}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    head = ProbeHead(backbone.channels[0], classes)
    groups = [{"params": list(head.parameters()), "base_lr": lr}]
    if backbone_lr is not None:
        groups.append({"params": list(backbone.parameters()), "base_lr": backbone_lr})
    optimiser = torch.optim.Adam([{**g, "lr": g["base_lr"]} for g in groups])
    volumes = [_padded(v, patch, BACKGROUND) for v in volumes]
    labels = [_padded(lab, patch, 0) for lab in labels]
    losses = []
    for step in range(steps):
        images, targets = [], []
        for _ in range(batch):
            k = int(rng.integers(len(volumes)))
            start = _crop_starts(labels[k], patch, rng, foreground_fraction)
            region = tuple(slice(s, s + p) for s, p in zip(start, patch))
            images.append(volumes[k][region])
            targets.append(labels[k][region])
        x = torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
        with torch.no_grad() if backbone_lr is None else contextlib.nullcontext():
            features = noised_features(backbone, x, timestep, generator)
        for group in optimiser.param_groups:  # cosine decay to a tenth, a function of the step alone
            group["lr"] = group["base_lr"] * (0.1 + 0.45 * (1.0 + math.cos(math.pi * step / max(steps, 1))))
        loss = F.cross_entropy(head(features), torch.from_numpy(np.stack(targets).astype(np.int64)))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return head.eval(), losses


def predict_probe(backbone: DenoisingBackbone, head: ProbeHead, volume: np.ndarray,
                  patch: Sequence[int] = (32, 32, 32), timestep: int = 0, seed: int = 0) -> np.ndarray:
    """Label map (D, H, W) int64 of a whole volume: sliding windows (half overlap, Gaussian-blended
    logits); features read at ``timestep`` as in training (noise from ``seed``)."""
    x = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None, None]
    generator = torch.Generator().manual_seed(seed)

    def logits(crop: torch.Tensor) -> torch.Tensor:
        return head(noised_features(backbone, crop, timestep, generator))

    return air_padded_windows(logits, x, patch)[0].argmax(0).numpy()


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, classes: int) -> list[float | None]:
    """Dice of labels 1..classes-1 (None where both maps lack the label)."""
    scores: list[float | None] = []
    for label in range(1, classes):
        a, b = prediction == label, reference == label
        total = int(a.sum() + b.sum())
        scores.append(None if total == 0 else 2.0 * int((a & b).sum()) / total)
    return scores
