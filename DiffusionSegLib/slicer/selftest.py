"""The module's self-test: what ``DiffusionSegTest`` (the module file) runs inside Slicer.

Slicer runs it from the module's "Reload and Test" button and from CTest (``py_DiffusionSeg``,
``slicer.testing.runUnitTest``). ``DiffusionSegTest`` is a ``ScriptedLoadableModuleTest`` whose test
methods hand off to :class:`SelfTest`, passing Slicer's scene, volume loader and event pump, and the
module Logic's workflow. Nothing here needs Qt, so the same checks also run under pytest on a
slicer-core scene (``Testing/slicer/test_logic.py``).

The tests need the Python dependencies (torch, monai, ...): without them they skip, naming what is
missing (press Apply once in the module to install them).
"""

from __future__ import annotations

import time
import unittest
from typing import Any, Callable

from DiffusionSegLib.core.enums import Stage
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.slicer.workflow import SegmentationWorkflow

_REGIONS = ("fused", "consistency", "ambiguity")
_CANCEL_WAIT_S = 120.0  # for the child to reach sampling before it is cancelled
_PROCESS_TIMEOUT_S = 1800.0


class SelfTest:
    """The self-test's checks, run against ``case`` (a unittest.TestCase: its asserts and skipTest).

    ``scene``: the MRML scene (inside Slicer ``slicer.mrmlScene``); ``make_workflow()``: a fresh
    workflow on it (the module Logic's); ``sample_path``: the bundled sample CT (None: missing);
    ``load_volume(path)``: a volume node in ``scene`` (``slicer.util.loadVolume``);
    ``process_events()``: keeps the UI alive while waiting (``slicer.app.processEvents``).
    """

    def __init__(self, case: unittest.TestCase, scene: Any, make_workflow: Callable[[], SegmentationWorkflow],
                 sample_path: str | None, load_volume: Callable[[str], Any],
                 process_events: Callable[[], None] = lambda: None):
        self.case = case
        self.scene = scene
        self.make_workflow = make_workflow
        self.sample_path = sample_path
        self.load_volume = load_volume
        self.process_events = process_events

    def say(self, message: str) -> None:
        """Show ``message`` (ScriptedLoadableModuleTest.delayDisplay in Slicer; print elsewhere)."""
        getattr(self.case, "delayDisplay", print)(message)

    def run_all(self) -> None:
        """Every test in turn; a skipped one is reported, not failed (the "Reload and Test" button)."""
        for test in (self.test_process, self.test_cancel):
            try:
                test()
            except unittest.SkipTest as reason:
                self.say(f"Skipped: {reason}")

    # -- helpers --------------------------------------------------------------------------------

    def require_dependencies(self) -> None:
        """Skip (naming the packages) when the child's Python packages are not installed."""
        from DiffusionSegLib.slicer.logic import missing_dependencies

        missing = missing_dependencies()
        if missing:
            self.case.skipTest("missing Python packages (press Apply once in the module to install them): "
                               + ", ".join(missing.values()))

    def load_sample(self) -> Any:
        """A fresh scene with the bundled sample CT in it."""
        self.case.assertIsNotNone(self.sample_path, "the bundled sample volume is missing")
        self.scene.Clear()
        return self.load_volume(self.sample_path)

    # -- the tests ------------------------------------------------------------------------------

    def test_process(self) -> None:
        """A blocking run on the sample: segments, geometry, overlays, table and the agreement slider."""
        import vtk
        from slicer import vtkSegmentationConverter

        from DiffusionSegLib.models.card import read_card
        from DiffusionSegLib.models.store import resolve_model

        self.require_dependencies()
        self.say("Segmenting the bundled sample CT (2 samples x 3 steps)")
        volume_node = self.load_sample()
        workflow = self.make_workflow()
        settings = SegmentSettings(samples=2, steps=3, seed=0, device="cpu", crf=False)
        outputs = workflow.process(volume_node, settings, timeout=_PROCESS_TIMEOUT_S)

        segmentation_node = outputs.segmentation_node
        self.case.assertIsNotNone(segmentation_node)
        segmentation = segmentation_node.GetSegmentation()
        self.case.assertGreater(segmentation.GetNumberOfSegments(), 0)

        # Every label the model outputs has its fused, consistency and ambiguity segments (a card may
        # list labels it was trained with but does not output).
        card = read_card(resolve_model(None))
        labels = [card.labels[i] for i in card.output_label_indices()]
        for label in labels:
            self.case.assertIn(label.name, outputs.segment_ids)
            for region in _REGIONS:
                segment_id = outputs.segment_ids[label.name][region]
                self.case.assertIsNotNone(segmentation.GetSegment(segment_id), f"{label.name}/{region}")

        # The segmentation lives on exactly the input volume's grid.
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(ijk_to_ras)
        expected = vtkSegmentationConverter.SerializeImageGeometry(ijk_to_ras, volume_node.GetImageData())
        actual = segmentation.GetConversionParameter(vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
        self.case.assertEqual(actual, expected)

        # Continuous maps and the table: one probability and one uncertainty volume per label.
        self.case.assertEqual(len(outputs.probability_nodes), len(labels))
        self.case.assertEqual(len(outputs.uncertainty_nodes), len(labels))
        dimensions = volume_node.GetImageData().GetDimensions()
        for node in [*outputs.probability_nodes, *outputs.uncertainty_nodes]:
            self.case.assertEqual(node.GetImageData().GetDimensions(), dimensions)
        self.case.assertIsNotNone(outputs.table_node)

        # The agreement slider: k of N from the kept samples, without sampling again.
        self.case.assertEqual(workflow.n_samples, 2)
        workflow.set_agreement(2)
        self.case.assertEqual(workflow.agreement, 2)
        summary = workflow.summary()
        self.case.assertIn("sample_diversity", summary)
        self.case.assertIn("volumes_ml", summary)
        self.say("Process test passed")

    def test_cancel(self) -> None:
        """Cancelling a run once it samples leaves the scene as it was."""
        self.require_dependencies()
        self.say("Cancelling a running segmentation leaves the scene unchanged")
        volume_node = self.load_sample()
        nodes_before = self.scene.GetNumberOfNodes()
        workflow = self.make_workflow()
        workflow.start(volume_node, SegmentSettings(samples=8, steps=50, device="cpu"))
        self.case.assertTrue(workflow.running)
        deadline = time.time() + _CANCEL_WAIT_S
        while time.time() < deadline:
            status = workflow.poll()
            if status.finished or status.stage == Stage.SAMPLING:
                break
            time.sleep(0.2)
            self.process_events()
        workflow.cancel()
        self.case.assertFalse(workflow.running)
        self.case.assertEqual(self.scene.GetNumberOfNodes(), nodes_before)
        self.say("Cancel test passed")


__all__ = ["SelfTest"]
