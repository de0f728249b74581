"""scripts/describe_lesion_pieces.py: one line per piece of a fused mask, with hand-known numbers."""

import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from helpers import REPO


def _write(array, path, spacing=(3.0, 3.0, 5.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_pieces_are_described_against_the_reference_the_lungs_and_the_samples(tmp_path):
    ct = np.full((6, 64, 64), -1000.0, np.float32)
    ct[:, 8:56, 4:60] = 40.0
    ct[:, 16:48, 10:28] = -850.0  # two lungs, 155 mL each
    ct[:, 16:48, 36:54] = -850.0
    label = np.zeros(ct.shape, np.uint8)
    label[2:4, 20:24, 12:16] = 1
    fused = label.copy()  # the lesion, in the lung
    fused[1, 52:55, 40:44] = 1  # body wall below the lungs' hull, one slice
    probability = fused * np.float32(0.6)
    probability[2, 21, 13] = 1.0
    _write(ct, tmp_path / "ct.nii.gz")
    _write(label, tmp_path / "label.nii.gz")
    (tmp_path / "out").mkdir()
    _write(fused, tmp_path / "out" / "fused.nii.gz")
    _write(probability, tmp_path / "out" / "probability_lesion.nii.gz")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "describe_lesion_pieces.py"), str(tmp_path / "out"),
                           str(tmp_path / "ct.nii.gz"), str(tmp_path / "label.nii.gz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "2 pieces, 44 voxels; reference 32 voxels"
    # Pieces are numbered in raster order: the body-wall piece (slice 1) comes first.
    assert lines[1] == ("piece 1: 12 voxels, slices 1-1, reference 0, in lung mask 0.00, in region 0.00,"
                        " most samples 0.60")
    assert lines[2] == ("piece 2: 32 voxels, slices 2-3, reference 32, in lung mask 1.00, in region 1.00,"
                        " most samples 1.00")
    assert lines[3] == "reference in lung mask 1.000, in region 1.000"
