"""Diffusion pretraining of a 3D backbone with anatomical guidance (issue 15, second building block).

A 3D encoder-decoder (``DenoisingBackbone``) learns from unlabelled CT crops, normalised by
``coordinates.ct_window``, with one of two image objectives (``PretrainObjective.kind``):

* ``diffusion``: the crop x0 is noised to a random level t of the linear DDPM schedule,
  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, and the network, told t, predicts eps. Across levels it
  must learn everything from fine texture (small t) to the layout of the body (large t).
* ``restorative``: plain reconstruction, the baseline the method is compared against: the crop is
  corrupted once, at one fixed level (``restorative_t``, the network is not told which), and the
  network predicts the clean crop.

Anatomical guidance (``coordinate_weight`` > 0): an auxiliary head regresses, per voxel, the
anatomical coordinates a frozen ``CoordinateNet`` gives the clean crop (mm, divided by
``coordinate_scale_mm``), so the features must also say where in the body a voxel is (multi-task).
Downstream, ``DenoisingBackbone.encode`` gives the feature pyramid at t = 0 (the clean image).

Crops are (B, 1, D, H, W); weights are written with safetensors next to a JSON card, never pickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from DiffusionSegLib.methods.blocks import Stage, conv_nd, norm_groups_for, timestep_embedding, upsample_conv
from DiffusionSegLib.methods.diffusion import schedule_alphas_cumprod
from DiffusionSegLib.methods.pretrain3d.coordinates import (BACKGROUND, CT_NORMALIZATION, load_weights, read_card,
                                                             save_weights_and_card)

OBJECTIVES = ("diffusion", "restorative")
WEIGHTS_FILE = "backbone.safetensors"
CARD_FILE = "backbone.json"
CARD_FORMAT = 1


@dataclass(frozen=True)
class PretrainObjective:
    """What the backbone is trained to do (every field is written to the card)."""

    kind: str = "diffusion"
    num_train_timesteps: int = 1000
    restorative_t: int = 250  # the one corruption level of ``restorative`` (a_t = 0.53 on the linear schedule)
    coordinate_weight: float = 0.0  # 0: no anatomical guidance
    coordinate_scale_mm: float = 100.0  # coordinates / scale are the head's targets (order 1)

    def check(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown pretraining objective {self.kind!r} (use {', '.join(OBJECTIVES)})")
        if not 0 <= self.restorative_t < self.num_train_timesteps:
            raise ValueError(f"restorative_t must be in [0, {self.num_train_timesteps - 1}]")
        if self.coordinate_weight < 0 or self.coordinate_scale_mm <= 0:
            raise ValueError("coordinate_weight must be >= 0 and coordinate_scale_mm > 0")


class DenoisingBackbone(nn.Module):
    """3D encoder-decoder told the noise level: (B, 1, D, H, W), t (B,) -> image (B, 1, ...) [+ coords (B, 3, ...)].

    One ``Stage`` of time-conditioned residual blocks per level, stride-2 convolutions between
    levels, nearest-upsampling decoder with skip connections. ``coordinate_head`` adds the 3-channel
    anatomical-coordinate output. Spatial sizes must be multiples of ``size_divisor``.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), num_res_blocks: int = 1, norm_groups: int = 8,
                 coordinate_head: bool = False):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels")
        self.channels, self.num_res_blocks, self.norm_groups = channels, int(num_res_blocks), int(norm_groups)
        self.size_divisor = 2 ** (len(channels) - 1)
        conv = conv_nd(3)
        time_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = conv(1, channels[0], 3, padding=1)
        self.encoder = nn.ModuleList(Stage(3, channels[max(i - 1, 0)], channels[i], num_res_blocks, time_dim, norm_groups)
                                     for i in range(len(channels)))
        self.downs = nn.ModuleList(conv(channels[i], channels[i], 3, stride=2, padding=1)
                                   for i in range(len(channels) - 1))
        self.up_convs = nn.ModuleList(conv(channels[i + 1], channels[i], 3, padding=1) for i in range(len(channels) - 1))
        self.decoder = nn.ModuleList(Stage(3, 2 * channels[i], channels[i], num_res_blocks, time_dim, norm_groups)
                                     for i in range(len(channels) - 1))

        def head(out: int) -> nn.Module:
            return nn.Sequential(nn.GroupNorm(norm_groups_for(channels[0], norm_groups), channels[0]), nn.SiLU(),
                                 conv(channels[0], out, 3, padding=1))

        self.image_head = head(1)
        self.coordinate_head = head(3) if coordinate_head else None

    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a card needs to rebuild the network)."""
        return {"channels": self.channels, "num_res_blocks": self.num_res_blocks, "norm_groups": self.norm_groups,
                "coordinate_head": self.coordinate_head is not None}

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The encoder's feature pyramid, full resolution first: [(B, C_i, *S / 2^i)]; t = 0 by default."""
        if timesteps is None:
            timesteps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self._encode(x, self._time(timesteps, x.dtype))

    def _time(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_mlp(timestep_embedding(timesteps, self.channels[0]).to(dtype))

    def _encode(self, x: torch.Tensor, temb: torch.Tensor) -> list[torch.Tensor]:
        if any(s % self.size_divisor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {self.size_divisor}")
        h, features = self.stem(x), []
        for i, stage in enumerate(self.encoder):
            h = stage(h, temb)
            features.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return features

    def features(self, x: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last feature map, what the heads read: (B, C_0, D, H, W); t = 0 by default
        (the clean image, as a downstream probe sees it)."""
        if timesteps is None:
            timesteps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self._decode(x, self._time(timesteps, x.dtype))

    def _decode(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        features = self._encode(x, temb)
        h = features[-1]
        for i in reversed(range(len(self.decoder))):
            up = upsample_conv(h, self.up_convs[i], features[i].shape[2:])
            h = self.decoder[i](torch.cat([up, features[i]], dim=1), temb)
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 1, D, H, W), timesteps (B,) -> {"image": (B, 1, ...), "coordinates": (B, 3, ...) if the head exists}."""
        h = self._decode(x, self._time(timesteps, x.dtype))
        out = {"image": self.image_head(h)}
        if self.coordinate_head is not None:
            out["coordinates"] = self.coordinate_head(h)
        return out


def pretraining_loss(net: DenoisingBackbone, clean: torch.Tensor, coordinates_mm: torch.Tensor | None,
                     objective: PretrainObjective, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The objective's loss on a batch of clean crops (B, 1, D, H, W); coordinates (B, 3, D, H, W) mm or None.

    Returns {"image": MSE of the image target, "coordinates": MSE of coordinates / scale (0 without
    guidance), "total": image + coordinate_weight * coordinates}. Noise and timesteps come from
    ``generator`` (CPU), so a seed gives the same loss on any device.
    """
    b = clean.shape[0]
    alpha_bar = schedule_alphas_cumprod("linear_beta", objective.num_train_timesteps)  # Ho et al. 2020
    if objective.kind == "diffusion":
        t = torch.randint(0, objective.num_train_timesteps, (b,), generator=generator)
    else:
        t = torch.full((b,), objective.restorative_t, dtype=torch.long)
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    a = alpha_bar[t].view(b, 1, 1, 1, 1).to(clean.device)
    noisy = a.sqrt() * clean + (1.0 - a).sqrt() * noise
    told = t if objective.kind == "diffusion" else torch.zeros_like(t)  # restorative: the level is not given
    out = net(noisy, told.to(clean.device))
    target = noise if objective.kind == "diffusion" else clean
    image = F.mse_loss(out["image"].float(), target.float())
    coords = torch.zeros((), device=clean.device)
    if objective.coordinate_weight > 0:
        if coordinates_mm is None or "coordinates" not in out:
            raise ValueError("anatomical guidance needs coordinate targets and a network with a coordinate head")
        coords = F.mse_loss(out["coordinates"].float(), coordinates_mm.float() / objective.coordinate_scale_mm)
    return {"image": image, "coordinates": coords, "total": image + objective.coordinate_weight * coords}


def random_crops(volumes: Sequence[np.ndarray], patch: Sequence[int], batch: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``batch`` crops of ``patch`` voxels from volumes drawn uniformly: (batch, 1, *patch) float32.

    A volume smaller than the patch along an axis is padded with ``BACKGROUND`` (air) there.
    """
    crops = []
    for _ in range(batch):
        volume = volumes[int(rng.integers(len(volumes)))]
        pad = [(0, max(0, p - n)) for p, n in zip(patch, volume.shape)]
        volume = np.pad(volume, pad, constant_values=BACKGROUND) if any(b for _, b in pad) else volume
        start = [int(rng.integers(n - p + 1)) for n, p in zip(volume.shape, patch)]
        crops.append(volume[tuple(slice(s, s + p) for s, p in zip(start, patch))])
    return np.stack(crops)[:, None].astype(np.float32)


@dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run: the objective plus the optimisation (written to the card)."""

    objective: PretrainObjective = PretrainObjective()
    channels: tuple[int, ...] = (16, 32, 64)
    patch: tuple[int, int, int] = (32, 32, 32)
    batch: int = 2
    steps: int = 1000
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 100


def config_dict(config: PretrainConfig) -> dict[str, Any]:
    """The run's configuration as the JSON card and the checkpoint hold it (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


def save_backbone(folder: str | Path, net: DenoisingBackbone, config: PretrainConfig,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``backbone.safetensors`` and ``backbone.json`` (network, objective, normalisation) into ``folder``."""
    card = {"format": CARD_FORMAT, "kind": "pretrained_backbone_3d", "network": net.config(),
            "pretraining": config_dict(config), "normalization": CT_NORMALIZATION, **(extra or {})}
    return save_weights_and_card(folder, WEIGHTS_FILE, CARD_FILE, net, card)


def load_backbone(folder: str | Path, device: str | torch.device = "cpu") -> tuple[DenoisingBackbone, dict[str, Any]]:
    """(backbone in eval mode, card) from a folder written by ``save_backbone``; a foreign card is refused."""
    card = read_card(folder, CARD_FILE, "pretrained_backbone_3d", CARD_FORMAT)
    net = DenoisingBackbone(**card["network"])
    load_weights(net, folder, WEIGHTS_FILE)
    return net.to(device).eval(), card
