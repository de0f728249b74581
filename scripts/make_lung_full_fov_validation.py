"""Whole-scan VALIDATION volumes for the lung task: the synthetic check lesions in uncropped scans (issue 13).

    python3 scripts/make_lung_full_fov_validation.py --bench data/bench --out data/lung_full_fov_val

The lung check volumes (``data/bench/lung_synthetic_check``) are crops: ``check_chest`` is the
TotalSegmentator chest CT at 3 mm slices cropped to its lungs plus 10 mm on every axis, and
``check_base`` is example_ct cut to its lung slices plus 8 below. A filter for the false positives
of whole scans (table, arms, shoulders, neck, upper abdomen) must be chosen on whole scans that are
not test cases. This pastes each check volume, voxel for voxel, back into the scan it was cut from
(the chest CT at the same 3 mm slices; example_ct with all its slices), so that the lesions, their
labels and the voxels inside the crop are those of the check set, and everything outside is the
source scan. It checks that the source matches the check volume wherever no lesion was inserted
(a wrong grid or a changed package fails loudly). The result is the test split of an nnU-Net style
folder (``diffusionseg evaluate MODEL OUT --split test --task lung``); written to a temporary
sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.bench import data as benchdata  # noqa: E402
from DiffusionSegLib.bench import realdata  # noqa: E402
from DiffusionSegLib.core.files import staged_folder  # noqa: E402

# check case -> (source file in the TotalSegmentator sdist, True where the check set's builder kept
# only the chest CT's 3 mm slices, bench.data.chest_slices)
SOURCES = {"check_chest": (benchdata.CHEST_CT, True), "check_base": (benchdata.BASE_CT, False)}


def source_scan(path: Path, thinned: bool) -> sitk.Image:
    """The source CT as the check set's builder read it."""
    ct = sitk.ReadImage(str(path))
    return benchdata.chest_slices(ct) if thinned else ct


def build(bench: Path, out: Path) -> list[dict[str, str]]:
    """Write ``out`` (imagesTs/labelsTs/dataset.json) from ``bench``'s check set; returns the test list."""
    check_dir = benchdata.lung_check_dir(bench)
    ts = realdata.ARCHIVES["totalsegmentator"]
    with staged_folder(out) as staging:
        with tempfile.TemporaryDirectory(prefix="diffusionseg-fullfov-val-") as tmp:
            src = realdata.extract_members(realdata.fetch_package("totalsegmentator"), ts.root,
                                           tuple(f for f, _ in SOURCES.values()), Path(tmp))
            cases, info = {}, {}
            for case, (member, thinned) in SOURCES.items():
                whole = source_scan(src / member, thinned)
                image, label = benchdata.paste_crop(whole, sitk.ReadImage(str(check_dir / "imagesTs" / f"{case}.nii.gz")),
                                                    sitk.ReadImage(str(check_dir / "labelsTs" / f"{case}.nii.gz")), case)
                cases[f"{case}_whole"] = (image, label)
                info[f"{case}_whole"] = {"check_case": case, "source": member, "size": list(image.GetSize()),
                                         "spacing": [round(s, 3) for s in image.GetSpacing()],
                                         "slices": f"every {benchdata.CHEST_SLICE_MM:g} mm" if thinned else "all"}
        test = benchdata.write_test_split(staging, cases, "lung", {
            "name": "Lung check lesions in whole scans (validation)",
            "note": "SYNTHETIC lesions (the benchmark's lung check set, seeds not used in training) pasted back "
                    "into the uncropped scans they were cut from: same patients as the lung training anatomy. "
                    "For choosing whole-scan filters; not a test set.",
            **benchdata.LESION_CT_META,
            "source": {"package": ts.requirement, "sha256": ts.sha256}, "cases": info,
            "command": f"python3 scripts/make_lung_full_fov_validation.py --bench {bench} --out {out}"})
    return test


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, default=Path("data/bench"), help="the prepared benchmark folder")
    p.add_argument("--out", type=Path, default=Path("data/lung_full_fov_val"))
    args = p.parse_args(argv)
    return benchdata.run_builder(lambda: build(args.bench, args.out), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
