"""Leave-one-patient-out lung lesion datasets (issue 13): real tumour anatomy in training.

    python3 scripts/make_lung_lopo_dataset.py --bench data/bench --held-out lung1 --out data/lung_lopo_lung1
    python3 scripts/make_lung_lopo_dataset.py --bench data/bench --held-out none --out data/lung_lopo_all

The benchmark's lung set (``diffusionseg bench --suite real --prepare-only --data data/bench``) trains
on SYNTHETIC lesions in two patients only (example_ct, aorta_report), so a model meets a third
patient's vessels and pleura for the first time at test. Here every real pyradiomics lung case that is
not held out joins training, with its REAL tumour labelled: once as it is, and in ``--realisations``
copies that also carry ``--lesions`` synthetic lesions inserted into its HU-threshold lung mask (kept
``--margin-mm`` clear of the real tumour, the benchmark's lesion design). The real cases come cropped
to the lungs as in the benchmark, or uncropped with ``--real-cases data/lung_full_fov``. The held-out real case is the
only test case; ``--held-out none`` puts both real cases in training (the model to ship; its test is
the cases nobody here has).

Folder (nnU-Net style, the benchmark's files copied, never modified):
    imagesTr/labelsTr   the 5 synthetic training volumes + the real case(s) and their realisations
    imagesVal/labelsVal the benchmark's two synthetic check volumes (the validation split)
    imagesTs/labelsTs   the held-out real case (absent with --held-out none)
Written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.bench.data import image_like, to_int16  # noqa: E402
from DiffusionSegLib.pipeline.regions import threshold_lung_mask  # noqa: E402
from DiffusionSegLib.bench.synthetic_lesions import LesionDesign, insert_lesions  # noqa: E402

REAL_CASES = ("lung1", "lung2")


def _copy(src_root: Path, images: str, labels: str, case: str, dst_root: Path, dst_images: str,
          dst_labels: str) -> dict[str, str]:
    for src, dst in ((images, dst_images), (labels, dst_labels)):
        (dst_root / dst).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / src / f"{case}.nii.gz", dst_root / dst / f"{case}.nii.gz")
    return {"image": f"./{dst_images}/{case}.nii.gz", "label": f"./{dst_labels}/{case}.nii.gz"}


def realisations(image: sitk.Image, label: sitk.Image, count: int, lesions: int, margin_mm: float,
                 seed: int, design: LesionDesign) -> list[tuple[sitk.Image, sitk.Image, dict]]:
    """``count`` copies of a real case with synthetic lesions added in its lung, away from the real tumour.

    Arrays (z, y, x); the label of each copy is the real tumour OR the synthetic lesions."""
    ct = sitk.GetArrayFromImage(image).astype(np.float32)
    tumour = sitk.GetArrayFromImage(label) > 0
    spacing = tuple(reversed(image.GetSpacing()))
    lung = threshold_lung_mask(ct, spacing)
    radius = [max(1, int(np.ceil(margin_mm / s))) for s in spacing]  # at least margin_mm on every axis
    keep_out = ndimage.binary_dilation(tumour, np.ones([2 * r + 1 for r in radius], bool))
    out = []
    for k in range(count):
        result = insert_lesions(ct, lung & ~keep_out, spacing, lesions, seed + k, design)
        merged = (tumour | (result.mask > 0)).astype(np.uint8)
        out.append((image_like(to_int16(result.ct), image, sitk.sitkInt16), image_like(merged, image, sitk.sitkUInt8),
                    {"seed": seed + k, "lesions": result.summary()}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, default=Path("data/bench"))
    p.add_argument("--held-out", required=True, choices=[*REAL_CASES, "none"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--realisations", type=int, default=3, help="copies of each real training case with synthetic lesions")
    p.add_argument("--lesions", type=int, default=6, help="synthetic lesions requested per copy")
    p.add_argument("--margin-mm", type=float, default=15.0, help="synthetic lesions stay this far from the real tumour")
    p.add_argument("--seed", type=int, default=500)
    p.add_argument("--real-cases", type=Path, default=None,
                   help="folder whose imagesTs/labelsTs hold the real cases (default: the benchmark's, cropped "
                        "to the lungs; data/lung_full_fov from scripts/make_lung_full_fov_test.py: uncropped)")
    args = p.parse_args(argv)
    lungs, checks = args.bench / "lung_lesions", args.bench / "lung_synthetic_check"
    real = args.real_cases or lungs
    for needed in (lungs / "dataset.json", checks / "dataset.json", real / "dataset.json"):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: run `diffusionseg bench --suite real --prepare-only --data {args.bench}`")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: remove it first")
    source = json.loads((lungs / "dataset.json").read_text())
    design = LesionDesign(**{k: tuple(v) if isinstance(v, list) else v for k, v in source["lesion_design"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}.tmp-"))
    try:
        training, info = [], {}
        for entry in source["training"]:
            case = Path(entry["image"]).name.split(".")[0]
            training.append(_copy(lungs, "imagesTr", "labelsTr", case, staging, "imagesTr", "labelsTr"))
        for n, case in enumerate(c for c in REAL_CASES if c != args.held_out):
            training.append(_copy(real, "imagesTs", "labelsTs", case, staging, "imagesTr", "labelsTr"))
            image = sitk.ReadImage(str(real / "imagesTs" / f"{case}.nii.gz"))
            label = sitk.ReadImage(str(real / "labelsTs" / f"{case}.nii.gz"))
            for k, (img, lab, meta) in enumerate(realisations(image, label, args.realisations, args.lesions,
                                                              args.margin_mm, args.seed + 100 * n, design)):
                name = f"{case}_synth_r{k}"
                sitk.WriteImage(img, str(staging / "imagesTr" / f"{name}.nii.gz"), True)
                sitk.WriteImage(lab, str(staging / "labelsTr" / f"{name}.nii.gz"), True)
                training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
                info[name] = {"real_case": case, **meta}
        validation = [_copy(checks, "imagesTs", "labelsTs", Path(e["image"]).name.split(".")[0], staging,
                            "imagesVal", "labelsVal") for e in json.loads((checks / "dataset.json").read_text())["test"]]
        test = [] if args.held_out == "none" else [
            _copy(real, "imagesTs", "labelsTs", args.held_out, staging, "imagesTs", "labelsTs")]
        (staging / "dataset.json").write_text(json.dumps({
            "name": f"Lung lesions, leave-one-patient-out (held out: {args.held_out})",
            "note": "Training: SYNTHETIC lesions in example_ct and aorta_report, plus the REAL pyradiomics lung "
                    "tumour(s) not held out, as they are and with synthetic lesions added in their lungs "
                    f"(real cases from {real}). "
                    "Validation: the benchmark's synthetic check volumes (training anatomy). Test: the held-out "
                    "REAL tumour.",
            "modality": {"0": "CT"}, "labels": {"0": "background", "1": "lesion"}, "tensorImageSize": "3D",
            "lesion_design": asdict(design), "realisations": info,
            "command": "python3 scripts/make_lung_lopo_dataset.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "numTraining": len(training), "numTest": len(test),
            "training": training, "validation": validation, "test": test}, indent=1) + "\n")
        staging.rename(args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out}: {len(training)} training, {len(validation)} validation, {len(test)} test cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
