"""The brain of a head MR, found by registering a bundled brain template to it.

Intensity classes cannot tell brain from the orbit and skull-base tissue on every kind of T1 (a
post-contrast T1 makes fat and marrow bright, a non-contrast T1 makes white matter bright too;
docs/BENCHMARKS.md, brain region). A template carries the brain's shape instead: the MNI ICBM 2009a
T1 template (skull-stripped, an average of 152 adults; ``Resources/Atlases``, made by
``scripts/make_brain_atlas.py``) is registered to the input with a rigid transform and Mattes mutual
information, and its brain (template intensity above ``BRAIN_LEVEL``) is carried onto the input's grid.

Rigid, not affine: the template has no skull or scalp, and with a scale the optimiser grows its brain
over the scalp (3.7 and 4.3 L on two heads), while the rigid fit followed the inner table of the skull.
The fit is refused (None, with the reason) when it cannot be trusted: a 2D image or a slab (under
``MIN_EXTENT_MM`` along an axis: the template's position along it is then a guess), a poor match
(final metric above ``MAX_METRIC``; the two whole validation heads measured -0.50 and -0.49, three
chest CTs -0.07 to -0.14: docs/BENCHMARKS.md), or too little brain in the field of view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.core.files import sha256_of

ATLAS_PATH = Path(__file__).resolve().parents[2] / "Resources" / "Atlases" / "mni_icbm152_2009a_brain_t1_3mm.nii.gz"
ATLAS_SHA256 = "3c22f35a127ae941d720e5291cfa76f6d6448a00e51914454bdc1fe18d14edb1"
ATLAS_SPACING_MM = 3.0
BRAIN_LEVEL = 5.0  # template intensity (0-255) above which a voxel is brain (0 outside the skull-stripped brain)
MIN_EXTENT_MM = 100.0
MAX_METRIC = -0.3
MIN_BRAIN_ML = 500.0


def downsample_template(template: sitk.Image, spacing_mm: float = ATLAS_SPACING_MM) -> sitk.Image:
    """A 3D template smoothed (Gaussian, sigma spacing/2) and resampled to ``spacing_mm`` isotropic,
    same origin and direction, rounded to uint8 (0-255): the bundled atlas."""
    if template.GetDimension() != 3:
        raise ValueError(f"the template must be 3D, got {template.GetDimension()}D")
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(template, sitk.sitkFloat32), spacing_mm / 2.0)
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(template.GetSize(), template.GetSpacing())]
    small = sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, template.GetOrigin(),
                          [spacing_mm] * 3, template.GetDirection(), 0.0, sitk.sitkFloat32)
    return sitk.Cast(sitk.Clamp(sitk.Round(small), sitk.sitkFloat32, 0.0, 255.0), sitk.sitkUInt8)


def load_atlas(path: Path = ATLAS_PATH, sha256: str | None = ATLAS_SHA256) -> sitk.Image:
    """The bundled template as float32; FileNotFoundError / ValueError when missing or not the file shipped."""
    if not path.is_file():
        raise FileNotFoundError(f"brain atlas missing: {path}")
    if sha256 is not None and sha256_of(path) != sha256:
        raise ValueError(f"brain atlas {path} is not the file shipped (sha256 differs)")
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def register_rigid(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Transform, float]:
    """Rigid (Euler 3D) transform mapping ``fixed`` points into ``moving``, and its final Mattes
    mutual-information metric (lower is better). Moments initialisation, three levels (shrink 4, 2, 1;
    smoothing 4, 2, 1 mm), every voxel in the metric, one thread: the same images give the same transform."""
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    # Every voxel of the 3 mm grid, not a random subset: ITK's threads draw random samples in an order
    # that varies from run to run, and with 20 % of the voxels the same head gave brains differing by up
    # to 14,963 voxels between runs (and the transform by up to 0.94 in a parameter).
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([4.0, 2.0, 1.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    # One ITK thread while it runs: the metric sums its per-thread parts in an order that varies, which
    # moved the brain found by up to 3 voxels between runs of the same head. The metric takes its thread
    # count from the global default, not from the method, so that is set here and restored (SimpleITK
    # filters that another thread starts meanwhile also get one thread: slower, not different); a single
    # thread cost 2.7 s against 1.95 s on brain2's head (2-core VM).
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        transform = method.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return transform, float(method.GetMetricValue())


def find_brain(image: sitk.Image, atlas: sitk.Image | None = None) -> tuple[np.ndarray | None, str]:
    """The brain of a 3D head MR on its grid: (bool array (z, y, x), "") or (None, why not).

    The input is smoothed and resampled to the atlas spacing for the registration (seconds, whatever
    its size); the template's brain is then resampled onto the input's own grid.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return None, "the brain atlas needs a 3D scalar image"
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    if min(extent) < MIN_EXTENT_MM:
        return None, (f"the image spans {min(extent):.0f} mm along one axis, under the {MIN_EXTENT_MM:.0f} mm "
                      "the brain atlas needs to be placed")
    if atlas is None:
        try:  # a damaged install: a note after the sampling, not a failed run that loses it
            atlas = load_atlas(ATLAS_PATH)
        except (OSError, ValueError) as err:
            return None, f"the brain atlas cannot be used ({err})"
    fixed = downsample_template(_rescaled(image), ATLAS_SPACING_MM)
    try:
        transform, metric = register_rigid(sitk.Cast(fixed, sitk.sitkFloat32), atlas)
    except RuntimeError as err:  # ITK gives up, e.g. a constant image or no overlap left
        return None, f"the brain atlas could not be registered ({str(err).strip().splitlines()[-1][:120]})"
    if metric > MAX_METRIC:
        return None, f"the brain atlas does not match the image (mutual information {metric:.2f} > {MAX_METRIC})"
    brain = sitk.Resample(sitk.Cast(atlas > BRAIN_LEVEL, sitk.sitkFloat32), image, transform, sitk.sitkLinear, 0.0)
    mask = sitk.GetArrayFromImage(brain) > 0.5
    brain_ml = float(mask.sum()) * float(np.prod(image.GetSpacing())) / 1000.0
    if brain_ml < MIN_BRAIN_ML:
        return None, f"only {brain_ml:.0f} mL of the registered brain atlas lies in the image"
    return mask, ""


def _rescaled(image: sitk.Image) -> sitk.Image:
    """``image`` as float32 mapped to 0-255 between its 0.5th and 99.5th percentiles, so any MR unit
    fills the same histogram bins as the template."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    scaled = sitk.ShiftScale(sitk.Cast(image, sitk.sitkFloat32), -low, 255.0 / max(high - low, 1e-6))
    return sitk.Clamp(scaled, sitk.sitkFloat32, 0.0, 255.0)
