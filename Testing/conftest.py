"""Shared fixtures: tiny untrained model folders written with the real model format, oblique and RGB
images, one torch thread. Plain helper functions live in helpers.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.models.card import LabelInfo
from helpers import make_model, rotation


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny_gray")


@pytest.fixture(scope="session")
def tiny_rgb_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny_rgb", in_channels=3, modality="RGB",
                      normalization={"kind": "rgb"}, labels=[LabelInfo("lesion"), LabelInfo("border")])


@pytest.fixture(scope="session")
def tiny_3d_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny_3d", spatial_dims=3, spacing=[2.0, 2.0, 3.0])


@pytest.fixture()
def oblique_3d() -> sitk.Image:
    """Anisotropic volume, direction rotated about an oblique axis: no axis of it is a world axis."""
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(6, 10, 13)).astype(np.float32))
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((12.5, -40.0, 7.25))
    image.SetDirection(rotation((1.0, 2.0, 0.5), 0.6).ravel().tolist())
    return image


@pytest.fixture()
def rgb_2d() -> sitk.Image:
    """8-bit RGB picture with a rotated 2D direction and non-square pixels."""
    pixels = np.random.default_rng(2).integers(0, 256, (14, 18, 3), dtype=np.uint8)
    image = sitk.GetImageFromArray(pixels, isVector=True)
    image.SetSpacing((0.5, 0.8))
    image.SetOrigin((5.0, -3.0))
    c, s = math.cos(0.5), math.sin(0.5)
    image.SetDirection((c, -s, s, c))
    return image


@pytest.fixture()
def one_thread():
    """One torch thread: on the shared 2-core machine, 2 threads under load made 6 tiny steps take
    44 s instead of 8 s (OpenMP threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
