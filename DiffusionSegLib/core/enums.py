"""The closed sets of the library, spelled once.

Each member is also its plain string (``Sampler.DDIM == "ddim"``), so model cards, report.json and
command lines keep their spelling and old files still read. The methods are not here: the method
registry (``methods.registry.Method``) is the only list of them.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str-valued enum that prints and formats as its value (as Python 3.11's StrEnum does)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The members' spellings, in definition order (for help texts and argparse choices)."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls, value: str | "Choice", what: str) -> "Choice":
        """The member spelled ``value``; ValueError naming ``what`` and the allowed spellings otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {value!r} (use {', '.join(cls.values())})") from None


class Sampler(Choice):
    """How a diffusion chain is walked (``NONE``: a deterministic method's single forward pass)."""

    DDIM = "ddim"  # deterministic after x_T; short chains
    DDPM = "ddpm"  # ancestral: fresh noise at every step
    NONE = "none"


SAMPLER_DESCRIPTIONS = {
    Sampler.DDIM: "DDIM (deterministic after the first noise)",
    Sampler.DDPM: "DDPM (ancestral, random at every step)",
    Sampler.NONE: "none (supervised model: one forward pass)",
}


class PredictionType(Choice):
    """What a diffusion network predicts at (x_t, t); MONAI's spelling."""

    EPSILON = "epsilon"
    SAMPLE = "sample"  # the clean mask x0
    V_PREDICTION = "v_prediction"


PREDICTION_TARGETS = {
    PredictionType.SAMPLE: "clean mask (x0)",
    PredictionType.EPSILON: "added noise (epsilon)",
    PredictionType.V_PREDICTION: "velocity (v, a mix of noise and mask)",
}


class Fusion(Choice):
    """How the N sampled masks become one."""

    MEAN = "mean"  # mean of the binary samples > 0.5
    STAPLE = "staple"  # SimpleITK STAPLE posterior > 0.5


class Uncertainty(Choice):
    """The per-voxel uncertainty map of the sample mean p."""

    VARIANCE = "variance"  # p(1 - p), 0 to 0.25
    ENTROPY = "entropy"  # binary entropy in bits, 0 to 1


UNCERTAINTY_DEFINITIONS = {
    Uncertainty.VARIANCE: "variance p(1-p) of the sample mean p, 0 (samples agree) to 0.25",
    Uncertainty.ENTROPY: "binary entropy of the sample mean p in bits, 0 (samples agree) to 1",
}


class CrfMode(Choice):
    """How DenseCRF refines the samples.

    ``MEAN``: one DenseCRF of the fusion's soft map (the mean of the samples, or STAPLE's posterior
    with the STAPLE fusion). ``PUBLISHED``: DiffSeg's protocol, K = 3 rounds each on the average of
    H = 4 randomly chosen samples, the K refined masks averaged (> 0.5).
    """

    OFF = "off"
    MEAN = "mean"
    PUBLISHED = "published"


CRF_DESCRIPTIONS = {
    CrfMode.MEAN: "DenseCRF of the {fusion} fusion",
    CrfMode.PUBLISHED: "DenseCRF, DiffSeg protocol: 3 rounds on the mean of 4 random samples, averaged",
}


class CrfBackend(Choice):
    """The DenseCRF implementation (``AUTO``: pydensecrf when installed, else the torch mean field)."""

    AUTO = "auto"
    PYDENSECRF = "pydensecrf"  # Kraehenbuehl & Koltun's permutohedral lattice (a C++ build)
    TORCH_MEANFIELD = "torch-meanfield"  # the fallback without a compiler; runs on the GPU too


class Supervision(Choice):
    """What a method learns from: pixel masks, or image-level labels only (weakly supervised)."""

    MASKS = "masks"  # image + label map pairs (data.PatchSampler)
    IMAGE_LABELS = "image_labels"  # lesion / healthy per image or slice, never a mask (weak_labels)


class DifferenceThreshold(Choice):
    """How DiffSeg turns one difference map (of a whole input) into a mask.

    ``HEALTHY``: above the quantile of the differences on healthy validation slices at that noise
    level (calibrated after training; a healthy input then comes out nearly empty). ``OTSU``: Otsu's
    threshold of the map (always splits it, so a lesion-free input still gets a "lesion").
    ``OTSU_OVER_HEALTHY``: the larger of the two.
    """

    HEALTHY = "healthy"
    OTSU = "otsu"
    OTSU_OVER_HEALTHY = "otsu_over_healthy"


class Stage(Choice):
    """The stages of a segmentation run, in order, as progress reports name them.

    ``SAMPLING`` counts network evaluations (samples x steps x slices); the others count their own
    units. ``STARTING`` is the background job's state before the first report; ``WRITE`` is the CLI's.
    """

    STARTING = "starting"
    LOAD = "load"
    SAMPLING = "sampling"
    CRF = "crf"
    RESTORE = "restore"
    WRITE = "write"


class Region(Choice):
    """Anatomical regions a model card may confine a label's pieces to (pipeline/regions.py)."""

    LUNGS = "lungs"  # the chest cavity: per-slice hull of the lungs, grown by a margin
    BRAIN = "brain"  # the brain of a head MR: a brain template registered to it (pipeline/brain_atlas.py)
