"""Model format: a folder with safetensors weights and a JSON model card.

Layout of a model folder::

    my_model/
      model.json          the card (this module's ModelCard), includes sha256 of the weights
      model.safetensors   the weights (no pickle anywhere)

Loading (``models.load_model``, which also builds the network) checks the sha256 of the weights
against the card and the tensor names/shapes against the architecture the card describes, so a
corrupt (truncated, partly copied) or mismatched model fails with a clear error. The sha256 sits in
the same folder as the weights: it detects corruption, not deliberate tampering (whoever can change
the weights can change the card); trust comes from where the model was installed from
(``models download --sha256`` checks the archive against a hash you supply).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from DiffusionSegLib.core.enums import CrfMode, Region
from DiffusionSegLib.core.errors import ModelLoadError, SettingsError
from DiffusionSegLib.core.files import atomic_write_bytes

CARD_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"
_MEMBER_FILE = re.compile(r"member_[1-9][0-9]*\.safetensors")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")  # a sha256 in hex, as cards and catalogues write it
FORMAT_VERSION = 1
# What a task of a multi-task card (``ModelCard.tasks``) may set for itself, over the card's value.
TASK_FIELDS = ("modality", "normalization", "region_components", "consistent_components", "largest_component",
               "member_flips", "crop_to_region", "crop_min_removed", "slice_windows", "description")


@dataclass
class LabelInfo:
    """One output channel of the model (binary/multi-label: one channel per label)."""

    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)  # RGB in [0, 1]
    # Terminology as "category;type" codes (SNOMED CT), used by the Slicer bridge when known.
    terminology: str = ""


def array_patch_size(patch_size: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """A ``patch_size`` as cards and training configs write it ((H, W) or (H, W, D)) in array order:
    (H, W) or (D, H, W)."""
    if spatial_dims == 3:
        height, width, depth = patch_size
        return int(depth), int(height), int(width)
    return tuple(int(p) for p in patch_size)


def slice_context(spatial_dims: int, context_slices: Any, context_spacing: Any,
                  spacing: Sequence[float] | None) -> tuple[int, float]:
    """Checked 2.5D context of a card or training config: (slices on each side, mm between them),
    (0, 0.0) without context; ValueError naming the key otherwise. ``context_spacing`` None = spacing[0]."""
    if not isinstance(context_slices, int) or isinstance(context_slices, bool) or context_slices < 0:
        raise ValueError(f"context_slices must be an integer >= 0, got {context_slices!r}")
    if context_slices == 0:
        return 0, 0.0
    if spatial_dims != 2:
        raise ValueError("context_slices is for 2D models (a 3D model sees its neighbours)")
    step = context_spacing if context_spacing is not None else (spacing or [None])[0]
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not step > 0:
        raise ValueError(f"context_slices needs context_spacing in mm > 0 (or a card spacing), got {step!r}")
    return context_slices, float(step)


def check_tasks(tasks: Any, default_task: Any = None, task: Any = None) -> None:
    """Checked ``tasks`` of a card or training config: lower-case names, each setting only TASK_FIELDS,
    and ``default_task`` / ``task`` among them; ValueError naming the key otherwise."""
    if not isinstance(tasks, dict):
        raise ValueError("tasks must map task names to settings")
    for name, settings in tasks.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"task name {name!r} must be lower-case letters, digits and _")
        if not isinstance(settings, dict) or set(settings) - set(TASK_FIELDS):
            raise ValueError(f"task {name!r} may set only {', '.join(TASK_FIELDS)}; got {settings!r}")
    for key, value in (("task", task), ("default_task", default_task)):
        if value is not None and value not in tasks:
            raise ValueError(f"{key} {value!r} is not one of its tasks")


@dataclass
class ModelCard:
    """Everything needed to rebuild, run and judge a model. Serialized as JSON.

    Attributes name the science: ``method`` is the network family (``medsegdiff`` or
    ``vanilla_dpm``), ``prediction_type`` the diffusion target (``epsilon``, ``sample`` = x0,
    ``v_prediction``), ``spacing`` the in-plane (2D models) or full (3D models) voxel spacing in
    mm, in SimpleITK (x, y[, z]) order, that the model was trained at (None = use the image grid).
    """

    name: str
    method: str = "medsegdiff"
    spatial_dims: int = 2
    in_channels: int = 1
    labels: list[LabelInfo] = field(default_factory=lambda: [LabelInfo("lesion")])
    network: dict[str, Any] = field(default_factory=dict)  # kwargs of networks.build_network
    modality: str = "CT"  # CT | MR | RGB | other
    spacing: list[float] | None = None
    # Normalization: {"kind": "ct_window", "center": 40, "width": 400} | {"kind": "zscore"}
    #                | {"kind": "rgb"} (8-bit channels to [-1, 1]) | {"kind": "minmax"}
    #                | {"kind": "by_modality", "CT": {"kind": "ct_window", "center": -300, "width": 1800},
    #                   "MR": {"kind": "zscore"}, "default": "MR"}: one model of several modalities
    #                   (modality "CT+MR"); each image gets the entry of its modality (DICOM Modality tag,
    #                   else CT or not from its HU statistics) or the default one; entries are plain
    #                   kinds, default is required with more than one (pipeline.preprocess.normalize).
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "zscore"})
    # DICOM orientation code 3D inputs are brought to (axes permuted/flipped, no interpolation)
    # before anything else, so a model always sees anatomy the same way up whatever the file's
    # direction matrix ("LPS": numpy axis 0 runs inferior->superior, i.e. axial slices). None = keep.
    orientation: str | None = "LPS"
    # numpy axis of a (z, y, x) volume along which a 2D model is applied (0 = axial slices).
    slice_axis: int = 0
    # 2.5D: a 2D model also sees ``context_slices`` neighbouring slices on each side as extra input
    # channels, taken every ``context_spacing`` mm along the slice axis by linear interpolation, so
    # scans of any slice thickness show the network the same physical offsets (None = spacing[0]).
    context_slices: int = 0
    context_spacing: float | None = None
    patch_size: list[int] | None = None  # training crop (H, W[, D]); inference is fully convolutional
    # 3D models: how far neighbouring inference windows (crop-sized) overlap, as a fraction of the crop.
    # 0.5 (half-crop steps, as nnU-Net) evaluates 8x the volume in windows, 0.25 (MONAI's default) 2.4x.
    window_overlap: float = 0.5
    # 2D models: the network sees each slice in overlapping ``patch_size`` windows (``window_overlap``),
    # Gaussian-blended, as it saw its training crops, instead of the whole slice at once. Its group
    # normalisation then takes statistics over a crop-sized window, so air, table or arms far from the
    # anatomy cannot change them. Costs up to (1 / (1 - overlap))^2 x the network compute. 3D models
    # always use windows. A task may set its own.
    slice_windows: bool = False
    prediction_type: str = "sample"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear_beta"
    default_sampler: str = "ddim"
    default_steps: int = 10
    default_samples: int = 5
    # Labels whose fused / final mask keeps only its largest connected component (solid organs;
    # see postprocess.py). Empty: no post-processing.
    largest_component: list[str] = field(default_factory=list)
    # Labels whose fused / final mask keeps only the connected pieces that hold a voxel every sample
    # marks (lesions; see postprocess.py). Applied before ``largest_component``. Empty: none.
    consistent_components: list[str] = field(default_factory=list)
    # Label -> anatomical region (pipeline/regions.REGIONS, e.g. "lungs"): the label's fused / final
    # mask keeps only the pieces that touch that region of the input (a lung lesion lies in the chest
    # cavity). Applied first. Empty: none.
    region_components: dict[str, str] = field(default_factory=dict)
    # An anatomical region (as in ``region_components``) whose in-plane bounding box is all a run samples:
    # a model trained on crops (the lungs plus 10 mm) then sees a whole scan as it saw its training
    # crops, every slice kept; the outputs are written back on the whole input grid (pipeline/crop.py).
    # Not found in an input: the whole image is sampled, and the report says so. None: no crop.
    crop_to_region: str | None = None
    # With ``crop_to_region``: the crop applies only when its box leaves out at least this fraction of
    # the slice area. An input already cut to the region (less left out) is sampled as it is: a 2D
    # model's Dice on a tumour moved by 0.1 when its sampling grid moved by a few pixels
    # (docs/BENCHMARKS.md, "Whole chest scans cropped"). 0: every box found crops.
    crop_min_removed: float = 0.0
    # How a run refines with DenseCRF unless told otherwise (decided on validation data: the CRF's
    # long-range appearance kernel can erase thin structures): a core.enums.CrfMode spelling
    # ("off", "mean", "published"), or true (= "mean") / false (= "off") as older cards say.
    default_crf: bool | str = True
    # Labels a run outputs; empty = all. The others are context classes: trained so the model tells
    # neighbouring structures apart (a kidney is not liver), sampled, and then dropped.
    shown_labels: list[str] = field(default_factory=list)
    # A multi-task model (one network for several lesion sites, e.g. "lung", "liver", "brain"): task
    # name -> what that task sets over the card's fields (TASK_FIELDS: its modality, normalization and
    # post-processing). The network sees the run's task as one-hot input planes after the image
    # channels (the task token, ``network_in_channels``), so every run has one: named, or decided by
    # the input's modality or ``default_task`` (``resolve_task``). Empty: a single-task model.
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The task a run takes when it names none and no single task fits the input's modality (``resolve_task``);
    # None: such a run must name one.
    default_task: str | None = None
    # The task of this run: set by ``for_task`` on the card a run uses, None on a stored card.
    task: str | None = None
    # Settings only one method reads (e.g. DiffSeg's noise levels and calibrated thresholds); the
    # method documents and checks its own keys.
    method_settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # data, steps, hardware, duration
    metrics: dict[str, Any] = field(default_factory=dict)  # measured validation/held-out figures
    limits: str = ""
    weights_sha256: str = ""
    # A deep ensemble: more networks of the same architecture (e.g. other training seeds), each
    # {"file": "member_K.safetensors", "sha256": ...}; model.safetensors is member 0. A run splits
    # its N samples over the members, so the masks, their agreement and the uncertainty describe the
    # ensemble (docs/BENCHMARKS.md: seed spread was larger than any other lever). Empty: one network.
    members: list[dict[str, str]] = field(default_factory=list)
    # Test-time flips of a run's networks: entry k lists the spatial axes of the model item (2D: 0 rows,
    # 1 columns = left-right of an LPS axial slice) along which network k (0 = model.safetensors) sees
    # its input mirrored; its masks are mirrored back. The ensemble then averages over the image and its
    # mirror at no extra network evaluation. Networks beyond the list, or [], see the image as it is.
    member_flips: list[list[int]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def out_channels(self) -> int:
        return len(self.labels)

    @property
    def network_in_channels(self) -> int:
        """Channels the network takes: the image's ``in_channels`` once per slice of the 2.5D context,
        then one task plane per task of a multi-task card."""
        return self.in_channels * (2 * self.slice_context()[0] + 1) + len(self.tasks)

    def check_tasks(self) -> None:
        """``tasks``, ``default_task`` and ``task`` checked (``check_tasks``); ModelLoadError naming the card."""
        try:
            check_tasks(self.tasks, self.default_task, self.task)
        except ValueError as err:
            raise ModelLoadError(f"model card '{self.name}': {err}") from None

    def resolve_task(self, task: str | None, input_modality: str | None = None) -> tuple[str | None, str]:
        """(the task a run uses, why): ``task`` when the run names one; for a multi-task card without one,
        the only task whose modality is the input's (``pipeline.modality.input_modality``: a DICOM code,
        or "not CT" from the statistics, which fits every non-CT task), else ``default_task``. None
        when nothing decides (``for_task`` then asks for a task)."""
        if task is not None or not self.tasks:
            return task, "named by the run" if task is not None else ""

        def fits(settings: dict[str, Any]) -> bool:
            modality = settings.get("modality", self.modality)
            return modality == input_modality or (input_modality == "not CT" and modality not in ("CT", "RGB"))

        matching = [name for name, settings in self.tasks.items() if fits(settings)]
        if len(matching) == 1:
            return matching[0], f"the model's only task for {input_modality} input"
        if self.default_task is not None and (not matching or self.default_task in matching):
            return self.default_task, "the model card's default_task"
        return None, ""

    def for_task(self, task: str | None) -> "ModelCard":
        """The card a run on ``task`` uses: the task's settings over the card's, ``task`` set.

        A single-task card is returned as it is for task None; SettingsError when a multi-task card
        gets no task or an unknown one, or a single-task card gets one, naming the choices.
        """
        if not self.tasks:
            if task is not None:
                raise SettingsError(f"model '{self.name}' has no tasks; run it without a task (got {task!r})")
            return self
        if task is None or task not in self.tasks:
            raise self._task_error(task)
        return dataclasses.replace(self, task=task, **{k: v for k, v in self.tasks[task].items()})

    def task_plane_values(self) -> list[float]:
        """The task token: one value per task (1.0 for this card's task, 0.0 for the others); [] single-task."""
        if not self.tasks:
            return []
        if self.task is None:
            raise self._task_error(None)
        return [1.0 if name == self.task else 0.0 for name in self.tasks]

    def _task_error(self, task: str | None) -> SettingsError:
        what = "needs a task" if task is None else f"has no task {task!r}"
        return SettingsError(f"model '{self.name}' {what}: choose one of {', '.join(self.tasks)} (--task)")

    def slice_context(self) -> tuple[int, float]:
        """(neighbouring slices on each side, mm between them), checked; (0, 0.0) without 2.5D context."""
        try:
            return slice_context(self.spatial_dims, self.context_slices, self.context_spacing, self.spacing)
        except ValueError as err:
            raise ModelLoadError(f"model card '{self.name}': {err}") from None

    def output_label_indices(self) -> list[int]:
        """Indices into ``labels`` of the labels a run outputs (``shown_labels``, all when empty)."""
        if not self.shown_labels:
            return list(range(len(self.labels)))
        names = [lab.name for lab in self.labels]
        unknown = [n for n in self.shown_labels if n not in names]
        if unknown:
            raise ModelLoadError(f"model card '{self.name}': shown_labels {unknown} are not labels of the model")
        return [i for i, n in enumerate(names) if n in self.shown_labels]

    def has_postprocessing(self) -> bool:
        """True when the card asks for any post-processing of the fused mask (postprocess.apply_card_filters)."""
        return bool(self.region_components or self.consistent_components or self.largest_component)

    def labels_by_region(self) -> dict[Region, list[str]]:
        """``region_components`` checked and grouped: region -> the labels confined to it."""
        names = [lab.name for lab in self.labels]
        out: dict[Region, list[str]] = {}
        for label, region in self.region_components.items():
            if label not in names:
                raise ModelLoadError(f"model card '{self.name}': region_components names {label!r}, not a label of the model")
            try:
                out.setdefault(Region.parse(region, "region"), []).append(label)
            except ValueError as err:
                raise ModelLoadError(f"model card '{self.name}': {err}") from None
        return out

    def crop_region(self) -> Region | None:
        """``crop_to_region`` checked: the Region a run samples in, or None; ModelLoadError for an unknown one
        or a ``crop_min_removed`` outside [0, 1)."""
        share = self.crop_min_removed
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
            raise ModelLoadError(f"model card '{self.name}': crop_min_removed {share!r} must be a fraction of the "
                                 "slice area in [0, 1)")
        if self.crop_to_region is None:
            return None
        try:
            return Region.parse(self.crop_to_region, "crop_to_region")
        except ValueError as err:
            raise ModelLoadError(f"model card '{self.name}': {err}") from None

    def patch_shape(self) -> tuple[int, ...] | None:
        """The training crop in the network's axis order, (H, W) or (D, H, W); None when unknown.

        ``patch_size`` is written (H, W[, D]); batches are (N, C, H, W) or (N, C, D, H, W).
        """
        if self.patch_size is None:
            return None
        if len(self.patch_size) != self.spatial_dims:
            raise ModelLoadError(f"model card '{self.name}': patch_size {self.patch_size} must have "
                                 f"{self.spatial_dims} entries")
        return array_patch_size(self.patch_size, self.spatial_dims)

    def inference_window(self) -> tuple[int, ...] | None:
        """The window (network axis order) a run's network calls are split into: the training crop for a 3D
        model, or a 2D one with ``slice_windows``; None (whole items) otherwise or without ``patch_size``."""
        if not isinstance(self.slice_windows, bool):
            raise ModelLoadError(f"model card '{self.name}': slice_windows {self.slice_windows!r} must be true or "
                                 "false")
        return self.patch_shape() if self.spatial_dims == 3 or self.slice_windows else None

    def windows_overlap(self) -> float:
        """``window_overlap`` checked: a fraction in [0, 1)."""
        value = self.window_overlap
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ModelLoadError(f"model card '{self.name}': window_overlap {value!r} must be a fraction in [0, 1)")
        return float(value)

    def member_files(self) -> list[tuple[str, str]]:
        """The extra ensemble members as (file name, sha256), checked: ``member_K.safetensors`` names
        (K >= 1, no folders), 64-hex sha256, no repeats. ModelLoadError otherwise."""
        out: list[tuple[str, str]] = []
        for entry in self.members:
            if not isinstance(entry, dict) or set(entry) != {"file", "sha256"}:
                raise ModelLoadError(f"model card '{self.name}': a member must be {{\"file\", \"sha256\"}}, got {entry!r}")
            name, digest = entry["file"], entry["sha256"]
            if not isinstance(name, str) or not _MEMBER_FILE.fullmatch(name):
                raise ModelLoadError(f"model card '{self.name}': member file {name!r} must be named member_K.safetensors")
            if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
                raise ModelLoadError(f"model card '{self.name}': member {name} has no valid sha256")
            out.append((name, digest))
        if len({n for n, _ in out}) != len(out):
            raise ModelLoadError(f"model card '{self.name}': a member file is listed twice")
        return out

    def member_flip_axes(self) -> list[tuple[int, ...]]:
        """``member_flips`` checked, one tuple of spatial axes per network (0 = model.safetensors), at
        most one entry per network, each axis in [0, spatial_dims) and listed once; ModelLoadError otherwise."""
        flips = self.member_flips
        if not isinstance(flips, list) or len(flips) > 1 + len(self.members):
            raise ModelLoadError(f"model card '{self.name}': member_flips must be a list of at most one entry per "
                                 f"network ({1 + len(self.members)}), got {flips!r}")
        out: list[tuple[int, ...]] = []
        for axes in flips:
            if (not isinstance(axes, list) or len(set(axes)) != len(axes)
                    or any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < self.spatial_dims for a in axes)):
                raise ModelLoadError(f"model card '{self.name}': member_flips entry {axes!r} must list distinct "
                                     f"spatial axes in [0, {self.spatial_dims})")
            out.append(tuple(axes))
        return out

    def crf_mode(self) -> CrfMode:
        """The card's DenseCRF default as a CrfMode (ModelLoadError for an unknown spelling)."""
        if isinstance(self.default_crf, bool):
            return CrfMode.MEAN if self.default_crf else CrfMode.OFF
        try:
            return CrfMode.parse(self.default_crf, "default_crf")
        except ValueError as err:
            raise ModelLoadError(f"model card '{self.name}': {err}") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ModelLoadError(f"model card has unknown fields: {sorted(unknown)}")
        data = dict(data)
        data["labels"] = [LabelInfo(**{**lab, "color": tuple(lab.get("color", (1, 0, 0)))}) for lab in data.get("labels", [])]
        if not data["labels"]:
            raise ModelLoadError("model card lists no labels")
        card = cls(**data)
        card.windows_overlap()  # refused when read, not after a long preprocessing
        card.check_tasks()
        for task in [None, *card.tasks]:  # a task may set its own slice_windows (tasks checked first)
            (card.for_task(task) if task else card).inference_window()
        card.member_files()
        return card


def save_model(model_dir: str | os.PathLike, state_dict: dict[str, Any], card: ModelCard) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (with the weights' sha256) into ``model_dir``."""
    from safetensors.torch import save

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"format": "diffusionseg", "name": card.name})
    card.weights_sha256 = hashlib.sha256(blob).hexdigest()
    atomic_write_bytes(model_dir / WEIGHTS_NAME, blob)
    atomic_write_bytes(model_dir / CARD_NAME, card.to_json().encode())
    return model_dir


def read_card(model_dir: str | os.PathLike) -> ModelCard:
    """Read and validate the JSON card of a model folder (weights are not touched)."""
    card_path = Path(model_dir) / CARD_NAME
    if not card_path.is_file():
        raise ModelLoadError(f"not a DiffusionSeg model folder (no {CARD_NAME}): {model_dir}")
    try:
        data = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"unreadable model card {card_path}: {err}") from err
    try:
        return ModelCard.from_dict(data)
    except TypeError as err:
        raise ModelLoadError(f"invalid model card {card_path}: {err}") from err
