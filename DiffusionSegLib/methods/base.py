"""The method interface: what every segmentation method provides to training and inference.

A method is one folder under ``methods/`` whose ``__init__`` exposes ``METHOD``, an instance of a
``SegmentationMethod`` subclass, listed once in ``methods.registry``. Training, inference,
evaluation, the CLI, the benchmark and the Slicer module ask the registry for the card's method
and call these operations; none of them branches on a method's name.

Shapes: ``spatial`` is (H, W) for 2D models (slices are the batch) and (D, H, W) for 3D models.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from DiffusionSegLib.core.enums import CrfMode, Sampler, Supervision

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from DiffusionSegLib.models.card import ModelCard

# progress(done, total): network calls of the current attempt (restarts after an out-of-memory halving).
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingPlan:
    """How many masks a run draws and how: ``samples`` x ``steps`` network evaluations per item."""

    samples: int
    steps: int
    sampler: Sampler
    note: str = ""  # why the plan differs from what was asked (e.g. a deterministic method), "" when it does not
    # network evaluations per sample when they are not ``steps`` (e.g. a coarse jump shared by the samples)
    evaluations_per_sample: float | None = None

    @property
    def nfe_per_sample(self) -> float:
        """Network evaluations per sample and item (the cost figure of reports and benchmarks)."""
        return float(self.steps) if self.evaluations_per_sample is None else self.evaluations_per_sample


class SegmentationMethod(ABC):
    """One segmentation method: its network, its training objective and how it draws N masks."""

    #: the card's ``method`` value (the registry key)
    name: str = ""
    #: how the method is called in papers and in the UI
    title: str = ""
    #: True when masks are drawn from noise (several differ); False: one deterministic pass
    draws_samples: bool = True
    #: what training reads: image + mask pairs, or image-level labels only (``training.weak_labels``)
    supervision: Supervision = Supervision.MASKS

    # -- the network ----------------------------------------------------------------------------

    @abstractmethod
    def network_class(self) -> type:
        """The network's class (imported here, so the registry stays free of torch)."""

    def build_network(self, card: "ModelCard") -> "torch.nn.Module":
        """The network the card describes: ``network_class()(spatial_dims, in_channels, out_channels, **card.network)``
        (in_channels counts the 2.5D context slices: ``card.network_in_channels``)."""
        return self.network_class()(spatial_dims=card.spatial_dims, in_channels=card.network_in_channels,
                                    out_channels=card.out_channels, **card.network)

    # -- training -------------------------------------------------------------------------------

    def load_pretrained_encoder(self, net: "torch.nn.Module", backbone: "torch.nn.Module") -> list[str]:
        """Initialise the network's image encoder from a pretrained 3D backbone (``diffusionseg pretrain``);
        returns the names of the parameters set. Methods without such an encoder refuse."""
        from DiffusionSegLib.core.errors import DiffusionSegError

        raise DiffusionSegError(f"{self.title} has no image encoder that a pretrained backbone can initialise")

    def prepare_training(self, card: "ModelCard") -> Any:
        """State the objective needs across steps (e.g. the noise schedule); None when it needs none."""
        return None

    @abstractmethod
    def training_loss(self, net: "torch.nn.Module", state: Any, image: "torch.Tensor", target: "torch.Tensor",
                      generator: "torch.Generator") -> "torch.Tensor":
        """Scalar loss of one batch: image (B, C, *spatial) normalized; target: the masks (B, L, *spatial)
        in {0, 1}, or for an image-label method the class labels (B,) (1 lesion, 0 healthy).

        ``state`` is what ``prepare_training`` returned; ``generator`` (CPU) draws every random number,
        so a resumed run continues bit-identically.
        """

    def target_description(self, card: "ModelCard") -> str:
        """What the network predicts, in words (report.json)."""
        from DiffusionSegLib.core.enums import PREDICTION_TARGETS

        return PREDICTION_TARGETS.get(card.prediction_type, card.prediction_type)

    def parameter_groups(self, net: "torch.nn.Module") -> list[list["torch.nn.Parameter"]]:
        """The optimizer's parameter groups (one learning rate each, see ``start_step``); one group by default."""
        return [list(net.parameters())]

    def start_step(self, state: Any, step: int) -> Sequence[float] | None:
        """Called before optimizer step ``step`` (0-based): a method whose objective changes over a run
        (e.g. an encoder pretrained first) records the step in ``state`` and returns one learning-rate
        factor per parameter group (0 = the group rests). None: every group at the configured rate."""
        return None

    def timestep_loss(self, net: "torch.nn.Module", state: Any, image: "torch.Tensor", mask: "torch.Tensor",
                      timesteps: "torch.Tensor", noise: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Diffusion methods: (the training loss at the given timesteps (B,) and noise (B, L, *S), the one-step
        x0 estimate (B, L, *S) in [-1, 1]), for the timestep profile (``training.timestep_profile``)."""
        from DiffusionSegLib.core.errors import DiffusionSegError

        raise DiffusionSegError(f"{self.title} is not a diffusion model: it has no timesteps")

    def card_defaults(self, default_samples: int, default_steps: int) -> dict[str, Any]:
        """Inference defaults written to a new model card (samples, steps, sampler, DenseCRF mode)."""
        return {"default_samples": default_samples, "default_steps": default_steps,
                "default_sampler": Sampler.DDIM.value, "default_crf": CrfMode.MEAN.value}

    def calibrate(self, net: "torch.nn.Module", card: "ModelCard", healthy_images: "torch.Tensor") -> None:
        """After training an image-label method: measure on held-out healthy slices (B, C, *spatial)
        what inference needs (written into ``card.method_settings``). Mask-supervised methods need nothing."""

    # -- inference ------------------------------------------------------------------------------

    @abstractmethod
    def plan(self, card: "ModelCard", samples: int | None, steps: int | None,
             sampler: Sampler | None) -> SamplingPlan:
        """The run's samples, steps and sampler from the settings (None: the card's default)."""

    @abstractmethod
    def sample(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor", plan: SamplingPlan,
               seed: int = 0, batch_size: int | None = None, amp: bool = False,
               progress: ProgressFn | None = None) -> "torch.Tensor":
        """Draw ``plan.samples`` masks per image, batched, under ``torch.inference_mode``.

        images: (B, C, *spatial) normalized, on the network's device. The same seed gives the same
        masks whatever the batch size. Returns (N, B, L, *spatial) uint8 masks in {0, 1} on the CPU,
        thresholded by the method's own rule as each chunk finishes (a soft map of a whole volume
        would take four times the memory).
        """

    def item_bytes(self, card: "ModelCard", spatial: tuple[int, ...]) -> int:
        """Rough activation memory of one item through the network (sizes batches to free memory)."""
        from DiffusionSegLib.core.device import activation_bytes

        return activation_bytes(spatial, card.network.get("channels"))

    @abstractmethod
    def example_call(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor") -> "torch.Tensor":
        """One network evaluation on ``images`` (k, C, *spatial), as ``sample`` makes them (for timing)."""

    def seconds_per_evaluation(self, net: "torch.nn.Module", card: "ModelCard", images: "torch.Tensor",
                               plan: SamplingPlan, batch_size: int | None, amp: bool) -> float:
        """Seconds per network evaluation on this device and input size, from one timed call.

        The timed call has the size of the sampler's chunks (``batch_size``, or what the sampler picks
        from free memory): a CPU call has a cost that does not shrink with the batch, so a smaller
        probe would overstate the time several times. One item goes first, untimed, to pay the
        one-time start-up (thread pool, allocator, kernel selection).
        """
        import torch

        from DiffusionSegLib.core.device import auto_batch_size, autocast, keep_freed_memory_for_reuse

        device = images.device
        if device.type == "cpu":
            keep_freed_memory_for_reuse()  # as the sampler does, so the probe runs under the same allocator
        chunk = batch_size or auto_batch_size(device, self.item_bytes(card, tuple(images.shape[2:])),
                                              cap=64 if device.type != "cpu" else 32)
        k = max(1, min(plan.samples * images.shape[0], chunk))
        items = images[torch.arange(k, device=device) % images.shape[0]]

        def timed(call: Callable[[], Any]) -> tuple[Any, float]:
            """(call's result, its seconds), waiting for the device to finish."""
            start = time.perf_counter()
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out, time.perf_counter() - start

        with torch.inference_mode(), autocast(device, amp):
            timed(lambda: self.example_call(net, card, items[:1]))
            return self.item_seconds(net, card, items, plan, timed)

    def item_seconds(self, net: "torch.nn.Module", card: "ModelCard", items: "torch.Tensor", plan: SamplingPlan,
                     timed: Callable[[Callable[[], Any]], tuple[Any, float]]) -> float:
        """Seconds per counted evaluation (one of samples x steps per image) from timed calls on
        ``items`` (k, C, *spatial); ``timed(call)`` runs a call and returns (result, seconds).
        Default: one ``example_call`` on all k items."""
        return timed(lambda: self.example_call(net, card, items))[1] / items.shape[0]
