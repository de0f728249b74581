"""DiffusionSeg (3D Slicer module): a shell over DiffusionSegLib.slicer (widget, workflow, logic, selftest),
imported inside methods so Slicer starts fast."""

import importlib.util
import os
import sys
from typing import Annotated, Optional

import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _, translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

SAMPLE_VOLUME_NAME = "ct_abdomen_sample.nii.gz"
DEVICES = ["auto", "cuda", "cpu"]
# Where DiffusionSegLib/ and Resources/ may be: next to this file (installed) or one up (source checkout).
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOTS = [_HERE, os.path.dirname(_HERE)]


def ensureLibraryImportable() -> None:
    """Make ``import DiffusionSegLib`` work, also when the module is used from a source checkout."""
    if importlib.util.find_spec("DiffusionSegLib") is not None:
        return
    for root in _ROOTS:
        if os.path.isfile(os.path.join(root, "DiffusionSegLib", "__init__.py")):
            if root not in sys.path:
                sys.path.insert(0, root)
            importlib.invalidate_caches()
            return
    raise ImportError("DiffusionSegLib was not found next to the DiffusionSeg module; reinstall the extension")


def sampleVolumePath() -> Optional[str]:
    """Path of the bundled sample CT, or None when it is not there."""
    for root in _ROOTS:
        path = os.path.join(root, "Resources", "Sample", SAMPLE_VOLUME_NAME)
        if os.path.isfile(path):
            return path
    return None


class DiffusionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DiffusionSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffusionSeg contributors"]
        self.parent.helpText = _(
            "Segments a volume with a diffusion model that draws several masks and shows how sure it is: fused "
            "(optionally CRF-refined) mask, consistency and ambiguity regions, probability and uncertainty overlays, "
            "sample diversity, volumes, and an agreement slider (k of N samples). Runs in the background. Not a "
            "clinical tool. <a href=\"https://github.com/diffusionseg/SlicerDiffusionSeg\">Project page</a>.")
        self.parent.acknowledgementText = _(
            "MedSegDiff (Wu et al. 2023), Wolleb et al. 2022, GED (Kohl et al. 2018), DenseCRF (Kraehenbuehl and "
            "Koltun 2011). Built on MONAI, PyTorch, SimpleITK, pydensecrf and slicerio.")


@parameterNodeWrapper
class DiffusionSegParameterNode:
    """The module's settings in the scene. Vector (RGB) volumes are scalar volumes too; roi: segment only
    the box; outputSegmentation None: one per input; model "" and samples/steps 0: the defaults."""

    inputVolume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    task: str = ""  # a multi-task model's task (lesion site); "" for a single-task model
    samples: Annotated[int, WithinRange(0, 64)] = 0
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Annotated[str, Choice(DEVICES)] = "auto"
    crf: bool = True
    showSamples: bool = False


class DiffusionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the .ui; the panel's behaviour is DiffusionSegLib.slicer.widget.DiffusionSegPanel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic, self.panel = None, None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.logic = DiffusionSegLogic()
        ensureLibraryImportable()
        from DiffusionSegLib.slicer.widget import DiffusionSegPanel

        self.panel = DiffusionSegPanel(uiWidget, self.logic, sampleVolumePath())
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()
        self.removeObservers()

    def enter(self):
        self.panel.enter()

    def exit(self):
        self.panel.exit()

    def onSceneStartClose(self, caller, event):
        self.panel.onSceneStartClose()

    def onSceneEndClose(self, caller, event):
        self.panel.onSceneEndClose(entered=self.parent.isEntered)


class DiffusionSegLogic(ScriptedLoadableModuleLogic):
    """The parameter node, and ``workflow``: a DiffusionSegLib SegmentationWorkflow on slicer.mrmlScene
    (scripting: ``logic.workflow.process(volumeNode, SegmentSettings(samples=5))``, see README)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.workflow = None
        self.resetWorkflow()

    def getParameterNode(self):
        return DiffusionSegParameterNode(super().getParameterNode())

    def resetWorkflow(self):
        """A fresh workflow, forgetting the last run (its nodes went with a scene close); cancels a running one."""
        if self.workflow is not None:
            self.workflow.cancel()
        ensureLibraryImportable()
        from DiffusionSegLib.slicer.logic import new_workflow

        self.workflow = new_workflow(slicer.mrmlScene)  # its child process runs PythonSlicer


class DiffusionSegTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer (README: headless test command); the tests are DiffusionSegLib.slicer.selftest."""

    def _selfTest(self):
        ensureLibraryImportable()
        from DiffusionSegLib.slicer.selftest import SelfTest

        return SelfTest(self, slicer.mrmlScene, lambda: DiffusionSegLogic().workflow, sampleVolumePath(),
                        slicer.util.loadVolume, slicer.app.processEvents)

    def runTest(self):  # the "Reload and Test" button
        self._selfTest().run_all()

    def test_DiffusionSeg_process(self):
        self._selfTest().test_process()

    def test_DiffusionSeg_cancel(self):
        self._selfTest().test_cancel()
