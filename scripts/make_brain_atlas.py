"""The bundled brain atlas: nilearn's MNI ICBM 2009a T1 brain template at 3 mm (pipeline/brain_atlas.py).

    python3 scripts/make_brain_atlas.py [--out Resources/Atlases]

Takes the template (1 mm, skull-stripped, uint8) from the pinned nilearn sdist (``bench.realdata``,
fetched from PyPI into the data cache once), smooths it (Gaussian, sigma 1.5 mm), resamples it to 3 mm
isotropic and writes it as uint8 NIfTI with its copyright notice. Prints the file's sha256, which
``brain_atlas.ATLAS_SHA256`` must equal. Each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.bench import realdata  # noqa: E402
from DiffusionSegLib.core.files import atomic_write_bytes, sha256_of  # noqa: E402
from DiffusionSegLib.pipeline.brain_atlas import ATLAS_PATH, ATLAS_SPACING_MM, downsample_template  # noqa: E402

NOTICE = """The brain atlas in this folder ({name}) is the MNI ICBM 2009a symmetric T1 template
(skull-stripped, as shipped in nilearn {version}'s sdist: {member}), smoothed and resampled to 3 mm
by scripts/make_brain_atlas.py. DiffusionSeg registers it to a head MR to find the brain
(DiffusionSegLib/pipeline/brain_atlas.py).

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Use, copying, modification and distribution are permitted provided
this copyright notice appears in all copies; the authors and McGill University make no
representations about its suitability for any purpose, and it is provided "as is" without express
or implied warranty.

Reference: V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli, D.L. Collins, "Unbiased nonlinear
average age-appropriate brain templates from birth to adulthood", NeuroImage 47, S102 (2009).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ATLAS_PATH.parent, help="folder for the atlas and its NOTICE")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffusionseg-atlas-") as tmp:
        template = sitk.ReadImage(str(realdata.extract_brain_template(tmp)))
        atlas = downsample_template(template, ATLAS_SPACING_MM)
        staged = Path(tmp) / ATLAS_PATH.name
        sitk.WriteImage(atlas, str(staged), True)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out / ATLAS_PATH.name, staged.read_bytes())
    archive = realdata.ARCHIVES["nilearn"]
    atomic_write_bytes(args.out / "NOTICE.txt", NOTICE.format(name=ATLAS_PATH.name, version=archive.requirement,
                                                              member=realdata.MNI_T1).encode())
    print(f"wrote {args.out / ATLAS_PATH.name}: size {atlas.GetSize()}, sha256 {sha256_of(args.out / ATLAS_PATH.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
