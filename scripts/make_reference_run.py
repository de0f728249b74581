"""Write Testing/data/reference_run_ct_abdomen_organs_2d.npz: the bundled model's masks for a fixed call.

    python scripts/make_reference_run.py

Run it only when a change is MEANT to move masks (a new bundled model, a new noise scheme) and say
so in the commit; Testing/pipeline/test_reference_run.py then guards every later change against it.
The call: bundled sample slices 8:11, 3 samples x 3 DDIM steps, seed 7, DenseCRF (pydensecrf), CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from DiffusionSegLib.pipeline.segment import segment_image  # noqa: E402
from DiffusionSegLib.pipeline.settings import SegmentSettings  # noqa: E402

image = sitk.ReadImage(str(ROOT / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"))[:, :, 8:11]
result = segment_image(image, ROOT / "Resources" / "Models" / "ct_abdomen_organs_2d",
                       SegmentSettings(samples=3, steps=3, seed=7, crf=True, crf_backend="pydensecrf",
                                       keep_samples=True, device="cpu"))
out = ROOT / "Testing" / "data" / "reference_run_ct_abdomen_organs_2d.npz"
partial = out.with_name(out.stem + ".partial.npz")  # renamed when complete: no half-written fixture
np.savez_compressed(partial, samples=np.packbits(result.samples), samples_shape=np.array(result.samples.shape),
                    fused=result.fused, refined=result.refined)
partial.replace(out)
print(f"wrote {out}: samples {result.samples.shape}, crf backend {result.report['crf_backend']}")
