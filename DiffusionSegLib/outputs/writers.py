"""Writers of a SegmentationResult: NIfTI maps, .seg.nrrd, JSON report, PNG overview.

:func:`write_outputs` writes into ``outdir`` (created if needed):

- ``fused.nii.gz``, ``crf.nii.gz`` (when ``result.refined`` is set), ``consistency.nii.gz``,
  ``ambiguity.nii.gz``: uint8 label maps, value i+1 for label i, 0 for background. Where several
  labels claim a voxel, the label with the higher ``probability`` there wins (ties: the lower index).
- ``probability_<label>.nii.gz``, ``uncertainty_<label>.nii.gz``: float32 maps (label names made
  safe for file names).
- ``samples/sample_<k>.nii.gz`` (label maps, same overlap rule) with ``keep_samples`` when the
  result holds its samples.
- ``segmentation.seg.nrrd`` (slicerio >= 1.1): segments "<label> fused" (the CRF-refined mask when
  available), "<label> consistency", "<label> ambiguity"; overlapping segments go to separate
  layers as Slicer stores them.
- ``overview.png``: the most informative axial slices with the final-mask outline, the ambiguity
  overlay and the uncertainty map, a legend, a titled colorbar, the model's CT window and slice
  positions in mm (see :func:`write_overview`).
- ``report.json``: ``result.report`` plus the list of files written.

Every output shares the geometry of ``result.reference`` (RGB inputs: its scalar geometry).

A folder holds exactly one run's outputs. Rewriting a folder replaces the earlier run's outputs
(the files its ``report.json`` lists, when they are named as this module names them); a file that
is not one of them is the user's: such a folder is refused unless ``overwrite`` is set, and even
then only a user file at the path of a new output is replaced, nothing else is removed.

The call is all-or-nothing: :class:`OutputFolder` checks the folder and reserves a hidden staging
folder inside it (cheap, so the CLI does it before the long sampling); the outputs are built there,
then the earlier outputs are moved aside (``report.json`` first) and the new ones renamed into place
(``report.json`` last, so a reader never sees a report with files of another run). On any failure
the new files are removed and the earlier ones moved back, and ``outdir`` (and parents) are removed
when this call created them and they are empty.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.pipeline.io import image_from_array, write_image_atomic
from DiffusionSegLib.models.card import LabelInfo
from DiffusionSegLib.pipeline.ensemble import (ambiguity_from_counts, consistency_from_counts, probability_from_counts,
                                                uncertainty_from_probability)
from DiffusionSegLib.pipeline.result import SegmentationResult

log = logging.getLogger(__name__)

# Slicer's default terminology contexts: a "category;type" pair from a model card is expanded in them.
_TYPE_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
_UNCERTAIN_COLOR = np.array([1.0, 0.6, 0.0])  # orange: "the samples disagree here"
_MAX_OVERVIEW_SLICES = 3


_REPORT = "report.json"
# Every name write_outputs gives a file (relative to outdir): only such files can be "ours".
_OUTPUT_NAME = re.compile(r"^(?:(?:fused|crf|consistency|ambiguity)\.nii\.gz"
                          r"|(?:probability|uncertainty)_[A-Za-z0-9_-]+\.nii\.gz"
                          r"|samples/sample_\d+\.nii\.gz|segmentation\.seg\.nrrd|overview\.png|report\.json)$")
_STAGING = re.compile(r"^\.diffusionseg-(\d+)-[0-9a-f]{8}\.partial$")
_SHOWN_FOREIGN = 3  # user files named in the refusal message
# Files the desktop puts into any folder a user looks at: neither a reason to refuse nor ours to remove.
_DESKTOP_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def write_outputs(result: SegmentationResult, outdir: str | os.PathLike, keep_samples: bool = False,
                  overwrite: bool = False) -> dict[str, Path]:
    """Write every output of ``result`` into ``outdir``; return {name: path} of the files written.

    Names are the file names without extension ("fused", "probability_liver", "sample_0",
    "segmentation", "overview", "report"). The earlier run's outputs in ``outdir`` are replaced;
    a folder that holds other files is refused unless ``overwrite`` (they are kept then, see the
    module docstring). Raises DiffusionSegError (naming the folder) when the folder is refused or
    cannot be created or written; the folder is left as it was then.
    """
    with OutputFolder(outdir, overwrite) as folder:
        return folder.write(result, keep_samples)


class OutputFolder:
    """The output folder of one run: checked and reserved by :meth:`open`, filled by :meth:`write`.

    Use as a context manager around the whole run, so that a folder that cannot be used fails
    before any computing, and a run that fails later leaves the folder as it was.
    """

    def __init__(self, outdir: str | os.PathLike, overwrite: bool = False):
        self.outdir = Path(outdir)
        self.overwrite = overwrite
        self._staging: Path | None = None
        self._created: list[Path] = []  # folders open() created, deepest first

    def __enter__(self) -> "OutputFolder":
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Refuse a folder with user files (unless overwrite); create it and the hidden staging folder.

        Creating the staging folder is the writability check: it fails at once on a read-only or
        missing location, where the outputs would otherwise fail after the whole run.
        """
        if self._staging is not None:
            raise RuntimeError("this OutputFolder is already open")
        outdir = self.outdir
        if outdir.exists() and not outdir.is_dir():
            raise DiffusionSegError(f"cannot write outputs: {outdir} exists and is not a folder")
        if outdir.is_dir() and not self.overwrite:
            foreign = _foreign_files(outdir, previous_outputs(outdir))
            if foreign:
                shown = ", ".join(foreign[:_SHOWN_FOREIGN]) + (" ..." if len(foreign) > _SHOWN_FOREIGN else "")
                raise DiffusionSegError(
                    f"output folder {outdir} holds files that are not outputs of an earlier DiffusionSeg run "
                    f"({shown}); choose a new or empty folder, or use --overwrite to write there anyway "
                    f"(those files are kept)")
        self._created = _missing_dirs(outdir)
        staging = outdir / f".diffusionseg-{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
        try:
            outdir.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
        except OSError as err:
            self._remove_created_dirs()
            raise DiffusionSegError(f"cannot write outputs to {outdir}: {err.strerror or err}") from err
        self._staging = staging
        _remove_stale_staging(outdir, keep=staging.name)

    def write(self, result: SegmentationResult, keep_samples: bool = False) -> dict[str, Path]:
        """Build the outputs in the staging folder, then swap them for the earlier run's (see module doc)."""
        if self._staging is None:
            raise RuntimeError("OutputFolder.open() must be called before write()")
        try:
            (self._staging / "new").mkdir()
            staged = _stage_outputs(result, self._staging / "new", keep_samples)
            return self._swap(staged)
        except OSError as err:
            raise DiffusionSegError(f"cannot write outputs to {self.outdir}: {err.strerror or err}") from err

    def close(self) -> None:
        """Remove the staging folder (and the earlier outputs moved into it), and folders open() created
        that are still empty (the run failed). Safe to call more than once."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._remove_created_dirs()

    def _swap(self, staged: list[str]) -> dict[str, Path]:
        """Move the earlier outputs (and, with overwrite, files in the way) aside, the new ones in; undo on failure."""
        assert self._staging is not None
        outdir, new, old = self.outdir, self._staging / "new", self._staging / "old"
        earlier = previous_outputs(outdir)  # again: the folder may have changed during the run
        in_the_way = [rel for rel in staged if os.path.lexists(outdir / rel) and rel not in earlier]
        if in_the_way and not self.overwrite:
            raise DiffusionSegError(f"cannot write outputs to {outdir}: {in_the_way[0]} appeared there during "
                                    f"the run and is not a DiffusionSeg output (use --overwrite to replace it)")
        aside: list[str] = []
        moved_in: list[Path] = []
        made: list[Path] = []
        try:
            for rel in [*earlier, *in_the_way]:  # report.json first: the old run is no longer "complete"
                (old / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(outdir / rel, old / rel)
                aside.append(rel)
            written: dict[str, Path] = {}
            for rel in staged:  # report.json last
                final = outdir / rel
                if not final.parent.is_dir():
                    final.parent.mkdir()
                    made.append(final.parent)
                os.replace(new / rel, final)
                moved_in.append(final)
                written[_output_name(rel)] = final
        except BaseException:
            _undo_swap(outdir, old, aside, moved_in, made)
            raise
        samples = outdir / "samples"
        if "samples" in {Path(rel).parts[0] for rel in earlier} and samples.is_dir() and not any(samples.iterdir()):
            samples.rmdir()  # the earlier run's samples/ held only its samples, all replaced or gone
        return written

    def _remove_created_dirs(self) -> None:
        for folder in self._created:
            try:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            except OSError:
                break  # a parent of a non-empty or unremovable folder cannot go either
        self._created = []


def previous_outputs(outdir: str | os.PathLike) -> list[str]:
    """Relative paths of the earlier run's outputs in ``outdir``, ``report.json`` first.

    They are the files ``report.json`` lists that exist and are named as this module names its
    outputs, so a foreign or edited report can never make a file of the user's count as ours.
    Empty when there is no readable report.
    """
    outdir = Path(outdir)
    try:
        listed = json.loads((outdir / _REPORT).read_text(encoding="utf-8")).get("outputs")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(listed, list) or not (outdir / _REPORT).is_file():
        return []
    ours = [rel for rel in listed if isinstance(rel, str) and rel != _REPORT and _OUTPUT_NAME.match(rel)
            and (outdir / rel).is_file() and not (outdir / rel).is_symlink()]
    return [_REPORT, *dict.fromkeys(ours)]


def _foreign_files(outdir: Path, ours: list[str]) -> list[str]:
    """Entries of ``outdir`` (one level into ``samples/``) that are not ``ours``, our staging folders
    or desktop metadata files."""
    known = set(ours)
    foreign: list[str] = []
    for entry in sorted(os.listdir(outdir)):
        path = outdir / entry
        if entry in known or entry in _DESKTOP_FILES or _STAGING.match(entry):
            continue
        if entry == "samples" and path.is_dir() and not path.is_symlink():
            foreign += [f"samples/{name}" for name in sorted(os.listdir(path)) if f"samples/{name}" not in known]
        else:
            foreign.append(entry)
    return foreign


def _remove_stale_staging(outdir: Path, keep: str) -> None:
    """Remove staging folders left by runs that were killed (their process is gone; POSIX only).

    Windows has no harmless "is this pid alive" probe in os, so leftovers stay there; they are
    hidden and never taken for user files.
    """
    if os.name == "nt":
        return
    for entry in os.listdir(outdir):
        match = _STAGING.match(entry)
        if entry == keep or not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(outdir / entry, ignore_errors=True)
        except (PermissionError, OverflowError, ValueError):
            pass  # alive under another user, or not a pid: not ours to judge


def _undo_swap(outdir: Path, old: Path, aside: list[str], moved_in: list[Path], made: list[Path]) -> None:
    """Best effort: remove the new files, move the earlier outputs back (each step on its own)."""
    for final in reversed(moved_in):
        try:
            final.unlink(missing_ok=True)
        except OSError:
            log.warning("could not remove %s while undoing a failed write", final)
    for folder in reversed(made):
        try:
            if not any(folder.iterdir()):
                folder.rmdir()
        except OSError:
            pass
    for rel in reversed(aside):
        try:
            (outdir / rel).parent.mkdir(exist_ok=True)
            os.replace(old / rel, outdir / rel)
        except OSError:
            log.warning("could not restore %s in %s after a failed write", rel, outdir)


def label_map(masks: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(L, *spatial) binary masks -> (*spatial) uint8 label map: i+1 where label i wins, else 0.

    A voxel in several masks goes to the label with the highest ``score`` (L, *spatial, >= 0: the
    probability or the sample counts) there; ties go to the lower label index. Labels are visited
    one at a time, so the temporaries are the size of one label's map.
    """
    if masks.shape[0] > 255:
        raise ValueError(f"{masks.shape[0]} labels do not fit a uint8 label map")
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    kind = np.result_type(np.asarray(score).dtype, np.int8)  # signed, holds every score: int16 for uint8 counts
    best = np.full(masks.shape[1:], -1, dtype=kind)  # every score (>= 0) beats "no label yet"
    for i in range(masks.shape[0]):
        label_score = np.asarray(score[i])
        wins = masks[i].astype(bool, copy=False) & (label_score > best)  # strictly: ties stay with the lower index
        out[wins] = i + 1
        best[wins] = label_score[wins]
    return out


def file_stems(labels: list[LabelInfo]) -> list[str]:
    """File-name-safe, unique stems of the label names ("left kidney" -> "left_kidney").

    No dots, so a stem never looks like an extension; no leading "-", which tools take for an option.
    """
    stems: list[str] = []
    for i, label in enumerate(labels):
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", label.name).strip("_-") or f"label{i}"
        stems.append(stem if stem not in stems else f"{stem}_{i}")
    return stems


def terminology_entry(terminology: str) -> str | None:
    """Slicer "TerminologyEntry" tag value of a model card's terminology, or None if unset or malformed.

    Accepted: a full Slicer entry (7 fields separated by "~"), or "category;type" where each code is
    "SCHEME^VALUE^MEANING" or a bare SNOMED CT value ("SCT" scheme, empty meaning).
    """
    text = terminology.strip()
    if not text:
        return None
    if "~" in text:
        if text.count("~") == 6:
            return text
    else:
        codes = [_code(part) for part in text.split(";")]
        if len(codes) == 2 and all(codes):
            return f"{_TYPE_CONTEXT}~{codes[0]}~{codes[1]}~^^~{_ANATOMIC_CONTEXT}~^^~^^"
    log.warning("ignoring malformed terminology %r (expected 'category;type' codes)", terminology)
    return None


def _code(text: str) -> str | None:
    """"SCHEME^VALUE^MEANING" as is, a bare value as "SCT^VALUE^"; None when malformed."""
    fields = [f.strip() for f in text.split("^")]
    if len(fields) == 1 and fields[0]:
        return f"SCT^{fields[0]}^"
    if len(fields) == 3 and fields[0] and fields[1]:
        return "^".join(fields)
    return None

def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _output_name(rel: str) -> str:
    """"samples/sample_0.nii.gz" -> "sample_0"; "segmentation.seg.nrrd" -> "segmentation"."""
    return Path(rel).name.split(".")[0]


def _stage_outputs(result: SegmentationResult, staging: Path, keep_samples: bool) -> list[str]:
    """Write every output under ``staging``; return their relative paths in writing order."""
    ref = result.reference
    stems = file_stems(result.labels)
    staged: list[str] = []

    def add(rel: str, write: Callable[[Path], None]) -> None:
        path = staging / rel
        path.parent.mkdir(exist_ok=True)
        write(path)
        staged.append(rel)

    def image_writer(array: np.ndarray, pixel_type: int) -> Callable[[Path], None]:
        return lambda path: write_image_atomic(image_from_array(array, ref, pixel_type), path)

    for name, masks in result.regions():
        add(f"{name}.nii.gz", image_writer(label_map(masks, result.counts), sitk.sitkUInt8))
        del masks  # before the next region is computed
    for i, stem in enumerate(stems):  # one label's float map at a time
        add(f"probability_{stem}.nii.gz", image_writer(result.probability_of(i), sitk.sitkFloat32))
        add(f"uncertainty_{stem}.nii.gz", image_writer(result.uncertainty_of(i), sitk.sitkFloat32))
    if keep_samples and result.samples is not None:
        for k, sample in enumerate(result.samples):
            add(f"samples/sample_{k}.nii.gz", image_writer(label_map(sample, result.counts), sitk.sitkUInt8))
    add("segmentation.seg.nrrd", lambda path: write_seg_nrrd(result, path))
    add("overview.png", lambda path: write_overview(result, path))
    outputs = [*staged, "report.json"]
    add("report.json", lambda path: _write_report(result.report, outputs, path))
    return staged


def _write_report(report: dict[str, Any], outputs: list[str], path: Path) -> None:
    """``report`` plus the relative paths of the outputs, as indented JSON."""
    text = json.dumps({**report, "outputs": outputs}, indent=2, default=_json_default)
    path.write_text(text + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and paths, which reports may carry, as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def ijk_to_lps(reference: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> LPS mm matrix of ``reference``; a 2D image becomes one slice 1 mm thick.

    ITK physical space is LPS, so columns are direction * spacing and the translation is the origin.
    """
    dim = reference.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.reshape(reference.GetDirection(), (dim, dim))
    spacing = np.ones(3)
    spacing[:dim] = reference.GetSpacing()
    matrix = np.eye(4)
    matrix[:3, :3] = direction * spacing  # scales column j by spacing[j]
    matrix[:dim, 3] = reference.GetOrigin()
    return matrix


def _ijk_volume(mask: np.ndarray) -> np.ndarray:
    """(z, y, x) or (y, x) SimpleITK-order array -> (i, j, k) = (x, y, z) array, 2D as one slice."""
    return mask.T if mask.ndim == 3 else mask.T[:, :, None]


def _pack_layers(masks: Iterable[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Place (i, j, k) binary masks in as few uint8 layers as possible without overlaps.

    Returns voxels, (i, j, k) for one layer or (layers, i, j, k), and (layer, label value) per mask,
    the layout Slicer itself writes for overlapping segments.
    """
    layers: list[np.ndarray] = []
    counts: list[int] = []  # label values used per layer
    placement: list[tuple[int, int]] = []
    for mask in masks:
        inside = mask.astype(bool, copy=False)
        for index, layer in enumerate(layers):
            if counts[index] < 255 and not layer[inside].any():
                break
        else:
            layers.append(np.zeros(mask.shape, np.uint8))
            counts.append(0)
            index = len(layers) - 1
        counts[index] += 1
        layers[index][inside] = counts[index]
        placement.append((index, counts[index]))
    voxels = layers[0] if len(layers) == 1 else np.stack(layers)
    return voxels, placement


def _extent(mask: np.ndarray) -> list[int]:
    """Bounding box (i0, i1, j0, j1, k0, k1) of an (i, j, k) mask; Slicer's empty extent when empty."""
    if not mask.any():
        return [0, -1, 0, -1, 0, -1]
    return [int(v) for axis in np.nonzero(mask) for v in (axis.min(), axis.max())]


def segment_colors(color: tuple[float, float, float]) -> dict[str, list[float]]:
    """Display colors per region: the label color (fused), darker (consistency), orange-ish (ambiguity).

    The ambiguity color keeps a quarter of the label color so that ambiguities of several labels
    stay distinguishable while all reading as "uncertain".
    """
    base = np.clip(np.asarray(color, float), 0.0, 1.0)
    return {"fused": base.round(4).tolist(),
            "consistency": (base * 0.6).round(4).tolist(),
            "ambiguity": (0.75 * _UNCERTAIN_COLOR + 0.25 * base).round(4).tolist()}


def write_seg_nrrd(result: SegmentationResult, path: str | os.PathLike) -> None:
    """Write the fused (CRF when available), consistency and ambiguity segments as a Slicer .seg.nrrd.

    Segment IDs are "<stem>_<region>", names "<label> <region>"; every segment of a label carries
    the label's terminology. Writes ``path`` directly (callers stage it).
    """
    import slicerio  # only needed here; keeps the package import light inside Slicer

    segments: list[dict[str, Any]] = []

    def masks() -> Iterator[np.ndarray]:
        """Each segment's (i, j, k) mask in turn, its entry appended to ``segments``: consistency and
        ambiguity are computed one label at a time from the counts, never for every label at once."""
        for i, (label, stem) in enumerate(zip(result.labels, file_stems(result.labels))):
            colors = segment_colors(label.color)
            entry = terminology_entry(label.terminology)
            regions = {"fused": result.final_mask[i],
                       "consistency": consistency_from_counts(result.counts[i], result.n_samples),
                       "ambiguity": ambiguity_from_counts(result.counts[i], result.n_samples)}
            for region, mask in regions.items():
                mask = _ijk_volume(mask)
                segment: dict[str, Any] = {"id": f"{stem}_{region}", "name": f"{label.name} {region}",
                                           "color": colors[region], "colorAutoGenerated": False,
                                           "nameAutoGenerated": False, "extent": _extent(mask)}
                if entry:
                    segment["tags"] = {"TerminologyEntry": entry}
                segments.append(segment)
                yield mask

    voxels, placement = _pack_layers(masks())
    for segment, (layer, value) in zip(segments, placement):
        segment["layer"], segment["labelValue"] = layer, value
    segmentation = {"voxels": voxels, "ijkToLPS": ijk_to_lps(result.reference), "segments": segments,
                    "containedRepresentationNames": ["Binary labelmap"],
                    "masterRepresentation": "Binary labelmap"}
    # Level 1: labelmaps compress almost as well as at 9, several times faster.
    slicerio.write_segmentation(os.fspath(path), segmentation, compression_level=1)


def _most_informative_slices(fused: np.ndarray, ambiguity: np.ndarray) -> list[int]:
    """Up to 3 axial (array axis 0) slices of (L, z, y, x) masks, spread over the structures.

    A slice scores its fused + ambiguity area; the slices that score are split into 3 runs along z
    and the best of each run is kept, so the picture does not show 3 neighbours of one peak.
    """
    score = fused.sum(axis=(0, 2, 3), dtype=np.int64) + ambiguity.sum(axis=(0, 2, 3), dtype=np.int64)
    candidates = np.flatnonzero(score)
    if candidates.size == 0:
        return [fused.shape[1] // 2]
    runs = np.array_split(candidates, min(_MAX_OVERVIEW_SLICES, candidates.size))
    return [int(run[np.argmax(score[run])]) for run in runs]


# What the uncertainty colorbar says and where it ends, per kind: a fixed scale, so a nearly
# certain result does not look alarming just because its largest value fills the colour range.
_UNCERTAINTY_SCALES = {"variance": ("uncertainty: variance p(1-p)\n(0 = samples agree, 0.25 = half of them)", 0.25),
                       "entropy": ("uncertainty: binary entropy (bits)\n(0 = samples agree, 1 = half of them)", 1.0)}
_OVERVIEW_DPI = 100
_OVERVIEW_WIDTH_IN = 11.5


def _display_window(image: np.ndarray, rgb: bool, report: dict[str, Any]) -> tuple[float, float, str]:
    """(low, high, description) of the grey-level window for scalar slices.

    A CT input shown to a CT-window model gets the model's own window (what the model was trained
    to look at, e.g. W400/L50 HU soft tissue); anything else a 1-99 % percentile window.
    """
    norm = (report.get("model") or {}).get("normalization") or {}
    input_modality = (report.get("modality") or {}).get("input")
    if not rgb and norm.get("kind") == "ct_window" and input_modality == "CT":
        center, width = float(norm["center"]), float(norm["width"])
        return center - width / 2, center + width / 2, f"CT window W{width:g}/L{center:g} HU (the model's)"
    low, high = np.percentile(image, [1, 99])
    if high <= low:
        low, high = float(image.min()), float(image.max())
    return float(low), float(max(high, low + 1e-12)), "grey levels: 1-99 % of the shown slices"


def _to_lps(ref: sitk.Image, maps: list[np.ndarray]) -> tuple[sitk.Image, list[np.ndarray]]:
    """A 3D reference (and (L, z, y, x) maps on its grid) permuted/flipped to LPS, no interpolation.

    Then array axis 0 runs inferior->superior, rows anterior->posterior and columns patient right->left:
    axial slices in the radiological convention whatever the file's direction matrix.
    """
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ref.GetDirection())
    if current == "LPS":
        return ref, maps
    oriented_ref = sitk.DICOMOrient(ref, "LPS")
    scalar_ref = image_from_array(np.zeros(tuple(reversed(ref.GetSize())), np.uint8), ref, sitk.sitkUInt8)
    out = []
    for stack in maps:
        channels = [sitk.GetArrayFromImage(sitk.DICOMOrient(image_from_array(m, scalar_ref, _pixel_type(m)), "LPS"))
                    for m in stack]
        out.append(np.stack(channels))
    return oriented_ref, out


def _pixel_type(array: np.ndarray) -> int:
    if array.dtype.kind == "f":
        return sitk.sitkFloat32
    return sitk.sitkUInt16 if array.dtype == np.uint16 else sitk.sitkUInt8


def _crop_box(shown: np.ndarray, masks: list[np.ndarray]) -> tuple[slice, slice]:
    """Rows/columns holding the anatomy (above the window floor) or any mask, with a small margin.

    A CT is mostly air around the body: without the crop the organs are a third of the panel.
    """
    grey = shown if shown.ndim == 3 else shown.mean(axis=-1)
    keep = (grey > 0.02).any(axis=0)
    for m in masks:
        keep |= m.any(axis=tuple(range(m.ndim - 2)))
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return slice(None), slice(None)
    h, w = keep.shape
    mr, mc = max(2, h // 30), max(2, w // 30)
    return (slice(max(0, rows[0] - mr), min(h, rows[-1] + mr + 1)),
            slice(max(0, cols[0] - mc), min(w, cols[-1] + mc + 1)))


def write_overview(result: SegmentationResult, path: str | os.PathLike, dpi: int = _OVERVIEW_DPI) -> None:
    """PNG of up to 3 informative axial slices, readable on a screen without the other outputs.

    Rows are slices (position in mm along the patient axis); columns: image + final-mask outline,
    image + ambiguity (where the samples disagree), image + uncertainty with a titled colorbar on a
    fixed scale. A legend names each label's colours, the grey window is the model's CT window for CT
    inputs, volumes are shown in the radiological convention (patient right on the left) with
    orientation letters, and input warnings (report "warnings") are repeated in red at the bottom.
    """
    # The Agg canvas is used explicitly instead of matplotlib.use("Agg"): inside Slicer a global
    # backend switch would change the user's own plotting; nothing here needs a display.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ref = result.reference
    report = result.report or {}
    rgb = ref.GetNumberOfComponentsPerPixel() == 3
    # The sample counts, not the float uncertainty map, travel through the reorientation: the
    # uncertainty is computed for the 3 slices shown only.
    maps = [result.fused, result.final_mask, result.ambiguity, result.counts]  # (L, *spatial)
    volume = ref.GetDimension() == 3
    if volume:
        ref, maps = _to_lps(ref, maps)
    image = sitk.GetArrayViewFromImage(ref)  # (z, y, x[, 3]) or (y, x[, 3])
    if not volume:  # one "slice": same code path as a volume
        image, maps = image[None], [m[:, None] for m in maps]
    fused, final, ambiguity, counts = maps
    slices = _most_informative_slices(fused, ambiguity)
    kind = result.uncertainty_kind.value
    uncertainty = uncertainty_from_probability(probability_from_counts(counts[:, slices], result.n_samples), kind)
    raw = np.asarray(image[slices], dtype=np.float32)
    if rgb and image.dtype == np.uint8:
        shown, window = raw / 255.0, "RGB as stored"
    else:
        low, high, window = _display_window(raw, rgb, report)
        shown = np.clip((raw - low) / (high - low), 0.0, 1.0)
    rows, cols = _crop_box(shown, [final[:, slices], ambiguity[:, slices]])
    spacing = ref.GetSpacing()
    aspect = spacing[1] / spacing[0]  # rows are y, columns x
    colors = [np.clip(np.asarray(lab.color, float), 0, 1) for lab in result.labels]
    amb_colors = [np.asarray(segment_colors(lab.color)["ambiguity"]) for lab in result.labels]
    unc_title, unc_max = _UNCERTAINTY_SCALES.get(kind, (f"uncertainty ({kind})", float(uncertainty.max()) or 1.0))
    unc_norm = Normalize(vmin=0.0, vmax=unc_max)
    unc_cmap = colormaps["inferno"]
    final_name = "final mask (CRF-refined)" if result.refined is not None else "final mask (fused)"

    n = len(slices)
    # Rows as tall as the cropped slices are at a third of the width: no empty bands between rows.
    panel_h = (_OVERVIEW_WIDTH_IN - 1.2) / 3 * aspect * shown[0][rows, cols].shape[0] / max(
        shown[0][rows, cols].shape[1], 1)
    fig = Figure(figsize=(_OVERVIEW_WIDTH_IN, min(n * (panel_h + 0.55) + 1.6, 11.8)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    # A thin first row holds the legend: placed by the layout engine under the title, never over it.
    grid = fig.add_gridspec(n + 1, 3, height_ratios=[0.12 * max(panel_h, 1.0)] + [panel_h] * n)
    legend_ax = fig.add_subplot(grid[0, :])
    legend_ax.set_axis_off()
    axes = np.array([[fig.add_subplot(grid[row + 1, col]) for col in range(3)] for row in range(n)])
    cmap = None if rgb else "gray"
    for row, z in enumerate(slices):
        ax_final, ax_amb, ax_unc = axes[row]
        picture = shown[row][rows, cols]
        for ax in (ax_final, ax_amb, ax_unc):
            ax.imshow(picture, cmap=cmap, vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        for i, color in enumerate(colors):
            if final[i, z][rows, cols].any():
                ax_final.contour(final[i, z][rows, cols], levels=[0.5], colors=[color], linewidths=1.6)
        overlay = np.zeros((*picture.shape[:2], 4), np.float32)
        for i, color in enumerate(amb_colors):
            overlay[ambiguity[i, z][rows, cols].astype(bool)] = (*color, 0.75)
        ax_amb.imshow(overlay, aspect=aspect, interpolation="nearest")
        unc = uncertainty[:, row].max(axis=0)[rows, cols]
        heat = unc_cmap(unc_norm(unc))
        heat[..., 3] = np.where(unc > 0, 0.85, 0.0)  # certain voxels stay transparent: anatomy shows through
        ax_unc.imshow(heat, aspect=aspect, interpolation="nearest")
        if volume:
            position = ref.TransformIndexToPhysicalPoint((0, 0, int(z)))[2]
            where = f"axial slice {z + 1} of {fused.shape[1]}, S {position:.1f} mm"
        else:
            where = "image"
        ax_final.set_title(f"{where}\n{final_name}", fontsize=10)
        ax_amb.set_title("ambiguity: samples disagree", fontsize=10)
        ax_unc.set_title("uncertainty", fontsize=10)
        for ax in (ax_final, ax_amb, ax_unc):
            ax.set_xticks([])
            ax.set_yticks([])
            if volume:  # LPS arrays: columns run patient right -> left, rows anterior -> posterior
                for x, y, text, ha, va in ((0.01, 0.5, "R", "left", "center"), (0.99, 0.5, "L", "right", "center"),
                                           (0.5, 0.99, "A", "center", "top"), (0.5, 0.01, "P", "center", "bottom")):
                    ax.text(x, y, text, transform=ax.transAxes, color="yellow", fontsize=9, ha=ha, va=va)
    bar = fig.colorbar(ScalarMappable(norm=unc_norm, cmap=unc_cmap), ax=axes[:, 2].tolist(), fraction=0.05, pad=0.02)
    bar.set_label(unc_title, fontsize=9)
    bar.ax.tick_params(labelsize=8)

    # Only labels that appear in the shown slices: a nine-organ model would otherwise list keys
    # for structures the picture does not contain.
    shown = [i for i in range(len(result.labels))
             if any(final[i, z].any() or ambiguity[i, z].any() for z in slices)] or list(range(len(result.labels)))
    handles = [Line2D([], [], color=colors[i], lw=2.5, label=f"{result.labels[i].name}: {final_name}") for i in shown]
    handles += [Patch(facecolor=amb_colors[i], alpha=0.75, label=f"{result.labels[i].name}: ambiguity")
                for i in shown]
    # Under the title, so the key is read before the pictures; the bottom is kept for warnings.
    legend_ax.legend(handles=handles, loc="center", ncol=min(4, len(handles)), fontsize=9, frameon=False)

    model = (report.get("model") or {}).get("name", "")
    samples = report.get("samples")
    diversity = ", ".join(f"{lab.name} {d:.3f}" for lab, d in zip(result.labels, result.sample_diversity))
    import textwrap

    lines = [f"DiffusionSeg{f' - model {model}' if model else ''}{f', {samples} samples' if samples else ''}; {window}",
             *textwrap.wrap(f"sample diversity (mean pairwise 1-IoU of the samples, 0 = identical): "
                            f"{diversity or 'n/a'}", width=150)]
    fig.suptitle("\n".join(lines), fontsize=10)
    warnings = report.get("warnings") or []
    if warnings:
        codes = ", ".join(dict.fromkeys(str(w.get("code", "")) for w in warnings))
        # supxlabel, not a free text: constrained layout makes room for it below the legend.
        fig.supxlabel(f"Input does not fit the model ({codes}): see report.json 'warnings'",
                      color="red", fontsize=10, weight="bold")
    fig.savefig(os.fspath(path), format="png", dpi=dpi)
