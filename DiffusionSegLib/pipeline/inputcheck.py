"""Before the long work: does the input fit the model, and how long will the run take?

:func:`check_input` compares an image with what the model card says the model was trained on
(modality, intensity scale, spacing, field of view, channels) and returns plain-language
:class:`InputWarning` s. It runs in well under a second, before any sampling, in the CLI and in the
Slicer panel (which imports this module in its UI process: numpy and SimpleITK only, no torch).

The modality comes from the DICOM Modality tag when the image carries it (SimpleITK metadata key
``0008|0060``); otherwise from intensity statistics: a CT in Hounsfield units has air near -1000 HU
and nearly every voxel within -1024..3071, which MR volumes and PNG/JPEG pictures do not have
(``pipeline.modality``, which preprocessing uses too; its names are re-exported here). A model of
several modalities (a ``by_modality`` normalization, ``card.modality`` written ``"CT+MR"``) takes
every modality it has a normalization entry for.

:class:`RunEstimate` turns a measured cost of one network evaluation into the announced run time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.pipeline.modality import (AIR_HU, MODALITY_TAG, IntensityStats, dicom_modality,
                                            input_modality, intensity_stats, not_ct_reason)

# Readable names of the DICOM Modality codes a user is likely to feed in.
_MODALITY_NAMES = {"CT": "CT", "MR": "MR", "PT": "PET", "US": "ultrasound", "CR": "radiograph",
                   "DX": "radiograph", "MG": "mammogram", "XA": "angiogram", "NM": "nuclear medicine",
                   "OT": "other", "SC": "secondary capture (screenshot)", "XC": "photograph",
                   "SM": "microscopy slide", "ES": "endoscopy"}
_FOV_MAX_MM = 1000.0  # no body cross-section is wider: larger means a spacing in the wrong unit
_FOV_MIN_MM = 64.0  # smallest sensible view when the card states no training crop
# An input narrower than the training crop leaves the model less context than it learned with: on
# lesion-centred crops of the lung checks the unified lung task (128 mm crops) lost 0.11 Dice at 80 mm
# against 130 mm, the lung model (192 mm crops) 0.12 at 130 mm against 200 mm and everything at 80 mm
# (docs/BENCHMARKS.md, "A small field of view").
_FOV_CROP_SHARE = 1.0
_BODY_MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class InputWarning:
    """One way the input does not fit the model: a stable ``code`` and a message for people.

    Codes: ``modality``, ``intensity``, ``spacing``, ``field_of_view``, ``channels``.
    """

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class InputMismatchError(DiffusionSegError):
    """Raised instead of running when warnings are refusals (``--strict``); holds every warning."""

    def __init__(self, warnings: list[InputWarning]):
        self.warnings = list(warnings)
        super().__init__("; ".join(w.message for w in self.warnings) or "the input does not fit the model")


def spacing_is_unknown(image: Any) -> bool:
    """True when the image carries no geometry: spacing 1, origin 0, identity direction.

    That is what SimpleITK reports for PNG/JPEG (which store no spacing) and for arrays saved without
    geometry. A real scan at exactly 1 mm also sitting at the origin with identity axes is rare
    enough that the warning is worth its occasional false alarm.
    """
    dim = image.GetDimension()
    return (all(s == 1.0 for s in image.GetSpacing()) and all(o == 0.0 for o in image.GetOrigin())
            and tuple(image.GetDirection()) == tuple(np.eye(dim).ravel()))


def _modality_name(code: str) -> str:
    name = _MODALITY_NAMES.get(code, code)
    return code if name == code else f"{code} ({name})"


def _model_modalities(card: Any) -> set[str]:
    """The modalities the model takes: the entries of a ``by_modality`` normalization (``{"CT", "MR"}``),
    else ``card.modality`` (``"CT+MR"`` read as both)."""
    normalization = card.normalization or {}
    if normalization.get("kind") == "by_modality":
        entries = {str(name).upper() for name, value in normalization.items() if isinstance(value, dict)}
        if entries:
            return entries
    return {code.strip() for code in (card.modality or "").upper().split("+") if code.strip()}


def _check_modality(image: Any, card: Any) -> list[InputWarning]:
    models = _model_modalities(card)
    model = "+".join(sorted(models))
    tag = dicom_modality(image)
    scalar = image.GetNumberOfComponentsPerPixel() == 1
    if tag and models & set(_BODY_MODALITIES) and tag not in models:
        return [InputWarning("modality", f"the image is {_modality_name(tag)} (DICOM Modality tag) but the model "
                                         f"'{card.name}' was trained on {model}: its masks would be meaningless")]
    if not scalar:
        return []  # colour pictures: the channel check speaks for them
    if "CT" in models:
        reason = not_ct_reason(intensity_stats(image))
        if reason is None:
            return []
        if tag == "CT":
            return [InputWarning("intensity", f"the image says CT (DICOM Modality tag) but its values are not "
                                              f"Hounsfield units: {reason}")]
        if models != {"CT"}:
            return []  # not CT: the model's other modality (an untagged MR) takes it
        return [InputWarning("modality", f"the model '{card.name}' expects CT in Hounsfield units, but this "
                                         f"image does not look like CT: {reason}")]
    if models == {"MR"} and not tag:
        stats = intensity_stats(image)
        if not_ct_reason(stats) is None and stats.low <= AIR_HU and stats.air >= 0.01:
            return [InputWarning("modality", f"the intensities look like CT (air at {stats.low:g}, Hounsfield "
                                             f"units) but the model '{card.name}' was trained on MR")]
    return []


def _check_channels(image: Any, card: Any) -> list[InputWarning]:
    have, want = image.GetNumberOfComponentsPerPixel(), card.in_channels
    if have == want:
        return []
    if have == 3 and want == 1 and _grey_rgb(image):
        return []  # a grey picture saved as RGB: preprocessing takes one of its identical channels
    kinds = {1: "greyscale", 3: "RGB colour"}
    return [InputWarning("channels", f"the model '{card.name}' takes {want} channel{'s' if want != 1 else ''} "
                                     f"({card.modality}), the image has {have} ({kinds.get(have, 'vector')})")]


def _grey_rgb(image: Any) -> bool:
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    return bool(np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]))


def _in_plane_extent_mm(image: Any, card: Any) -> list[float]:
    """Physical extent (mm) of the image along the axes the model sees at once.

    2D model on a volume: the two in-slice axes after the card's reorientation (exact permutation,
    no resampling); 2D image or 3D model: every axis.
    """
    from DiffusionSegLib.pipeline.preprocess import orient

    if image.GetDimension() == 3 and card.spatial_dims == 2:
        oriented = orient(image, card)
        extent = [n * s for n, s in zip(oriented.GetSize(), oriented.GetSpacing())]  # SimpleITK (x, y, z)
        through = 2 - card.slice_axis if card.slice_axis in (0, 1, 2) else 2  # numpy axis k = sitk axis 2-k
        return [e for i, e in enumerate(extent) if i != through]
    return [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]


def _training_view_mm(card: Any) -> float | None:
    """Width (mm) of the crops the model was trained on, when the card says (patch size x spacing)."""
    if not card.patch_size or not card.spacing:
        return None
    return float(min(p * s for p, s in zip(card.patch_size, card.spacing)))


def _check_geometry(image: Any, card: Any) -> list[InputWarning]:
    if card.spacing is None:
        return []  # the model works on the pixel grid as given (photos): no physical scale to check
    model_mm = " x ".join(f"{s:g}" for s in card.spacing)
    if spacing_is_unknown(image):
        return [InputWarning("spacing", f"the image has no pixel spacing (PNG/JPEG and plain arrays carry none, so "
                                        f"1 mm per pixel is assumed); the model works at {model_mm} mm, so it sees "
                                        f"the anatomy at the wrong size and the volumes in mL are wrong")]
    if not _model_modalities(card) & set(_BODY_MODALITIES):
        return []
    try:
        extent = _in_plane_extent_mm(image, card)
    except DiffusionSegError:
        return []  # a shape the model refuses anyway: preprocessing says why
    shown = " x ".join(f"{e:.0f}" for e in extent)
    upper = _FOV_MAX_MM if card.spatial_dims == 2 else 2 * _FOV_MAX_MM
    if max(extent) > upper:
        spacing = ", ".join(f"{s:g}" for s in image.GetSpacing())
        return [InputWarning("field_of_view", f"the image covers {shown} mm, larger than any body: is its "
                                              f"spacing ({spacing}) really in mm and not in another unit?")]
    view = _training_view_mm(card)
    lower = _FOV_CROP_SHARE * view if view else _FOV_MIN_MM
    if max(extent) < lower:
        if view:
            return [InputWarning("field_of_view", f"the image covers only {shown} mm, less than the {view:.0f} mm "
                                                  f"views of {card.modality} slices the model was trained on: it "
                                                  f"sees less context than it learned with, and its masks may miss "
                                                  f"or cut lesions; give it a wider field of view")]
        return [InputWarning("field_of_view", f"the image covers only {shown} mm; the model was trained on whole "
                                              f"{card.modality} slices, so a crop this small leaves it too little "
                                              f"context")]
    return []


def check_input(image: Any, card: Any) -> list[InputWarning]:
    """Everything about ``image`` (SimpleITK) that does not fit ``card`` (ModelCard); [] when all fits.

    Pure: reads the image and the card only. Fails on nothing the model could still run on; an input
    the model cannot take at all (wrong dimension) is left to preprocessing, which refuses it.
    """
    found = _check_channels(image, card)
    found += _check_modality(image, card)
    found += _check_geometry(image, card)
    return found


# --- Run-time estimate ------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """"40 s", "3 min", "2.5 h": the precision an estimate deserves."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    hours = seconds / 3600
    return f"{hours:.1f} h" if hours < 10 else f"{round(hours)} h"


@dataclass(frozen=True)
class RunEstimate:
    """Announced sampling time: network evaluations x measured seconds per evaluation.

    ``items`` are the slices (2D model) or patches (3D model) of the input; one network evaluation
    is one item through the network once. The probe that measures ``seconds_per_evaluation`` runs
    on the same device and input size, so the figure is this machine's, not a catalogue's.
    """

    samples: int
    steps: int
    items: int
    seconds_per_evaluation: float
    device: str
    item_kind: str = "slices"
    source: str = "measured here"  # where seconds_per_evaluation comes from, in words

    @property
    def network_evaluations(self) -> int:
        return self.samples * self.steps * self.items

    @property
    def seconds(self) -> float:
        return self.network_evaluations * self.seconds_per_evaluation

    def text(self) -> str:
        """e.g. "about 3 min on cpu (5 samples x 10 steps x 20 slices = 1000 network evaluations)"."""
        item = self.item_kind if self.items != 1 else self.item_kind.rstrip("s")
        return (f"about {format_duration(self.seconds)} on {self.device} ({self.samples} samples x {self.steps} "
                f"steps x {self.items} {item} = {self.network_evaluations} network evaluations, "
                f"{self.seconds_per_evaluation:.3g} s each, {self.source})")

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 2), "network_evaluations": self.network_evaluations,
                "seconds_per_network_evaluation": round(self.seconds_per_evaluation, 6), "device": self.device,
                "text": self.text()}


def model_grid_items(image: Any, card: Any) -> tuple[int, int]:
    """(items, pixels per item) the model will see for ``image``: slices and their size on the
    model grid (2D models), or one volume (3D models). Padding is ignored: an estimate, not a plan.

    Lets the Slicer panel scale a speed measured on one input to another before anything runs.
    """
    from DiffusionSegLib.pipeline.preprocess import model_spacing, orient

    oriented = orient(image, card)
    spacing = model_spacing(oriented, card)
    size = [max(1, math.ceil(n * s / t)) for n, s, t in zip(oriented.GetSize(), oriented.GetSpacing(), spacing)]
    if card.spatial_dims == 3 or oriented.GetDimension() == 2:
        return 1, int(np.prod(size))
    through = 2 - card.slice_axis
    items = size[through]
    return items, int(np.prod(size)) // items


__all__ = ["InputWarning", "InputMismatchError", "check_input", "dicom_modality", "input_modality",
           "spacing_is_unknown", "intensity_stats", "IntensityStats", "RunEstimate", "format_duration",
           "model_grid_items", "MODALITY_TAG"]
