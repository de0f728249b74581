"""Reading back what :func:`DiffusionSegLib.outputs.writers.write_outputs` wrote: the inverse of the writers.

:func:`read_outputs` rebuilds a :class:`SegmentationResult` from an output folder. The Slicer
workflow uses it to turn the files of a background ``diffusionseg segment`` run into MRML nodes.

Where the values come from (writers' file layout):

- ``report.json`` (written last, so its presence means the run finished) and its ``outputs`` list:
  which files belong to the run and the label file stems in label order.
- ``probability_<stem>.nii.gz``: exact float32 maps, counts / N with N the report's ``samples``:
  the counts, and from them probability, consistency, ambiguity and uncertainty (of the report's
  ``uncertainty_kind``), per label and exactly, overlaps included. The uncertainty, consistency
  and ambiguity files must be present but are not read.
- ``segmentation.seg.nrrd`` (read with slicerio when available): label names, colors and
  terminology, and the final (CRF when it ran, else fused) mask of every label, exactly, overlaps
  included (each segment is stored on its own).
- ``fused.nii.gz``, ``crf.nii.gz`` and ``samples/sample_<k>.nii.gz``: label maps (value i+1 = label i). They are exact for one label or
  non-overlapping labels; where several labels claimed a voxel only the most probable one was
  written, so the others cannot be recovered from these files.

The reference image of the result is the geometry (size, origin, spacing, direction) of the
written maps; its voxels are those of ``fused.nii.gz`` (the input image itself is not written).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.models.card import LabelInfo
from DiffusionSegLib.pipeline import ensemble
from DiffusionSegLib.pipeline.result import SegmentationResult

log = logging.getLogger(__name__)

_REPORT = "report.json"
_SEGMENTATION = "segmentation.seg.nrrd"
_PROBABILITY = re.compile(r"^probability_(.+)\.nii\.gz$")
_SAMPLE = re.compile(r"^samples/sample_(\d+)\.nii\.gz$")
# Geometry tolerance between the maps of one folder: they are written from one reference image,
# so only float formatting (NIfTI stores float32) separates them.
_GEOMETRY_ATOL = 1e-4


class OutputFolderError(DiffusionSegError):
    """An output folder is missing, incomplete (run interrupted) or not written by DiffusionSeg."""


def read_outputs(outdir: str | os.PathLike) -> SegmentationResult:
    """Rebuild the :class:`SegmentationResult` that ``write_outputs`` wrote into ``outdir``.

    Arrays are (L, *spatial) in SimpleITK array order of the written maps; ``samples`` is
    (N, L, *spatial) uint8 when ``samples/`` was written, else None; ``refined`` is set when
    the report's ``outputs`` list names ``crf.nii.gz`` (a stray file of that name is ignored). ``report`` is the JSON report without its ``outputs`` list.
    Raises OutputFolderError naming the folder and the missing or unreadable file.
    """
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise OutputFolderError(f"no DiffusionSeg outputs: folder {outdir} does not exist")
    report, outputs = _read_report(outdir)
    missing = [rel for rel in outputs if not (outdir / rel).is_file()]
    if missing:
        raise OutputFolderError(f"incomplete DiffusionSeg outputs in {outdir}: missing {', '.join(missing)}")
    stems = [m.group(1) for rel in outputs if (m := _PROBABILITY.match(rel))]
    if not stems:
        raise OutputFolderError(f"incomplete DiffusionSeg outputs in {outdir}: no probability_<label> maps listed")
    for name in ("fused", "consistency", "ambiguity"):
        if f"{name}.nii.gz" not in outputs:
            raise OutputFolderError(f"incomplete DiffusionSeg outputs in {outdir}: missing {name}.nii.gz")

    fused_image = _read(outdir / "fused.nii.gz")
    n_labels = len(stems)

    def label_masks(rel: str) -> np.ndarray:
        return _decode_label_map(_read_on_grid(outdir / rel, fused_image), n_labels)

    n_samples = report.get("samples")
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise OutputFolderError(f"{outdir / _REPORT} does not say how many samples were drawn ('samples': {n_samples!r})")
    counts = np.stack([_counts_from_probability(outdir / f"probability_{s}.nii.gz", fused_image, n_samples)
                       for s in stems])
    fused = label_masks("fused.nii.gz")
    refined = label_masks("crf.nii.gz") if "crf.nii.gz" in outputs else None

    labels = [LabelInfo(stem) for stem in stems]
    if _SEGMENTATION in outputs:
        segments = _read_segments(outdir / _SEGMENTATION, fused_image, stems)
        if segments is not None:
            labels = segments["labels"]
            # The .seg.nrrd keeps overlapping labels apart: prefer its exact masks.
            if refined is not None:
                refined = segments["fused"]
            else:
                fused = segments["fused"]

    samples = None
    sample_files = sorted(((int(m.group(1)), rel) for rel in outputs if (m := _SAMPLE.match(rel))))
    if sample_files:
        if [k for k, _ in sample_files] != list(range(len(sample_files))):
            raise OutputFolderError(f"incomplete DiffusionSeg outputs in {outdir}: sample files are not numbered 0..N-1")
        samples = np.stack([label_masks(rel) for _, rel in sample_files])

    diversity = report.get("sample_diversity") or {}
    sample_diversity = [float(diversity[lab.name]) for lab in labels] if all(
        lab.name in diversity for lab in labels) else []
    try:
        return SegmentationResult(
            reference=fused_image, labels=labels, counts=counts, n_samples=n_samples, fused=fused,
            uncertainty_kind=report.get("uncertainty_kind", "variance"), refined=refined, samples=samples,
            sample_diversity=sample_diversity, report=report)
    except ValueError as err:
        raise OutputFolderError(f"{outdir / _REPORT}: {err}") from None


def _counts_from_probability(path: Path, reference: sitk.Image, n_samples: int) -> np.ndarray:
    """The sample counts (uint8/uint16) behind a probability map, which the writers wrote as counts / N.

    OutputFolderError when the map is not a multiple of 1 / N (not this run's map, or edited).
    """
    probability = _read_on_grid(path, reference).astype(np.float64)
    counts = np.rint(probability * n_samples)
    if probability.size and (np.abs(counts - probability * n_samples).max() > 1e-3
                             or counts.min() < 0 or counts.max() > n_samples):
        raise OutputFolderError(f"{path} is not a fraction of the report's {n_samples} samples: not this run's map")
    return counts.astype(ensemble.count_dtype(n_samples))


def _read_report(outdir: Path) -> tuple[dict[str, Any], list[str]]:
    """report.json without ``outputs``, and the ``outputs`` list (relative paths)."""
    path = outdir / _REPORT
    if not path.is_file():
        raise OutputFolderError(
            f"incomplete DiffusionSeg outputs in {outdir}: no {_REPORT} (the run did not finish)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise OutputFolderError(f"unreadable {path}: {err}") from err
    if not isinstance(report, dict) or not isinstance(report.get("outputs"), list):
        raise OutputFolderError(f"{path} is not a DiffusionSeg report (no 'outputs' list)")
    outputs = [str(rel) for rel in report.pop("outputs")]
    for rel in outputs:
        # The list comes from a file: never let it point outside the folder.
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise OutputFolderError(f"{path} lists an output outside the folder: {rel}")
    return report, outputs


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise OutputFolderError(f"cannot read {path}: corrupt or truncated file") from err


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=_GEOMETRY_ATOL)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=_GEOMETRY_ATOL)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=_GEOMETRY_ATOL))


def _read_on_grid(path: Path, reference: sitk.Image) -> np.ndarray:
    """Voxels of ``path`` (SimpleITK array order); OutputFolderError when its grid is not the reference's."""
    image = _read(path)
    if not _same_grid(image, reference):
        raise OutputFolderError(f"{path} is not on the grid of the other outputs (size {image.GetSize()} "
                                f"vs {reference.GetSize()})")
    return sitk.GetArrayFromImage(image)


def _decode_label_map(label_map: np.ndarray, n_labels: int) -> np.ndarray:
    """(*spatial) label map, value i+1 = label i -> (L, *spatial) uint8 masks."""
    values = np.arange(1, n_labels + 1, dtype=label_map.dtype).reshape((n_labels,) + (1,) * label_map.ndim)
    return (label_map[None] == values).astype(np.uint8)


def _read_segments(path: Path, reference: sitk.Image, stems: list[str]) -> dict[str, Any] | None:
    """Labels and the exact (L, *spatial) fused (CRF when it ran) masks from the .seg.nrrd.

    None (the label maps are used instead) when slicerio is not installed. Segment IDs are
    "<stem>_<region>" as the writers make them; a label whose segments are absent keeps its stem
    as name and the default color.
    """
    try:
        import slicerio
    except ImportError:
        log.info("slicerio is not installed: label colors and overlaps come from the label maps only")
        return None
    try:
        seg = slicerio.read_segmentation(os.fspath(path))
    except Exception as err:  # noqa: BLE001 - nrrd/slicerio raise many types for a damaged file
        raise OutputFolderError(f"cannot read {path}: {type(err).__name__}: {err}") from err
    by_id = {s["id"]: s for s in seg.get("segments", [])}
    spatial = tuple(reversed(reference.GetSize()))  # SimpleITK array order
    ijk_shape = tuple(reference.GetSize()) + (1,) * (3 - reference.GetDimension())
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 3:
        voxels = voxels[None]  # one layer
    offset = [int(v) for v in seg.get("referenceImageExtentOffset", [0, 0, 0])]
    if any(o < 0 or o + n > s for o, n, s in zip(offset, voxels.shape[1:], ijk_shape)):
        raise OutputFolderError(f"{path} does not fit the grid of the other outputs (size {reference.GetSize()})")
    labels: list[LabelInfo] = []
    masks: dict[str, list[np.ndarray]] = {"fused": []}
    for stem in stems:
        fused = by_id.get(f"{stem}_fused")
        name = fused["name"][: -len(" fused")] if fused and fused["name"].endswith(" fused") else stem
        color = tuple(float(c) for c in fused["color"]) if fused and "color" in fused else LabelInfo(name).color
        terminology = _card_terminology((fused or {}).get("terminology"))
        labels.append(LabelInfo(name, color, terminology))
        for region, stack in masks.items():
            segment = by_id.get(f"{stem}_{region}")
            if segment is None:
                return None  # not written by our writers: fall back to the label maps
            layer = voxels[int(segment.get("layer", 0))]
            full = np.zeros(ijk_shape, np.uint8)
            region_box = tuple(slice(o, o + n) for o, n in zip(offset, layer.shape))
            full[region_box] = layer == int(segment["labelValue"])
            # (i, j, k) -> SimpleITK (k, j, i); a 2D grid was stored as one slice.
            stack.append(full.T.reshape(spatial))
    return {"labels": labels, **{region: np.stack(stack) for region, stack in masks.items()}}


def _card_terminology(parsed: Any) -> str:
    """slicerio's parsed terminology {"category": [scheme, code, meaning], "type": [...]} -> the model
    card form "scheme^code^meaning;scheme^code^meaning" (what ``writers.terminology_entry`` expands)."""
    if not isinstance(parsed, dict):
        return ""
    try:
        return ";".join("^".join(str(part) for part in parsed[key][:3]) for key in ("category", "type"))
    except (KeyError, TypeError):
        return ""
