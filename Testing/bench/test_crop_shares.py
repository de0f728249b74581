"""scripts/crop_shares.py: the share of the slice a crop to the lungs would leave out, known by hand."""

import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from helpers import REPO


def test_each_image_gets_its_box_and_the_share_left_out(tmp_path):
    ct = np.full((6, 64, 64), -1000.0, np.float32)
    ct[:, 8:56, 4:60] = 40.0
    ct[:, 16:48, 10:28] = -850.0  # two lungs: hull rows 16-47, columns 10-53
    ct[:, 16:48, 36:54] = -850.0
    folder = tmp_path / "data" / "imagesTs"
    folder.mkdir(parents=True)
    for name, array in (("chest.nii.gz", ct), ("body.nii.gz", np.where(ct < -900, ct, 40.0))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((3.0, 3.0, 5.0))
        sitk.WriteImage(image, str(folder / name))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "crop_shares.py"), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Sorted by name. The hull grown 10 mm = 3 pixels: rows 13-50, columns 7-56, 50 x 38 of 64 x 64,
    # 1 - 1900 / 4096 = 0.536 left out. No lungs in the body-only image.
    assert done.stdout.splitlines() == ["body.nii.gz: 64 x 64, region lungs not found (no lungs found)",
                                        "chest.nii.gz: 64 x 64, box 50 x 38, removed 0.536"]
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "crop_shares.py"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
