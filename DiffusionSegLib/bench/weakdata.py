"""Weakly labelled lung-lesion dataset (image-level labels, no training masks) for DiffSeg.

Built from the prepared benchmark folder (``bench.data.prepare``) into::

    OUT/image_labels.csv        image,label,slices,split (one row per volume)
    OUT/images/<case>.nii.gz    every volume of every split
    OUT/validation_masks/       masks of the validation volumes (threshold rule only, never training)
    OUT/test_masks/             masks of the real test tumours (evaluation only)
    OUT/README.md, OUT/weakdata.json

Training: the synthetic lesion realisations (lesion rows, ``slices`` = z indices where the mask
has a voxel) and the SAME anatomy without lesions (healthy rows), regenerated from the
TotalSegmentator sdist exactly as ``bench.data`` made it, so that the healthy and the lesion
volumes differ only by the lesions. Validation: the synthetic check set. Test: the two real
pyradiomics tumours. Training masks are never copied: the method sees image-level labels only.

Arrays are (z, y, x) in SimpleITK array order; ``slices`` index the first array axis (z as stored).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from DiffusionSegLib.bench import data as benchdata
from DiffusionSegLib.bench import realdata
from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.core.files import replace_folder

CSV_NAME = "image_labels.csv"
MANIFEST = "weakdata.json"
CSV_COLUMNS = ("image", "label", "slices", "split")
LESION, HEALTHY = "lesion", "healthy"
SPLITS = ("training", "validation", "test")
HEALTHY_CASES = {"chest": "healthy_chest", "base": "healthy_base"}
MASK_DIRS = {"validation": "validation_masks", "test": "test_masks"}
# insert_lesions blends each lesion into the CT over a partial-volume ramp that reaches past the
# label (alpha < 0.5 is not labelled); on these grids it stays within two voxels of the mask.
BORDER_VOXELS = 2
_GEOMETRY_TOL = 1e-4  # mm / direction cosines: NIfTI stores geometry as float32


# ---------------------------------------------------------------------------------------------
# Slice labels
# ---------------------------------------------------------------------------------------------


def lesion_slices(mask_zyx: np.ndarray) -> list[int]:
    """Sorted z indices (first axis) of a (z, y, x) mask that hold at least one non-zero voxel."""
    mask = np.asarray(mask_zyx)
    if mask.ndim != 3:
        raise ValueError(f"expected a (z, y, x) mask, got shape {mask.shape}")
    return [int(z) for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))]


def format_slices(slices: Iterable[int]) -> str:
    """Compact slice list: [3, 5, 7, 8, 9] -> "3;5;7-9" (sorted, duplicates dropped, ranges inclusive)."""
    values = sorted({int(s) for s in slices})
    if values and values[0] < 0:
        raise ValueError(f"slice indices must be >= 0, got {values[0]}")
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ";".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---------------------------------------------------------------------------------------------
# The healthy anatomy
# ---------------------------------------------------------------------------------------------


def healthy_anatomy() -> dict[str, sitk.Image]:
    """{"chest", "base"}: the int16 CTs ``bench.data`` inserts lesions into, regenerated from the
    cached TotalSegmentator sdist (the same crop, slices and lung-mask step)."""
    archive = realdata.ARCHIVES["totalsegmentator"]
    with tempfile.TemporaryDirectory(prefix="diffusionseg-weak-") as tmp:
        src = realdata.extract_members(realdata.fetch_package("totalsegmentator"), archive.root,
                                       (benchdata.CHEST_CT, benchdata.BASE_CT, benchdata.BASE_SEG,
                                        benchdata.CLASS_MAP), Path(tmp))
        class_map = realdata.total_class_map(src / benchdata.CLASS_MAP)
        anatomy = {"chest": benchdata.chest_anatomy(src / benchdata.CHEST_CT)[0],
                   "base": benchdata.base_anatomy(src / benchdata.BASE_CT, src / benchdata.BASE_SEG, class_map)[0]}
    return {kind: _as_int16(image, kind) for kind, image in anatomy.items()}


def _as_int16(image: sitk.Image, name: str) -> sitk.Image:
    """Int16 copy (the synthetic cases are written as int16); raises if a value would not fit."""
    array = sitk.GetArrayViewFromImage(image)
    if array.min() < -32768 or array.max() > 32767 or not np.array_equal(array, np.rint(array)):
        raise DatasetError(f"{name} anatomy: values do not fit int16 exactly; cannot match the synthetic cases")
    return sitk.Cast(image, sitk.sitkInt16)


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and all(np.allclose(f(a), f(b), atol=_GEOMETRY_TOL)
                    for f in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection)))


def check_same_anatomy(healthy: sitk.Image, lesion_image: sitk.Image, mask_zyx: np.ndarray, name: str) -> dict[str, Any]:
    """Raise DatasetError unless ``lesion_image`` is ``healthy`` plus lesions.

    Same size, spacing, origin and direction, and identical voxels outside the lesion mask grown
    by ``BORDER_VOXELS`` (the partial-volume ramp). Returns what the ramp changed outside the
    label: {"border_voxels": int, "border_only_slices": [z]} (slices labelled healthy whose
    voxels a lesion's faint border still altered).
    """
    if not _same_geometry(healthy, lesion_image):
        raise DatasetError(f"{name}: geometry differs from the regenerated anatomy (size {lesion_image.GetSize()} "
                           f"vs {healthy.GetSize()}, or spacing/origin/direction); rebuild data/bench")
    mask = np.asarray(mask_zyx) > 0
    changed = sitk.GetArrayViewFromImage(lesion_image) != sitk.GetArrayViewFromImage(healthy)
    grown = ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool), iterations=BORDER_VOXELS)
    stray = int((changed & ~grown).sum())
    if stray:
        raise DatasetError(f"{name}: {stray} voxels away from the lesions differ from the regenerated anatomy; "
                           "the healthy and lesion volumes would not show the same patient")
    border = changed & ~mask
    return {"border_voxels": int(border.sum()),
            "border_only_slices": sorted(set(lesion_slices(border)) - set(lesion_slices(mask)))}


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def _bench_cases(bench_dir: Path) -> list[dict[str, Any]]:
    """[{case, split, anatomy or None, image, mask}] in row order, read from the bench dataset.json files."""
    benchdata.check_prepared(bench_dir, [benchdata.LUNG, benchdata.LUNG_CHECK])
    lung = json.loads((bench_dir / benchdata.LUNG / "dataset.json").read_text(encoding="utf-8"))
    check = json.loads((bench_dir / benchdata.LUNG_CHECK / "dataset.json").read_text(encoding="utf-8"))

    def rows(root: Path, entries: list[dict[str, str]], split: str, kinds: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for entry in entries:
            case = Path(entry["image"]).name.split(".")[0]
            out.append({"case": case, "split": split, "anatomy": kinds.get(case, {}).get("anatomy"),
                        "image": root / entry["image"], "mask": root / entry["label"]})
        return out

    return (rows(bench_dir / benchdata.LUNG, lung["training"], "training", lung.get("synthetic_training_cases", {}))
            + rows(bench_dir / benchdata.LUNG_CHECK, check["test"], "validation", check.get("synthetic_cases", {}))
            + rows(bench_dir / benchdata.LUNG, lung["test"], "test", {}))


def _split_counts(cases: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts = {}
    for split in SPLITS:
        rows = [c for c in cases if c["split"] == split]
        n, lesion = sum(c["n_slices"] for c in rows), sum(c["n_lesion_slices"] for c in rows)
        counts[split] = {"volumes": len(rows), "lesion_volumes": sum(c["label"] == LESION for c in rows),
                         "healthy_volumes": sum(c["label"] == HEALTHY for c in rows),
                         "slices": n, "lesion_slices": lesion, "healthy_slices": n - lesion}
    return counts


def _readme(manifest: dict[str, Any]) -> str:
    lines = [
        "# Weakly labelled lung lesions (image-level labels)", "",
        f"Built by `DiffusionSegLib.bench.weakdata` from the prepared benchmark folder (`bench.data.prepare`). "
        f"`{CSV_NAME}` has one row per volume: `image,label,slices,split`. For a lesion volume, `slices` lists "
        "the 0-based indices along the first SimpleITK array axis (z as stored) that show lesion (ranges "
        "inclusive, e.g. `3;5;7-9`); every other slice of it is healthy. Healthy volumes leave `slices` empty.", "",
        "## Splits", "",
        "- **training**: the synthetic lesion realisations (lesions SYNTHETIC, inserted into REAL lung anatomy of two "
        "TotalSegmentator CTs) and the same two anatomies WITHOUT lesions (`healthy_chest`, `healthy_base`), "
        "regenerated exactly as the lesions' host volumes and checked voxel for voxel away from the lesions: the "
        "healthy and the lesion volumes differ only by the lesions. Training gets image-level labels only: "
        "no training mask is in this folder.",
        "- **validation**: the synthetic check set (new lesions, other seeds, SAME anatomy as training). Its masks in "
        "`validation_masks/` are used ONLY to choose the method's threshold rule, never by training.",
        "- **test**: the two REAL lung tumours of pyradiomics (`lung1`, `lung2`), other patients and scanners. Masks "
        "in `test_masks/`, for evaluation only.", "",
        "The lung masks that decided where synthetic lesions go are TotalSegmentator's own predictions (lung lobes of "
        "`example_ct`) or an HU threshold (chest CT), not manual ground truth.", "",
        "A synthetic lesion is blended into the CT over a thin partial-volume border below the label threshold; "
        "`weakdata.json` lists, per case, the voxels it changed outside the mask and the slices labelled healthy "
        "that it still touches (`border_only_slices`).", "",
        "## Counts", "",
        "| split | volumes (lesion / healthy) | slices | lesion slices | healthy slices |",
        "|---|---|---|---|---|",
    ]
    for split, c in manifest["splits"].items():
        lines.append(f"| {split} | {c['volumes']} ({c['lesion_volumes']} / {c['healthy_volumes']}) | {c['slices']} "
                     f"| {c['lesion_slices']} | {c['healthy_slices']} |")
    lines += ["", "| case | split | label | slices | lesion slices |", "|---|---|---|---|---|"]
    lines += [f"| {c['case']} | {c['split']} | {c['label']} | {c['n_slices']} | {c['n_lesion_slices']} |"
              for c in manifest["cases"]]
    return "\n".join(lines) + "\n"


def build_weak_lung_dataset(bench_dir: Path, out_dir: Path, rebuild: bool = False,
                            anatomy: dict[str, sitk.Image] | None = None) -> dict[str, Any]:
    """Write the weak lung-lesion dataset into ``out_dir``; returns the manifest (also ``weakdata.json``).

    ``bench_dir``: a prepared benchmark folder (lung_lesions and lung_synthetic_check).
    ``anatomy``: the healthy host CTs by anatomy name; default :func:`healthy_anatomy`.
    Refuses an existing ``out_dir`` unless ``rebuild`` (and then only one this function wrote).
    Raises DatasetError when a synthetic case is not its anatomy plus lesions.
    """
    bench_dir, out_dir = Path(bench_dir), Path(out_dir)
    if out_dir.exists():
        if not rebuild:
            raise DatasetError(f"{out_dir} exists; pass rebuild=True (--rebuild) to replace it")
        if not (out_dir / MANIFEST).is_file():
            raise DatasetError(f"{out_dir} exists and has no {MANIFEST}: not a weak dataset, refusing to replace it")
    sources = _bench_cases(bench_dir)
    anatomy = healthy_anatomy() if anatomy is None else {k: _as_int16(v, k) for k, v in anatomy.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the dataset is shared like its siblings
        (staging / "images").mkdir()
        cases: list[dict[str, Any]] = []
        for src in sources:
            image_rel = f"images/{src['case']}.nii.gz"
            image = sitk.ReadImage(str(src["image"]))
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(src["mask"])))
            if mask.shape != sitk.GetArrayViewFromImage(image).shape:
                raise DatasetError(f"{src['mask']}: mask shape {mask.shape} differs from its image")
            z = lesion_slices(mask)
            if not z:
                raise DatasetError(f"{src['mask']}: empty mask; a lesion row needs at least one lesion slice")
            entry: dict[str, Any] = {"case": src["case"], "image": image_rel, "label": LESION, "split": src["split"],
                                     "slices": format_slices(z), "n_slices": int(mask.shape[0]),
                                     "n_lesion_slices": len(z), "mask": None, "anatomy": src["anatomy"]}
            if src["anatomy"] is not None:  # synthetic: must be the healthy anatomy plus lesions
                if src["anatomy"] not in anatomy:
                    raise DatasetError(f"{src['case']}: unknown anatomy {src['anatomy']!r}")
                entry.update(check_same_anatomy(anatomy[src["anatomy"]], image, mask, src["case"]))
            shutil.copyfile(src["image"], staging / image_rel)
            if src["split"] in MASK_DIRS:  # training masks are never copied: weak labels only
                entry["mask"] = f"{MASK_DIRS[src['split']]}/{src['case']}.nii.gz"
                (staging / MASK_DIRS[src["split"]]).mkdir(exist_ok=True)
                shutil.copyfile(src["mask"], staging / entry["mask"])
            cases.append(entry)
        used = [kind for kind in HEALTHY_CASES if any(c["anatomy"] == kind and c["split"] == "training" for c in cases)]
        at = next((i for i, c in enumerate(cases) if c["split"] != "training"), len(cases))  # after the training lesions
        for kind in used:
            image_rel = f"images/{HEALTHY_CASES[kind]}.nii.gz"
            sitk.WriteImage(anatomy[kind], str(staging / image_rel), True)
            cases.insert(at, {"case": HEALTHY_CASES[kind], "image": image_rel, "label": HEALTHY, "split": "training",
                              "slices": "", "n_slices": int(anatomy[kind].GetSize()[2]), "n_lesion_slices": 0,
                              "mask": None, "anatomy": kind})
            at += 1
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows([c[k] for k in CSV_COLUMNS] for c in cases)
        (staging / CSV_NAME).write_text(text.getvalue(), encoding="utf-8")
        manifest = {"csv": CSV_NAME, "splits": _split_counts(cases), "cases": cases,
                    "training_masks": "none: image-level labels only",
                    "validation_masks": "threshold rule only, never training",
                    "source": {"bench": [benchdata.LUNG, benchdata.LUNG_CHECK],
                               "anatomy": realdata.ARCHIVES["totalsegmentator"].requirement}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(_readme(manifest), encoding="utf-8")
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
