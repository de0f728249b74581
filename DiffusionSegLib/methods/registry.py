"""The registry of segmentation methods: the only place that lists them.

A model card's ``method`` names one entry; ``get_method`` returns its ``SegmentationMethod``
(``methods.base``), and everything else (training, inference, evaluation, the CLI, the benchmark,
the Slicer module) goes through it. Adding a method: a new folder under ``methods/`` whose
``__init__`` defines ``METHOD``, a member of ``Method`` and an entry in ``_METHODS`` below, and a test.

Every network has the call signature its method's ``sample`` and ``training_loss`` use; diffusion
networks are ``net(x_t, image, timesteps)`` (see ``methods.dpm``), the supervised UNet ``net(image)``.
Each has an attribute ``size_divisor`` (int): spatial sizes must be multiples of it (the
preprocessing pads to it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from DiffusionSegLib.core.enums import Choice
from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.methods import diffseg, medsegdiff, unet, unisegdiff, vanilla_dpm
from DiffusionSegLib.methods.base import SegmentationMethod

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard


class Method(Choice):
    """The card's ``method`` values."""

    MEDSEGDIFF = "medsegdiff"
    VANILLA_DPM = "vanilla_dpm"
    UNET = "unet"
    DIFFSEG = "diffseg"
    UNISEGDIFF = "unisegdiff"


_METHODS: dict[Method, SegmentationMethod] = {
    Method.MEDSEGDIFF: medsegdiff.METHOD,
    Method.VANILLA_DPM: vanilla_dpm.METHOD,
    Method.UNET: unet.METHOD,
    Method.DIFFSEG: diffseg.METHOD,
    Method.UNISEGDIFF: unisegdiff.METHOD,
}


def get_method(name: str) -> SegmentationMethod:
    """The method a card's ``method`` names; ValueError listing the known ones otherwise."""
    return _METHODS[Method.parse(name, "method")]


def build_network(card: "ModelCard") -> "torch.nn.Module":
    """Build the network the card describes (``card.method``; kwargs in ``card.network``)."""
    return get_method(card.method).build_network(card)


def load_model(model_dir: str | os.PathLike, device: Any = "cpu",
               card: "ModelCard | None" = None) -> tuple["torch.nn.Module", "ModelCard"]:
    """Rebuild the network of a model folder and load its weights (safetensors; never pickle).

    Returns ``(network, card)``; the network is in eval mode on ``device``. ``card``: the folder's
    card when the caller has already read it (``read_card``), so it is not read twice. An ensemble's other
    members (``card.members``) are checked (present, sha256) but not loaded: ``load_members``.
    Raises ModelLoadError when the sha256 differs from the card (corrupt or truncated file),
    when the card names an unknown method or an invalid network, or when the weights do not fit it.
    """
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.models.store import verify_members, verify_weights

    card = read_card(model_dir) if card is None else card
    weights = verify_weights(Path(model_dir), card)
    verify_members(Path(model_dir), card)
    return _load_network(card, weights, model_dir).to(device).eval(), card


def load_members(model_dir: str | os.PathLike, card: "ModelCard", device: Any = "cpu", count: int | None = None,
                 checked: bool = False) -> list["torch.nn.Module"]:
    """The extra ensemble members of a model folder (``card.members``; [] for one network), each built
    from the card and loaded like ``load_model``'s network, in eval mode on ``device``. ``count``: only
    the first that many (members that will draw no sample are not loaded). ``checked=True`` skips the
    sha256 check when the caller has just run it (``load_model`` does) instead of hashing every file twice."""
    from DiffusionSegLib.models.store import verify_members

    names = card.member_files()[:count]
    paths = [Path(model_dir) / name for name, _ in names] if checked else \
        verify_members(Path(model_dir), card)[:count]
    return [_load_network(card, path, model_dir).to(device).eval() for path in paths]


def load_network(model_dir: str | os.PathLike, card: "ModelCard", member: int = 0,
                 device: Any = "cpu") -> "torch.nn.Module":
    """Network ``member`` of a model folder alone (0 = model.safetensors, K = member K), its file's sha256
    checked and no other network's file read (fine-tuning from one ensemble member); eval mode on ``device``."""
    from DiffusionSegLib.models.store import verify_network

    return _load_network(card, verify_network(Path(model_dir), card, member), model_dir).to(device).eval()


def _load_network(card: "ModelCard", weights: Path, model_dir: str | os.PathLike) -> "torch.nn.Module":
    """The card's network with the safetensors ``weights`` loaded (strict); ModelLoadError when they do not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"corrupt weights file {weights}: {err}") from err
    try:
        net = build_network(card)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"model card {model_dir} describes an invalid network: {err}") from err
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelLoadError(f"weights do not match the architecture in the model card ({weights.name}): {first}") from err
    return net


def pretraining() -> Any:
    """The 3D pretraining of the anatomy-guided diffusion method (``methods/pretrain3d``): a namespace
    with ``denoising`` (backbone, objectives, loss; the loop is ``training/pretrain.py``), ``coordinates`` (the
    anatomical coordinate model) and ``probe`` (the frozen-backbone downstream test). Not a segmentation method of its own: what it trains is a backbone
    for a 3D segmenter. Imported on demand (it needs MONAI, which segmentation does not)."""
    from types import SimpleNamespace

    from DiffusionSegLib.methods.pretrain3d import coordinates, denoising, probe

    return SimpleNamespace(denoising=denoising, coordinates=coordinates, probe=probe)
