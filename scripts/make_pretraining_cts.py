"""Collect the unlabelled CT volumes for 3D pretraining (issue 15) into one folder.

    python scripts/make_pretraining_cts.py --out data/pretrain_ct [--organs data/organs_multi]

Every CT the packages of ../shared/DATA.md provide, except the organ benchmark's held-out cases:
- the training slabs of TotalSegmentator's ``example_ct`` (from the organ dataset's imagesTr, its
  validation slab left out), one patient;
- TotalSegmentator's ``aorta_report/example_ct.nii.gz`` (a chest/abdomen CT of another patient; the
  ``pulmonary_report`` and ``ct_cropped`` files are crops of it and are not added again);
- pyradiomics' ``lung1`` and ``lung2`` chest CTs (two more patients; only the images, no labels).
The contrast-enhanced ``example_ct_dicom`` (the organ test case) is never added. Reads the sdists
from ~/.cache/diffusionseg/data (``diffusionseg bench --suite real`` or DATA.md's pip commands put them there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "diffusionseg" / "data"
MEMBERS = {
    "totalsegmentator-2.18.0.tar.gz": {
        "totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz": "totalseg_aorta_report_ct.nii.gz"},
    "pyradiomics_bhklab-3.1.4.tar.gz": {
        "pyradiomics_bhklab-3.1.4/data/lung1_image.nrrd": "pyradiomics_lung1.nrrd",
        "pyradiomics_bhklab-3.1.4/data/lung2_image.nrrd": "pyradiomics_lung2.nrrd"},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--organs", type=Path, default=Path("data/organs_multi"),
                   help="the organ dataset (scripts/make_organ_dataset.py): its training slabs are added")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    meta = json.loads((args.organs / "dataset.json").read_text())
    held_out = {Path(v["image"]).name for v in meta.get("validation", [])}
    for image in sorted((args.organs / "imagesTr").glob("*.nii.gz")):
        if image.name not in held_out:
            shutil.copyfile(image, args.out / image.name)
            written.append(image.name)
    for archive, members in MEMBERS.items():
        path = CACHE / archive
        if not path.is_file():
            raise SystemExit(f"{path} is missing: fetch it as ../shared/DATA.md says")
        with tarfile.open(path) as tar:
            for member, name in members.items():
                source = tar.extractfile(member)
                if source is None:
                    raise SystemExit(f"{member} not found in {archive}")
                partial = args.out / (name + ".partial")
                with open(partial, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                partial.replace(args.out / name)
                written.append(name)
    print(json.dumps({"out": str(args.out), "volumes": written}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
