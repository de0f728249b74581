"""DiffusionSeg: segmentation with diffusion models, with the uncertainty shown (3D Slicer module).

The module file is a shell. The work is done by the bundled library ``DiffusionSegLib``:
``slicer_workflow.SegmentationWorkflow`` exports the input volume, runs the ``diffusionseg segment``
CLI in a child process (the UI stays responsive, cancel kills the whole process tree) and puts the
outputs into the scene through ``mrml_bridge``. The Logic below is a thin adapter over that
workflow; the Widget only maps controls to settings and shows progress and results.

Nothing heavy is imported at file scope: DiffusionSegLib is imported inside methods, and its
third-party dependencies (torch, monai, ...) are checked for, and installed after asking, when the
user presses Apply, never when Slicer starts.
"""

import importlib.util
import logging
import os
import shutil
import sys
import time
import unittest
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SAMPLE_VOLUME_NAME = "ct_abdomen_sample.nii.gz"
DEVICES = ["auto", "cuda", "cpu"]
POLL_INTERVAL_MS = 200
# QSettings group of the sampling speed measured by earlier runs, per model and device setting: the
# time estimate next to Apply comes from it, so it survives Slicer restarts.
SPEED_SETTINGS_GROUP = "DiffusionSeg/SecondsPerPixelEvaluation"


def _moduleDir():
    return os.path.dirname(os.path.abspath(__file__))


def _candidateRoots():
    """Folders that may hold DiffusionSegLib/ and Resources/: next to this file (installed
    extension: both sit in qt-scripted-modules) or one level up (source checkout)."""
    here = _moduleDir()
    return [here, os.path.dirname(here)]


def ensureLibraryImportable():
    """Make ``import DiffusionSegLib`` work, also when the module is used from a source checkout."""
    if importlib.util.find_spec("DiffusionSegLib") is not None:
        return
    for root in _candidateRoots():
        if os.path.isfile(os.path.join(root, "DiffusionSegLib", "__init__.py")):
            if root not in sys.path:
                sys.path.insert(0, root)
            importlib.invalidate_caches()
            return
    raise ImportError("DiffusionSegLib was not found next to the DiffusionSeg module; reinstall the extension")


def sampleVolumePath():
    """Path of the bundled sample CT, or None when it is not there."""
    for root in _candidateRoots():
        path = os.path.join(root, "Resources", "Sample", SAMPLE_VOLUME_NAME)
        if os.path.isfile(path):
            return path
    return None


def childPythonExecutable():
    """Interpreter of the segmentation child process: Slicer's own Python (same packages)."""
    return shutil.which("PythonSlicer") or sys.executable


#
# DiffusionSeg
#


class DiffusionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DiffusionSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffusionSeg contributors"]
        self.parent.helpText = _(
            "Segments a volume with a conditional diffusion model that draws several masks, and shows "
            "how sure it is: the fused mask (optionally CRF-refined), the consistency region (all samples "
            "agree), the ambiguity region (samples disagree), probability and uncertainty maps as overlays, "
            "the sample diversity and region volumes. An agreement slider re-derives the fused mask from "
            "the kept samples (k of N). Runs in the background; Apply becomes Cancel while it runs. "
            "Not a clinical tool: the bundled model was trained on a single CT. "
            "See the <a href=\"https://github.com/diffusionseg/SlicerDiffusionSeg\">project page</a>.")
        self.parent.acknowledgementText = _(
            "Methods: MedSegDiff (Wu et al., MIDL 2023), diffusion segmentation ensembles (Wolleb et al., "
            "MIDL 2022), GED (Kohl et al., NeurIPS 2018), DenseCRF (Kraehenbuehl and Koltun, NeurIPS 2011). "
            "Built on MONAI, PyTorch, SimpleITK, pydensecrf and slicerio.")


#
# Parameter node
#


@parameterNodeWrapper
class DiffusionSegParameterNode:
    """The module's settings, stored in the scene.

    inputVolume - volume to segment. Annotated as scalar volume: vector (RGB) volumes are a
        subclass of it, so the selector shows them too (its .ui hides label maps and DWI/DTI).
    roi - optional markups ROI; only the box is segmented.
    outputSegmentation - optional target segmentation node; None creates one per input.
    model - model folder (as shown in the model list); "" = the bundled default model.
    samples, steps - 0 = the model card's default.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    samples: Annotated[int, WithinRange(0, 64)] = 0
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Annotated[str, Choice(DEVICES)] = "auto"
    crf: bool = True
    showSamples: bool = False


#
# DiffusionSegWidget
#


class DiffusionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._gpuAvailable = None  # checked once, lazily (imports torch)
        self._updatingAgreement = False
        self._inputCheckKey = None  # what the warning label and the estimate were computed for

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DiffusionSegLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.clearModelsButton.connect("clicked(bool)", self.onClearModels)
        self.ui.agreementSlider.connect("valueChanged(double)", self.onAgreementChanged)
        self.ui.loadSampleButton.enabled = sampleVolumePath() is not None

        self.ui.progressBar.setVisible(False)
        self.ui.inputWarningLabel.setVisible(False)
        self._setupResultsTable()
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        """Called when the application closes and the module widget is destroyed."""
        self._cancelRunning()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # Keep a running job going: the user may work in other modules meanwhile.
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)

    def onSceneStartClose(self, caller, event):
        # The nodes of a running job are about to disappear: stop it, the scene stays as closed.
        if self._isRunning():
            self._cancelRunning()
            self.ui.statusLabel.text = _("Cancelled: the scene was closed.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        # The last run's nodes are gone: forget its samples so the slider cannot touch removed nodes.
        self.logic.forgetResults()
        self._clearResults()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
            self._selectModelInCombo(self._parameterNode.model)
        self._updateGuiState()

    # -- state ---------------------------------------------------------------------------------

    def _isRunning(self):
        return self.logic is not None and self.logic.running

    def _updateGuiState(self, caller=None, event=None):
        running = self._isRunning()
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running segmentation; the scene is left as it was.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.toolTip = _("Run the segmentation in the background.") if hasInput \
                else _("Select an input volume.")
            self.ui.applyButton.enabled = hasInput
        for widget in (self.ui.inputVolumeSelector, self.ui.roiSelector, self.ui.modelComboBox,
                       self.ui.addModelButton, self.ui.downloadModelButton, self.ui.clearModelsButton,
                       self.ui.samplesSpinBox, self.ui.stepsSpinBox, self.ui.seedSpinBox,
                       self.ui.deviceComboBox, self.ui.crfCheckBox, self.ui.showSamplesCheckBox,
                       self.ui.outputSegmentationSelector, self.ui.loadSampleButton):
            widget.enabled = not running
        if not running:
            self.ui.loadSampleButton.enabled = sampleVolumePath() is not None
            self._updateInputCheck()
        self.ui.agreementSlider.enabled = (not running) and self.logic is not None and self.logic.nSamples > 0

    # -- does the input fit, how long will it take (before Apply) ------------------------------

    def _selectionKey(self):
        """Everything the input check and the estimate depend on; they are recomputed when it changes."""
        params = self._parameterNode
        if not params or not params.inputVolume:
            return None
        volume, roi = params.inputVolume, params.roi
        return (volume.GetID(), volume.GetMTime(), volume.GetImageData().GetMTime() if volume.GetImageData() else 0,
                roi.GetID() if roi else None, roi.GetMTime() if roi else 0, params.model, params.samples,
                params.steps, params.device)

    def _updateInputCheck(self):
        """Show what about the selected volume does not fit the selected model, and the time estimate.

        A visible label, not a log line: the user reads it before pressing Apply. Cheap (statistics on a
        subsample, the model card only), and only recomputed when the selection changes.
        """
        key = self._selectionKey()
        if key == self._inputCheckKey:
            return
        self._inputCheckKey = key
        if key is None:
            self._showInputWarnings([])
            self.ui.estimateLabel.text = ""
            return
        params = self._parameterNode
        try:
            warnings = self.logic.checkInput(params.inputVolume, params.model or None, params.roi)
            self._showInputWarnings([w.message for w in warnings])
        except Exception as err:  # an unusable node or model: Apply reports it properly
            logging.debug("DiffusionSeg: input check skipped: %s", err)
            self._showInputWarnings([])
        try:
            settings = self.logic.makeSettings(model=params.model or None, samples=params.samples or None,
                                               steps=params.steps or None, device=params.device)
            estimate = self.logic.estimate(params.inputVolume, settings, params.roi,
                                           speed=self._storedSpeed(params.model or None, params.device))
        except Exception as err:
            logging.debug("DiffusionSeg: no estimate: %s", err)
            estimate = None
        self.ui.estimateLabel.text = (_("Sampling: {estimate}").format(estimate=estimate.text()) if estimate
                                      else _("Sampling time: measured a few seconds after Apply."))

    def _showInputWarnings(self, messages):
        label = self.ui.inputWarningLabel
        if not messages:
            label.text = ""
            label.setVisible(False)
            return
        label.text = _("This input may not fit the model:") + "".join(f"\n\u2022 {m}" for m in messages)
        label.setVisible(True)

    def _storedSpeed(self, model, device):
        """The speed an earlier run of ``model`` with ``device`` measured (QSettings), or None."""
        ensureLibraryImportable()
        from DiffusionSegLib.models.card import read_card
        from DiffusionSegLib.models.store import resolve_model
        from DiffusionSegLib.slicer.workflow import MeasuredSpeed

        name = read_card(resolve_model(model)).name
        value = qt.QSettings().value(f"{SPEED_SETTINGS_GROUP}/{name}/{device}")
        try:
            return MeasuredSpeed(name, device, float(value)) if value is not None else None
        except (TypeError, ValueError):
            return None

    def _storeSpeed(self):
        speed = self.logic.measuredSpeed
        if speed is not None:
            qt.QSettings().setValue(f"{SPEED_SETTINGS_GROUP}/{speed.model}/{speed.device}",
                                    speed.seconds_per_pixel_evaluation)

    # -- input -------------------------------------------------------------------------------

    def onLoadSample(self):
        path = sampleVolumePath()
        if path is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample volume."), waitCursor=True):
            volumeNode = slicer.util.loadVolume(path)
            self._parameterNode.inputVolume = volumeNode

    # -- models ------------------------------------------------------------------------------

    def refreshModels(self, select=None):
        """Fill the model list: the bundled default first, then every other readable model."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self._modelListError = ""
        try:
            entries = self.logic.availableModels()
        except Exception as err:  # a broken model folder must not break the module panel
            logging.exception("DiffusionSeg: listing models failed")
            entries = []
            self._modelListError = _("Could not list models: {error}").format(error=err)
        combo.addItem(_("Bundled default model"), "")
        combo.setItemData(0, _("The model bundled with the extension."), qt.Qt.ToolTipRole)
        for entry in entries:
            if entry["isDefault"]:
                combo.setItemText(0, _("{name} (bundled default)").format(name=entry["name"]))
                combo.setItemData(0, entry["tooltip"], qt.Qt.ToolTipRole)
                continue
            combo.addItem(f"{entry['name']} ({entry['origin']})", entry["folder"])
            combo.setItemData(combo.count - 1, entry["tooltip"], qt.Qt.ToolTipRole)
        self._modelEntries = {entry["folder"]: entry for entry in entries}
        self._modelEntries[""] = next((e for e in entries if e["isDefault"]), None)
        combo.blockSignals(wasBlocked)
        wanted = select if select is not None else (self._parameterNode.model if self._parameterNode else "")
        self._selectModelInCombo(wanted)

    def _selectModelInCombo(self, folder):
        combo = self.ui.modelComboBox
        index = combo.findData(folder or "")
        if index < 0:
            index = 0
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)
        self._showModelInfo()
        if self._parameterNode and self._parameterNode.model != (combo.itemData(index) or ""):
            self._parameterNode.model = combo.itemData(index) or ""

    def _showModelInfo(self):
        entry = getattr(self, "_modelEntries", {}).get(self.ui.modelComboBox.currentData or "")
        self.ui.modelInfoLabel.text = entry["summary"] if entry else getattr(self, "_modelListError", "")

    def onModelSelected(self, index):
        if self._parameterNode:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""
        entry = getattr(self, "_modelEntries", {}).get(self.ui.modelComboBox.itemData(index) or "")
        if entry is not None:  # DenseCRF starts as the model card recommends; the user may still change it
            self.ui.crfCheckBox.checked = entry.get("defaultCrf", True)
        self._showModelInfo()

    def onAddModel(self):
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Select a DiffusionSeg model folder (model.json + model.safetensors)"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be added."), waitCursor=True):
            installed = self.logic.installModel(folder)
            self.refreshModels(select=str(installed))
            slicer.util.showStatusMessage(_("Model installed in {path}").format(path=installed), 5000)

    def onDownloadModel(self):
        url, sha256 = self._askDownload()
        if not url:
            return
        # A progress dialog with Cancel; events are processed from the download's progress callback
        # so Slicer keeps repainting while the archive arrives.
        dialog = qt.QProgressDialog(_("Downloading model..."), _("Cancel"), 0, 100, slicer.util.mainWindow())
        dialog.setWindowTitle(_("DiffusionSeg"))
        dialog.minimumDuration = 0
        dialog.show()

        def progress(done, total):
            if total > 0:
                dialog.setValue(int(100 * done / total))
            else:
                dialog.setLabelText(_("Downloading model... {mb:.1f} MB").format(mb=done / 2**20))
            slicer.app.processEvents()
            if dialog.wasCanceled:
                # Raising from the callback stops the download; the library removes the partial file.
                raise RuntimeError(_("Download cancelled."))

        try:
            with slicer.util.tryWithErrorDisplay(_("The model could not be downloaded."), waitCursor=False):
                installed = self.logic.downloadModel(url, sha256, progress=progress)
                self.refreshModels(select=str(installed))
                slicer.util.showStatusMessage(_("Model installed in {path}").format(path=installed), 5000)
        finally:
            dialog.close()

    def _askDownload(self):
        """Small dialog: URL and SHA256 of a model archive. Returns (url, sha256) or (None, None)."""
        dialog = qt.QDialog(slicer.util.mainWindow())
        dialog.setWindowTitle(_("Download DiffusionSeg model"))
        form = qt.QFormLayout(dialog)
        note = qt.QLabel(_("Enter the address of a model archive (.zip) and the SHA256 checksum published "
                           "with it. The archive is checked before anything is installed. Only the download "
                           "request is sent; no image data leaves this computer."))
        note.wordWrap = True
        form.addRow(note)
        urlEdit = qt.QLineEdit()
        urlEdit.placeholderText = "https://.../model.zip"
        shaEdit = qt.QLineEdit()
        shaEdit.placeholderText = _("64 hexadecimal digits")
        form.addRow(_("URL:"), urlEdit)
        form.addRow(_("SHA256:"), shaEdit)
        buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Ok | qt.QDialogButtonBox.Cancel)
        buttons.connect("accepted()", dialog.accept)
        buttons.connect("rejected()", dialog.reject)
        form.addRow(buttons)
        dialog.setMinimumWidth(520)
        if dialog.exec_() != qt.QDialog.Accepted:
            return None, None
        url, sha256 = urlEdit.text.strip(), shaEdit.text.strip()
        if not url or not sha256:
            slicer.util.warningDisplay(_("Both the URL and the SHA256 checksum are needed."))
            return None, None
        return url, sha256

    def onClearModels(self):
        if not slicer.util.confirmOkCancelDisplay(
                _("Remove every model you added or downloaded? The bundled model stays."),
                _("Clear downloaded models")):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not remove the downloaded models."), waitCursor=True):
            removed = self.logic.clearInstalledModels()
            self.refreshModels(select="")
            slicer.util.showStatusMessage(_("Removed {count} model(s).").format(count=removed), 5000)

    # -- run ---------------------------------------------------------------------------------

    def onApplyButton(self):
        if self._isRunning():
            self.onCancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("Not started: the required Python packages are not installed.")
                return
            params = self._parameterNode
            settings = self.logic.makeSettings(
                model=params.model or None, samples=params.samples or None, steps=params.steps or None,
                seed=params.seed, device=params.device, crf=params.crf, showSamples=params.showSamples)
            deviceNote = self._deviceNote(params.device)
            self.logic.start(params.inputVolume, settings, params.roi)
            self._runStartTime = time.time()
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...") + (f" {deviceNote}" if deviceNote else "")
            self._deviceNoteText = deviceNote
            self._pollTimer.start()
        self._updateGuiState()

    def _deviceNote(self, device):
        """A message when no GPU will be used although one may be expected (empty when all is well)."""
        if device == "cpu":
            return ""
        if self._gpuAvailable is None:
            self._gpuAvailable = self.logic.gpuAvailable()
        if self._gpuAvailable is False:
            if device == "cuda":
                return _("No CUDA GPU found: running on the CPU instead (slower).")
            return _("No GPU found: running on the CPU (slower; fewer samples or steps are faster).")
        return ""

    def onCancel(self):
        self._cancelRunning()
        self.ui.statusLabel.text = _("Cancelled; the scene was left unchanged.")
        self._updateGuiState()

    def _cancelRunning(self):
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._isRunning():
            try:
                self.logic.cancel()
            except Exception:
                logging.exception("DiffusionSeg: cancelling the run failed")
        if hasattr(self, "ui"):
            self.ui.progressBar.setVisible(False)

    def onPollTimer(self):
        if not self._isRunning():
            self._pollTimer.stop()
            self._updateGuiState()
            return
        try:
            status = self.logic.poll()
        except Exception as err:
            self._pollTimer.stop()
            self._cancelRunning()
            slicer.util.errorDisplay(_("Lost track of the segmentation: {error}").format(error=err))
            self._updateGuiState()
            return
        self.ui.progressBar.value = progressPercent(status)
        text = stageText(status)
        if getattr(self, "_deviceNoteText", ""):
            text += f"  {self._deviceNoteText}"
        self.ui.statusLabel.text = text
        try:  # the child's own input warnings and its measured estimate, printed before sampling
            messages = self.logic.runMessages()
            if messages.estimate:
                self.ui.estimateLabel.text = _("Sampling: {estimate}").format(estimate=messages.estimate)
            if messages.warnings:
                self._showInputWarnings(messages.warnings)
        except Exception:
            logging.debug("DiffusionSeg: run messages unavailable", exc_info=True)
        if not status.finished:
            return
        self._pollTimer.stop()
        elapsed = time.time() - getattr(self, "_runStartTime", time.time())
        succeeded = False
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            self.logic.finish(self._parameterNode.outputSegmentation if self._parameterNode else None)
            succeeded = True
        self.ui.progressBar.setVisible(False)
        if succeeded:
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s.").format(seconds=elapsed)
            self._storeSpeed()
            self._inputCheckKey = None  # the estimate can now use this run's speed
            self._showResults(resetAgreement=True)
        else:
            self.ui.statusLabel.text = _("Failed; the scene was left unchanged.")
        self._updateGuiState()

    # -- results -----------------------------------------------------------------------------

    def _setupResultsTable(self):
        table = self.ui.resultsTable
        table.setColumnCount(0)
        table.setRowCount(0)
        table.verticalHeader().setVisible(False)
        table.horizontalHeader().setStretchLastSection(True)

    def _clearResults(self):
        self._setupResultsTable()
        self.ui.agreementSlider.enabled = False
        self.ui.agreementLabel.text = _("Run a segmentation with samples to use the agreement slider.")

    def _showResults(self, resetAgreement=False):
        summary = self.logic.summary()
        if not summary:
            self._clearResults()
            return
        n = self.logic.nSamples
        if resetAgreement and n > 0:
            # Start at the majority vote: what the run itself fused (mean of the samples > 0.5).
            self._updatingAgreement = True
            self.ui.agreementSlider.minimum = 1
            self.ui.agreementSlider.maximum = n
            self.ui.agreementSlider.value = n // 2 + 1
            self._updatingAgreement = False
        self._updateAgreementLabel()
        self._fillResultsTable(summary)

    def _updateAgreementLabel(self):
        n = self.logic.nSamples
        if n <= 0:
            self.ui.agreementLabel.text = _("No samples were kept: the agreement slider is off.")
            return
        k = self.logic.agreement
        if k is None:
            self.ui.agreementLabel.text = _(
                "Fused segments: the run's own fusion of {n} samples (majority vote, CRF-refined when on). "
                "Move the slider to require k of {n} samples.").format(n=n)
        elif k == n:
            self.ui.agreementLabel.text = _("Fused = all {n} samples agree (consistency).").format(n=n)
        elif k == 1:
            self.ui.agreementLabel.text = _("Fused = any of the {n} samples (union).").format(n=n)
        else:
            self.ui.agreementLabel.text = _("Fused = at least {k} of {n} samples.").format(k=k, n=n)

    def _fillResultsTable(self, summary):
        diversity = summary.get("sample_diversity", {}) or {}
        volumes = summary.get("volumes_ml", {}) or {}
        labels = list(dict.fromkeys([*diversity.keys(), *volumes.keys()]))
        regions = []
        for label in labels:
            for region in (volumes.get(label) or {}):
                if region not in regions:
                    regions.append(region)
        table = self.ui.resultsTable
        headers = [_("Label"), _("Sample diversity")] + [_("{region} (mL)").format(region=r) for r in regions]
        table.clear()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(labels))
        for row, label in enumerate(labels):
            table.setItem(row, 0, qt.QTableWidgetItem(str(label)))
            value = diversity.get(label)
            table.setItem(row, 1, qt.QTableWidgetItem("" if value is None else f"{value:.3f}"))
            for column, region in enumerate(regions, start=2):
                ml = (volumes.get(label) or {}).get(region)
                table.setItem(row, column, qt.QTableWidgetItem("" if ml is None else f"{ml:.1f}"))
        table.resizeColumnsToContents()

    def onAgreementChanged(self, value):
        if self._updatingAgreement or self._isRunning() or self.logic.nSamples <= 0:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not update the fused segments."), waitCursor=True):
            self.logic.setAgreement(int(round(value)))
            self._updateAgreementLabel()
            self._fillResultsTable(self.logic.summary())


def catalogueFigures(entry):
    """One line of measured figures from a model catalogue entry (Resources/Models.json), or ""."""
    ensureLibraryImportable()
    from DiffusionSegLib.models.catalogue import summary_line

    return summary_line(entry)


def progressPercent(status):
    """Overall progress 0-100 of a JobStatus; sampling dominates the run time."""
    if status.finished:
        return 100
    stage = status.stage
    if stage == "sampling" and status.total:
        return 5 + int(85 * min(status.done, status.total) / status.total)
    return {"starting": 0, "load": 2, "sampling": 5, "crf": 90, "restore": 95, "write": 97}.get(stage, 0)


def stageText(status):
    """One line for the status label."""
    names = {
        "starting": _("Starting the segmentation process..."),
        "load": _("Loading the model and the image..."),
        "sampling": _("Sampling"),
        "crf": _("Refining with DenseCRF..."),
        "restore": _("Restoring the input geometry..."),
        "write": _("Writing the outputs..."),
        "cancelled": _("Cancelled."),
    }
    if status.finished:
        return _("Finished; loading the results...") if status.returncode == 0 else _("The segmentation process stopped.")
    text = names.get(status.stage, status.stage)
    if status.stage == "sampling" and status.total:
        # The CLI counts network evaluations (samples x steps x slices), as the estimate does.
        text += " " + _("{done} of {total} network evaluations").format(done=status.done, total=status.total)
    return text


#
# DiffusionSegLogic
#


class DiffusionSegLogic(ScriptedLoadableModuleLogic):
    """Thin adapter over ``DiffusionSegLib.slicer.workflow.SegmentationWorkflow`` on ``slicer.mrmlScene``.

    Usable without the GUI, e.g. from Slicer's Python console::

        logic = slicer.util.getModuleLogic("DiffusionSeg")
        outputs = logic.process(volumeNode, logic.makeSettings(samples=5, steps=10))
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._workflow = None

    def getParameterNode(self):
        return DiffusionSegParameterNode(super().getParameterNode())

    @property
    def workflow(self):
        if self._workflow is None:
            ensureLibraryImportable()
            from DiffusionSegLib.slicer.workflow import SegmentationWorkflow

            self._workflow = SegmentationWorkflow(slicer.mrmlScene)
        return self._workflow

    # -- settings and dependencies -----------------------------------------------------------

    def makeSettings(self, model=None, samples=None, steps=None, seed=0, device="auto", crf=True,
                     showSamples=False):
        """A RunSettings for the child process (PythonSlicer), keeping the samples for the slider."""
        ensureLibraryImportable()
        from DiffusionSegLib.slicer.workflow import RunSettings

        return RunSettings(python=childPythonExecutable(), model=model or None, samples=samples or None,
                           steps=steps or None, seed=int(seed), device=device, crf=bool(crf),
                           keep_samples=True, show_samples=bool(showSamples))

    @staticmethod
    def missingDependencies():
        """Required packages that are not installed: {import name: pip requirement}."""
        ensureLibraryImportable()
        from DiffusionSegLib.core.dependencies import missing_requirements

        return missing_requirements()

    def ensureDependencies(self, askConfirmation=True):
        """Install the missing required packages after asking once. Returns True when all are there.

        torch comes through the PyTorch extension (it picks the build for the GPU driver); the other
        packages through Slicer's pip helpers. pydensecrf2 is optional and never installed here.
        """
        ensureLibraryImportable()
        from DiffusionSegLib.core.dependencies import TORCH, describe, missing_requirements, pip_requirements

        missing = missing_requirements()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("DiffusionSeg needs Python packages that are not installed yet:\n\n{packages}\n\n"
                  "Install them now? This downloads several hundred MB (PyTorch) and can take minutes; "
                  "Slicer may be unresponsive meanwhile.").format(packages=describe(missing)),
                _("DiffusionSeg: install dependencies")):
            return False
        if TORCH in missing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_(
                    "DiffusionSeg needs PyTorch, which is installed through the PyTorch extension. Install "
                    "the 'PyTorch' extension from the Extensions Manager, restart Slicer, then press Apply "
                    "again.")) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
            if torch is None:
                return False
        requirements = pip_requirements(missing)
        if requirements:
            _pipInstall(requirements)
        importlib.invalidate_caches()
        stillMissing = missing_requirements()
        if stillMissing:
            raise RuntimeError(_("These packages could not be installed: {packages}").format(
                packages=describe(stillMissing)))
        return True

    @staticmethod
    def gpuAvailable():
        """True/False when torch is installed and says whether a GPU (CUDA or MPS) is usable; None otherwise."""
        if importlib.util.find_spec("torch") is None:
            return None
        try:
            import torch

            if torch.cuda.is_available():
                return True
            mps = getattr(torch.backends, "mps", None)
            return bool(mps is not None and mps.is_available())
        except Exception:  # a broken torch install must not stop the module; the child reports it
            logging.exception("DiffusionSeg: could not query torch for a GPU")
            return None

    # -- models --------------------------------------------------------------------------------

    def availableModels(self):
        """Readable models as dicts: name, origin, folder, isDefault, summary, tooltip."""
        ensureLibraryImportable()
        from DiffusionSegLib.models import catalogue
        from DiffusionSegLib.models import store as models

        try:
            measured = {entry["name"]: entry for entry in catalogue.catalogue()}
        except Exception:  # a damaged catalogue must not hide the models themselves
            logging.exception("DiffusionSeg: reading the model catalogue failed")
            measured = {}
        entries = []
        for origin, folder, card in models.list_models():
            labels = ", ".join(card.labels[i].name for i in card.output_label_indices())
            summary = _("{name}: {modality}; labels: {labels}").format(
                name=card.name, modality=card.modality, labels=labels)
            figures = catalogueFigures(measured.get(card.name))
            if figures:
                summary += "\n" + figures
            tooltip = (card.description or card.name) + "\n" + summary
            entries.append({
                "name": card.name, "origin": origin, "folder": str(folder),
                "isDefault": origin == "bundled" and card.name == models.DEFAULT_MODEL,
                "summary": summary + (f"\n{card.description}" if card.description else ""),
                "tooltip": tooltip,
                "defaultCrf": bool(card.default_crf),
            })
        return entries

    def installModel(self, sourceFolder):
        ensureLibraryImportable()
        from DiffusionSegLib.models.store import install_model

        return install_model(sourceFolder)

    def downloadModel(self, url, sha256, progress=None):
        """Download a model archive (checked against ``sha256``) into the user models folder.

        ``progress(done_bytes, total_bytes)`` is called as data arrives (total 0 when unknown);
        raising from it cancels the download.
        """
        ensureLibraryImportable()
        from DiffusionSegLib.models.store import download_model

        return download_model(url, sha256, progress=progress)

    def clearInstalledModels(self):
        ensureLibraryImportable()
        from DiffusionSegLib.models.store import clear_installed_models

        return clear_installed_models()

    # -- running (delegated to the workflow) ---------------------------------------------------

    @property
    def running(self):
        return self._workflow is not None and self._workflow.running

    def forgetResults(self):
        """Drop the last run's state (after a scene close); a running job is cancelled first."""
        if self._workflow is not None:
            self._workflow.cancel()
        self._workflow = None

    def start(self, volumeNode, settings, roiNode=None):
        if volumeNode is None:
            raise ValueError(_("Select an input volume."))
        self.workflow.start(volumeNode, settings, roi_node=roiNode)

    def checkInput(self, volumeNode, model=None, roiNode=None):
        """What about the volume does not fit the model (list of InputWarning); no torch, no weights."""
        return self.workflow.check_input(volumeNode, model, roi_node=roiNode)

    def estimate(self, volumeNode, settings, roiNode=None, speed=None):
        """RunEstimate of the sampling time from a measured speed, or None when none was measured."""
        return self.workflow.estimate(volumeNode, settings, roi_node=roiNode, speed=speed)

    def runMessages(self):
        """Input warnings and the measured estimate the running child printed."""
        return self.workflow.run_messages()

    @property
    def measuredSpeed(self):
        return self._workflow.measured_speed if self._workflow is not None else None

    def poll(self):
        return self.workflow.poll()

    def cancel(self):
        if self._workflow is not None:
            self._workflow.cancel()

    def finish(self, segmentationNode=None):
        return self.workflow.finish(segmentation_node=segmentationNode)

    def process(self, volumeNode, settings=None, roiNode=None, segmentationNode=None, timeout=None):
        """Blocking run for scripts and tests: returns the BridgeOutputs."""
        if settings is None:
            settings = self.makeSettings()
        return self.workflow.process(volumeNode, settings, roi_node=roiNode, segmentation_node=segmentationNode,
                                     timeout=timeout)

    @property
    def nSamples(self):
        return self._workflow.n_samples if self._workflow is not None else 0

    @property
    def agreement(self):
        return self._workflow.agreement if self._workflow is not None else None

    def setAgreement(self, k):
        self.workflow.set_agreement(int(k))

    def summary(self):
        return self._workflow.summary() if self._workflow is not None else {}


def _pipInstall(requirements):
    """pip-install ``requirements`` (list of requirement strings) with Slicer's helper of this version.

    Newer Slicer (>= 5.12) has ``pip_ensure`` (checks, installs, skips installs in testing mode, offers a
    restart when an imported package changed); its home module moved during development, so both known
    homes are tried. Older versions: ``slicer.util.pip_install``.
    """
    for moduleName in ("slicer.pydeps", "slicer.packaging"):
        try:
            helper = importlib.import_module(moduleName)
        except ImportError:
            continue
        pipEnsure = getattr(helper, "pip_ensure", None)
        if pipEnsure is not None:
            from packaging.requirements import Requirement

            # Already confirmed by the user above: no second prompt.
            pipEnsure([Requirement(r) for r in requirements], prompt_install=False, requester="DiffusionSeg")
            return
    slicer.util.pip_install(requirements)


#
# DiffusionSegTest
#


class DiffusionSegTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer (see README: headless test command). Needs the Python dependencies."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Entry point of the module's "Reload and Test" button."""
        for test in (self.test_DiffusionSeg_process, self.test_DiffusionSeg_cancel):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Skipped: {reason}")

    def _requireDependencies(self):
        missing = DiffusionSegLogic.missingDependencies()
        if missing:
            self.skipTest("missing Python packages (press Apply once in the module to install them): "
                          + ", ".join(missing.values()))

    def _loadSample(self):
        path = sampleVolumePath()
        self.assertIsNotNone(path, "the bundled sample volume is missing")
        return slicer.util.loadVolume(path)

    def test_DiffusionSeg_process(self):
        self._requireDependencies()
        self.delayDisplay("Segmenting the bundled sample CT (2 samples x 3 steps)")
        volumeNode = self._loadSample()
        logic = DiffusionSegLogic()
        settings = logic.makeSettings(samples=2, steps=3, seed=0, device="cpu", crf=False)
        outputs = logic.process(volumeNode, settings, timeout=1800)

        segmentationNode = outputs.segmentation_node
        self.assertIsNotNone(segmentationNode)
        segmentation = segmentationNode.GetSegmentation()
        self.assertGreater(segmentation.GetNumberOfSegments(), 0)

        # Every label of the model has its fused, consistency and ambiguity segments.
        ensureLibraryImportable()
        from DiffusionSegLib.models.card import read_card
        from DiffusionSegLib.models.store import resolve_model

        card = read_card(resolve_model(None))
        for label in card.labels:
            self.assertIn(label.name, outputs.segment_ids)
            for region in ("fused", "consistency", "ambiguity"):
                segmentId = outputs.segment_ids[label.name][region]
                self.assertIsNotNone(segmentation.GetSegment(segmentId), f"{label.name}/{region}")

        # The segmentation lives on exactly the input volume's grid.
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        expected = slicer.vtkSegmentationConverter.SerializeImageGeometry(ijkToRas, volumeNode.GetImageData())
        actual = segmentation.GetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
        self.assertEqual(actual, expected)

        # Continuous maps and the table: one probability and one uncertainty volume per label.
        self.assertEqual(len(outputs.probability_nodes), len(card.labels))
        self.assertEqual(len(outputs.uncertainty_nodes), len(card.labels))
        for node in [*outputs.probability_nodes, *outputs.uncertainty_nodes]:
            self.assertEqual(node.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions())
        self.assertIsNotNone(outputs.table_node)

        # The agreement slider: k of N from the kept samples, without sampling again.
        self.assertEqual(logic.nSamples, 2)
        logic.setAgreement(2)
        self.assertEqual(logic.agreement, 2)
        summary = logic.summary()
        self.assertIn("sample_diversity", summary)
        self.assertIn("volumes_ml", summary)
        self.delayDisplay("Process test passed")

    def test_DiffusionSeg_cancel(self):
        self._requireDependencies()
        self.delayDisplay("Cancelling a running segmentation leaves the scene unchanged")
        volumeNode = self._loadSample()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = DiffusionSegLogic()
        logic.start(volumeNode, logic.makeSettings(samples=8, steps=50, device="cpu"))
        self.assertTrue(logic.running)
        deadline = time.time() + 120
        while time.time() < deadline:
            status = logic.poll()
            if status.finished or status.stage == "sampling":
                break
            time.sleep(0.2)
            slicer.app.processEvents()
        logic.cancel()
        self.assertFalse(logic.running)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Cancel test passed")
