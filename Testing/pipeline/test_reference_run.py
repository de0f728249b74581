"""Same seed, same masks: the bundled MedSegDiff organ model on the bundled sample against a stored run.

Testing/data/reference_run_ct_abdomen_organs_2d.npz is made by scripts/make_reference_run.py (see
Testing/data/README.md for its history). Any change to preprocessing, the sampler's
noise, the network, the ensemble or DenseCRF that moves a voxel fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import REPO
from DiffusionSegLib.pipeline.segment import segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings

REFERENCE = REPO / "Testing" / "data" / "reference_run_ct_abdomen_organs_2d.npz"
SAMPLE = REPO / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"
MODEL = REPO / "Resources" / "Models" / "ct_abdomen_organs_2d"


def test_the_bundled_model_draws_the_stored_reference_masks():
    pytest.importorskip("pydensecrf")  # the reference's CRF ran with the pydensecrf backend
    reference = np.load(REFERENCE)
    samples = np.unpackbits(reference["samples"])[: int(np.prod(reference["samples_shape"]))]
    samples = samples.reshape(tuple(reference["samples_shape"]))
    image = sitk.ReadImage(str(SAMPLE))[:, :, 8:11]
    result = segment_image(image, MODEL, SegmentSettings(samples=3, steps=3, seed=7, crf=True,
                                                         crf_backend="pydensecrf", keep_samples=True, device="cpu"))
    assert result.samples.shape == samples.shape == (3, 9, 3, 333, 333)
    # Identical on this machine (1 and 2 threads). Another CPU's kernels may round a network output
    # differently and flip a voxel that sits exactly at 0.5: allow one in 100,000, no more.
    for name, got, want in (("samples", result.samples, samples), ("fused", result.fused, reference["fused"]),
                            ("crf", result.refined, reference["refined"])):
        differ = int(np.count_nonzero(got != want))
        assert differ <= want.size // 100_000, f"{name}: {differ} of {want.size} voxels differ from the reference"
