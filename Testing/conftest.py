"""Shared fixtures: tiny untrained model folders written with the real model format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from DiffusionSegLib.models.card import LabelInfo, ModelCard, save_model
from DiffusionSegLib.methods.registry import build_network

REPO = Path(__file__).resolve().parent.parent


def make_model(folder: Path, **card_fields) -> Path:
    """Write a randomly initialised (seeded) tiny model; card_fields override the card."""
    fields = dict(name=folder.name, method="medsegdiff", spatial_dims=2, in_channels=1,
                  labels=[LabelInfo("lesion", (1.0, 0.2, 0.2))],
                  network={"channels": [8, 16], "norm_groups": 4},
                  normalization={"kind": "zscore"}, default_steps=3, default_samples=3)
    fields.update(card_fields)
    card = ModelCard(**fields)
    torch.manual_seed(0)
    net = build_network(card)
    save_model(folder, net.state_dict(), card)
    return folder


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


def new_mrml_scene():
    """A real slicer-core MRML scene set up as SLICER.md describes: application logic, default
    color nodes and the segmentations logic (which also registers the representation converters).

    The logics are kept on the scene (``scene.segmentations_logic``, ``scene.application_logic``):
    they must outlive the test. Skips the test when slicer-core is not installed.
    """
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    seg_logic.SetMRMLApplicationLogic(app)
    app.SetModuleLogic("Segmentations", seg_logic)
    scene.application_logic, scene.segmentations_logic = app, seg_logic
    return scene
