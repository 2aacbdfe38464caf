"""SemID 3D Slicer module ("De-identify"): send a head volume to the SemID server, show the
de-identified result beside the original, and save it as a new DICOM series.

This file is a thin adapter: the HTTP client, the privacy levels and the DICOM export live in
SemIDLib (no Slicer imports, tested with pytest against a real server).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ctk
import numpy as np
import qt
import slicer
import vtk
from SemIDLib import (
    DONE,
    KEYS,
    OUTLINE_SOURCE,
    PRESETS,
    Geometry,
    InferJob,
    SegcheckSummary,
    SemIDClient,
    SemIDClientError,
    SeriesExportError,
    ServerHeader,
    ServerInfo,
    changed_mask,
    display_window,
    explain_level,
    fetch_server_header,
    format_level,
    format_record,
    parse_level,
    plan_series,
    read_source_attributes,
    render_pair,
    start_header_job,
    summarize_record,
    validate,
    validate_output_folder,
    validate_server_url,
    write_renders,
    write_series,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SOURCE_REFERENCE = "SemIDSource"
POLL_MS = 200


class SemID(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "De-identify"
        self.parent.categories = ["Utilities"]
        self.parent.dependencies = []
        self.parent.contributors = ["SemID developers"]
        self.parent.helpText = """
Removes the identity from a head CT or MRI while keeping its medical content: the face and ears are
blocked at an adjustable privacy level and the blocked region is refilled by SemID's generator, which
draws a face from identity-free features of a medical encoder, in the volume's own contrast. The brain
(found in the image) and every voxel outside the blocked region are untouched. A head that is already
defaced gets what remains smoothed; a skull-stripped brain, or a volume with no face part or ear in view,
is returned unchanged with the reason. The work is done by a SemID MONAI Label server (start it with
<code>semid serve DATA_FOLDER</code>).
<ul>
<li>Pick the input volume and the privacy level (off, low, medium, high, max, or any value 0-1); the
line under the slider says what the level removes.</li>
<li>De-identify: runs in the background (Cancel stops it). The result is shown beside the original in
linked views with the changed region outlined, with frontal and lateral surface renders of both, the
record (level, blocked volume, residual re-identification risk, models) and, if ticked, the
segmentation check (Dice per class, pass/fail; the segmentation is shown over the result).</li>
<li>Save as DICOM: writes the result as a new series, optionally also into Slicer's DICOM database. For a
volume loaded from Slicer's DICOM database, the header is the source series' header de-identified by the
server with the project's DICOM profile (pseudonymous patient, the same pseudonymous study as every other
export of that study, new series and instance UIDs, kept patient characteristics). A volume loaded from a
file has no source header: its series gets a new pseudonymous patient and study of its own. The source
series is never modified.</li>
</ul>
"""
        self.parent.acknowledgementText = """
SemID implements the identity-blocking and medical-semantics-compensation approach of Tian et al.
(ICCV 2025). Developed by the SemID developers.
"""


class SemIDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: server, input volume, privacy level, background request, results, DICOM export."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SemIDLogic | None = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._job: InferJob | None = None
        self._jobDone: Any = None  # called on the main thread with the finished job
        self._timer: Any = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemID.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SemIDLogic()

        # Only folders make sense as an export target.
        self.ui.outputFolderSelector.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.levelSlider.minimum = 0.0
        self.ui.levelSlider.maximum = 1.0
        self.ui.progressBar.visible = False
        self.ui.cancelButton.enabled = False
        self.ui.segcheckLabel.setFont(qt.QFont("Monospace"))

        # The widget polls the background job: Qt objects may only be touched from this thread.
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.serverUrlLineEdit.editingFinished.connect(self.updateParameterNodeFromGUI)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.levelSlider.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.outputFolderSelector.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)

        presetButtons = {
            "off": self.ui.presetOffButton,
            "low": self.ui.presetLowButton,
            "medium": self.ui.presetMediumButton,
            "high": self.ui.presetHighButton,
            "max": self.ui.presetMaxButton,
        }
        for name, button in presetButtons.items():
            button.setToolTip(f"{name} ({PRESETS[name]:.2f}): {explain_level(PRESETS[name])}")
            # Default argument binds the value now; a plain closure would see the last preset only.
            button.clicked.connect(lambda _checked=False, value=PRESETS[name]: self.setLevel(value))

        self.ui.checkServerButton.clicked.connect(self.onCheckServer)
        self.ui.deidentifyButton.clicked.connect(self.onDeidentify)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.saveDicomButton.clicked.connect(self.onSaveDicom)
        self.ui.saveDefaultLevelButton.clicked.connect(self.onSaveDefaultLevel)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        if self._job is not None:
            self._job.cancel()  # its result would land in a closed scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ---------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        """Use the module's parameter node, with defaults and a first volume selected."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.SetNodeReferenceID("InputVolume", firstVolume.GetID())

    def setParameterNode(self, inputParameterNode: Any) -> None:
        if inputParameterNode:
            problems = self.logic.setDefaultParameters(inputParameterNode)
            if problems:
                self.showMessage(f"Settings reset to defaults: {problems[0]}", error=True)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller: Any = None, event: Any = None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        # Guard: setting widget values fires their signals, which would write back mid-update.
        self._updatingGUIFromParameterNode = True
        try:
            node = self._parameterNode
            self.ui.serverUrlLineEdit.text = node.GetParameter("ServerURL")
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference("InputVolume"))
            self.ui.outputVolumeSelector.setCurrentNode(node.GetNodeReference("OutputVolume"))
            level = float(node.GetParameter("Level") or PRESETS["high"])
            self.ui.levelSlider.value = level
            self.ui.levelExplanationLabel.text = f"{format_level(level)}: {explain_level(level)}"
            self.ui.outputFolderSelector.currentPath = node.GetParameter("OutputFolder")

            busy = self._job is not None
            hasInput = node.GetNodeReference("InputVolume") is not None
            hasUrl = bool(node.GetParameter("ServerURL").strip())
            self.ui.deidentifyButton.enabled = hasInput and hasUrl and not busy
            self.ui.checkServerButton.enabled = hasUrl and not busy
            self.ui.cancelButton.enabled = busy
            hasOutput = node.GetNodeReference("OutputVolume") is not None
            self.ui.saveDicomButton.enabled = hasOutput and bool(node.GetParameter("OutputFolder")) and not busy
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, *args: Any) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        node = self._parameterNode
        wasModified = node.StartModify()
        try:
            url = self.ui.serverUrlLineEdit.text.strip()
            node.SetParameter("ServerURL", url)
            folder = self.ui.outputFolderSelector.currentPath
            node.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
            node.SetNodeReferenceID("OutputVolume", self.ui.outputVolumeSelector.currentNodeID)
            node.SetParameter("Level", f"{self.ui.levelSlider.value:.4f}")
            node.SetParameter("OutputFolder", folder)
            # Kept in Slicer's settings only when valid, so a typo never sticks across sessions.
            settings = qt.QSettings()
            try:
                settings.setValue(KEYS["server_url"], validate_server_url(url))
            except ValueError:
                pass
            try:
                settings.setValue(KEYS["output_folder"], validate_output_folder(folder))
            except ValueError:
                pass
        finally:
            node.EndModify(wasModified)

    def setLevel(self, level: float) -> None:
        """Move the slider to a preset; the parameter node follows through the slider's signal."""
        self.ui.levelSlider.value = level

    def onSaveDefaultLevel(self) -> None:
        level = float(self.ui.levelSlider.value)
        qt.QSettings().setValue(KEYS["level"], f"{level:.4f}")
        self.showMessage(f"Default privacy level set to {format_level(level)}.")

    # -- messages ---------------------------------------------------------------------------------
    def showMessage(self, text: str, error: bool = False) -> None:
        """A line in the panel; errors in red. Never a dialog with a traceback."""
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")

    def _guard(self, action: Any) -> Any:
        """Run `action`; user errors become one sentence in the panel, never a traceback dialog."""
        try:
            return action()
        except (SemIDClientError, SeriesExportError, ValueError) as exc:
            self.showMessage(str(exc), error=True)
        except Exception as exc:
            # Unexpected: keep the traceback for the Python console and the log, show a short line.
            logging.exception("SemID: unexpected failure")
            self.showMessage(
                f"SemID failed unexpectedly ({type(exc).__name__}); see the Python console for details.", error=True
            )
        return None

    # -- actions ----------------------------------------------------------------------------------
    def onCheckServer(self) -> None:
        self.updateParameterNodeFromGUI()
        url = self._parameterNode.GetParameter("ServerURL")
        self.showMessage(f"Contacting {url}...")
        slicer.app.processEvents()
        info = self._guard(lambda: self.logic.checkServer(url))
        if info is not None:
            extra = ", segmentation check available" if "segcheck" in info.models else ""
            name = info.name or "MONAI Label"
            self.showMessage(f"Connected: {name} {info.version}, task '{info.task}' ready{extra}.")

    def _startJob(self, task: str, done: Any) -> bool:
        node = self._parameterNode
        inputVolume = node.GetNodeReference("InputVolume")
        level = float(node.GetParameter("Level"))
        url = node.GetParameter("ServerURL")
        job = self._guard(lambda: self.logic.startJob(inputVolume, url, level, task))
        if job is None:
            return False
        self._watchJob(job, done)
        return True

    def _watchJob(self, job: InferJob, done: Any) -> None:
        """Poll a started job from the timer; `done(job)` runs on this thread once it succeeded."""
        self._job, self._jobDone = job, done
        self.ui.progressBar.visible = True
        self.ui.progressBar.setRange(0, 0)
        self._timer.start()
        self.updateGUIFromParameterNode()

    def onDeidentify(self) -> None:
        self.updateParameterNodeFromGUI()
        self.ui.recordLabel.text = ""
        self.ui.segcheckLabel.text = ""
        self._startJob("deidentify", self.onDeidentified)

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.showMessage("Cancelling...")

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        progress = job.progress()
        if progress.fraction is None:
            self.ui.progressBar.setRange(0, 0)  # busy indicator while the server works
        else:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.setValue(int(progress.fraction * 1000))
        self.showMessage(f"{job.task}: {progress.text()}")
        if not job.done:
            return
        self._timer.stop()
        self._job, done = None, self._jobDone
        self.ui.progressBar.visible = False
        try:
            if job.progress().phase != DONE:
                self.showMessage(str(job.error), error=not job.cancelled)
            else:
                self._guard(lambda: done(job))
        finally:
            self.logic.finishJob(job)
            self.updateGUIFromParameterNode()

    def onDeidentified(self, job: InferJob) -> None:
        node = self._parameterNode
        inputVolume = node.GetNodeReference("InputVolume")
        level = float(node.GetParameter("Level"))
        outputVolume = self.logic.loadResult(job, inputVolume, level)
        node.SetNodeReferenceID("OutputVolume", outputVolume.GetID())
        self.logic.showSideBySide(inputVolume, outputVolume)
        record = job.result.record
        self.ui.recordLabel.text = format_record(record, level)
        self.showRenders(inputVolume, outputVolume)
        self.showMessage(summarize_record(record, level) + f" Outlined: {OUTLINE_SOURCE}.")
        if self.ui.segcheckCheckBox.checked:
            self._startJob("segcheck", self.onSegchecked)

    def onSegchecked(self, job: InferJob) -> None:
        outputVolume = self._parameterNode.GetNodeReference("OutputVolume")
        summary = SegcheckSummary.from_json(job.result.record)
        self.logic.loadSegmentation(job, outputVolume, summary)
        self.ui.segcheckLabel.text = summary.table_text()
        self.ui.segcheckLabel.setStyleSheet("" if summary.passed else "color: #c0392b;")
        self.showMessage(summary.verdict(), error=not summary.passed)

    def showRenders(self, original: Any, result: Any) -> None:
        """Frontal and lateral surface renders of both, in the panel's four picture labels."""
        files = self.logic.renders(original, result)
        labels = {
            "original_frontal": self.ui.originalFrontalLabel,
            "result_frontal": self.ui.resultFrontalLabel,
            "original_lateral": self.ui.originalLateralLabel,
            "result_lateral": self.ui.resultLateralLabel,
        }
        try:
            for name, label in labels.items():
                label.setPixmap(qt.QPixmap(str(files[name])).scaledToWidth(160))
        finally:
            # The original's renders show the face: no copy is left on disk once they are on screen.
            shutil.rmtree(next(iter(files.values())).parent, ignore_errors=True)

    def onSaveDicom(self) -> None:
        """Fetch the profile's header for the source series in the background (when the source came from
        Slicer's DICOM database), then write the series."""
        self.updateParameterNodeFromGUI()
        node = self._parameterNode
        outputVolume = node.GetNodeReference("OutputVolume")
        sourceVolume = outputVolume.GetNodeReference(SOURCE_REFERENCE) if outputVolume is not None else None
        if self.logic.sourceInstanceFile(sourceVolume) is None:
            self._writeSeries(None)
            return
        url = node.GetParameter("ServerURL")
        job = self._guard(lambda: self.logic.startHeaderJob(sourceVolume, url))
        if job is not None:
            self._watchJob(job, self.onHeaderFetched)

    def onHeaderFetched(self, job: InferJob) -> None:
        self._writeSeries(ServerHeader.from_answer(job.result.record))

    def _writeSeries(self, header: ServerHeader | None) -> None:
        node = self._parameterNode
        outputVolume = node.GetNodeReference("OutputVolume")
        folder = node.GetParameter("OutputFolder")
        self.showMessage("Writing DICOM series...")
        slicer.app.processEvents()
        files = self._guard(lambda: self.logic.exportDicom(outputVolume, folder, header=header))
        if not files:
            return
        message = f"Saved {len(files)} DICOM files in {files[0].parent}."
        if header is None:
            message += (" The source volume was not loaded from Slicer's DICOM database, so the series has a new "
                        "pseudonymous patient and study of its own.")
        else:
            message += " Header: the source series' header de-identified by the project's DICOM profile."
        if self.ui.addToDatabaseCheckBox.checked:
            if self._guard(lambda: self.logic.addToDatabase(files[0].parent)):
                message += " Added to Slicer's DICOM database."
        self.showMessage(message)


class SemIDLogic(ScriptedLoadableModuleLogic):
    """The work behind the panel, callable from the Python console and from tests."""

    def __init__(self, timeout: float = 600.0) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.timeout = timeout
        self._workDirs: dict[int, str] = {}

    def setDefaultParameters(self, parameterNode: Any) -> list[str]:
        """Fill unset parameters from Slicer's settings (validated); returns the problems found."""
        settings = qt.QSettings()
        stored = {key: settings.value(name) for key, name in KEYS.items()}
        values, problems = validate({k: (str(v) if v is not None else None) for k, v in stored.items()})
        if not parameterNode.GetParameter("ServerURL"):
            parameterNode.SetParameter("ServerURL", values.server_url)
        if not parameterNode.GetParameter("Level"):
            parameterNode.SetParameter("Level", f"{values.level:.4f}")
        if not parameterNode.GetParameter("OutputFolder"):
            parameterNode.SetParameter("OutputFolder", values.output_folder)
        return problems

    def checkServer(self, serverUrl: str) -> ServerInfo:
        """Raise a SemIDClientError unless the server runs and has the de-identification task."""
        return SemIDClient(serverUrl, timeout=min(self.timeout, 30.0)).info()

    # -- background requests ----------------------------------------------------------------------
    def startJob(self, inputVolume: Any, serverUrl: str, level: str | float, task: str = "deidentify") -> InferJob:
        """Save `inputVolume` to a private temporary folder and start `task` on it in the background."""
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("Select a volume with image data to de-identify.")
        if inputVolume.GetParentTransformNode() is not None:
            # The server sees the voxels and their geometry only: a pending transform would be lost.
            raise ValueError("The volume is under a transform: harden the transform first (Data module).")
        level = parse_level(level)
        client = SemIDClient(serverUrl, timeout=self.timeout)
        # The temporary input holds the identifiable face: finishJob removes the folder whatever happens.
        workDir = tempfile.mkdtemp(prefix="semid-slicer-")
        try:
            inputPath = os.path.join(workDir, "input.nrrd")
            if not slicer.util.saveNode(inputVolume, inputPath, {"useCompression": 0}):
                raise ValueError("Could not write the volume to a temporary file: check the free disk space.")
            job = InferJob(client, task, inputPath, {"level": level}, output_dir=os.path.join(workDir, "out"))
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self._workDirs[id(job)] = workDir
        return job.start()

    def finishJob(self, job: InferJob) -> None:
        """Remove the job's temporary input and output (after its result was loaded)."""
        workDir = self._workDirs.pop(id(job), None)
        if workDir:
            shutil.rmtree(workDir, ignore_errors=True)

    def runJob(self, inputVolume: Any, serverUrl: str, level: str | float, task: str = "deidentify") -> InferJob:
        """Start a job and wait for it (scripts, self tests); raises its error when it fails."""
        job = self.startJob(inputVolume, serverUrl, level, task)
        job.wait()
        if job.progress().phase != DONE:
            self.finishJob(job)
            raise job.error
        return job

    def loadResult(self, job: InferJob, inputVolume: Any, level: float) -> Any:
        """Load a finished `deidentify` job's volume as a new node beside `inputVolume`."""
        # A neutral node name: a volume's name may come from DICOM descriptions.
        name = slicer.mrmlScene.GenerateUniqueName("SemID de-identified")
        outputVolume = slicer.util.loadVolume(str(job.result.volume_path), {"name": name, "show": False,
                                                                             "singleFile": True})
        outputVolume.SetAttribute("SemID.level", f"{level:g}")
        outputVolume.SetAttribute("SemID.record", json.dumps(job.result.record))
        outputVolume.SetNodeReferenceID(SOURCE_REFERENCE, inputVolume.GetID())
        return outputVolume

    def deidentify(self, inputVolume: Any, serverUrl: str, level: str | float) -> tuple[Any, dict[str, Any]]:
        """De-identify `inputVolume` on the server and wait; returns (new volume node, server record)."""
        job = self.runJob(inputVolume, serverUrl, level)
        try:
            outputVolume = self.loadResult(job, inputVolume, parse_level(level))
        finally:
            self.finishJob(job)
        return outputVolume, job.result.record

    def loadSegmentation(self, job: InferJob, outputVolume: Any, summary: SegcheckSummary) -> Any:
        """The `segcheck` label map as a segmentation node over the de-identified volume."""
        labelNode = slicer.util.loadLabelVolume(str(job.result.volume_path), {"show": False})
        try:
            present = sorted(int(v) for v in np.unique(slicer.util.arrayFromVolume(labelNode)) if v)
            segNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SemID segmentation check")
            segNode.CreateDefaultDisplayNodes()
            segNode.SetReferenceImageGeometryParameterFromVolumeNode(outputVolume)
            slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segNode)
        finally:
            slicer.mrmlScene.RemoveNode(labelNode)
        names = {value: name for name, value in summary.labels.items()}
        segmentation = segNode.GetSegmentation()
        # Segments are imported in increasing label order.
        for index, value in enumerate(present[: segmentation.GetNumberOfSegments()]):
            segmentation.GetNthSegment(index).SetName(names.get(value, f"label {value}"))
        return segNode

    # -- display ----------------------------------------------------------------------------------
    def showSideBySide(self, original: Any, result: Any, orientation: str = "Sagittal") -> Any:
        """Original in the left view, result in the right: same slice, window/level and zoom, and the
        changed region outlined in both. Returns the outline's segmentation node.

        Sagittal by default: the face profile, which the privacy level changes, shows best there.
        """
        originalArray, _ = self.volumeArrayAndGeometry(original)
        resultArray, _ = self.volumeArrayAndGeometry(result)
        window, level = display_window(originalArray)
        for volume in (original, result):
            if volume.GetDisplayNode() is None:
                volume.CreateDefaultDisplayNodes()
            display = volume.GetDisplayNode()
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(window, level)
        outline = self.outlineNode(result, changed_mask(originalArray, resultArray))

        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no GUI (e.g. Slicer run with --no-main-window)
            return outline
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        views = (("Red", original), ("Yellow", result))
        for viewName, volume in views:
            sliceWidget = layoutManager.sliceWidget(viewName)
            compositeNode = sliceWidget.mrmlSliceCompositeNode()
            # Unlink while assigning volumes, or the assignment would be copied to the linked view.
            compositeNode.SetLinkedControl(False)
            compositeNode.SetBackgroundVolumeID(volume.GetID())
            compositeNode.SetForegroundVolumeID(None)
            compositeNode.SetLabelVolumeID(None)
            sliceWidget.mrmlSliceNode().SetOrientation(orientation)
        for viewName, _volume in views:
            sliceWidget = layoutManager.sliceWidget(viewName)
            sliceWidget.sliceLogic().FitSliceToAll()
            # Linked: moving the slice, panning or zooming one view does the same in the other.
            sliceWidget.mrmlSliceCompositeNode().SetLinkedControl(True)
            sliceWidget.mrmlSliceCompositeNode().SetHotLinkedControl(True)
        return outline

    @staticmethod
    def outlineNode(result: Any, mask: np.ndarray) -> Any:
        """The changed region as a segmentation shown as an outline only, in every slice view."""
        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            labelNode.CopyOrientation(result)
            slicer.util.updateVolumeFromArray(labelNode, mask.astype(np.uint8))
            segNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SemID changed region")
            segNode.CreateDefaultDisplayNodes()
            segNode.SetReferenceImageGeometryParameterFromVolumeNode(result)
            slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segNode)
        finally:
            slicer.mrmlScene.RemoveNode(labelNode)
        display = segNode.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        return segNode

    def renders(self, original: Any, result: Any) -> dict[str, Path]:
        """Frontal and lateral surface renders of both volumes as PNG files (a new temporary folder)."""
        originalArray, geometry = self.volumeArrayAndGeometry(original)
        resultArray, _ = self.volumeArrayAndGeometry(result)
        folder = tempfile.mkdtemp(prefix="semid-renders-")
        return write_renders(render_pair(originalArray, resultArray, geometry), folder)

    @staticmethod
    def volumeArrayAndGeometry(volume: Any) -> tuple[np.ndarray, Geometry]:
        """The (z, y, x) voxel array and LPS geometry of a scalar volume node."""
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        ijkToRas = [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]
        return np.array(slicer.util.arrayFromVolume(volume)), Geometry.from_ijk_to_ras(ijkToRas)

    @staticmethod
    def sourceInstanceFile(volume: Any) -> str | None:
        """One DICOM file of the volume's source series in Slicer's DICOM database, or None when the
        volume was not loaded from it (e.g. from a NIfTI file)."""
        if volume is None:
            return None
        uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return None
        path = database.fileForInstance(uids[0])
        return path if path and os.path.exists(path) else None

    def startHeaderJob(self, sourceVolume: Any, serverUrl: str) -> InferJob:
        """Start fetching the server's de-identified header of `sourceVolume`'s series in the background."""
        path = self.sourceInstanceFile(sourceVolume)
        if path is None:
            raise ValueError("The source volume was not loaded from Slicer's DICOM database: it has no header to send.")
        client = SemIDClient(serverUrl, timeout=min(self.timeout, 120.0))
        # The pixel-less copy still holds the source's PHI: finishJob removes the folder whatever happens.
        workDir = tempfile.mkdtemp(prefix="semid-header-")
        try:
            job = start_header_job(client, path, workDir)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        self._workDirs[id(job)] = workDir
        return job

    def fetchHeader(self, sourceVolume: Any, serverUrl: str) -> ServerHeader | None:
        """The server's de-identified header of `sourceVolume`'s series, waited for (scripts, self tests);
        None when the volume was not loaded from Slicer's DICOM database."""
        path = self.sourceInstanceFile(sourceVolume)
        if path is None:
            return None
        return fetch_server_header(SemIDClient(serverUrl, timeout=min(self.timeout, 120.0)), path)

    @staticmethod
    def sourceAttributes(volume: Any) -> dict[str, Any]:
        """Allow-listed DICOM attributes of the volume's original series, if it came from DICOM."""
        if volume is None:
            return {}
        uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return {}
        path = database.fileForInstance(uids[0])
        return read_source_attributes(path) if path and os.path.exists(path) else {}

    def exportDicom(self, resultVolume: Any, folder: str, sourceVolume: Any = None,
                    header: ServerHeader | None = None) -> list[Path]:
        """Write `resultVolume` as a new DICOM series in a new subfolder of `folder`.

        The header: with `header` (the server's de-identified source header, see `startHeaderJob`), that
        header with new Series and SOP Instance UIDs; without it, built from scratch: a pseudonymous
        patient, new UIDs, and the allow-listed patient characteristics and acquisition parameters of the
        source (SemIDLib.series_export). The source files are only read.
        """
        if resultVolume is None or resultVolume.GetImageData() is None:
            raise ValueError("Select a de-identified volume to save.")
        folder = validate_output_folder(folder)
        if resultVolume.GetParentTransformNode() is not None:
            raise ValueError("The volume is under a transform: harden the transform first (Data module).")
        if sourceVolume is None:
            sourceVolume = resultVolume.GetNodeReference(SOURCE_REFERENCE)
        source = self.sourceAttributes(sourceVolume)
        record = json.loads(resultVolume.GetAttribute("SemID.record") or "{}")
        modality = str(source.get("Modality") or record.get("modality") or "MR")
        levelText = resultVolume.GetAttribute("SemID.level")
        description = "De-identified (SemID)"
        if levelText:
            description = f"De-identified (SemID, level {format_level(float(levelText))})"
        array, geometry = self.volumeArrayAndGeometry(resultVolume)
        plan = plan_series(array, geometry, modality, source, header=header, series_description=description)
        # A new folder per export: never mixes two series, and write_series needs a new or empty folder.
        target = Path(folder) / f"SemID-{time.strftime('%Y%m%d-%H%M%S')}-{plan.series_uid[-6:]}"
        return write_series(plan, target)

    @staticmethod
    def addToDatabase(seriesFolder: Path) -> bool:
        """Import the written series into Slicer's DICOM database."""
        if getattr(slicer, "dicomDatabase", None) is None or not slicer.dicomDatabase.isOpen:
            raise ValueError("Slicer's DICOM database is not open: open the DICOM module once, then save again.")
        from DICOMLib import DICOMUtils

        DICOMUtils.importDicom(str(seriesFolder))
        return True


class SemIDTest(ScriptedLoadableModuleTest):
    """Runs the real flow in Slicer against a running SemID server (with the segcheck task).

    Server URL: $SEMID_SERVER_URL (default http://127.0.0.1:8000). Head volume: $SEMID_SAMPLE_HEAD
    (e.g. the project's .data/samples/t1w_small.nii.gz), else Slicer's "MRHead" sample.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_unreachable_server_message()
        if not os.environ.get("SEMID_SERVER_URL"):
            # registered with every build's tests (BUILD_TESTING), where no server runs: say so, do not pretend
            self.delayDisplay("SEMID_SERVER_URL is not set: the de-identification flow needs a running SemID server "
                              "(semid serve DATA) and was not run.")
            return
        self.setUp()
        self.test_deidentify_show_check_and_export()
        self.setUp()
        self.test_save_series_with_the_profiles_header()

    def _sampleHead(self) -> Any:
        path = os.environ.get("SEMID_SAMPLE_HEAD")
        if path:
            return slicer.util.loadVolume(path)
        import SampleData

        return SampleData.downloadSample("MRHead")

    def test_unreachable_server_message(self) -> None:
        logic = SemIDLogic()
        with self.assertRaises(SemIDClientError) as caught:
            logic.checkServer("http://127.0.0.1:9")  # discard port: nothing listens there
        self.assertIn("Cannot reach the SemID server", str(caught.exception))
        self.assertNotIn("Traceback", str(caught.exception))

    def test_deidentify_show_check_and_export(self) -> None:
        import pydicom

        serverUrl = os.environ.get("SEMID_SERVER_URL", "http://127.0.0.1:8000")
        logic = SemIDLogic()
        info = logic.checkServer(serverUrl)
        self.delayDisplay(f"Server ready: {info.name} {info.version}")

        original = self._sampleHead()
        result, record = logic.deidentify(original, serverUrl, "high")
        self.assertIsInstance(record, dict)
        self.assertEqual(result.GetImageData().GetDimensions(), original.GetImageData().GetDimensions())
        originalArray, originalGeometry = logic.volumeArrayAndGeometry(original)
        resultArray, resultGeometry = logic.volumeArrayAndGeometry(result)
        np.testing.assert_allclose(resultGeometry.spacing, originalGeometry.spacing, atol=1e-4)
        np.testing.assert_allclose(resultGeometry.origin, originalGeometry.origin, atol=1e-4)
        np.testing.assert_allclose(resultGeometry.direction, originalGeometry.direction, atol=1e-4)
        changed = resultArray != originalArray
        self.assertTrue(changed.any(), "level high changed no voxel")
        self.assertLess(changed.mean(), 0.5, "more than half of the head changed")
        self.assertIn("Residual re-identification risk", format_record(record))
        self.delayDisplay("De-identified")

        outline = logic.showSideBySide(original, result)
        self.assertGreater(outline.GetSegmentation().GetNumberOfSegments(), 0)
        self.assertEqual(result.GetDisplayNode().GetWindow(), original.GetDisplayNode().GetWindow())
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            red = layoutManager.sliceWidget("Red").mrmlSliceCompositeNode()
            yellow = layoutManager.sliceWidget("Yellow").mrmlSliceCompositeNode()
            self.assertEqual(red.GetBackgroundVolumeID(), original.GetID())
            self.assertEqual(yellow.GetBackgroundVolumeID(), result.GetID())
            self.assertTrue(red.GetLinkedControl() and yellow.GetLinkedControl())
        renders = logic.renders(original, result)
        self.assertEqual(len(renders), 4)
        self.assertTrue(all(path.is_file() for path in renders.values()))

        if "segcheck" in info.models:
            job = logic.runJob(original, serverUrl, "high", "segcheck")
            try:
                summary = SegcheckSummary.from_json(job.result.record)
                segNode = logic.loadSegmentation(job, result, summary)
            finally:
                logic.finishJob(job)
            self.assertGreater(segNode.GetSegmentation().GetNumberOfSegments(), 1)
            self.assertIn("Dice", summary.table_text())
            self.delayDisplay(summary.verdict())

        with tempfile.TemporaryDirectory() as folder:
            files = logic.exportDicom(result, folder)
            self.assertEqual(len(files), resultArray.shape[0])
            slices = sorted((pydicom.dcmread(str(f)) for f in files), key=lambda ds: int(ds.InstanceNumber))
            self.assertEqual({str(ds.PatientName) for ds in slices}, {"SEMID^ANON"})
            self.assertEqual(len({ds.SeriesInstanceUID for ds in slices}), 1)
            stack = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
            # Slices are written along the slice normal; undo that for a left-handed volume.
            if np.linalg.det(resultGeometry.matrix) < 0:
                stack = stack[::-1]
            np.testing.assert_allclose(stack, resultArray, atol=float(slices[0].RescaleSlope))
        self.delayDisplay("Test passed")

    def test_save_series_with_the_profiles_header(self) -> None:
        """A volume loaded from Slicer's DICOM database: the saved series' header comes from the server's
        profile (pseudonymous patient and study, new series), not from the source's identity."""
        import pydicom
        from DICOMLib import DICOMUtils

        serverUrl = os.environ.get("SEMID_SERVER_URL", "http://127.0.0.1:8000")
        logic = SemIDLogic()
        info = logic.checkServer(serverUrl)
        if "dicomheader" not in info.models:
            self.delayDisplay("The server has no dicomheader task: header test skipped")
            return
        head = self._sampleHead()
        array, geometry = logic.volumeArrayAndGeometry(head)
        with tempfile.TemporaryDirectory() as work, DICOMUtils.TemporaryDICOMDatabase():
            # a source series with identifying values, through Slicer's own DICOM import and loading
            sourcePlan = plan_series(array, geometry, "MR", {"PatientSex": "F", "PatientAge": "047Y"},
                                     patient_name="CANARY^SLICER", patient_id="CANARY-SLICER")
            write_series(sourcePlan, Path(work) / "source")
            DICOMUtils.importDicom(str(Path(work) / "source"))
            loaded = DICOMUtils.loadSeriesByUID([sourcePlan.series_uid])
            self.assertEqual(len(loaded), 1)
            original = slicer.mrmlScene.GetNodeByID(loaded[0])
            self.assertIsNotNone(logic.sourceInstanceFile(original))
            result, _record = logic.deidentify(original, serverUrl, "high")
            header = logic.fetchHeader(original, serverUrl)
            self.assertIsNotNone(header)
            self.assertNotEqual(header.patient_id, "CANARY-SLICER")
            self.assertNotEqual(header.study_uid, sourcePlan.study_uid)
            files = logic.exportDicom(result, str(Path(work) / "out"), header=header)
            slices = [pydicom.dcmread(str(f)) for f in files]
            self.assertEqual({ds.StudyInstanceUID for ds in slices}, {header.study_uid})
            self.assertEqual({ds.PatientID for ds in slices}, {header.patient_id})
            self.assertEqual(len({ds.SeriesInstanceUID for ds in slices}), 1)
            self.assertNotEqual(slices[0].SeriesInstanceUID, sourcePlan.series_uid)
            self.assertEqual((slices[0].PatientSex, slices[0].PatientAge), ("F", "047Y"))
            for path in files:
                self.assertNotIn(b"CANARY", path.read_bytes())
        self.delayDisplay("Saved series has the profile's header")
