"""Training/evaluation datasets: discovery of image/label pairs and sampling of training items.

Two dataset layouts are read:

- MSD style: ``dataset.json`` with ``"training": [{"image": "./imagesTr/a.nii.gz", "label":
  "./labelsTr/a.nii.gz"}, ...]`` (optional ``"validation"`` and ``"test"`` lists; test entries may be
  plain image paths) and ``"labels": {"0": "background", "1": "liver"}`` (the nnU-Net v2 form
  ``{"background": 0, "liver": 1}`` is read too);
- folders ``imagesTr/`` + ``labelsTr/`` (``imagesVal``/``labelsVal``, ``imagesTs``/``labelsTs`` for
  the other splits) matched by case name; an nnU-Net ``_0000`` channel suffix on images is ignored.

Cases are preprocessed exactly like inference input (``io.read_image`` -> ``preprocess.
resample_to_model_grid`` -> ``preprocess.normalize``), labels are resampled with nearest neighbour
onto the resampled image grid, and both are kept in memory as arrays on the model grid.
``PatchSampler`` then draws augmented training items from them with its own seeded generators,
so the same seed gives the same item sequence (and its state can be saved for resuming).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from DiffusionSegLib.core.errors import DatasetError, DiffusionSegError
from DiffusionSegLib.pipeline.io import read_label
from DiffusionSegLib.models.card import ModelCard

SPLITS = ("training", "validation", "test")
_SPLIT_FOLDERS = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVal", "labelsVal"),
                  "test": ("imagesTs", "labelsTs")}
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
CHANNEL_SUFFIX = "_0000"  # nnU-Net names the first (only supported) channel <case>_0000.<ext>

LabelValues = dict[str, tuple[int, ...]]  # label name -> values in the label files that form it


@dataclass(frozen=True)
class CaseFiles:
    """One case on disk; ``label`` is None only for unlabelled test images."""

    name: str
    image: Path
    label: Path | None
    task: str | None = None  # the case's task for a multi-task model (dataset.json entry "task"), None: none given


@dataclass
class Case:
    """One preprocessed case on the model grid.

    image: (C, S, H, W) float32 for 2D models (S slices along the card's slice_axis, S = 1 for a
    2D input; C counts the 2.5D context blocks, ``card.network_in_channels``) or (C, D, H, W) for
    3D models, normalized per the card.
    mask:  (L, S, H, W) or (L, D, H, W) uint8, one binary channel per selected label.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    task: str | None = None  # a multi-task model's task for this case (CaseFiles.task)


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def case_name(path: Path) -> str:
    """File name without its image extension (and without an nnU-Net ``_0000`` channel suffix)."""
    name = _strip_extension(path.name)
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


def _strip_extension(name: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_EXTENSIONS)


def read_dataset_json(dataset_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``dataset.json`` of a dataset folder, or None when there is none."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"unreadable {path}: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return data


def _entry_files(dataset_dir: Path, entry: Any, split: str) -> CaseFiles:
    """A ``dataset.json`` list entry ({"image": ..., "label": ...} or an image path) -> CaseFiles."""
    if isinstance(entry, str):
        image, label, task = entry, None, None
    elif isinstance(entry, dict) and isinstance(entry.get("image"), str):
        image, label, task = entry["image"], entry.get("label"), entry.get("task")
    else:
        raise DatasetError(f"dataset.json: {split} entry {entry!r} has no image path")
    if task is not None and not isinstance(task, str):
        raise DatasetError(f"dataset.json: {split} entry {image}: task must be a name, got {task!r}")
    image_path = (dataset_dir / image).resolve()
    if not image_path.is_file():
        raise DatasetError(f"dataset.json: image {image} of the {split} list does not exist")
    label_path = None
    if label is not None:
        label_path = (dataset_dir / label).resolve()
        if not label_path.is_file():
            raise DatasetError(f"dataset.json: label {label} (for image {image_path.name}) does not exist")
    return CaseFiles(case_name(image_path), image_path, label_path, task)


def _folder_files(dataset_dir: Path, split: str) -> list[CaseFiles]:
    """Cases of ``imagesXx/`` matched by name with ``labelsXx/`` (labels optional for test)."""
    images_dir, labels_dir = (dataset_dir / f for f in _SPLIT_FOLDERS[split])
    if not images_dir.is_dir():
        return []
    images: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if not _is_image_file(path):
            continue
        if _strip_extension(path.name).endswith("_0001"):
            raise DatasetError(f"{path}: multi-channel nnU-Net cases (_0001 files) are not supported")
        name = case_name(path)
        if name in images:
            raise DatasetError(f"{images_dir}: two images for case '{name}' ({images[name].name}, {path.name})")
        images[name] = path
    labels = {case_name(p): p for p in sorted(labels_dir.iterdir()) if _is_image_file(p)} if labels_dir.is_dir() else {}
    if split != "test" or labels:
        missing = sorted(set(images) - set(labels))
        if missing:
            raise DatasetError(f"{labels_dir}: no label file for case(s) {', '.join(missing[:5])}")
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise DatasetError(f"{images_dir}: no image for label file(s) of case(s) {', '.join(orphans[:5])}")
    return [CaseFiles(name, path, labels.get(name)) for name, path in images.items()]


def discover_cases(dataset_dir: str | Path, split: str = "training") -> list[CaseFiles]:
    """Image/label pairs of one split of a dataset folder, in listing (or name) order.

    ``dataset.json`` lists win when the file has one for the split; otherwise the split's folders
    are matched by case name. Raises DatasetError for a missing folder, an empty training split,
    missing image or label files, or duplicate case names. An absent validation/test split gives [].
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset folder does not exist: {root}")
    meta = read_dataset_json(root)
    if meta is not None and isinstance(meta.get(split), list):
        cases = [_entry_files(root, entry, split) for entry in meta[split]]
    else:
        cases = _folder_files(root, split)
    if split == "training" and not cases:
        raise DatasetError(f"{root}: no training cases (expected dataset.json with a 'training' list, "
                           "or imagesTr/ + labelsTr/ folders with images)")
    if split != "test" and any(c.label is None for c in cases):
        raise DatasetError(f"{root}: every {split} case needs a label file")
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{root}: duplicate case name(s) in the {split} split: {', '.join(duplicates)}")
    return cases


# ---------------------------------------------------------------------------------------------
# Label selection
# ---------------------------------------------------------------------------------------------


def _as_values(name: str, values: Any) -> tuple[int, ...]:
    items = values if isinstance(values, (list, tuple)) else [values]
    try:
        out = tuple(int(v) for v in items)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"label '{name}': values must be integers, got {values!r}") from err
    if not out or 0 in out:
        raise DatasetError(f"label '{name}': values must be non-empty and non-zero (0 is background), got {values!r}")
    return out


def check_label_selection(selection: Mapping[str, Any]) -> LabelValues:
    """Validate a user mapping label name -> value or list of values (e.g. {"liver": 5, "kidney": [2, 3]})."""
    if not selection:
        raise DatasetError("the label selection is empty")
    return {str(name): _as_values(str(name), values) for name, values in selection.items()}


def labels_from_dataset_json(meta: Mapping[str, Any]) -> LabelValues:
    """Every non-background label of a dataset.json ``labels`` table, in value order."""
    table = meta.get("labels")
    if not isinstance(table, dict) or not table:
        return {}
    if all(str(k).lstrip("-").isdigit() for k in table):  # MSD: {"0": "background", "1": "liver"}
        pairs = sorted((int(k), str(v)) for k, v in table.items())
        return {name: (value,) for value, name in pairs if value != 0}
    # nnU-Net v2: {"background": 0, "liver": 1, "tumour": [2, 3]}; region lists keep their order
    return {str(name): _as_values(str(name), v) for name, v in table.items()
            if not (isinstance(v, int) and v == 0)}


def default_labels(dataset_dir: str | Path, cases: Sequence[CaseFiles]) -> LabelValues:
    """Default selection: every label of dataset.json, else every non-zero value in the label files."""
    meta = read_dataset_json(dataset_dir)
    found = labels_from_dataset_json(meta) if meta else {}
    if found:
        return found
    import SimpleITK as sitk

    values: set[int] = set()
    for case in cases:
        if case.label is not None:
            values |= {int(v) for v in np.unique(sitk.GetArrayFromImage(read_label(case.label)))}
    values.discard(0)
    if not values:
        raise DatasetError(f"{dataset_dir}: the label files contain no foreground (all zero)")
    return {f"label_{v}": (v,) for v in sorted(values)}


# ---------------------------------------------------------------------------------------------
# Loading on the model grid
# ---------------------------------------------------------------------------------------------


def check_geometry(image, label, case: CaseFiles) -> None:
    """Raise DatasetError unless the label map lies on the image's voxel grid."""
    if image.GetDimension() != label.GetDimension() or image.GetSize() != label.GetSize():
        raise DatasetError(f"case {case.name}: label {case.label.name} has size {label.GetSize()}, "
                           f"image {case.image.name} has size {image.GetSize()}")
    spacing = np.asarray(image.GetSpacing())
    tolerance = 1e-3 * float(spacing.min())  # a thousandth of a voxel: rounding in headers only
    if (not np.allclose(spacing, label.GetSpacing(), rtol=1e-4, atol=0)
            or not np.allclose(image.GetOrigin(), label.GetOrigin(), rtol=0, atol=tolerance)
            or not np.allclose(image.GetDirection(), label.GetDirection(), rtol=0, atol=1e-4)):
        raise DatasetError(f"case {case.name}: label {case.label.name} has a different spacing, origin or "
                           f"direction than image {case.image.name}")


def to_model_layout(array: np.ndarray, card: ModelCard) -> np.ndarray:
    """(C, *spatial) in SimpleITK array order -> the layout of ``Case`` arrays.

    2D models: the slice axis moves to position 1 ((C, S, H, W)); a 2D input gets S = 1.
    3D models: unchanged (C, D, H, W).
    """
    if card.spatial_dims == 3:
        if array.ndim != 4:
            raise DatasetError("a 3D model needs 3D training images")
        return array
    if array.ndim == 3:
        return array[:, None]
    return np.moveaxis(array, 1 + card.slice_axis, 1)


def load_case(files: CaseFiles, card: ModelCard, labels: LabelValues) -> Case:
    """Read, resample and normalize one case exactly as inference prepares its input (a multi-task
    card: with the case's task, its settings and its task planes)."""
    import SimpleITK as sitk

    from DiffusionSegLib.pipeline.io import array_with_channels, read_image
    from DiffusionSegLib.pipeline.preprocess import (add_slice_context, add_task_planes, normalize,
                                                     resample_labels_to_model_grid, resample_to_model_grid,
                                                     slice_spacing_of)

    if card.tasks:
        if files.task not in card.tasks:
            raise DatasetError(f"case {files.name}: the model's tasks are {', '.join(card.tasks)}; the case's "
                               f"dataset.json entry names {'no task' if files.task is None else repr(files.task)}")
        card = card.for_task(files.task)
    label = read_label(files.label)
    try:
        image = read_image(files.image)
        check_geometry(image, label, files)
        image_grid = resample_to_model_grid(image, card)
        label_grid = sitk.GetArrayFromImage(resample_labels_to_model_grid(label, card, image_grid))
        array = normalize(array_with_channels(image_grid), card, image)  # image as read: a by_modality choice
        # 2.5D neighbours exactly as prepare() stacks them at inference (2D models only)
        slice_axis = card.slice_axis if card.spatial_dims == 2 and image_grid.GetDimension() == 3 else None
        array = add_slice_context(array, card, slice_axis, slice_spacing_of(image_grid, slice_axis))
        array = add_task_planes(array, card)
    except DatasetError:
        raise
    except DiffusionSegError as err:  # InputImageError, ModelLoadError: name the case in the message
        raise DatasetError(f"case {files.name}: {err}") from err
    mask = np.stack([np.isin(label_grid, values) for values in labels.values()]).astype(np.uint8)
    return Case(files.name, to_model_layout(array.astype(np.float32, copy=False), card), to_model_layout(mask, card),
                files.task)


def load_cases(cases: Sequence[CaseFiles], card: ModelCard, labels: LabelValues) -> list[Case]:
    """``load_case`` for each case; raises DatasetError when a selected label occurs in no case."""
    loaded = [load_case(c, card, labels) for c in cases]
    for index, name in enumerate(labels):
        if not any(case.mask[index].any() for case in loaded):
            raise DatasetError(f"label '{name}' (values {list(labels[name])}) occurs in none of the "
                               f"{len(loaded)} cases on the model grid; check the label selection")
    return loaded


def image_channels(files: CaseFiles) -> int:
    """Channels of a case's image (1 for scalar, 3 for RGB), read without preprocessing."""
    from DiffusionSegLib.pipeline.io import read_image

    return int(read_image(files.image).GetNumberOfComponentsPerPixel())


# ---------------------------------------------------------------------------------------------
# Sampling training items
# ---------------------------------------------------------------------------------------------


@dataclass
class Augmentation:
    """Random augmentation of training items (MONAI array transforms).

    The affine (rotation up to ``rotate_deg`` in each plane, isotropic-per-axis scale in
    1 +- ``scale``) moves image (bilinear) and mask (nearest) together. Intensity scale/shift and
    gaussian noise act on the normalized image only. Left-right flips are off by default because
    organs are lateralized (a flipped liver is a wrong liver).
    """

    enabled: bool = True
    prob: float = 0.5  # probability of each transform
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_std: float = 0.05
    flips: bool = False
    # Contrast-phase augmentation: per label index, a (low, high) range of intensity offsets in
    # normalized units added to that organ's voxels (one uniform draw per organ and item), so a
    # model trained on one phase (e.g. non-contrast CT) also sees the enhanced organs of another.
    label_offsets: tuple[tuple[float, float] | None, ...] = ()
    label_offset_prob: float = 0.7
    # Boundary jitter (label noise): each label's boundary moves in or out by a smooth random field
    # with this standard deviation in mm (correlated over ``boundary_jitter_scale_mm``), so the
    # training labels carry the spread of a contour drawn by hand and a diffusion model learns to
    # sample it: its samples then differ along uncertain boundaries instead of all being the same
    # mask. ``voxel_mm``: the model grid's spacing in array order (mm per voxel of the patch).
    boundary_jitter_mm: float = 0.0
    boundary_jitter_scale_mm: float = 12.0
    voxel_mm: tuple[float, ...] = ()
    # MR intensity augmentation (vary_intensity), each with probability ``prob``: a gamma drawn
    # log-uniform in ``gamma`` (low, high) and a smooth multiplicative bias field of log-amplitude
    # ``bias_field`` (standard deviation), on the items of the tasks in ``intensity_tasks`` (empty:
    # every item). MR intensities are not calibrated: another scanner or sequence changes the contrast
    # between tissues and shades the image, which a model trained on one patient's scans never saw.
    gamma: tuple[float, float] | None = None
    bias_field: float = 0.0
    intensity_tasks: tuple[str, ...] = ()
    # A narrow field of view (narrow_view), with probability ``view_prob``: the item keeps a window of
    # ``view_min``..1 of the patch per axis around its centre, and the rest becomes the case's darkest
    # value (CT air) and background, as an input smaller than the patch is padded at inference. A model
    # trained so sees tight crops of a tumour as it sees them in use; measured, it also raised false
    # positives on a real lung tumour, so no shipped model uses it (docs/BENCHMARKS.md, "A small field
    # of view"). 0: off.
    view_prob: float = 0.0
    view_min: float = 0.4


def pad_to(array: np.ndarray, size: Sequence[int], value: np.ndarray | float) -> np.ndarray:
    """Pad the trailing len(size) axes of (K, *spatial) symmetrically up to at least ``size``.

    ``value``: a scalar, or one value per leading channel (image minimum per channel, matching
    the constant padding of inference).
    """
    spatial = array.shape[-len(size):]
    widths = [(0, 0)] * (array.ndim - len(size))
    widths += [((max(0, p - n)) // 2, max(0, p - n) - max(0, p - n) // 2) for n, p in zip(spatial, size)]
    if all(w == (0, 0) for w in widths):
        return array
    values = np.broadcast_to(np.asarray(value, dtype=array.dtype), (array.shape[0],))
    return np.stack([np.pad(a, widths[1:], constant_values=v) for a, v in zip(array, values)])


def augmentation_transform(aug: Augmentation, spatial_dims: int, keys: Sequence[str],
                           random_state: np.random.RandomState) -> Any:
    """The MONAI transforms of ``aug`` on dict items with ``keys`` ("image" first, then an optional
    "mask"), all drawing from ``random_state`` (one state to save for resuming); None when disabled.

    The affine moves every key together (bilinear for the image, nearest for a mask); intensity
    scale/shift and noise act on the image only.
    """
    if not aug.enabled:
        return None
    from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandScaleIntensityd, RandShiftIntensityd)

    keys = tuple(keys)
    angle = math.radians(aug.rotate_deg)
    rotate = (angle,) if spatial_dims == 2 else (angle, angle, angle)
    modes = ("bilinear", "nearest", "nearest")[: len(keys)]
    transforms = [
        RandAffined(keys=keys, prob=aug.prob, rotate_range=rotate, scale_range=(aug.scale,) * spatial_dims,
                    mode=modes, padding_mode="border"),  # border on both keeps image and mask consistent at edges
        RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=aug.prob),
        RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.prob),
        RandGaussianNoised(keys="image", std=aug.noise_std, prob=aug.prob),
    ]
    if aug.flips:
        transforms.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=spatial_dims - 1))
    compose = Compose(transforms)  # Compose re-seeds its members: share the state after it
    for t in transforms:
        t.set_random_state(state=random_state)
    return compose


BIAS_FIELD_GRID = 4  # control points per axis of the bias field: a few smooth bumps across a patch


def vary_intensity(image: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """MR intensity augmentation of one item: image (C, *patch) float32 -> same shape.

    Gamma (with probability ``aug.prob``): each channel is rescaled to [0, 1] over its own range,
    raised to a power drawn log-uniform in ``aug.gamma`` and scaled back, so its range is kept and
    only the contrast between tissues changes. Bias field (with probability ``aug.prob``): above each
    channel's minimum the image is multiplied by exp(f), f a smooth field (a grid of
    ``BIAS_FIELD_GRID`` values per axis, N(0, ``aug.bias_field``), cubic-interpolated to the patch),
    the slow shading of a receive coil. Random numbers come from ``rng``; nothing is drawn for a
    transform that is off.
    """
    from scipy import ndimage

    axes = tuple(range(1, image.ndim))
    out = image.astype(np.float32, copy=True)
    if aug.gamma is not None and rng.random() < aug.prob:
        gamma = math.exp(rng.uniform(math.log(aug.gamma[0]), math.log(aug.gamma[1])))
        low, high = out.min(axis=axes, keepdims=True), out.max(axis=axes, keepdims=True)
        span = np.maximum(high - low, 1e-6)
        out = ((out - low) / span) ** gamma * span + low
    if aug.bias_field > 0 and rng.random() < aug.prob:
        spatial = out.shape[1:]
        grid = rng.normal(0.0, aug.bias_field, (BIAS_FIELD_GRID,) * len(spatial))
        field = ndimage.zoom(grid, [n / BIAS_FIELD_GRID for n in spatial], order=3, mode="nearest",
                             grid_mode=True)[tuple(slice(0, n) for n in spatial)]
        low = out.min(axis=axes, keepdims=True)
        out = (out - low) * np.exp(field)[None] + low
    return out.astype(np.float32, copy=False)


def narrow_view(image: np.ndarray, mask: np.ndarray, fill: np.ndarray, view_min: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """image (C, *patch) and mask (L, *patch) seen through a window holding the patch centre: per axis
    a side drawn in [ceil(view_min * p), p]; outside it the image is ``fill`` (C,) and the mask 0."""
    window = []
    for p in image.shape[1:]:
        side = int(rng.integers(min(p, max(1, math.ceil(view_min * p))), p + 1))
        centre = p // 2  # the window always holds the centre voxel (a foreground item's lesion)
        start = int(rng.integers(max(0, centre - side + 1), min(centre, p - side) + 1))
        window.append(slice(start, start + side))
    inside = (slice(None), *window)
    image_out = np.empty_like(image)
    image_out[:] = np.asarray(fill, dtype=image.dtype).reshape(-1, *([1] * (image.ndim - 1)))
    image_out[inside] = image[inside]
    mask_out = np.zeros_like(mask)
    mask_out[inside] = mask[inside]
    return image_out, mask_out


def jitter_boundaries(mask: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Move each label's boundary by a smooth random distance: mask (L, *patch) uint8 -> same shape.

    Per label, the signed distance to the boundary d (mm, negative inside) is compared with a
    Gaussian random field f (standard deviation ``aug.boundary_jitter_mm``, smoothed with a Gaussian
    of ``aug.boundary_jitter_scale_mm``): the new mask is d < f, so where f > 0 the label grows by
    about f mm and where f < 0 it shrinks. Empty and full labels stay as they are. The random
    numbers come from ``rng`` (whose state the training checkpoint keeps).
    """
    from scipy import ndimage

    spatial = mask.shape[1:]
    voxel = np.asarray(aug.voxel_mm if aug.voxel_mm else (1.0,) * len(spatial), dtype=np.float64)
    out = mask.copy()
    for label in range(mask.shape[0]):
        inside = mask[label].astype(bool)
        if not inside.any() or inside.all():
            continue
        distance = ndimage.distance_transform_edt(~inside, sampling=voxel) - ndimage.distance_transform_edt(
            inside, sampling=voxel)  # > 0 outside, < 0 inside, in mm
        field = ndimage.gaussian_filter(rng.standard_normal(spatial), sigma=aug.boundary_jitter_scale_mm / voxel)
        field *= aug.boundary_jitter_mm / max(float(field.std()), 1e-12)
        out[label] = distance < field
    return out


class SeededSampler:
    """Endless seeded training batches whose state can be saved with a checkpoint and restored.

    Two generators drive a subclass: ``rng`` (numpy Generator) for locations and classes, and
    ``random_state`` (a RandomState shared by the MONAI transforms) for augmentation.
    """

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.random_state = np.random.RandomState(seed)

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless batches, drawn in the calling process (no DataLoader workers)."""
        while True:
            yield self.batch(batch_size)

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable state of both random generators."""
        kind, key, pos, has_gauss, cached = self.random_state.get_state()
        return {"locations": self.rng.bit_generator.state,
                "augmentation": [kind, key.tolist(), int(pos), int(has_gauss), float(cached)]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore ``get_state`` output (the transforms share ``random_state``, so they follow)."""
        self.rng.bit_generator.state = state["locations"]
        kind, key, pos, has_gauss, cached = state["augmentation"]
        self.random_state.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))


def hard_negatives(image: np.ndarray, foreground: np.ndarray, limit: int = 65536) -> np.ndarray:
    """(K, 3) int32 positions of background voxels whose intensity lies in the foreground's 10th-90th
    percentile band. image, foreground: (S, H, W) or (D, H, W). Empty when there is no foreground.

    At most ``limit`` positions, taken at an even stride (no random draw: the sampler's stream is untouched)."""
    if not foreground.any():
        return np.zeros((0, 3), np.int32)
    low, high = np.percentile(image[foreground], [10, 90])
    coords = np.argwhere(~foreground & (image >= low) & (image <= high)).astype(np.int32)
    if len(coords) > limit:
        coords = coords[:: -(-len(coords) // limit)]
    return coords


@dataclass(frozen=True)
class _Pool:
    """Case indices a training item is drawn from: all, foreground, hard-negative; 2D slice weights."""

    cases: list[int]
    fg: list[int]
    hard: list[int]
    slice_weights: np.ndarray


class PatchSampler(SeededSampler):
    """Draws (image, mask) training items from in-memory cases.

    2D models (``spatial_dims=2``): an item is a slice along the card's slice axis cropped to
    ``patch_size`` (H, W); 3D models: a (D, H, W) patch (array order: see ``models.card.array_patch_size``). With probability
    ``foreground_fraction`` the item is centred on a foreground voxel: a label present in a
    random foreground case, then (2D) a slice containing that label and a pixel of it, or (3D) a
    voxel of it. With probability ``hard_negative_fraction`` it is centred on a hard negative: a
    background voxel whose intensity (channel 0) lies inside its case's foreground intensity band
    (10th-90th percentile), the look-alikes (vessels, bowel, pleura) a model must learn to reject.
    Otherwise the location is uniform (2D: uniform over all slices of all cases).
    ``task_weights`` (task name -> weight, every case's ``task`` named): each item first draws a task by
    weight, then all of the above happens among that task's cases, so each task's share of the items
    is its weight whatever its number of cases or slices. None: one pool of all cases.
    Images smaller than the patch are padded (image: its per-channel minimum, mask: 0). The last
    ``task_channels`` image channels are a multi-task model's task planes: no augmentation touches them.
    All randomness comes from ``seed``: a numpy Generator for locations and a RandomState shared
    by the MONAI transforms, both saved/restored by ``get_state``/``set_state``.
    """

    def __init__(self, cases: Sequence[Case], spatial_dims: int, patch_size: Sequence[int],
                 foreground_fraction: float = 0.67, augmentation: Augmentation | None = None, seed: int = 0,
                 hard_negative_fraction: float = 0.0, task_channels: int = 0,
                 task_weights: Mapping[str, float] | None = None):
        if not cases:
            raise DatasetError("no training cases to sample from")
        if len(patch_size) != spatial_dims:
            raise ValueError(f"patch_size {list(patch_size)} does not have {spatial_dims} dimensions")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError("foreground_fraction must be in [0, 1]")
        if hard_negative_fraction < 0.0 or foreground_fraction + hard_negative_fraction > 1.0:
            raise ValueError("hard_negative_fraction must be >= 0 and foreground_fraction + hard_negative_fraction <= 1")
        self.spatial_dims = spatial_dims
        self.hard_negative_fraction = hard_negative_fraction
        self.task_channels = int(task_channels)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_fraction = foreground_fraction
        self.augmentation = augmentation or Augmentation(enabled=False)
        # patch_size pads the trailing axes: (H, W) of (C, S, H, W), or (D, H, W) of (C, D, H, W).
        self.fills = [c.image.reshape(c.image.shape[0], -1).min(axis=1) for c in cases]  # (C,) per case
        self.images = [pad_to(c.image, self.patch_size, fill) for c, fill in zip(cases, self.fills)]
        self.masks = [pad_to(c.mask, self.patch_size, 0) for c in cases]
        self.case_tasks = [c.task for c in cases]
        self.n_labels = self.masks[0].shape[0]
        # Foreground coordinates per case and label, sorted by first (slice) axis by np.argwhere.
        self.fg = [[np.argwhere(m[l]).astype(np.int32) for l in range(self.n_labels)] for m in self.masks]
        self.hard = [hard_negatives(img[0], m.any(axis=0)) for img, m in zip(self.images, self.masks)] \
            if hard_negative_fraction > 0 else []
        self.pools, self.task_p = self._task_pools(cases, task_weights) if task_weights \
            else ([self._pool(range(len(cases)))], None)
        super().__init__(seed)
        self.transform = self._build_transform()

    def _pool(self, indices: Sequence[int]) -> "_Pool":
        fg = [i for i in indices if any(len(c) for c in self.fg[i])]
        hard = [i for i in indices if self.hard and len(self.hard[i])]
        slices = np.array([self.images[i].shape[1] for i in indices], dtype=np.float64)
        return _Pool(list(indices), fg, hard, slices / slices.sum())

    def _task_pools(self, cases: Sequence[Case], weights: Mapping[str, float]) -> tuple[list["_Pool"], np.ndarray]:
        """One pool of case indices per task with weight > 0, and the tasks' draw probabilities."""
        unnamed = sorted({str(c.task) for c in cases if c.task not in weights})
        if unnamed:
            raise DatasetError(f"task_weights names no weight for the task(s) {', '.join(unnamed)} of the training cases")
        names = [t for t in weights if weights[t] > 0]
        pools = [self._pool([i for i, c in enumerate(cases) if c.task == t]) if any(c.task == t for c in cases)
                 else None for t in names]
        empty = [t for t, pool in zip(names, pools) if pool is None or (self.foreground_fraction > 0 and not pool.fg)]
        if empty:
            raise DatasetError(f"task_weights gives items to {', '.join(empty)}, but no training case of that task "
                               "has foreground")
        p = np.array([float(weights[t]) for t in names])
        return pools, p / p.sum()

    def _build_transform(self):
        return augmentation_transform(self.augmentation, self.spatial_dims, ("image", "mask"), self.random_state)

    def _location(self) -> tuple[int, np.ndarray | None]:
        """(case index, centre voxel or None for a uniform location); 2D centre is (slice, y, x)."""
        # Without task weights no task is drawn, so the random stream is the one of a single pool.
        pool = self.pools[0] if self.task_p is None else self.pools[int(self.rng.choice(len(self.pools), p=self.task_p))]
        # One uniform draw decides the kind, so hard_negative_fraction 0 keeps the earlier random stream.
        u = self.rng.random() if pool.fg else 1.0
        if pool.hard and self.foreground_fraction <= u < self.foreground_fraction + self.hard_negative_fraction:
            case = pool.hard[int(self.rng.integers(len(pool.hard)))]
            return case, self.hard[case][int(self.rng.integers(len(self.hard[case])))]
        if u < self.foreground_fraction:
            case = pool.fg[int(self.rng.integers(len(pool.fg)))]
            present = [l for l, coords in enumerate(self.fg[case]) if len(coords)]
            coords = self.fg[case][present[int(self.rng.integers(len(present)))]]
            if self.spatial_dims == 2:  # uniform over slices with the label, then over its pixels there
                slices, first, counts = np.unique(coords[:, 0], return_index=True, return_counts=True)
                k = int(self.rng.integers(len(slices)))
                return case, coords[first[k] + int(self.rng.integers(counts[k]))]
            return case, coords[int(self.rng.integers(len(coords)))]
        if self.spatial_dims == 2:
            return pool.cases[int(self.rng.choice(len(pool.cases), p=pool.slice_weights))], None
        return pool.cases[int(self.rng.integers(len(pool.cases)))], None

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One item: image (C, *patch) float32 and mask (L, *patch) uint8."""
        case, centre = self._location()
        image, mask = self.images[case], self.masks[case]
        if self.spatial_dims == 2:
            s = int(centre[0]) if centre is not None else int(self.rng.integers(image.shape[1]))
            image, mask = image[:, s], mask[:, s]
            centre = centre[1:] if centre is not None else None
        starts = []
        for axis, p in enumerate(self.patch_size):
            n = image.shape[1 + axis]
            if centre is None:
                starts.append(int(self.rng.integers(n - p + 1)))
            else:
                starts.append(int(np.clip(int(centre[axis]) - p // 2, 0, n - p)))
        window = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        image, mask = np.ascontiguousarray(image[window]), np.ascontiguousarray(mask[window])
        planes = None
        if self.task_channels:  # the task token stays as it is: set aside, put back after augmentation
            image, planes = image[:-self.task_channels], image[-self.task_channels:]
        if self.augmentation.enabled and self.augmentation.label_offsets:
            image = self._enhance_organs(image, mask)
        if self._varies_intensity(case):
            image = vary_intensity(image, self.augmentation, self.rng)
        if self.augmentation.enabled and self.augmentation.boundary_jitter_mm > 0:
            mask = jitter_boundaries(mask, self.augmentation, self.rng)
        if self.transform is not None:
            import torch

            out = self.transform({"image": torch.from_numpy(image), "mask": torch.from_numpy(mask.astype(np.float32))})
            image = out["image"].as_tensor().numpy().astype(np.float32, copy=False)
            mask = (out["mask"].as_tensor().numpy() > 0.5).astype(np.uint8)
        aug = self.augmentation
        # After the affine, so the border stays axis-aligned like the padding at inference; drawn only
        # when on, so runs without it keep their random stream.
        if aug.enabled and aug.view_prob > 0 and self.rng.random() < aug.view_prob:
            image, mask = narrow_view(image, mask, self.fills[case][:image.shape[0]], aug.view_min, self.rng)
        if planes is not None:
            image = np.concatenate([image, planes], axis=0)
        return image, mask

    def _varies_intensity(self, case: int) -> bool:
        """Whether the items of ``case`` get the MR intensity augmentation (its task is listed, or none is)."""
        aug = self.augmentation
        if not aug.enabled or (aug.gamma is None and aug.bias_field <= 0):
            return False
        return not aug.intensity_tasks or self.case_tasks[case] in aug.intensity_tasks

    def _enhance_organs(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Contrast-phase augmentation: image (C, *patch) + a random offset inside each organ's mask (L, *patch).

        Offsets are drawn from ``self.rng`` (its state is saved with the checkpoint) and the result is
        kept inside the normalized range the image already spans, as the CT window clip would.
        """
        aug = self.augmentation
        if self.rng.random() >= aug.label_offset_prob:
            return image
        low, high = float(image.min()), float(image.max())
        out = image.copy()
        for label, bounds in enumerate(aug.label_offsets[: mask.shape[0]]):
            if bounds is None:
                continue
            offset = float(self.rng.uniform(bounds[0], bounds[1]))
            out[:, mask[label].astype(bool)] += offset
        return np.clip(out, min(low, -1.0), max(high, 1.0), out=out)

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, *patch) float32 images and (B, L, *patch) uint8 masks."""
        items = [self.sample() for _ in range(batch_size)]
        return np.stack([i for i, _ in items]), np.stack([m for _, m in items])

