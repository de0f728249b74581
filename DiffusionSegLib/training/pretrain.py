"""The pretraining loop of the 3D backbone (issue 15): checkpoints, resume, one device or ``torchrun``.

The network, the objectives and the loss are the method's (``methods/pretrain3d/denoising.py``,
reached through the registry); this module runs the optimisation. Under ``torchrun`` with N
processes it is data-parallel the way ``training.loop`` is (``training/distributed.py``): every rank
draws the same global batch of crops from the seeded crop generator and trains on its own rows;
``RowsOfGlobalDraws`` gives each rank the single process's timesteps and noise for those rows; DDP
averages the gradients. So N processes with ``batch`` crops give the run of one process with the
same ``batch``, up to float rounding. Rank 0 alone writes checkpoints and the backbone.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.core.files import replace_folder
from DiffusionSegLib.methods.registry import pretraining
from DiffusionSegLib.training import distributed

__all__ = ["pretrain_backbone", "load_pretrained_encoder", "CHECKPOINT"]

CHECKPOINT = "checkpoint"


class _PretrainLoss(nn.Module):
    """The pretraining loss as a module, so that DDP sees the whole computation as its forward."""

    def __init__(self, net: nn.Module, objective: Any, generator: torch.Generator):
        super().__init__()
        self.net, self.objective, self.generator = net, objective, generator

    def forward(self, clean: torch.Tensor, coordinates_mm: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return pretraining().denoising.pretraining_loss(self.net, clean, coordinates_mm, self.objective,
                                                        self.generator)


def pretrain_backbone(volumes: Sequence[np.ndarray], config: Any, out: str | Path,
                      coordinate_net: nn.Module | None = None, device: str | torch.device = "cpu",
                      card_extra: dict[str, Any] | None = None) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a ``DenoisingBackbone`` on unlabelled volumes (D, H, W) normalised by ``ct_window``.

    config: a ``denoising.PretrainConfig``; ``config.batch`` is the global batch (split over the
    processes of a torchrun launch). Every ``checkpoint_every`` steps the network, the optimiser,
    the random states and the log go to ``out/checkpoint`` (swapped in by rename); a call with the
    same config and ``out`` resumes from there and gives the weights an uninterrupted run gives.
    The finished backbone is written with ``save_backbone`` (rank 0). ``coordinate_net`` (frozen)
    gives the coordinate targets; it is required exactly when the objective's ``coordinate_weight``
    > 0. ``card_extra`` goes into the backbone's card (e.g. the grid's ``spacing_mm``). Returns
    (backbone on the CPU in eval mode, log: one dict of losses per step, rank mean).
    """
    from DiffusionSegLib.core.device import resolve_device

    objective = config.objective
    objective.check()
    if (objective.coordinate_weight > 0) != (coordinate_net is not None):
        raise ValueError("give a coordinate model exactly when coordinate_weight > 0")
    distributed.local_batch(config.batch, distributed.world_size())  # before any process waits for another
    device = distributed.device_for(resolve_device(device) if isinstance(device, str) else device)
    with distributed.process_group(device):
        return _pretrain(volumes, config, Path(out), coordinate_net, device, card_extra or {})


def _pretrain(volumes: Sequence[np.ndarray], config: Any, out: Path, coordinate_net: nn.Module | None,
              device: torch.device, card_extra: dict[str, Any]) -> tuple[nn.Module, list[dict[str, float]]]:
    denoising = pretraining().denoising
    world, rank = distributed.world_size(), distributed.rank()
    rows = distributed.local_batch(config.batch, world)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    net = denoising.DenoisingBackbone(config.channels, coordinate_head=coordinate_net is not None)
    if any(p % net.size_divisor for p in config.patch):
        raise ValueError(f"patch {config.patch} is not a multiple of {net.size_divisor}")
    net.to(device)  # before the optimiser: a resumed optimiser state follows its parameters' device
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # CPU: a seed gives the same numbers on any device
    log: list[dict[str, float]] = []
    step = _resume(out / CHECKPOINT, config, net, optimiser, rng, generator, log)
    net.train()
    if coordinate_net is not None:
        coordinate_net = coordinate_net.to(device).eval()
    # The coordinate head exists exactly when it is trained, so every parameter is in every loss.
    loss_module = distributed.wrap(_PretrainLoss(net, config.objective, generator), device, parts_may_rest=False)
    while step < config.steps:
        batch = denoising.random_crops(volumes, config.patch, config.batch, rng)  # the global batch, every rank
        clean = torch.from_numpy(batch[rank * rows:(rank + 1) * rows]).to(device)
        coords = None
        if coordinate_net is not None:
            with torch.no_grad():
                coords = coordinate_net(clean)
        for group in optimiser.param_groups:  # cosine decay to lr / 10, a function of the step alone
            group["lr"] = config.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * step / max(config.steps, 1))))
        with distributed.RowsOfGlobalDraws(generator, rows, rank, world) if world > 1 else nullcontext():
            losses = loss_module(clean, coords)
        optimiser.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimiser.step()
        step += 1
        log.append({"step": step, **{k: round(distributed.mean(float(v.detach())), 6) for k, v in losses.items()}})
        if step % config.checkpoint_every == 0 or step == config.steps:
            if distributed.is_main():
                _save_checkpoint(out / CHECKPOINT, config, net, optimiser, rng, generator, log)
            distributed.barrier()
    net.cpu().eval()
    if distributed.is_main():
        denoising.save_backbone(out, net, config, {**card_extra, "steps": step, "final_loss": log[-1] if log else None,
                                                   **({"processes": world} if world > 1 else {})})
    distributed.barrier()
    return net, log


def _save_checkpoint(folder: Path, config: Any, net: nn.Module, optimiser: torch.optim.Optimizer,
                     rng: np.random.Generator, generator: torch.Generator, log: list[dict[str, float]]) -> None:
    import json

    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.loss"] = generator.get_state()
    save_file(tensors, str(partial / "weights.safetensors"))
    torch.save(optimiser.state_dict(), partial / "optimizer.pt")  # read back with weights_only=True
    state = {"config": pretraining().denoising.config_dict(config), "log": log, "rng": rng.bit_generator.state}
    (partial / "state.json").write_text(json.dumps(state), encoding="utf-8")
    replace_folder(partial, folder)


def _resume(folder: Path, config: Any, net: nn.Module, optimiser: torch.optim.Optimizer,
            rng: np.random.Generator, generator: torch.Generator, log: list[dict[str, float]]) -> int:
    """Load ``folder`` into the run when it exists; the step reached (0 without a checkpoint)."""
    import json

    from safetensors.torch import load_file

    if not folder.exists():
        return 0
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state["config"] != pretraining().denoising.config_dict(config):
        raise ValueError(f"cannot resume from {folder}: it was written with another configuration")
    tensors = load_file(str(folder / "weights.safetensors"))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
    optimiser.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.loss"])
    rng.bit_generator.state = state["rng"]
    log.extend(state["log"])
    return int(log[-1]["step"]) if log else 0



def load_pretrained_encoder(method: Any, net: nn.Module, card: Any, folder: str | Path) -> dict[str, Any]:
    """Initialise ``net``'s image encoder from the backbone in ``folder`` (``diffusionseg pretrain``),
    after checking that the backbone saw inputs as this model will: the same CT window (else the
    features read other numbers) and, with a warning only, the same grid spacing.

    Returns what the model card records: folder, objective, pretraining steps, parameters set.
    DiffusionSegError for an unreadable backbone, another normalisation, or a network it does not fit.
    """
    import logging

    denoising = pretraining().denoising
    try:
        backbone, backbone_card = denoising.load_backbone(folder)
    except (OSError, ValueError, KeyError) as err:
        raise DiffusionSegError(f"cannot read the pretrained backbone {folder}: {err}") from None
    window = backbone_card.get("normalization", {})
    norm = card.normalization or {}
    same_window = (norm.get("kind") == "ct_window" and window.get("kind") == "ct_window"
                   and abs(norm["center"] - norm["width"] / 2 - window["low_hu"]) < 1e-6
                   and abs(norm["center"] + norm["width"] / 2 - window["high_hu"]) < 1e-6)
    if not same_window:
        low, high = float(window.get("low_hu", "nan")), float(window.get("high_hu", "nan"))
        raise DiffusionSegError(
            f"the pretrained backbone {folder} saw CT scaled from {low:g}..{high:g} HU to [-1, 1]; this model's "
            f"normalization is {norm}: use {{\"kind\": \"ct_window\", \"center\": {(low + high) / 2:g}, "
            f"\"width\": {high - low:g}}}")
    spacing = backbone_card.get("spacing_mm")
    if spacing is not None and card.spacing is not None and any(abs(float(a) - float(b)) > 1e-3
                                                                for a, b in zip(card.spacing, spacing)):
        logging.getLogger("diffusionseg").warning(
            "the pretrained backbone saw a %s mm grid, this model's grid is %s mm: its features may not transfer",
            spacing, card.spacing)
    try:
        names = method.load_pretrained_encoder(net, backbone.to(next(net.parameters()).device))
    except ValueError as err:
        raise DiffusionSegError(f"the pretrained backbone {folder} does not fit this network: {err}") from None
    return {"folder": str(folder), "objective": backbone_card["pretraining"]["objective"],
            "pretraining_steps": backbone_card.get("steps"), "spacing_mm": spacing, "parameters_set": len(names)}
