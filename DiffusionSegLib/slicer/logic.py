"""The module's logic that is not Qt and not the run itself: settings, dependencies, GPU, models, progress text.

The run is :class:`DiffusionSegLib.slicer.workflow.SegmentationWorkflow`; the Slicer module's
``DiffusionSegLogic`` holds one (``logic.workflow``, made by :func:`new_workflow`) and the panel
(:mod:`DiffusionSegLib.slicer.widget`) calls it directly. What is here is what the panel needs besides
running, written without Qt so that pytest checks it on a slicer-core install:

- :func:`settings_from_parameters`: the module's parameter node -> :class:`SegmentSettings` (one step).
- :func:`missing_dependencies`, :func:`ensure_dependencies`: the packages the child needs, installed
  after asking (torch through the PyTorch extension, the rest with Slicer's pip helpers).
- :func:`gpu_available` and :func:`device_note`: say so when no GPU will be used.
- :func:`available_models`, :func:`install_model`, :func:`download_model`, :func:`clear_models`.
- :func:`stored_speed`, :func:`speed_setting`: the sampling speed remembered between sessions.
- :func:`progress_percent`, :func:`stage_text`: the progress bar and status line of a run.

No ``qt``, ``ctk`` or ``slicer`` import at file scope: the Slicer helpers (pip, dialogs, PyTorchUtils)
are imported inside the functions that use them, which only run inside Slicer.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from DiffusionSegLib.core.enums import CrfMode, Stage
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.slicer.job import JobStatus
from DiffusionSegLib.slicer.workflow import MeasuredSpeed, SegmentationWorkflow

log = logging.getLogger(__name__)

# QSettings group of the sampling speed measured by earlier runs, per model and device setting: the
# time estimate next to Apply comes from it, so it survives Slicer restarts.
SPEED_SETTINGS_GROUP = "DiffusionSeg/SecondsPerPixelEvaluation"

# Overall progress (percent) when a stage starts; sampling dominates the run time, so it gets 5-90.
STAGE_PERCENT: dict[Stage, int] = {Stage.STARTING: 0, Stage.LOAD: 2, Stage.SAMPLING: 5, Stage.CRF: 90,
                                   Stage.RESTORE: 95, Stage.WRITE: 97}
_SAMPLING_SPAN = STAGE_PERCENT[Stage.CRF] - STAGE_PERCENT[Stage.SAMPLING]


def _(text: str) -> str:
    """Slicer's translation of ``text`` inside Slicer; the text itself elsewhere (pytest, scripts)."""
    try:
        from slicer.i18n import tr
    except ImportError:  # slicer-core and plain Python have no i18n module
        return text
    return tr(text)


def child_python() -> str:
    """Interpreter of the segmentation child process: Slicer's own Python (same packages) when found."""
    return shutil.which("PythonSlicer") or sys.executable


def new_workflow(scene: Any) -> SegmentationWorkflow:
    """The workflow of the module on ``scene`` (inside Slicer: ``slicer.mrmlScene``), child = PythonSlicer."""
    return SegmentationWorkflow(scene, python=child_python())


# -- settings -----------------------------------------------------------------------------------


class PanelParameters(Protocol):
    """The fields of the module's parameter node (``DiffusionSegParameterNode``) a run reads.

    0 and "" mean "the model card's default", as the spin boxes and the model list show them.
    """

    model: str
    task: str
    samples: int
    steps: int
    seed: int
    device: str
    crf: bool


def settings_from_parameters(parameters: PanelParameters) -> SegmentSettings:
    """The run settings of the panel's values; the samples are kept (the agreement slider needs them).

    The DenseCRF checkbox says on or off; which CRF runs when it is on is the model card's choice
    (``default_crf``: the plain CRF of the fused map, or DiffSeg's published protocol).
    """
    return SegmentSettings(model=parameters.model or None, task=parameters.task or None,
                           samples=parameters.samples or None,
                           steps=parameters.steps or None, seed=int(parameters.seed), device=parameters.device,
                           crf=_panel_crf(parameters.model or None, bool(parameters.crf)), keep_samples=True)


def _panel_crf(model: str | None, checked: bool) -> CrfMode | None:
    """The checkbox as a CrfMode: off; or on = the card's own CRF (None) when it has one, else the plain one."""
    if not checked:
        return CrfMode.OFF
    from DiffusionSegLib.core.errors import DiffusionSegError
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.models.store import resolve_model

    try:
        mode = read_card(resolve_model(model)).crf_mode()
    except DiffusionSegError:  # the run itself will say what is wrong with the model
        return CrfMode.MEAN
    return None if mode != CrfMode.OFF else CrfMode.MEAN


# -- dependencies -------------------------------------------------------------------------------


def missing_dependencies(find_spec: Callable = importlib.util.find_spec) -> dict[str, str]:
    """Required packages that are not installed: {import name: pip requirement} (nothing is imported)."""
    from DiffusionSegLib.core.dependencies import missing_requirements

    return missing_requirements(find_spec=find_spec)


def install_message(missing: dict[str, str]) -> str:
    """The question asked before anything is installed."""
    from DiffusionSegLib.core.dependencies import describe

    return _("DiffusionSeg needs Python packages that are not installed yet:\n\n{packages}\n\n"
             "Install them now? This downloads several hundred MB (PyTorch) and can take minutes; "
             "Slicer may be unresponsive meanwhile.").format(packages=describe(missing))


def ensure_dependencies(confirm: Callable[[str], bool] | None = None,
                        install_torch: Callable[[], bool] | None = None,
                        pip_install: Callable[[list[str]], None] | None = None,
                        find_spec: Callable = importlib.util.find_spec) -> bool:
    """Install the missing required packages after asking once. True when all are there afterwards.

    ``confirm(question)`` asks the user (default: Slicer's OK/Cancel dialog); False leaves everything
    as it is. torch comes first and through ``install_torch`` (default: the PyTorch extension, which
    picks the build for the GPU driver; monai would otherwise pull a default torch with pip); the
    others through ``pip_install`` (default: Slicer's pip helper). pydensecrf2 is optional and never
    installed here. Raises RuntimeError when packages are still missing after the install.
    """
    from DiffusionSegLib.core.dependencies import TORCH, describe, pip_requirements

    missing = missing_dependencies(find_spec)
    if not missing:
        return True
    if not (confirm or _confirm_in_slicer)(install_message(missing)):
        return False
    if TORCH in missing and not (install_torch or install_torch_with_extension)():
        return False
    requirements = pip_requirements(missing)
    if requirements:
        (pip_install or pip_install_in_slicer)(requirements)
    importlib.invalidate_caches()  # find_spec must see what was just installed
    still_missing = missing_dependencies(find_spec)
    if still_missing:
        raise RuntimeError(_("These packages could not be installed: {packages}").format(
            packages=describe(still_missing)))
    return True


def _confirm_in_slicer(question: str) -> bool:
    import slicer

    return bool(slicer.util.confirmOkCancelDisplay(question, _("DiffusionSeg: install dependencies")))


def install_torch_with_extension() -> bool:
    """Install torch through the PyTorch extension (PyTorchUtils), never with a direct pip install.

    Returns False when the user declined; RuntimeError when the PyTorch extension is not installed.
    """
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(_(
            "DiffusionSeg needs PyTorch, which is installed through the PyTorch extension. Install "
            "the 'PyTorch' extension from the Extensions Manager, restart Slicer, then press Apply "
            "again.")) from None
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None


def pip_install_in_slicer(requirements: list[str]) -> None:
    """pip-install ``requirements`` with Slicer's helper of this Slicer version.

    Newer Slicer (>= 5.12) has ``pip_ensure`` (checks, installs, skips installs in testing mode,
    offers a restart when an imported package changed); its home module moved during development,
    so both known homes are tried. Older versions: ``slicer.util.pip_install``.
    """
    for module_name in ("slicer.pydeps", "slicer.packaging"):
        try:
            helper = importlib.import_module(module_name)
        except ImportError:
            continue
        pip_ensure = getattr(helper, "pip_ensure", None)
        if pip_ensure is not None:
            from packaging.requirements import Requirement

            # Already confirmed by the user (ensure_dependencies): no second prompt.
            pip_ensure([Requirement(r) for r in requirements], prompt_install=False, requester="DiffusionSeg")
            return
    import slicer

    slicer.util.pip_install(requirements)


def gpu_available() -> bool | None:
    """True/False when torch is installed and says whether a GPU (CUDA or MPS) is usable; None otherwise.

    Imports torch (seconds): call it once, lazily, when a run starts.
    """
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return True
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    except Exception:  # a broken torch install must not stop the module; the child reports it
        log.exception("DiffusionSeg: could not query torch for a GPU")
        return None


def device_note(device: str, gpu: bool | None) -> str:
    """A message when no GPU will be used although one may be expected ("" when all is well)."""
    if device == "cpu" or gpu is not False:
        return ""
    if device == "cuda":
        return _("No CUDA GPU found: running on the CPU instead (slower).")
    return _("No GPU found: running on the CPU (slower; fewer samples or steps are faster).")


# -- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One readable model as the model list shows it."""

    name: str
    origin: str  # bundled | installed | an extra search folder
    folder: str
    is_default: bool  # the bundled default model (the list's first item, parameter value "")
    summary: str  # the text under the list
    tooltip: str
    default_crf: bool  # the model card's recommendation for the DenseCRF checkbox
    tasks: tuple[tuple[str, str], ...] = ()  # a multi-task model's (task, description); () for one task


def catalogue_figures(entry: dict[str, Any] | None) -> str:
    """One line of measured figures from a model catalogue entry (Resources/Models.json), or ""."""
    from DiffusionSegLib.models.catalogue import summary_line

    return summary_line(entry)


def available_models() -> list[ModelEntry]:
    """Every readable model, with the figures the catalogue measured for it."""
    from DiffusionSegLib.models import catalogue, store

    try:
        measured = {entry["name"]: entry for entry in catalogue.catalogue()}
    except Exception:  # a damaged catalogue must not hide the models themselves
        log.exception("DiffusionSeg: reading the model catalogue failed")
        measured = {}
    entries = []
    for origin, folder, card in store.list_models():
        labels = ", ".join(card.labels[i].name for i in card.output_label_indices())
        summary = _("{name}: {modality}; labels: {labels}").format(name=card.name, modality=card.modality,
                                                                  labels=labels)
        if card.tasks:
            summary += _("; tasks: {tasks}").format(tasks=", ".join(card.tasks)) + (
                _(" (default {task})").format(task=card.default_task) if card.default_task else "")
        figures = catalogue_figures(measured.get(card.name))
        if figures:
            summary += "\n" + figures
        entries.append(ModelEntry(
            name=card.name, origin=origin, folder=str(folder),
            is_default=origin == "bundled" and card.name == store.DEFAULT_MODEL,
            summary=summary + (f"\n{card.description}" if card.description else ""),
            tooltip=(card.description or card.name) + "\n" + summary,
            default_crf=card.crf_mode() != CrfMode.OFF,
            tasks=tuple((name, str(settings.get("description", ""))) for name, settings in card.tasks.items())))
    return entries


def install_model(source: str | Path) -> Path:
    """Install a model folder or .zip into the user models folder, checking that its network loads."""
    from DiffusionSegLib.methods.registry import load_model
    from DiffusionSegLib.models.store import install_model as store_install

    return store_install(source, load_check=load_model)


def download_model(url: str, sha256: str, progress: Callable[[int, int], None] | None = None) -> Path:
    """Download a model archive (checked against ``sha256`` and loaded once) into the user models folder.

    ``progress(done_bytes, total_bytes)`` is called as data arrives (total 0 when unknown); raising
    from it cancels the download.
    """
    from DiffusionSegLib.methods.registry import load_model
    from DiffusionSegLib.models.store import download_model as store_download

    return store_download(url, sha256, progress=progress, load_check=load_model)


def clear_models() -> int:
    """Remove every added or downloaded model (the bundled ones stay); returns how many."""
    from DiffusionSegLib.models.store import clear_installed_models

    return clear_installed_models()


# -- the speed measured by earlier runs -----------------------------------------------------------


def speed_key(model_name: str, device: str) -> str:
    """The settings key of the speed of ``model_name`` (card name) with the device setting ``device``."""
    return f"{SPEED_SETTINGS_GROUP}/{model_name}/{device}"


def stored_speed(model: str | None, device: str, read: Callable[[str], Any]) -> MeasuredSpeed | None:
    """The speed an earlier run of ``model`` (folder, name or None = default) with ``device`` measured.

    ``read(key)`` returns the stored value or None (inside Slicer: ``qt.QSettings().value``).
    """
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.models.store import resolve_model

    name = read_card(resolve_model(model)).name
    value = read(speed_key(name, device))
    try:
        return MeasuredSpeed(name, device, float(value)) if value is not None else None
    except (TypeError, ValueError):  # a hand-edited or foreign value: measure again
        return None


def speed_setting(speed: MeasuredSpeed) -> tuple[str, float]:
    """(key, value) that :func:`stored_speed` reads back."""
    return speed_key(speed.model, speed.device), speed.seconds_per_pixel_evaluation


# -- progress -----------------------------------------------------------------------------------


def _stage(status: JobStatus) -> Stage | None:
    try:
        return Stage(status.stage)
    except ValueError:  # "cancelled", or a stage a newer CLI reports
        return None


def progress_percent(status: JobStatus) -> int:
    """Overall progress 0-100 of a run; sampling dominates the run time."""
    if status.finished:
        return 100
    stage = _stage(status)
    if stage == Stage.SAMPLING and status.total:
        return STAGE_PERCENT[Stage.SAMPLING] + int(_SAMPLING_SPAN * min(status.done, status.total) / status.total)
    return STAGE_PERCENT.get(stage, 0) if stage is not None else 0


def stage_text(status: JobStatus) -> str:
    """One line for the status label."""
    if status.finished:
        return (_("Finished; loading the results...") if status.returncode == 0
                else _("The segmentation process stopped."))
    names = {
        Stage.STARTING: _("Starting the segmentation process..."),
        Stage.LOAD: _("Loading the model and the image..."),
        Stage.SAMPLING: _("Sampling"),
        Stage.CRF: _("Refining with DenseCRF..."),
        Stage.RESTORE: _("Restoring the input geometry..."),
        Stage.WRITE: _("Writing the outputs..."),
    }
    stage = _stage(status)
    if stage is None:
        return _("Cancelled.") if status.stage == "cancelled" else str(status.stage)
    text = names[stage]
    if stage == Stage.SAMPLING and status.total:
        # The CLI counts network evaluations (samples x steps x slices), as the estimate does.
        text += " " + _("{done} of {total} network evaluations").format(done=status.done, total=status.total)
    return text


def done_text(seconds: float, report: dict[str, Any] | None) -> str:
    """The status label after a run: its time, where the card's crop sampled (nothing outside the box
    was looked at) or why it did not, then each post-processing note of its report (e.g. a card's
    brain region that could not be placed on a slab, so nothing was confined to it)."""
    crop = (report or {}).get("crop") or {}
    notes = [_("Crop to {region}: {note}").format(region=crop["region"], note=crop["note"])] if crop else []
    notes += ((report or {}).get("postprocessing") or {}).get("region_notes") or []
    return _("Done in {seconds:.0f} s.").format(seconds=seconds) + "".join(f"\n{note}" for note in notes)


__all__ = ["SPEED_SETTINGS_GROUP", "STAGE_PERCENT", "ModelEntry", "PanelParameters", "available_models",
           "catalogue_figures", "child_python", "clear_models", "device_note", "download_model",
           "done_text", "ensure_dependencies", "gpu_available", "install_message", "install_model",
           "install_torch_with_extension", "missing_dependencies", "new_workflow", "pip_install_in_slicer",
           "progress_percent", "settings_from_parameters", "speed_key", "speed_setting", "stage_text",
           "stored_speed"]


# -- references for the Generalized Energy Distance -------------------------------------------


def match_reference_segments(segmentation_node: Any, labels: list[str]) -> dict[str, list[tuple[Any, str]]]:
    """Segments of ``segmentation_node`` named like a label: label -> [(node, segment id), ...].

    A segment is a reference of label "liver" when its name is "liver" or starts with "liver " (e.g.
    "liver 2", "liver reader B"), case-insensitive, so several readers' contours can sit in one node.
    DiffusionSeg's own output segments ("liver fused", "liver ambiguity", ...) are never references.
    """
    from DiffusionSegLib.slicer.scene import REGION_TAG

    segmentation = segmentation_node.GetSegmentation()
    matched: dict[str, list[tuple[Any, str]]] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        if segment.HasTag(REGION_TAG):  # a segment a run made (fused, consistency, ...), not a reader's
            continue
        name = segment.GetName().strip().lower()
        for label in labels:
            key = label.lower()
            if name == key or name.startswith(key + " "):
                matched.setdefault(label, []).append((segmentation_node, segment_id))
                break
    return matched
