"""How a diffusion model's training signal is spread over the timesteps (the problem UniSegDiff names).

For each of ``bins`` equal ranges of t, on held-out cases: the loss of the card's prediction target,
the global gradient norm of that loss, and the Dice of the one-step x0 estimate (the mask the network
implies from x_t alone). A bin with a near-zero loss and gradient teaches nothing; a bin whose x0
Dice is already high at large t needs no more steps there. Diffusion methods only.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from DiffusionSegLib.core.errors import DiffusionSegError


def timestep_profile(net: Any, card: Any, cases: Sequence[Any], bins: int = 10, seed: int = 0,
                     repeats: int = 2) -> list[dict[str, float]]:
    """Per timestep bin: ``{"t_low", "t_high", "loss", "grad_norm", "x0_dice"}``.

    ``cases``: ``training.data.Case`` objects on the model grid (image (C, S, H, W), mask (L, S, H, W)
    for 2D models). Every slice of every case is used ``repeats`` times per bin, each with t drawn
    uniformly in the bin and fresh noise from one generator seeded with ``seed``. x0 Dice pools all
    labels and slices (both empty: 1). The network's weights are not changed (gradients are cleared).
    """
    import torch

    from DiffusionSegLib.methods.diffusion import mask_to_signal
    from DiffusionSegLib.methods.registry import get_method
    from DiffusionSegLib.training.data import pad_to

    method = get_method(card.method)
    if not method.draws_samples:
        raise DiffusionSegError(f"model '{card.name}' ({card.method}) is not a diffusion model: no timesteps")
    if card.spatial_dims != 2:
        raise DiffusionSegError("the timestep profile takes 2D models (slices as the batch)")
    state = method.prepare_training(card)
    divisor = int(getattr(net, "size_divisor", 1))
    images, masks = [], []
    for case in cases:
        size = [math.ceil(n / divisor) * divisor for n in case.image.shape[-2:]]
        images.append(np.moveaxis(pad_to(case.image, size, case.image.reshape(case.image.shape[0], -1).min(1)), 1, 0))
        masks.append(np.moveaxis(pad_to(case.mask, size, 0), 1, 0))
    generator = torch.Generator("cpu").manual_seed(seed)
    device = next(net.parameters()).device
    edges = np.linspace(0, card.num_train_timesteps, bins + 1).round().astype(int)
    profile = []
    net.eval()
    for low, high in zip(edges[:-1], edges[1:]):
        losses, norms, hits, totals = [], [], 0, 0
        for image, mask in zip(images, masks):
            cond = torch.from_numpy(np.ascontiguousarray(image)).float().to(device)
            x0 = mask_to_signal(torch.from_numpy(np.ascontiguousarray(mask))).to(device)
            for _ in range(repeats):
                t = torch.randint(int(low), int(high), (x0.shape[0],), generator=generator)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                net.zero_grad(set_to_none=True)
                loss, estimate = method.timestep_loss(net, state, cond, torch.from_numpy(np.ascontiguousarray(mask))
                                                      .to(device), t.to(device), noise)
                loss.backward()
                norms.append(float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in net.parameters()
                                                  if p.grad is not None))))
                losses.append(float(loss.detach()))
                with torch.no_grad():
                    predicted, truth = estimate > 0, x0 > 0
                    hits += 2 * int((predicted & truth).sum())
                    totals += int(predicted.sum()) + int(truth.sum())
        net.zero_grad(set_to_none=True)
        profile.append({"t_low": int(low), "t_high": int(high) - 1, "loss": float(np.mean(losses)),
                        "grad_norm": float(np.mean(norms)), "x0_dice": 1.0 if totals == 0 else hits / totals})
    return profile
