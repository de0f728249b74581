"""Image-level ("lesion" / "healthy") training data for weakly supervised methods (DiffSeg).

A weakly supervised model learns from whole-image class labels only; no pixel mask is ever read.
Dataset layout::

    DATASET/
      image_labels.csv      columns: image,label[,slices][,split]
      ...                   image files anywhere below DATASET

- ``image``: path of an image file relative to DATASET (any of ``data.IMAGE_EXTENSIONS``: NIfTI,
  NRRD, MHA, PNG/JPEG/TIFF including RGB).
- ``label``: ``lesion`` or ``healthy`` (case-insensitive; ``1`` / ``0`` are accepted too).
- ``slices`` (optional, volumes only): on a ``lesion`` row, the 0-based indices of the slices that
  show the lesion along the FILE's slice axis (the first axis of the SimpleITK array, i.e. image
  index k as stored on disk), written ``12-18`` or ``3;5;7-9`` (ranges inclusive; ``,`` separates
  too when the cell is quoted). The listed slices are lesion, every other slice of that volume is
  healthy. Empty: every slice takes the row's label.
- ``split`` (optional): ``training`` (when empty or absent), ``validation`` or ``test``.

Without a CSV, sub-folders ``lesion/`` and ``healthy/`` holding image files (directly inside them)
give each whole image its folder's label, all in the training split. When both layouts exist the
CSV wins. Case names are ``data.case_name`` of the file; files sharing a name get their folder path
prepended (``lesion_a`` / ``healthy_a``) so names stay unique.

Images are loaded exactly as inference prepares them (``io.read_image`` -> ``preprocess.
resample_to_model_grid`` -> ``preprocess.normalize``). Per-slice labels are built as a label map
on the file's grid and resampled like a mask, so they stay on their slices when the card
reorients or resamples the volume. Only 2D models are trained this way: an item is one model
slice with its class. ``ImageLabelSampler`` draws (crop, class) items with seeded generators whose
state can be saved for resuming.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from DiffusionSegLib.core.errors import DatasetError, DiffusionSegError, SettingsError
from DiffusionSegLib.models.card import ModelCard
from DiffusionSegLib.training.data import (IMAGE_EXTENSIONS, SPLITS, Augmentation, SeededSampler,
                                           augmentation_transform, case_name, pad_to, to_model_layout)

CSV_NAME = "image_labels.csv"
LESION, HEALTHY = 1, 0
CLASS_FOLDERS = {"lesion": LESION, "healthy": HEALTHY}
CSV_COLUMNS = ("image", "label", "slices", "split")
MASK_FOLDERS = ("labelsTr", "labelsVal", "labelsTs")  # mask folders of the mask-based layout: never read here
_LABEL_WORDS = {"lesion": LESION, "1": LESION, "healthy": HEALTHY, "0": HEALTHY}
_INDEX, _RANGE = re.compile(r"^[0-9]+$"), re.compile(r"^([0-9]+)\s*-\s*([0-9]+)$")


@dataclass(frozen=True)
class WeakCaseFiles:
    """One image on disk with its image-level label.

    ``lesion_slices``: sorted file-slice indices that are lesion (the rest of the volume is
    healthy); None when every slice takes ``label``. ``source`` says where the entry came from
    (``image_labels.csv line 4``) for error messages; it takes no part in comparisons.
    """

    name: str
    image: Path
    label: int
    lesion_slices: tuple[int, ...] | None
    split: str
    source: str = field(default="", compare=False)


@dataclass
class WeakCase:
    """One image on the model grid.

    image: (C, S, H, W) float32 normalized per the card (S slices along the card's slice_axis,
    S = 1 for a 2D input); slice_labels: (S,) uint8, 1 = lesion, 0 = healthy, per model slice.
    """

    name: str
    image: np.ndarray
    slice_labels: np.ndarray


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def is_weak_dataset(dataset_dir: str | Path) -> bool:
    """True when ``dataset_dir`` has an ``image_labels.csv`` or both ``lesion/`` and ``healthy/`` folders."""
    root = Path(dataset_dir)
    return (root / CSV_NAME).is_file() or all((root / folder).is_dir() for folder in CLASS_FOLDERS)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def parse_label(text: str) -> int:
    """``lesion``/``1`` -> LESION, ``healthy``/``0`` -> HEALTHY (case-insensitive); ValueError otherwise."""
    value = _LABEL_WORDS.get(text.strip().lower())
    if value is None:
        raise ValueError(f"unknown label {text!r} (use lesion or healthy, or 1 / 0)")
    return value


def parse_slices(text: str) -> tuple[int, ...] | None:
    """``"3;5;7-9"`` -> (3, 5, 7, 8, 9) (sorted, unique, ranges inclusive); empty -> None; ValueError if unparsable."""
    text = text.strip()
    if not text:
        return None
    found: set[int] = set()
    for part in re.split(r"[;,]", text):
        part = part.strip()
        match = _RANGE.match(part)
        if _INDEX.match(part):
            found.add(int(part))
        elif match:
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise ValueError(f"slice range {part!r} runs backwards")
            found.update(range(first, last + 1))
        else:
            raise ValueError(f"cannot read slices {text!r} (write e.g. 12-18 or 3;5;7-9, 0-based)")
    return tuple(sorted(found))


def _csv_entries(root: Path) -> list[WeakCaseFiles]:
    """Every row of ``image_labels.csv`` (all splits), checked; names not yet made unique."""
    path = root / CSV_NAME
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"unreadable {path}: {err}") from err
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "image" not in columns or "label" not in columns:
        raise DatasetError(f"{path}: the first line must name the columns image,label[,slices][,split]; "
                           f"found {','.join(reader.fieldnames or [])!r}")
    unknown = [c for c in columns if c and c not in CSV_COLUMNS]  # "": a spreadsheet's trailing comma
    if unknown:  # a misspelt "slices" would silently make whole volumes lesion: refuse
        raise DatasetError(f"{path}: unknown column(s) {', '.join(unknown)} (expected {', '.join(CSV_COLUMNS)})")
    reader.fieldnames = columns
    entries: list[WeakCaseFiles] = []
    seen: dict[Path, int] = {}
    for row in reader:
        line = reader.line_num
        where = f"{CSV_NAME} line {line}"
        cells = {k: (v or "").strip() for k, v in row.items() if k}
        if not any(cells.values()):
            continue
        entry = _csv_entry(root, cells, where)
        if entry.image in seen:
            raise DatasetError(f"{where}: image {cells['image']} is already listed on line {seen[entry.image]}")
        seen[entry.image] = line
        entries.append(entry)
    if not entries:
        raise DatasetError(f"{path}: no image rows")
    return entries


def _csv_entry(root: Path, cells: Mapping[str, str], where: str) -> WeakCaseFiles:
    """One checked CSV row (``where`` names the line in every error)."""
    relative = cells.get("image", "")
    if not relative:
        raise DatasetError(f"{where}: the image column is empty")
    try:
        label = parse_label(cells.get("label", ""))
        slices = parse_slices(cells.get("slices", ""))
    except ValueError as err:
        raise DatasetError(f"{where}: {err}") from None
    if label == HEALTHY and slices is not None:
        raise DatasetError(f"{where}: a healthy image has no lesion slices; leave slices empty "
                           "(or label the row lesion)")
    split = cells.get("split", "").lower() or "training"
    if split not in SPLITS:
        raise DatasetError(f"{where}: unknown split {cells['split']!r} (use {', '.join(SPLITS)})")
    image = (root / relative).resolve()
    if not image.is_file():
        raise DatasetError(f"{where}: image {relative} does not exist")
    if not _is_image_name(image.name):
        raise DatasetError(f"{where}: {relative} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    if any(part in MASK_FOLDERS for part in Path(relative).parts):
        # Weak supervision must never see a mask; a path into labelsTr/ is almost surely a slip.
        raise DatasetError(f"{where}: {relative} lies in a mask folder; image-level training reads images only")
    return WeakCaseFiles(case_name(image), image, label, slices, split, where)


def _folder_entries(root: Path) -> list[WeakCaseFiles]:
    """Images directly inside ``lesion/`` and ``healthy/`` (training split, whole-image labels)."""
    entries = []
    for folder, label in CLASS_FOLDERS.items():
        for path in sorted((root / folder).iterdir()):
            if path.is_file() and _is_image_name(path.name):
                entries.append(WeakCaseFiles(case_name(path), path.resolve(), label, None, "training", f"{folder}/"))
    return entries


def _unique_names(entries: list[WeakCaseFiles], root: Path) -> list[WeakCaseFiles]:
    """Entries whose names are unique: a shared file name gets its folder path prepended, then a number."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.name] = counts.get(entry.name, 0) + 1
    named = []
    for entry in entries:
        name = entry.name
        if counts[name] > 1:
            try:
                parents = entry.image.relative_to(root.resolve()).parent.parts
            except ValueError:  # a CSV path outside the dataset folder
                parents = entry.image.parent.parts[-1:]
            name = "_".join([*parents, name])
        named.append(name)
    used: set[str] = set()
    out = []
    for entry, name in zip(entries, named):
        unique, k = name, 2
        while unique in used:  # still shared (e.g. "a_b/c" vs "a/b_c"): number it, in listing order
            unique, k = f"{name}_{k}", k + 1
        used.add(unique)
        out.append(WeakCaseFiles(unique, entry.image, entry.label, entry.lesion_slices, entry.split, entry.source))
    return out


def discover_weak_cases(dataset_dir: str | Path, split: str = "training") -> list[WeakCaseFiles]:
    """The images of one split with their image-level labels, in CSV (or sorted folder) order.

    Reads ``image_labels.csv`` when present, else the ``lesion/`` + ``healthy/`` folders (training
    split only). Raises DatasetError naming the CSV line for a bad row, and when the training split
    is empty or neither layout exists. An absent validation/test split gives [].
    Slice indices are checked against the volumes when they are loaded (``load_weak_case``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (use {', '.join(SPLITS)})")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset folder does not exist: {root}")
    if (root / CSV_NAME).is_file():
        entries = _csv_entries(root)
    elif is_weak_dataset(root):
        entries = _folder_entries(root)
    else:
        present = [f"{f}/" for f in CLASS_FOLDERS if (root / f).is_dir()]
        found = f" (found only {present[0]})" if present else ""
        raise DatasetError(f"{root}: not an image-level dataset: expected {CSV_NAME} (columns image,label"
                           f"[,slices][,split]) or both lesion/ and healthy/ folders of images{found}")
    cases = [e for e in _unique_names(entries, root) if e.split == split]
    if split == "training" and not cases:
        raise DatasetError(f"{root}: no training images (rows of {CSV_NAME} with split training or empty, "
                           "or images in lesion/ and healthy/)")
    return cases


# ---------------------------------------------------------------------------------------------
# Loading on the model grid
# ---------------------------------------------------------------------------------------------


def load_weak_case(files: WeakCaseFiles, card: ModelCard) -> WeakCase:
    """Read, resample and normalize one image as inference does, with one class label per model slice.

    Only the image file is opened. Raises DatasetError for a 3D card, an unreadable image, slices
    on a 2D image or slice indices beyond the volume.
    """
    import SimpleITK as sitk

    from DiffusionSegLib.pipeline.io import array_with_channels, image_from_array, read_image
    from DiffusionSegLib.pipeline.preprocess import normalize, resample_labels_to_model_grid, resample_to_model_grid

    if card.spatial_dims == 3:
        raise DatasetError(f"model '{card.name}' is 3D; image-level labels train 2D models: a slice is an item")
    where = files.source or files.image.name
    try:
        image = read_image(files.image)
        file_slices = _check_slices(image, files, where)
        image_grid = resample_to_model_grid(image, card)
        array = normalize(array_with_channels(image_grid), card, image)  # image as read: a by_modality choice
        layout = to_model_layout(array.astype(np.float32, copy=False), card)  # (C, S, H, W)
        n_slices = layout.shape[1]
        if file_slices is None:
            slice_labels = np.full(n_slices, files.label, dtype=np.uint8)
        else:
            # A label map on the file's grid, moved exactly like a mask, so reorientation (a flipped
            # z direction) or resampling cannot shift the labels off their slices.
            marks = np.zeros(tuple(reversed(image.GetSize())), dtype=np.uint8)
            marks[list(file_slices)] = 1
            label_map = image_from_array(marks, image, sitk.sitkUInt8)
            on_grid = sitk.GetArrayFromImage(resample_labels_to_model_grid(label_map, card, image_grid))
            per_slice = to_model_layout(on_grid[None], card)[0]  # (S, H, W)
            slice_labels = per_slice.reshape(n_slices, -1).any(axis=1).astype(np.uint8)
    except DatasetError:
        raise
    except DiffusionSegError as err:  # InputImageError, ModelLoadError: name the case in the message
        raise DatasetError(f"{where}: case {files.name}: {err}") from err
    return WeakCase(files.name, layout, slice_labels)


def _check_slices(image: Any, files: WeakCaseFiles, where: str) -> tuple[int, ...] | None:
    """``files.lesion_slices`` checked against the volume read from disk (``image``: SimpleITK image)."""
    if files.lesion_slices is None:
        return None
    if image.GetDimension() != 3:
        raise DatasetError(f"{where}: {files.image.name} is a 2D image; slices apply to volumes only")
    n = int(image.GetSize()[2])
    beyond = [k for k in files.lesion_slices if k >= n]
    if beyond:
        raise DatasetError(f"{where}: slice(s) {', '.join(map(str, beyond[:5]))} out of range: "
                           f"{files.image.name} has {n} slices (0-{n - 1})")
    return files.lesion_slices


def load_weak_cases(files: Sequence[WeakCaseFiles], card: ModelCard) -> list[WeakCase]:
    """``load_weak_case`` for each; DatasetError when no slice at all is lesion, or none is healthy."""
    loaded = [load_weak_case(f, card) for f in files]
    for label, word in ((LESION, "lesion"), (HEALTHY, "healthy")):
        if not any((case.slice_labels == label).any() for case in loaded):
            raise DatasetError(f"no {word} slice in any of the {len(loaded)} image(s): a weakly supervised "
                               f"model needs both lesion and healthy images (check the labels of {CSV_NAME})")
    return loaded


def split_weak_validation(cases: list[WeakCaseFiles], val_cases: int | list[str] | None,
                          seed: int) -> tuple[list[WeakCaseFiles], list[WeakCaseFiles]]:
    """(training, held-out) by case, never by slice (slices of one volume are not independent).

    ``val_cases``: case names (held out in the order named), a count drawn with
    ``np.random.default_rng(seed).permutation``, or None = 20% (at least 1 with 2 or more cases,
    none for a single case). DatasetError for unknown names, a negative count, or no case left to train.
    """
    if isinstance(val_cases, (list, tuple)):  # names
        by_name = {c.name: c for c in cases}
        missing = [n for n in val_cases if n not in by_name]
        if missing:
            raise DatasetError(f"val_cases not among the training images: {', '.join(map(str, missing))}")
        wanted = list(dict.fromkeys(val_cases))
        train = [c for c in cases if c.name not in wanted]
        if not train:
            raise DatasetError(f"val_cases holds out all {len(cases)} image(s): nothing left to train on")
        return train, [by_name[n] for n in wanted]
    if val_cases is None:
        count = max(1, round(0.2 * len(cases))) if len(cases) >= 2 else 0
    else:
        count = int(val_cases)
    if count < 0:
        raise DatasetError(f"val_cases must not be negative, got {count}")
    if count >= len(cases):  # 0 of 1 case is fine; any count of 0 cases is not
        raise DatasetError(f"val_cases={count} leaves no training image (the dataset has {len(cases)})")
    held = set(np.random.default_rng(seed).permutation(len(cases))[:count].tolist())
    return ([c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held])


# ---------------------------------------------------------------------------------------------
# Sampling (image crop, class) items
# ---------------------------------------------------------------------------------------------


class ImageLabelSampler(SeededSampler):
    """Draws (image crop, class label) items from in-memory weak cases of a 2D model.

    With probability ``lesion_fraction`` an item is of the lesion class, else healthy; then a slice
    of that class uniformly over all such slices of all cases, then a uniform crop of
    ``patch_size`` (H, W) of it. Images smaller than the patch are padded with their per-channel
    minimum. Augmentation (MONAI: affine, intensity scale/shift, noise, optional flips) acts on the
    image only. All randomness comes from ``seed``: a numpy Generator for locations and a
    RandomState shared by the transforms, both saved/restored by ``get_state``/``set_state``.
    """

    def __init__(self, cases: Sequence[WeakCase], patch_size: Sequence[int], augmentation: Augmentation | None = None,
                 seed: int = 0, lesion_fraction: float = 0.5):
        if len(patch_size) != 2:
            raise ValueError(f"patch_size {list(patch_size)} must be (H, W): image-level items are 2D slices")
        if not 0.0 <= lesion_fraction <= 1.0:
            raise ValueError("lesion_fraction must be in [0, 1]")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.lesion_fraction = float(lesion_fraction)
        self.augmentation = augmentation or Augmentation(enabled=False)
        if self.augmentation.enabled and self.augmentation.label_offsets:
            raise SettingsError("contrast-phase augmentation shifts organs inside their masks; "
                                "image-level training has no masks")
        self.images = [pad_to(c.image, self.patch_size, c.image.reshape(c.image.shape[0], -1).min(axis=1))
                       for c in cases]
        # (case, slice) pairs of each class: drawing uniformly from them is uniform over slices.
        self.pools: dict[int, np.ndarray] = {}
        for label, word, share in ((LESION, "lesion", lesion_fraction), (HEALTHY, "healthy", 1 - lesion_fraction)):
            pairs = [(i, int(s)) for i, c in enumerate(cases) for s in np.flatnonzero(c.slice_labels == label)]
            if not pairs and share > 0:  # a class drawn with probability 0 may be absent (healthy-only calibration)
                raise DatasetError(f"no {word} slice among the {len(cases)} training image(s): "
                                   "both classes are needed to sample from")
            self.pools[label] = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        super().__init__(seed)
        self.transform = self._build_transform()

    def _build_transform(self):
        return augmentation_transform(self.augmentation, 2, ("image",), self.random_state)

    def sample(self) -> tuple[np.ndarray, int]:
        """One item: image (C, H, W) float32 cropped to patch_size, and its class (LESION or HEALTHY)."""
        label = LESION if self.rng.random() < self.lesion_fraction else HEALTHY
        pool = self.pools[label]
        case, s = (int(v) for v in pool[int(self.rng.integers(len(pool)))])
        image = self.images[case][:, s]
        starts = [int(self.rng.integers(n - p + 1)) for n, p in zip(image.shape[1:], self.patch_size)]
        window = (slice(None),) + tuple(slice(a, a + p) for a, p in zip(starts, self.patch_size))
        image = np.ascontiguousarray(image[window], dtype=np.float32)
        if self.transform is not None:
            import torch

            out = self.transform({"image": torch.from_numpy(image)})
            image = out["image"].as_tensor().numpy().astype(np.float32, copy=False)
        return image, label

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, H, W) float32 images and (B,) int64 class labels."""
        items = [self.sample() for _ in range(batch_size)]
        return np.stack([i for i, _ in items]), np.array([c for _, c in items], dtype=np.int64)

