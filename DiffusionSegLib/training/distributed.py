"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

Launch (one machine, N processes; gloo on CPU, NCCL on CUDA with one GPU per process)::

    torchrun --standalone --nproc_per_node=N -m DiffusionSegLib train DATA -o MODEL ...

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in each process; ``process_group``
reads them and starts the group (a CUDA process uses ``cuda:LOCAL_RANK``). Without them (or with
``WORLD_SIZE=1``) nothing here acts and training runs exactly as a single process always did,
bit for bit.

How N processes reproduce one process's run with the same ``batch_size`` (the GLOBAL batch):

- every rank draws the same full batch from the seeded sampler (same seed everywhere, so the
  sampler's state is the same on every rank and in every checkpoint) and trains on its own rows
  ``[rank * b, (rank + 1) * b)``, b = batch_size / N (``local_batch`` refuses a batch that does not
  split evenly);
- the random numbers of the loss (timesteps, noise) are those the single process draws for these
  rows: inside ``RowsOfGlobalDraws`` a draw from the loss generator of b rows is made for the whole
  batch (the same call with batch_size rows, so the generator advances exactly as in one process)
  and the rank keeps its rows. The methods stay as they are: their contract is that the loss
  generator draws every random number, one row per item;
- each rank's loss is the mean over its rows; DDP averages the gradients over the ranks, which
  is the gradient of the mean over the whole batch; the logged loss is the mean over the ranks.

What is equal and what is not: the batches and the random numbers are identical (sampler and
generator states bit for bit), the arithmetic is not. A convolution's weight gradient summed over b
items on each rank and then all-reduced adds the same terms in another order than one sum over
batch_size items, so gradients differ in the last bits, and AdamW, which divides each gradient
element by its own running magnitude, turns those bits into a visible part of a step where a
gradient is nearly 0 by cancellation. Exact equality is therefore not reachable with DDP; measured
after 3 steps (lr 1e-3, ``Testing/training/test_distributed.py``): losses within 1e-7 relative,
weights within 1.2e-7 (MedSegDiff), 2e-6 (UniSegDiff), 4e-7 (DiffSeg), 9e-5 (vanilla DPM); root
mean square of the weight difference 1e-9 to 1e-6, against 1e-3 without gradient synchronisation. A few elements of
parameters that barely matter (conv biases right before a one-channel-per-group GroupNorm) can move
by up to half a step. Losses that pool over the batch, not over items, are NOT the single-process
loss: a Dice over the whole batch (the supervised UNet; UniSegDiff's encoder loss in pretraining, and
in fine-tuning while ``prior_loss_weight`` > 0) is computed over each rank's rows, as BatchNorm
statistics would be. Per-item losses (the MSE of MedSegDiff, the vanilla DPM and DiffSeg,
UniSegDiff's staged MSE) match.

Rank 0 alone keeps the EMA, validates, writes checkpoints, the log and the final model, and shows
the progress bar; the other ranks wait at a barrier meanwhile (``TIMEOUT`` is long for that
reason). A checkpoint resumes on every rank (each loads the same files), whether one process or
several wrote it: its contents do not depend on the number of ranks.
Every rank loads the whole dataset; several machines need the model folder on a shared file system.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from DiffusionSegLib.core.errors import DiffusionSegError

__all__ = ["TIMEOUT", "world_size", "rank", "local_rank", "is_main", "is_distributed", "local_batch",
           "device_for", "process_group", "barrier", "mean", "LossModule", "wrap", "RowsOfGlobalDraws"]

# Rank 0 validates and writes checkpoints while the others wait at a barrier: allow for a long validation.
TIMEOUT = datetime.timedelta(hours=2)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise DiffusionSegError(f"environment variable {name}={value!r} is not an integer") from None


def _group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes of this run: the process group's size once started, else torchrun's ``WORLD_SIZE``, else 1."""
    return torch.distributed.get_world_size() if _group_ready() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank (0 .. world_size - 1): the group's, else torchrun's ``RANK``, else 0."""
    return torch.distributed.get_rank() if _group_ready() else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True in the process that logs and writes files (rank 0; always in a single-process run)."""
    return rank() == 0


def is_distributed() -> bool:
    """True when more than one process trains (after ``process_group`` started the group)."""
    return _group_ready() and torch.distributed.get_world_size() > 1


def local_batch(batch_size: int, world: int) -> int:
    """Items per rank of a global batch; DiffusionSegError when the batch does not split evenly."""
    if world < 1 or batch_size % world:
        raise DiffusionSegError(f"batch_size {batch_size} cannot be split evenly over {world} processes: "
                                f"use a multiple of {world} (batch_size is the global batch)")
    return batch_size // world


def device_for(device: torch.device) -> torch.device:
    """The device of this process: under torchrun with several processes a CUDA device becomes
    ``cuda:LOCAL_RANK`` (one GPU per process); CPU stays CPU; other devices are refused."""
    if world_size() <= 1:
        return device
    if device.type == "cuda":
        return torch.device("cuda", local_rank())
    if device.type == "cpu":
        return device
    raise DiffusionSegError(f"distributed training runs on CPU (gloo) or CUDA (NCCL), not on {device.type}")


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Start the process group for a torchrun launch of several processes (gloo for CPU, NCCL for
    CUDA) and end it on the way out. A no-op in a single process, and when the caller already
    started a group (that group is used and left running)."""
    if world_size() <= 1 or _group_ready():
        yield
        return
    if not torch.distributed.is_available():
        raise DiffusionSegError("this PyTorch build has no torch.distributed: run a single process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if not is_distributed():
        return
    if torch.distributed.get_backend() == "nccl":
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks (for the log); ``value`` itself in a single process."""
    if not is_distributed():
        return value
    nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    tensor = torch.tensor([value], dtype=torch.float64,
                          device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / torch.distributed.get_world_size()


class LossModule(torch.nn.Module):
    """The method's training loss as a module whose forward is the whole loss computation.

    DDP synchronises gradients only for computations that went through ITS forward (the forward
    arms the reducer for the next backward); a method may call other network functions than
    ``forward`` (UniSegDiff calls ``net.encode`` and ``net.denoise``). Wrapping the loss, not the
    network, makes every such call part of DDP's forward. ``net`` is a submodule, so the
    parameters are the network's own.
    """

    def __init__(self, method: Any, net: torch.nn.Module, objective: Any, generator: torch.Generator):
        super().__init__()
        self.net = net
        self.method, self.objective, self.generator = method, objective, generator

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.method.training_loss(self.net, self.objective, image, target, self.generator)


def wrap(module: torch.nn.Module, device: torch.device, parts_may_rest: bool) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when several processes train; ``module`` itself otherwise.

    ``parts_may_rest``: a step may leave parameters out of the loss (a method with several parameter
    groups: UniSegDiff trains its encoder alone first, then may freeze it); DDP must then look for
    them after each forward (``find_unused_parameters``), or it waits for their gradients. Other
    methods skip that search (DDP fails loudly at the second step if one ever leaves a parameter out).
    """
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=parts_may_rest)


class RowsOfGlobalDraws(TorchFunctionMode):
    """Inside: a draw from ``generator`` of ``rows`` items is made for all ``rows * world`` items of the
    global batch and this rank's rows ``[rank * rows, (rank + 1) * rows)`` are returned.

    So the generator advances exactly as in a single process drawing for the whole batch, and the
    rank's timesteps and noise are the single process's for its rows. ``torch.randn``, ``torch.rand``
    and ``torch.randint`` are handled (what the methods call); any other use of the generator, or a draw
    whose first dimension is not the batch, is a DiffusionSegError (it would silently train on other
    numbers than a single process). Everything else passes through untouched (each torch call inside
    the loss pays one Python check, microseconds against a network's convolutions).
    """

    def __init__(self, generator: torch.Generator, rows: int, rank_index: int, world: int):
        super().__init__()
        self.generator, self.rows, self.start, self.world = generator, rows, rank_index * rows, world

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("generator") is not self.generator:
            return func(*args, **kwargs)
        if func not in (torch.randn, torch.rand, torch.randint):
            raise DiffusionSegError(f"the training loss draws random numbers with {getattr(func, '__name__', func)}: "
                                    "distributed training can split only randn, rand and randint draws over ranks")
        args, kwargs = list(args), dict(kwargs)
        if "size" in kwargs:
            kwargs["size"] = self._global(kwargs["size"])
        elif func is torch.randint:  # randint(high, size) or randint(low, high, size)
            args[-1] = self._global(args[-1])
        elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):  # randn((B, ...))
            args = [self._global(args[0])]
        else:  # randn(B, ...)
            args = [self._global(tuple(args))]
        return func(*args, **kwargs)[self.start:self.start + self.rows]

    def _global(self, size: Any) -> tuple[int, ...]:
        size = tuple(int(n) for n in size)
        if not size or size[0] != self.rows:
            raise DiffusionSegError(f"the training loss draws random numbers of shape {list(size)}, not one row per "
                                    f"item of the batch ({self.rows} on this rank): they cannot be split over ranks")
        return (self.rows * self.world,) + size[1:]
