"""The Slicer-side workflow: volume node -> background ``diffusionseg segment`` run -> MRML nodes.

One :class:`SegmentationWorkflow` per scene drives one run at a time:

1. :meth:`~SegmentationWorkflow.start` exports the input volume node (cropped to an optional
   markups ROI) to a temporary NRRD file and starts the library CLI in a child process
   (:mod:`DiffusionSegLib.slicer.job`), so the Slicer UI never blocks and a cancel really stops
   the computation.
2. :meth:`~SegmentationWorkflow.poll` reports the child's progress (the widget polls it from a
   QTimer); :meth:`~SegmentationWorkflow.cancel` kills the child's process tree.
3. :meth:`~SegmentationWorkflow.finish` reads the output folder back (:mod:`DiffusionSegLib.outputs.readers`),
   pastes an ROI result into the full volume grid and only then touches the scene, through
   :mod:`DiffusionSegLib.slicer.scene`. Until that point the scene is never modified, so a
   cancelled or failed run leaves it exactly as it was.

:meth:`~SegmentationWorkflow.process` is the blocking path for scripts and tests.
After a run with kept samples, :meth:`~SegmentationWorkflow.set_agreement` re-derives the fused
segments as "at least k of N samples agree" without sampling again (the agreement slider).

Before a run, :meth:`~SegmentationWorkflow.check_input` says what about the selected volume does not
fit the selected model (the panel's warning label, shown before Apply) and
:meth:`~SegmentationWorkflow.estimate` how long sampling will take, from the speed measured by the
last run on this computer (:attr:`~SegmentationWorkflow.measured_speed`). During a run,
:meth:`~SegmentationWorkflow.run_messages` returns the child's own warnings and its estimate, which
it measures with one timed network pass before sampling.

No Qt and no torch here: this module imports the bridge (slicer MRML, vtk, numpy) and
standard-library process handling only, so it runs in Slicer's UI process and under pytest on a
``slicer-core`` scene alike.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from DiffusionSegLib.cli.protocol import ESTIMATE_PREFIX, WARNING_PREFIX
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.pipeline.inputcheck import MODALITY_TAG, InputWarning, RunEstimate
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.slicer.job import JobStatus, SegmentJob

# Box in IJK of the input volume, half-open: ((i0, j0, k0), (i1, j1, k1)).
IJKBox = tuple[tuple[int, int, int], tuple[int, int, int]]
_REGIONS = ("fused", "consistency", "ambiguity")


@dataclass(frozen=True)
class MeasuredSpeed:
    """Sampling speed measured by a finished run: seconds per network evaluation per model-grid pixel.

    Per pixel, so it scales to another input size; keyed by model and the device *setting* the user
    chose (auto/cpu/cuda), which is what the panel knows before a run.
    """

    model: str
    device: str
    seconds_per_pixel_evaluation: float


@dataclass(frozen=True)
class RunMessages:
    """What the running child said before sampling: input warnings and its measured estimate."""

    warnings: list[str]
    estimate: str | None


@dataclass
class _Run:
    """State of the run in progress (between start and finish/cancel)."""

    volume_node: Any
    settings: SegmentSettings
    show_samples: bool
    box: IJKBox | None
    workdir: Path
    job: SegmentJob


class SegmentationWorkflow:
    """Runs DiffusionSeg on volume nodes of one MRML scene; see the module docstring."""

    def __init__(self, scene: Any, python: str | None = None):
        """``python``: the interpreter of the segmentation child (inside Slicer: PythonSlicer)."""
        import sys

        self.scene = scene
        self.python = python or sys.executable
        self._run: _Run | None = None
        # Kept from the last finished run, for the agreement slider and the results panel.
        self._volume_node: Any = None
        self._outputs: Any = None  # mrml_bridge.BridgeOutputs
        self._samples: np.ndarray | None = None  # (N, L, K, J, I) uint8 on the node grid
        self._labels: list[str] = []
        self._summary: dict[str, Any] = {}
        self._agreement: int | None = None
        self._speed: MeasuredSpeed | None = None
        # The card whose post-processing the run applied (None: none applied), and its regions on the
        # volume: the slider's masks get the same filters. A region can take seconds to find (the brain
        # atlas is registered to the head), so it is found in a worker thread as soon as the run is
        # shown (ITK releases the GIL) and the first slider move waits only for what is left of it.
        self._card: Any = None
        self._regions: list[tuple[np.ndarray, list[str], float]] | None = None
        self._regions_pending: Future | None = None
        self._region_worker: ThreadPoolExecutor | None = None
        self._counts: np.ndarray | None = None  # (L, K, J, I): how many samples mark each voxel

    # -- running --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`finish` / :meth:`cancel`."""
        return self._run is not None

    def start(self, volume_node: Any, settings: SegmentSettings, roi_node: Any = None,
              show_samples: bool = False) -> None:
        """Export ``volume_node`` (cropped to ``roi_node``) and start the segmentation child process.

        The samples are always kept (the agreement slider needs them); ``show_samples`` also shows
        each as a hidden segment. Raises ValueError for an unusable node or ROI, DiffusionSegError
        when the child cannot start. The scene is not modified.
        """
        settings = dataclasses.replace(settings, keep_samples=True)
        if self._run is not None:
            raise RuntimeError("a DiffusionSeg run is already in progress; cancel or finish it first")
        box, image = self._export(volume_node, roi_node)
        workdir = Path(tempfile.mkdtemp(prefix="diffusionseg-"))
        try:
            input_path = workdir / "input.nrrd"
            import SimpleITK as sitk

            sitk.WriteImage(image, str(input_path))
            job = SegmentJob(input_path, workdir / "out", settings, self.python)
            job.start()
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._run = _Run(volume_node, settings, show_samples, box, workdir, job)

    def _export(self, volume_node: Any, roi_node: Any = None) -> tuple[IJKBox | None, Any]:
        """The image the child will segment: the node's voxels (ROI-cropped) with its geometry and, when
        the volume came from DICOM, its Modality tag (so the input check can trust it)."""
        from DiffusionSegLib.slicer import scene as mrml_bridge

        if volume_node is None:
            raise ValueError("no input volume selected")
        box = mrml_bridge.roi_ijk_box(volume_node, roi_node) if roi_node is not None else None
        image = mrml_bridge.volume_to_image(volume_node, box)
        if image.GetDimension() == 3 and image.GetSize()[2] == 1 and image.GetNumberOfComponentsPerPixel() > 1:
            # A single-slice colour node is a photo: a 2D picture for the library, never reoriented
            # as anatomy. A single scalar slice (one CT/MR slice) stays 3D, as the CLI keeps it, so it
            # is reoriented like any volume. The bridge puts results back on the node's 3D grid.
            image = image[:, :, 0]
        modality = _dicom_modality(self.scene, volume_node)
        if modality:
            image.SetMetaData(MODALITY_TAG, modality)  # NRRD keeps it: the child sees it too
        return box, image

    def check_input(self, volume_node: Any, model: str | None = None, roi_node: Any = None,
                    task: str | None = None) -> list[InputWarning]:
        """What about ``volume_node`` (cropped to ``roi_node``) does not fit ``model`` (for a multi-task
        model: its ``task``); [] when it fits.

        The checks the CLI runs before sampling (inputcheck.check_input), run here in the UI process:
        numpy statistics on a subsample, no torch, no model weights, well under a second.
        Raises ValueError for an unusable node, DiffusionSegError for a missing or broken model.
        """
        from DiffusionSegLib.pipeline.inputcheck import check_input

        _, image = self._export(volume_node, roi_node)
        return check_input(image, _run_card(model, task, image))

    def estimate(self, volume_node: Any, settings: SegmentSettings, roi_node: Any = None,
                 speed: MeasuredSpeed | None = None) -> RunEstimate | None:
        """Sampling time of a run with ``settings`` on ``volume_node``, before it starts; None when no
        speed was measured for this model and device setting (``speed`` or the last run's).

        Network evaluations are counted as the CLI counts them (samples x steps x slices on the model
        grid); seconds per evaluation scale with the slice's pixels on the model grid.
        """
        from DiffusionSegLib.methods.registry import get_method
        from DiffusionSegLib.pipeline.inputcheck import model_grid_items

        _, image = self._export(volume_node, roi_node)
        card = _run_card(settings.model, settings.task, image)
        speed = speed or self._speed
        if speed is None or speed.model != card.name or speed.device != settings.device:
            return None
        items, pixels = model_grid_items(image, card)
        plan = get_method(card.method).plan(card, settings.samples, settings.steps, settings.sampler)
        return RunEstimate(plan.samples, plan.steps, items,
                           speed.seconds_per_pixel_evaluation * pixels, settings.device,
                           "slices" if card.spatial_dims == 2 else "volumes",
                           source="measured by the last run on this computer")

    @property
    def measured_speed(self) -> MeasuredSpeed | None:
        """Speed of the last finished run (for :meth:`estimate`; the panel keeps it across sessions)."""
        return self._speed

    def run_messages(self) -> RunMessages:
        """Input warnings and the measured estimate the running child printed (empty before it did)."""
        if self._run is None:
            raise RuntimeError("no DiffusionSeg run in progress")
        lines = list(self._run.job.stderr_lines)
        warnings = [line[len(WARNING_PREFIX):] for line in lines if line.startswith(WARNING_PREFIX)]
        estimates = [line[len(ESTIMATE_PREFIX):] for line in lines if line.startswith(ESTIMATE_PREFIX)]
        return RunMessages(warnings, estimates[-1] if estimates else None)

    def poll(self) -> JobStatus:
        """Progress of the run in progress (stage, done, total, finished, returncode, error)."""
        if self._run is None:
            raise RuntimeError("no DiffusionSeg run in progress")
        return self._run.job.poll()

    def cancel(self) -> None:
        """Kill the running child (its whole process tree) and drop its files; the scene is untouched."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.job.cancel()
        finally:
            shutil.rmtree(run.workdir, ignore_errors=True)

    def finish(self, segmentation_node: Any = None) -> Any:
        """Read the finished run's outputs and put them into the scene; returns the BridgeOutputs.

        Raises DiffusionSegError with the child's one-line error when the run failed (the scene is
        then unchanged). ``segmentation_node``: put the segments into this node (only our own
        earlier segments in it are replaced); None = this module's node for the input.
        """
        from DiffusionSegLib.slicer import scene as mrml_bridge
        from DiffusionSegLib.outputs.readers import read_outputs

        if self._run is None:
            raise RuntimeError("no DiffusionSeg run in progress")
        status = self._run.job.poll()
        if not status.finished:
            raise RuntimeError("the DiffusionSeg run has not finished yet; poll() until finished")
        run, self._run = self._run, None
        try:
            if not status.succeeded:
                raise DiffusionSegError(status.error or "the segmentation process failed")
            result = read_outputs(run.job.output_dir)
            shape = mrml_bridge.volume_shape_kji(run.volume_node)
            if run.box is not None or result.fused.shape[1:] != shape:
                # ROI crop or single slice: the outputs are on the exported image, not the node's
                # grid. Put them on the node's grid (the bridge takes the geometry from the node).
                result = _paste_into_volume(result, shape, run.box)
            outputs = mrml_bridge.show_result(self.scene, run.volume_node, result,
                                              show_samples=run.show_samples,
                                              segmentation_node=segmentation_node)
        finally:
            shutil.rmtree(run.workdir, ignore_errors=True)
        self._remember(run.volume_node, result, outputs, _card_of(run.settings, result.report["model"].get("task")))
        self._speed = _speed_of(result.report, run.settings.device) or self._speed
        return outputs

    def process(self, volume_node: Any, settings: SegmentSettings | None = None, roi_node: Any = None,
                segmentation_node: Any = None, timeout: float | None = None, show_samples: bool = False) -> Any:
        """Blocking run (scripts, tests): start, wait, finish. Returns the BridgeOutputs.

        On timeout the child is cancelled and TimeoutError raised (scene unchanged).
        """
        self.start(volume_node, settings or SegmentSettings(), roi_node, show_samples)
        assert self._run is not None
        status = self._run.job.wait(timeout)
        if not status.finished:
            self.cancel()
            raise TimeoutError(f"DiffusionSeg did not finish within {timeout} s; the run was cancelled")
        return self.finish(segmentation_node)

    # -- results of the last run ----------------------------------------------------------------

    @property
    def n_samples(self) -> int:
        """Number of kept samples of the last run (0 when none were kept)."""
        return 0 if self._samples is None else int(self._samples.shape[0])

    @property
    def agreement(self) -> int | None:
        """The k of the fused segments now shown (None: the run's own fused/CRF mask)."""
        return self._agreement

    def set_agreement(self, k: int) -> None:
        """Show as fused segments the voxels that at least ``k`` of the N samples mark foreground.

        k = N is the consistency region, k = 1 the union of all samples. No resampling: only the
        fused segments of the last run's segmentation node change (their volumes in ``summary``
        too); the CRF refinement is not re-run on these masks, the model card's post-processing
        (region, consistent and largest components) is, when the run applied it.
        """
        from DiffusionSegLib.slicer import scene as mrml_bridge
        from DiffusionSegLib.pipeline.ensemble import agreement_mask, volumes_ml

        if self._samples is None or self._outputs is None:
            raise RuntimeError("no samples kept from a finished run; run with keep_samples=True first")
        masks = agreement_mask(self._samples, k)  # (L, K, J, I) uint8
        if self._card is not None:
            from DiffusionSegLib.pipeline.postprocess import apply_card_filters
            from DiffusionSegLib.pipeline.regions import find_card_regions

            if self._regions is None:
                pending, self._regions_pending = self._regions_pending, None
                self._regions = (pending.result() if pending is not None else
                                 find_card_regions(mrml_bridge.volume_to_image(self._volume_node), self._card))[0]
            voxel_ml = float(np.prod(_node_spacing(self._volume_node))) / 1000.0
            apply_card_filters(masks, self._counts, self.n_samples, self._labels, self._card, self._regions, voxel_ml)
        seg_node = self._outputs.segmentation_node
        for label, mask in zip(self._labels, masks):
            mrml_bridge.set_segment_mask(seg_node, self._volume_node, self._outputs.segment_ids[label]["fused"], mask)
        seg_node.SetAttribute("DiffusionSeg.Agreement", f"{int(k)}/{self.n_samples}")
        for label, ml in zip(self._labels, volumes_ml(masks, _node_spacing(self._volume_node))):
            self._summary["volumes_ml"][label]["fused"] = ml
        self._agreement = int(k)

    def ged_against(self, references: dict[str, list[tuple[Any, str]]]) -> dict[str, dict[str, float]]:
        """Generalized Energy Distance of the last run's samples against reference segments in the scene.

        ``references``: label -> [(segmentation node, segment id), ...], e.g. the reader's own contour
        and a second reader's. Per label: ``{"ged", "cross", "sample_diversity", "reference_diversity"}``
        (D2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')], d = 1 - IoU; with one reference the last
        term is 0). Kept in ``summary()["ged"]``. The samples are the run's, on the volume's grid.
        """
        from DiffusionSegLib.pipeline.ensemble import ged_terms
        from DiffusionSegLib.slicer import scene as mrml_bridge

        if self._samples is None or self._volume_node is None:
            raise RuntimeError("no samples kept from a finished run; run first")
        out = {}
        for label, segments in references.items():
            if label not in self._labels:
                raise ValueError(f"'{label}' is not a label of the last run ({', '.join(self._labels)})")
            if not segments:
                raise ValueError(f"no reference segment given for '{label}'")
            index = self._labels.index(label)
            masks = np.stack([mrml_bridge.segment_mask(node, segment_id, self._volume_node)
                              for node, segment_id in segments])  # (M, K, J, I)
            out[label] = ged_terms(self._samples[:, index:index + 1], masks[:, None])[0].to_dict()
        self._summary.setdefault("ged", {}).update(out)
        return out

    def summary(self) -> dict[str, Any]:
        """Figures of the last run for the results panel.

        ``{"sample_diversity": {label: float}, "volumes_ml": {label: {region: mL}}, "report": dict,
        "agreement": k or None, "n_samples": N}``; empty dict before the first run.
        """
        if not self._summary:
            return {}
        return {**self._summary, "agreement": self._agreement, "n_samples": self.n_samples}

    def _remember(self, volume_node: Any, result: Any, outputs: Any, card: Any = None) -> None:
        from DiffusionSegLib.pipeline.ensemble import volumes_ml

        self._volume_node, self._outputs = volume_node, outputs
        self._card, self._regions, self._counts = card, None, result.counts
        self._samples = result.samples
        self._regions_pending = None
        if card is not None and card.region_components and result.samples is not None:
            from DiffusionSegLib.pipeline.regions import find_card_regions
            from DiffusionSegLib.slicer import scene as mrml_bridge

            # The image is read from the node here, on the main thread; the worker touches no MRML.
            if self._region_worker is None:
                self._region_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusionseg-regions")
            self._regions_pending = self._region_worker.submit(
                find_card_regions, mrml_bridge.volume_to_image(volume_node), card)
        self._labels = [label.name for label in result.labels]
        self._agreement = None
        spacing = _node_spacing(volume_node)
        regions = {"fused": result.final_mask, "consistency": result.consistency, "ambiguity": result.ambiguity}
        volumes = {name: volumes_ml(mask, spacing) for name, mask in regions.items()}
        self._summary = {
            "sample_diversity": dict(zip(self._labels, (float(d) for d in result.sample_diversity))),
            "volumes_ml": {label: {name: volumes[name][i] for name in _REGIONS}
                           for i, label in enumerate(self._labels)},
            "report": result.report,
        }


def _speed_of(report: dict[str, Any], device_setting: str) -> MeasuredSpeed | None:
    """The sampling speed a run's report.json records, per model-grid pixel; None when it has none."""
    per_evaluation = report.get("seconds_per_network_evaluation")
    shape = report.get("model_grid_item_shape")
    name = (report.get("model") or {}).get("name")
    if not per_evaluation or not shape or not name:
        return None
    return MeasuredSpeed(str(name), device_setting, float(per_evaluation) / float(np.prod(shape)))


def _dicom_modality(scene: Any, volume_node: Any) -> str | None:
    """The DICOM Modality Slicer's DICOM import recorded for the node's series (subject hierarchy), or None."""
    try:
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        item = sh.GetItemByDataNode(volume_node)
        if item == sh.GetInvalidItemID():
            return None
        name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
        return sh.GetItemAttribute(item, name).strip().upper() or None
    except (ImportError, AttributeError):  # no subject hierarchy: nothing recorded
        return None


def _stored_card(model: str | None) -> Any:
    """The card of ``model`` (folder, name or None = the default model) as stored."""
    from DiffusionSegLib.models.card import read_card
    from DiffusionSegLib.models.store import resolve_model

    return read_card(resolve_model(model))


def _run_card(model: str | None, task: str | None, image: Any) -> Any:
    """The card a run of ``model`` on ``image`` uses: for a multi-task model, that of the named task or the
    one the image decides (``ModelCard.resolve_task``); SettingsError when neither decides."""
    from DiffusionSegLib.pipeline.modality import input_modality

    card = _stored_card(model)
    return card.for_task(card.resolve_task(task, input_modality(image)["modality"])[0])


def _card_of(settings: SegmentSettings, task: str | None = None) -> Any:
    """The card whose post-processing a run with ``settings`` applied (a multi-task model: the run's
    ``task``, from its report); None when it applied none."""
    if not settings.postprocess:
        return None
    card = _stored_card(settings.model).for_task(task)  # a task sets its own filters
    return card if card.has_postprocessing() else None


def _node_spacing(volume_node: Any) -> tuple[float, float, float]:
    return tuple(float(s) for s in volume_node.GetSpacing())


def _paste_into_volume(result: Any, shape: tuple[int, int, int], box: IJKBox | None) -> Any:
    """Arrays of a result on the (ROI-cropped, possibly 2D) exported image -> (…, K, J, I) node grid.

    Without an ROI only single-slice results are reshaped (2D (J, I) -> (1, J, I)). With an ROI,
    every array is placed at the ROI box of a zero volume: outside the ROI nothing was segmented,
    so masks, probability and uncertainty are 0 there. ``reference`` stays the exported image:
    the bridge places the arrays with the volume node's own geometry.
    """
    (i0, j0, k0), (i1, j1, k1) = box if box is not None else ((0, 0, 0), (shape[2], shape[1], shape[0]))
    crop = (k1 - k0, j1 - j0, i1 - i0)
    where = (slice(k0, k1), slice(j0, j1), slice(i0, i1))

    def full(array: np.ndarray | None, lead: int) -> np.ndarray | None:
        if array is None:
            return None
        head = array.shape[:lead]
        if int(np.prod(array.shape[lead:])) != int(np.prod(crop)):
            raise DiffusionSegError(f"the outputs (shape {array.shape}) do not match the exported volume {crop}")
        array = array.reshape(head + crop)
        if box is None:
            return array
        out = np.zeros(head + tuple(shape), dtype=array.dtype)
        out[(Ellipsis, *where)] = array
        return out

    # Outside the box no sample marked anything: counts 0, so probability, uncertainty and every mask are 0.
    return dataclasses.replace(
        result, counts=full(result.counts, 1), fused=full(result.fused, 1), refined=full(result.refined, 1),
        samples=full(result.samples, 2))


__all__ = ["MeasuredSpeed", "RunMessages", "SegmentationWorkflow"]
