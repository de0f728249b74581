"""The two real pyradiomics lung tumours at their full field of view (issue 13).

    python3 scripts/make_lung_full_fov_test.py --out data/lung_full_fov

The benchmark's lung test cases are cropped in-plane to the lungs plus 10 mm. A user loads the whole
scan: table, arms, back muscles and upper abdomen included, each a place for false positives that
the crop hides. This writes ``lung1`` and ``lung2`` as the pyradiomics files hold them (512 x 512,
original voxels, nothing cropped) as the test split of an nnU-Net style folder, so that
``diffusionseg evaluate MODEL data/lung_full_fov --split test`` scores a model the way it will be
used. Written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.bench import realdata  # noqa: E402
from DiffusionSegLib.core.files import staged_folder  # noqa: E402

CASES = ("lung1", "lung2")


def build(out: Path) -> list[dict[str, str]]:
    """Write ``out`` (imagesTs/labelsTs/dataset.json); returns the test list."""
    with staged_folder(out) as staging:
        with tempfile.TemporaryDirectory(prefix="diffusionseg-fullfov-") as tmp:
            pairs = realdata.build_lesion_cases(tmp)  # checks geometry and binary labels
            test = []
            for image_path, label_path in pairs:
                case = image_path.name.split("_image")[0]
                if case not in CASES:
                    continue
                for folder, path, pixel in (("imagesTs", image_path, sitk.sitkInt16),
                                            ("labelsTs", label_path, sitk.sitkUInt8)):
                    (staging / folder).mkdir(exist_ok=True)
                    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(path)), pixel),
                                    str(staging / folder / f"{case}.nii.gz"), True)
                test.append({"image": f"./imagesTs/{case}.nii.gz", "label": f"./labelsTs/{case}.nii.gz"})
        (staging / "dataset.json").write_text(json.dumps({
            "name": "Real lung tumours, full field of view",
            "note": "The two REAL pyradiomics lung tumours, uncropped (512 x 512, original voxels): the "
                    "benchmark's lung test cases before its in-plane crop to the lungs.",
            "modality": {"0": "CT"}, "labels": {"0": "background", "1": "lesion"}, "tensorImageSize": "3D",
            "source": {"package": realdata.ARCHIVES["pyradiomics"].requirement,
                       "sha256": realdata.ARCHIVES["pyradiomics"].sha256},
            "command": "python3 scripts/make_lung_full_fov_test.py --out " + str(out),
            "training": [], "test": test, "numTraining": 0, "numTest": len(test)}, indent=1))
    return test


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/lung_full_fov"))
    args = p.parse_args(argv)
    test = build(args.out)
    print(f"wrote {args.out}: {len(test)} test cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
