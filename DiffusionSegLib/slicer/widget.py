"""The DiffusionSeg module panel: the Qt side of the module (runs inside Slicer only).

``DiffusionSegWidget`` (the module file) loads the Qt Designer file, creates the module's Logic and a
:class:`DiffusionSegPanel`, and hands it its ``setup``/``cleanup``/``enter``/``exit`` and the scene
close events. The panel maps the controls to the parameter node (``@parameterNodeWrapper``), shows
the model list, adds/downloads/clears models, starts a run on Apply (Apply becomes Cancel), polls it
from a QTimer, and shows the results table and the agreement slider. Everything that is not Qt is in
:mod:`DiffusionSegLib.slicer.logic` (settings, dependencies, models, progress text) and the run
itself in :class:`DiffusionSegLib.slicer.workflow.SegmentationWorkflow` (``logic.workflow``).

This is the only library module that imports ``qt``/``slicer`` at file scope; nothing else in the
library imports it (pytest has no Qt).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from DiffusionSegLib.core.errors import SettingsError
from DiffusionSegLib.slicer import logic as modulelogic

POLL_INTERVAL_MS = 200
STATUS_MESSAGE_MS = 5000


class DiffusionSegPanel(VTKObservationMixin):
    """The module panel's behaviour on the widgets of ``DiffusionSeg.ui``.

    ``logic``: the module's ``DiffusionSegLogic`` (``getParameterNode()``, ``workflow``,
    ``resetWorkflow()``). ``samplePath``: the bundled sample volume, or None (button disabled).
    """

    def __init__(self, uiWidget: Any, logic: Any, samplePath: str | None):
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self.samplePath = samplePath
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self._parameterNode: Any = None
        self._parameterNodeGuiTag: Any = None
        self._gpuAvailable: bool | None = None  # checked once, lazily (imports torch)
        self._updatingAgreement = False
        self._inputCheckKey: Any = None  # what the warning label and the estimate were computed for
        self._modelEntries: dict[str, modulelogic.ModelEntry | None] = {}
        self._modelListError = ""
        self._runStartTime = 0.0
        self._deviceNoteText = ""

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskSelected)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.clearModelsButton.connect("clicked(bool)", self.onClearModels)
        self.ui.agreementSlider.connect("valueChanged(double)", self.onAgreementChanged)
        self.ui.gedButton.connect("clicked(bool)", self.onCompareWithReference)
        self.ui.referenceSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateGuiState)
        self.ui.loadSampleButton.enabled = samplePath is not None

        self.ui.progressBar.setVisible(False)
        self.ui.inputWarningLabel.setVisible(False)
        self._setupResultsTable()
        self.refreshModels()
        self.initializeParameterNode()

    @property
    def workflow(self) -> Any:
        """The run of the module (a SegmentationWorkflow); replaced by the Logic after a scene close."""
        return self.logic.workflow

    # -- module widget life cycle (called by DiffusionSegWidget) ---------------------------------

    def cleanup(self) -> None:
        """The application closes and the module widget is destroyed: stop a run, drop observers."""
        self._cancelRunning()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Keep a running job going: the user may work in other modules meanwhile.
        self._disconnectParameterNode()

    def onSceneStartClose(self) -> None:
        # The nodes of a running job are about to disappear: stop it, the scene stays as closed.
        if self._isRunning():
            self._cancelRunning()
            self.ui.statusLabel.text = _("Cancelled: the scene was closed.")
        self.setParameterNode(None)

    def onSceneEndClose(self, entered: bool) -> None:
        # The last run's nodes are gone: forget its samples so the slider cannot touch removed nodes.
        self.logic.resetWorkflow()
        self._clearResults()
        if entered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)

    def setParameterNode(self, inputParameterNode: Any) -> None:
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
            self._selectModelInCombo(self._parameterNode.model)
        self._updateGuiState()

    # -- state -----------------------------------------------------------------------------------

    def _isRunning(self) -> bool:
        return self.workflow.running

    def _updateGuiState(self, caller: Any = None, event: Any = None) -> None:
        running = self._isRunning()
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running segmentation; the scene is left as it was.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.toolTip = (_("Run the segmentation in the background.") if hasInput
                                           else _("Select an input volume."))
            self.ui.applyButton.enabled = hasInput
        for widget in (self.ui.inputVolumeSelector, self.ui.roiSelector, self.ui.modelComboBox, self.ui.taskComboBox,
                       self.ui.addModelButton, self.ui.downloadModelButton, self.ui.clearModelsButton,
                       self.ui.samplesSpinBox, self.ui.stepsSpinBox, self.ui.seedSpinBox,
                       self.ui.deviceComboBox, self.ui.crfCheckBox, self.ui.showSamplesCheckBox,
                       self.ui.outputSegmentationSelector, self.ui.loadSampleButton):
            widget.enabled = not running
        if not running:
            self.ui.loadSampleButton.enabled = self.samplePath is not None
            self._updateInputCheck()
        self.ui.agreementSlider.enabled = (not running) and self.workflow.n_samples > 0
        self.ui.gedButton.enabled = ((not running) and self.workflow.n_samples > 0
                                     and self.ui.referenceSegmentationSelector.currentNode() is not None)

    # -- does the input fit, how long will it take (before Apply) --------------------------------

    def _selectionKey(self) -> tuple | None:
        """Everything the input check and the estimate depend on; they are recomputed when it changes."""
        params = self._parameterNode
        if not params or not params.inputVolume:
            return None
        volume, roi = params.inputVolume, params.roi
        return (volume.GetID(), volume.GetMTime(), volume.GetImageData().GetMTime() if volume.GetImageData() else 0,
                roi.GetID() if roi else None, roi.GetMTime() if roi else 0, params.model, params.task, params.samples,
                params.steps, params.device)

    def _updateInputCheck(self) -> None:
        """Show what about the selected volume does not fit the selected model, and the time estimate.

        A visible label, not a log line: the user reads it before pressing Apply. Cheap (statistics on
        a subsample, the model card only), and only recomputed when the selection changes.
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
            warnings = self.workflow.check_input(params.inputVolume, params.model or None, roi_node=params.roi,
                                                 task=params.task or None)
            self._showInputWarnings([w.message for w in warnings])
        except SettingsError as err:  # a multi-task model whose task the image does not decide
            self._showInputWarnings([str(err)])
        except Exception as err:  # an unusable node or model: Apply reports it properly
            logging.debug("DiffusionSeg: input check skipped: %s", err)
            self._showInputWarnings([])
        try:
            speed = modulelogic.stored_speed(params.model or None, params.device, qt.QSettings().value)
            estimate = self.workflow.estimate(params.inputVolume, modulelogic.settings_from_parameters(params),
                                              roi_node=params.roi, speed=speed)
        except Exception as err:
            logging.debug("DiffusionSeg: no estimate: %s", err)
            estimate = None
        self.ui.estimateLabel.text = (_("Sampling: {estimate}").format(estimate=estimate.text()) if estimate
                                      else _("Sampling time: measured a few seconds after Apply."))

    def _showInputWarnings(self, messages: list[str]) -> None:
        label = self.ui.inputWarningLabel
        if not messages:
            label.text = ""
            label.setVisible(False)
            return
        label.text = _("This input may not fit the model:") + "".join(f"\n\u2022 {m}" for m in messages)
        label.setVisible(True)

    def _storeSpeed(self) -> None:
        """Remember the speed the finished run measured (QSettings): later estimates use it."""
        speed = self.workflow.measured_speed
        if speed is not None:
            qt.QSettings().setValue(*modulelogic.speed_setting(speed))

    # -- input -----------------------------------------------------------------------------------

    def onLoadSample(self) -> None:
        if self.samplePath is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample volume."), waitCursor=True):
            self._parameterNode.inputVolume = slicer.util.loadVolume(self.samplePath)

    # -- models ----------------------------------------------------------------------------------

    def refreshModels(self, select: str | None = None) -> None:
        """Fill the model list: the bundled default first, then every other readable model."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self._modelListError = ""
        try:
            entries = modulelogic.available_models()
        except Exception as err:  # a broken model folder must not break the module panel
            logging.exception("DiffusionSeg: listing models failed")
            entries = []
            self._modelListError = _("Could not list models: {error}").format(error=err)
        combo.addItem(_("Bundled default model"), "")
        combo.setItemData(0, _("The model bundled with the extension."), qt.Qt.ToolTipRole)
        for entry in entries:
            if entry.is_default:
                combo.setItemText(0, _("{name} (bundled default)").format(name=entry.name))
                combo.setItemData(0, entry.tooltip, qt.Qt.ToolTipRole)
                continue
            combo.addItem(f"{entry.name} ({entry.origin})", entry.folder)
            combo.setItemData(combo.count - 1, entry.tooltip, qt.Qt.ToolTipRole)
        self._modelEntries = {entry.folder: entry for entry in entries}
        self._modelEntries[""] = next((e for e in entries if e.is_default), None)
        combo.blockSignals(wasBlocked)
        wanted = select if select is not None else (self._parameterNode.model if self._parameterNode else "")
        self._selectModelInCombo(wanted)

    def _selectModelInCombo(self, folder: str) -> None:
        combo = self.ui.modelComboBox
        index = max(combo.findData(folder or ""), 0)  # a model that is gone: the bundled default
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)
        self._showModelInfo()
        if self._parameterNode and self._parameterNode.model != (combo.itemData(index) or ""):
            self._parameterNode.model = combo.itemData(index) or ""

    def _showModelInfo(self) -> None:
        entry = self._modelEntries.get(self.ui.modelComboBox.currentData or "")
        self.ui.modelInfoLabel.text = entry.summary if entry else self._modelListError
        self._fillTasks(entry)

    def _fillTasks(self, entry: Any) -> None:
        """The task list of a multi-task model (hidden for a single-task one); the user chooses the site."""
        combo = self.ui.taskComboBox
        tasks = entry.tasks if entry is not None else ()
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if tasks:
            combo.addItem(_("Automatic (from the image's modality, else the model's default)"), "")
            for name, description in tasks:
                combo.addItem(name, name)
                combo.setItemData(combo.count - 1, description or name, qt.Qt.ToolTipRole)
        current = self._parameterNode.task if self._parameterNode else ""
        combo.currentIndex = max(combo.findData(current), 0) if tasks else -1
        combo.blockSignals(wasBlocked)
        combo.visible = self.ui.taskLabel.visible = bool(tasks)
        chosen = (combo.currentData or "") if tasks else ""  # a task the new model lacks is dropped
        if self._parameterNode and self._parameterNode.task != chosen:
            self._parameterNode.task = chosen

    def onTaskSelected(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.task = self.ui.taskComboBox.itemData(index) or ""

    def onModelSelected(self, index: int) -> None:
        folder = self.ui.modelComboBox.itemData(index) or ""
        if self._parameterNode:
            self._parameterNode.model = folder
        entry = self._modelEntries.get(folder)
        if entry is not None:  # DenseCRF starts as the model card recommends; the user may still change it
            self.ui.crfCheckBox.checked = entry.default_crf
        self._showModelInfo()

    def _modelInstalled(self, installed: Any) -> None:
        self.refreshModels(select=str(installed))
        slicer.util.showStatusMessage(_("Model installed in {path}").format(path=installed), STATUS_MESSAGE_MS)

    def onAddModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Select a DiffusionSeg model folder (model.json + model.safetensors)"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be added."), waitCursor=True):
            # The install loads the network once (architecture check): that needs torch.
            if self._ensureDependencies():
                self._modelInstalled(modulelogic.install_model(folder))

    def onDownloadModel(self) -> None:
        url, sha256 = self._askDownload()
        if not url:
            return
        ready = False  # tryWithErrorDisplay shows an install error and goes on: remember the outcome
        with slicer.util.tryWithErrorDisplay(_("The model could not be downloaded."), waitCursor=False):
            ready = self._ensureDependencies()  # the install loads the network once: that needs torch
        if not ready:
            return
        # A progress dialog with Cancel; events are processed from the download's progress callback
        # so Slicer keeps repainting while the archive arrives.
        dialog = qt.QProgressDialog(_("Downloading model..."), _("Cancel"), 0, 100, slicer.util.mainWindow())
        dialog.setWindowTitle(_("DiffusionSeg"))
        dialog.minimumDuration = 0
        dialog.show()

        def progress(done: int, total: int) -> None:
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
                self._modelInstalled(modulelogic.download_model(url, sha256, progress=progress))
        finally:
            dialog.close()

    def _askDownload(self) -> tuple[str | None, str | None]:
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

    def onClearModels(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(
                _("Remove every model you added or downloaded? The bundled model stays."),
                _("Clear downloaded models")):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not remove the downloaded models."), waitCursor=True):
            removed = modulelogic.clear_models()
            self.refreshModels(select="")
            slicer.util.showStatusMessage(_("Removed {count} model(s).").format(count=removed), STATUS_MESSAGE_MS)

    # -- run -------------------------------------------------------------------------------------

    def _ensureDependencies(self) -> bool:
        """Install what is missing after asking (Slicer's OK/Cancel dialog); True when all is there."""
        return modulelogic.ensure_dependencies(
            confirm=lambda question: slicer.util.confirmOkCancelDisplay(
                question, _("DiffusionSeg: install dependencies")))

    def onApplyButton(self) -> None:
        if self._isRunning():
            self.onCancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self._ensureDependencies():
                self.ui.statusLabel.text = _("Not started: the required Python packages are not installed.")
                return
            params = self._parameterNode
            if params.inputVolume is None:
                raise ValueError(_("Select an input volume."))
            deviceNote = self._deviceNote(params.device)
            self.workflow.start(params.inputVolume, modulelogic.settings_from_parameters(params),
                                roi_node=params.roi, show_samples=params.showSamples)
            self._runStartTime = time.time()
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...") + (f" {deviceNote}" if deviceNote else "")
            self._deviceNoteText = deviceNote
            self._pollTimer.start()
        self._updateGuiState()

    def _deviceNote(self, device: str) -> str:
        if device != "cpu" and self._gpuAvailable is None:
            self._gpuAvailable = modulelogic.gpu_available()
        return modulelogic.device_note(device, self._gpuAvailable)

    def onCancel(self) -> None:
        self._cancelRunning()
        self.ui.statusLabel.text = _("Cancelled; the scene was left unchanged.")
        self._updateGuiState()

    def _cancelRunning(self) -> None:
        self._pollTimer.stop()
        if self._isRunning():
            try:
                self.workflow.cancel()
            except Exception:
                logging.exception("DiffusionSeg: cancelling the run failed")
        self.ui.progressBar.setVisible(False)

    def onPollTimer(self) -> None:
        if not self._isRunning():
            self._pollTimer.stop()
            self._updateGuiState()
            return
        try:
            status = self.workflow.poll()
        except Exception as err:
            self._cancelRunning()
            slicer.util.errorDisplay(_("Lost track of the segmentation: {error}").format(error=err))
            self._updateGuiState()
            return
        self.ui.progressBar.value = modulelogic.progress_percent(status)
        text = modulelogic.stage_text(status)
        if self._deviceNoteText:
            text += f"  {self._deviceNoteText}"
        self.ui.statusLabel.text = text
        try:  # the child's own input warnings and its measured estimate, printed before sampling
            messages = self.workflow.run_messages()
            if messages.estimate:
                self.ui.estimateLabel.text = _("Sampling: {estimate}").format(estimate=messages.estimate)
            if messages.warnings:
                self._showInputWarnings(messages.warnings)
        except Exception:
            logging.debug("DiffusionSeg: run messages unavailable", exc_info=True)
        if not status.finished:
            return
        self._pollTimer.stop()
        elapsed = time.time() - self._runStartTime
        succeeded = False
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            self.workflow.finish(self._parameterNode.outputSegmentation if self._parameterNode else None)
            succeeded = True
        self.ui.progressBar.setVisible(False)
        if succeeded:
            self.ui.statusLabel.text = modulelogic.done_text(elapsed, self.workflow.summary().get("report"))
            self._storeSpeed()
            self._inputCheckKey = None  # the estimate can now use this run's speed
            self._showResults(resetAgreement=True)
        else:
            self.ui.statusLabel.text = _("Failed; the scene was left unchanged.")
        self._updateGuiState()

    # -- results ---------------------------------------------------------------------------------

    def _setupResultsTable(self) -> None:
        table = self.ui.resultsTable
        table.setColumnCount(0)
        table.setRowCount(0)
        table.verticalHeader().setVisible(False)
        table.horizontalHeader().setStretchLastSection(True)

    def _clearResults(self) -> None:
        self._setupResultsTable()
        self.ui.agreementSlider.enabled = False
        self.ui.agreementLabel.text = _("Run a segmentation with samples to use the agreement slider.")

    def _showResults(self, resetAgreement: bool = False) -> None:
        summary = self.workflow.summary()
        if not summary:
            self._clearResults()
            return
        n = self.workflow.n_samples
        if resetAgreement and n > 0:
            # Start at the majority vote: what the run itself fused (mean of the samples > 0.5).
            self._updatingAgreement = True
            self.ui.agreementSlider.minimum = 1
            self.ui.agreementSlider.maximum = n
            self.ui.agreementSlider.value = n // 2 + 1
            self._updatingAgreement = False
        self._updateAgreementLabel()
        self._fillResultsTable(summary)

    def _updateAgreementLabel(self) -> None:
        n = self.workflow.n_samples
        if n <= 0:
            self.ui.agreementLabel.text = _("No samples were kept: the agreement slider is off.")
            return
        k = self.workflow.agreement
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

    def _fillResultsTable(self, summary: dict[str, Any]) -> None:
        diversity = summary.get("sample_diversity", {}) or {}
        volumes = summary.get("volumes_ml", {}) or {}
        labels = list(dict.fromkeys([*diversity.keys(), *volumes.keys()]))
        regions: list[str] = []
        for label in labels:
            for region in (volumes.get(label) or {}):
                if region not in regions:
                    regions.append(region)
        ged = summary.get("ged", {}) or {}
        table = self.ui.resultsTable
        headers = [_("Label"), _("Sample diversity")] + [_("{region} (mL)").format(region=r) for r in regions]
        if ged:  # after "Compare (GED)": the distance to the reference and its two other terms
            headers += [_("GED"), _("E[d(S,Y)]"), _("E[d(Y,Y')]")]
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
            if ged:
                terms = ged.get(label) or {}
                for column, term in enumerate(("ged", "cross", "reference_diversity"), start=2 + len(regions)):
                    value = terms.get(term)
                    table.setItem(row, column, qt.QTableWidgetItem("" if value is None else f"{value:.3f}"))
        table.resizeColumnsToContents()

    def onCompareWithReference(self) -> None:
        """GED of the last run's samples against the chosen segmentation's segments named like its labels."""
        reference = self.ui.referenceSegmentationSelector.currentNode()
        if reference is None or self.workflow.n_samples <= 0:
            return
        labels = list((self.workflow.summary().get("sample_diversity") or {}).keys())
        matched = modulelogic.match_reference_segments(reference, labels)
        if not matched:
            self.ui.statusLabel.text = _("No segment of '{node}' is named like a label ({labels}).").format(
                node=reference.GetName(), labels=", ".join(labels))
            return
        try:
            self.workflow.ged_against(matched)
        except (ValueError, RuntimeError) as err:
            slicer.util.errorDisplay(_("Could not compare with the reference: {error}").format(error=err))
            return
        self.ui.statusLabel.text = _("Compared with {n} reference segment(s) of '{node}'.").format(
            n=sum(len(v) for v in matched.values()), node=reference.GetName())
        self._fillResultsTable(self.workflow.summary())

    def onAgreementChanged(self, value: float) -> None:
        if self._updatingAgreement or self._isRunning() or self.workflow.n_samples <= 0:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not update the fused segments."), waitCursor=True):
            self.workflow.set_agreement(int(round(value)))
            self._updateAgreementLabel()
            self._fillResultsTable(self.workflow.summary())


__all__ = ["DiffusionSegPanel"]
