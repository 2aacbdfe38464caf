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
    PRESETS,
    Geometry,
    SemIDClient,
    SemIDClientError,
    SeriesExportError,
    ServerInfo,
    explain_level,
    format_level,
    parse_level,
    plan_series,
    read_source_attributes,
    summarize_record,
    write_series,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
SETTINGS_SERVER_URL = "SemID/ServerURL"
SOURCE_REFERENCE = "SemIDSource"


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
blocked at an adjustable privacy level and the blocked region is refilled (this version: with a
featureless head surface; the brain and every voxel outside the blocked region are untouched).
The work is done by a SemID MONAI Label server (start it with
<code>monailabel start_server --app monailabel_app --studies DATA_FOLDER --host 127.0.0.1</code>).
<ul>
<li>Pick the input volume and the privacy level (off, low, medium, high, max, or any value 0-1).</li>
<li>De-identify: the result is shown beside the original, with linked slice views.</li>
<li>Save as DICOM: writes the result as a new series with a pseudonymous patient and no source
identifiers.</li>
</ul>
"""
        self.parent.acknowledgementText = """
SemID implements the identity-blocking and medical-semantics-compensation approach of Tian et al.
(ICCV 2025). Developed by the SemID developers.
"""


class SemIDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: server, input volume, privacy level, result, DICOM export."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SemIDLogic | None = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False

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
            button.setToolTip(f"{name}: {explain_level(PRESETS[name])}")
            # Default argument binds the value now; a plain closure would see the last preset only.
            button.clicked.connect(lambda _checked=False, value=PRESETS[name]: self.setLevel(value))

        self.ui.checkServerButton.clicked.connect(self.onCheckServer)
        self.ui.deidentifyButton.clicked.connect(self.onDeidentify)
        self.ui.saveDicomButton.clicked.connect(self.onSaveDicom)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
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
            self.logic.setDefaultParameters(inputParameterNode)
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
            level = float(node.GetParameter("Level") or 0.75)
            self.ui.levelSlider.value = level
            self.ui.levelExplanationLabel.text = f"{format_level(level)}: {explain_level(level)}"
            self.ui.outputFolderSelector.currentPath = node.GetParameter("OutputFolder")

            hasInput = node.GetNodeReference("InputVolume") is not None
            hasUrl = bool(node.GetParameter("ServerURL").strip())
            self.ui.deidentifyButton.enabled = hasInput and hasUrl
            self.ui.checkServerButton.enabled = hasUrl
            hasOutput = node.GetNodeReference("OutputVolume") is not None
            self.ui.saveDicomButton.enabled = hasOutput and bool(node.GetParameter("OutputFolder"))
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
            qt.QSettings().setValue(SETTINGS_SERVER_URL, url)
            node.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
            node.SetNodeReferenceID("OutputVolume", self.ui.outputVolumeSelector.currentNodeID)
            node.SetParameter("Level", f"{self.ui.levelSlider.value:.4f}")
            node.SetParameter("OutputFolder", self.ui.outputFolderSelector.currentPath)
        finally:
            node.EndModify(wasModified)

    def setLevel(self, level: float) -> None:
        """Move the slider to a preset; the parameter node follows through the slider's signal."""
        self.ui.levelSlider.value = level

    # -- actions ----------------------------------------------------------------------------------
    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.app.processEvents()

    def reportError(self, message: str) -> None:
        """An error the user can act on: one sentence in the status line and a message box."""
        self.setStatus(message)
        slicer.util.errorDisplay(message, windowTitle="SemID")

    def _run(self, busyText: str, action: Any) -> Any:
        """Run `action` with a busy cursor; user errors become one sentence, never a traceback."""
        self.setStatus(busyText)
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            return action()
        except (SemIDClientError, SeriesExportError, ValueError) as exc:
            message = str(exc)
        except Exception as exc:
            # Unexpected: keep the traceback for the Python console and the log, show a short line.
            logging.exception("SemID: unexpected failure")
            message = f"SemID failed unexpectedly ({type(exc).__name__}); see the Python console for details."
        finally:
            # Before the message box, or the box would show a busy cursor too.
            qt.QApplication.restoreOverrideCursor()
        self.reportError(message)
        return None

    def onCheckServer(self) -> None:
        self.updateParameterNodeFromGUI()
        url = self._parameterNode.GetParameter("ServerURL")
        info = self._run(f"Contacting {url}...", lambda: self.logic.checkServer(url))
        if info is not None:
            self.setStatus(f"Connected: {info.name or 'MONAI Label'} {info.version}, task '{info.task}' ready.")

    def onDeidentify(self) -> None:
        self.updateParameterNodeFromGUI()
        node = self._parameterNode
        inputVolume = node.GetNodeReference("InputVolume")
        level = float(node.GetParameter("Level"))
        url = node.GetParameter("ServerURL")
        done = self._run(
            f"De-identifying at {format_level(level)}...",
            lambda: self.logic.deidentify(inputVolume, url, level),
        )
        if done is None:
            return
        outputVolume, record = done
        node.SetNodeReferenceID("OutputVolume", outputVolume.GetID())
        self.logic.showSideBySide(inputVolume, outputVolume)
        self.setStatus(summarize_record(record, level))

    def onSaveDicom(self) -> None:
        self.updateParameterNodeFromGUI()
        node = self._parameterNode
        outputVolume = node.GetNodeReference("OutputVolume")
        folder = node.GetParameter("OutputFolder")
        files = self._run("Writing DICOM series...", lambda: self.logic.exportDicom(outputVolume, folder))
        if files:
            self.setStatus(f"Saved {len(files)} DICOM files in {files[0].parent}.")


class SemIDLogic(ScriptedLoadableModuleLogic):
    """The work behind the panel, callable from the Python console and from tests."""

    def __init__(self, timeout: float = 600.0) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.timeout = timeout

    def setDefaultParameters(self, parameterNode: Any) -> None:
        if not parameterNode.GetParameter("ServerURL"):
            parameterNode.SetParameter("ServerURL", str(qt.QSettings().value(SETTINGS_SERVER_URL, DEFAULT_SERVER_URL)))
        if not parameterNode.GetParameter("Level"):
            parameterNode.SetParameter("Level", str(PRESETS["high"]))
        if not parameterNode.GetParameter("OutputFolder"):
            parameterNode.SetParameter("OutputFolder", str(Path.home() / "SemID"))

    def checkServer(self, serverUrl: str) -> ServerInfo:
        """Raise a SemIDClientError unless the server runs and has the de-identification task."""
        return SemIDClient(serverUrl, timeout=min(self.timeout, 30.0)).info()

    def deidentify(self, inputVolume: Any, serverUrl: str, level: str | float) -> tuple[Any, dict[str, Any]]:
        """De-identify `inputVolume` on the server; returns (new volume node, server record)."""
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("Select a volume with image data to de-identify.")
        if inputVolume.GetParentTransformNode() is not None:
            # The server sees the voxels and their geometry only: a pending transform would be lost.
            raise ValueError("The volume is under a transform: harden the transform first (Data module).")
        level = parse_level(level)
        client = SemIDClient(serverUrl, timeout=self.timeout)
        # The temporary input holds the identifiable face: TemporaryDirectory removes it whatever happens.
        with tempfile.TemporaryDirectory(prefix="semid-slicer-") as workDir:
            inputPath = os.path.join(workDir, "input.nrrd")
            if not slicer.util.saveNode(inputVolume, inputPath, {"useCompression": 0}):
                raise RuntimeError("Could not write the volume to a temporary file.")
            result = client.deidentify(inputPath, level)
            try:
                name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()}_deidentified")
                outputVolume = slicer.util.loadVolume(
                    str(result.volume_path), {"name": name, "show": False, "singleFile": True}
                )
            finally:
                shutil.rmtree(result.volume_path.parent, ignore_errors=True)
        outputVolume.SetAttribute("SemID.level", f"{level:g}")
        outputVolume.SetAttribute("SemID.record", json.dumps(result.record))
        outputVolume.SetNodeReferenceID(SOURCE_REFERENCE, inputVolume.GetID())
        self._copyDisplay(inputVolume, outputVolume)
        return outputVolume, result.record

    @staticmethod
    def _copyDisplay(source: Any, target: Any) -> None:
        """Same window/level and colours on both, so differences seen are in the data, not the display."""
        sourceDisplay, targetDisplay = source.GetDisplayNode(), target.GetDisplayNode()
        if sourceDisplay is None or targetDisplay is None:
            return
        targetDisplay.SetAndObserveColorNodeID(sourceDisplay.GetColorNodeID())
        targetDisplay.SetAutoWindowLevel(False)
        targetDisplay.SetWindowLevel(sourceDisplay.GetWindow(), sourceDisplay.GetLevel())

    def showSideBySide(self, original: Any, result: Any, orientation: str = "Sagittal") -> None:
        """Original in the left view, result in the right, slice positions linked.

        Sagittal by default: the face profile, which is what the privacy level changes, shows best there.
        """
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no GUI (e.g. Slicer run with --no-main-window)
            return
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
            sliceWidget.mrmlSliceCompositeNode().SetLinkedControl(True)

    @staticmethod
    def volumeArrayAndGeometry(volume: Any) -> tuple[np.ndarray, Geometry]:
        """The (z, y, x) voxel array and LPS geometry of a scalar volume node."""
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        ijkToRas = [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]
        return np.array(slicer.util.arrayFromVolume(volume)), Geometry.from_ijk_to_ras(ijkToRas)

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

    def exportDicom(self, resultVolume: Any, folder: str, sourceVolume: Any = None) -> list[Path]:
        """Write `resultVolume` as a new DICOM series in a new subfolder of `folder`."""
        if resultVolume is None or resultVolume.GetImageData() is None:
            raise ValueError("Select a de-identified volume to save.")
        if not folder:
            raise ValueError("Choose an output folder for the DICOM series.")
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
        plan = plan_series(array, geometry, modality, source, series_description=description)
        # A new folder per export: never mixes two series, and write_series needs a new or empty folder.
        target = Path(folder) / f"SemID-{time.strftime('%Y%m%d-%H%M%S')}-{plan.series_uid[-6:]}"
        return write_series(plan, target)


class SemIDTest(ScriptedLoadableModuleTest):
    """Runs the real flow in Slicer against a running SemID server.

    Server URL: $SEMID_SERVER_URL (default http://127.0.0.1:8000). Head volume: $SEMID_SAMPLE_HEAD,
    else Slicer's "MRHead" sample.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_unreachable_server_message()
        self.setUp()
        self.test_deidentify_show_and_export()

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

    def test_deidentify_show_and_export(self) -> None:
        import pydicom

        serverUrl = os.environ.get("SEMID_SERVER_URL", DEFAULT_SERVER_URL)
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
        self.delayDisplay("De-identified")

        logic.showSideBySide(original, result)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            red = layoutManager.sliceWidget("Red").mrmlSliceCompositeNode()
            yellow = layoutManager.sliceWidget("Yellow").mrmlSliceCompositeNode()
            self.assertEqual(red.GetBackgroundVolumeID(), original.GetID())
            self.assertEqual(yellow.GetBackgroundVolumeID(), result.GetID())
            self.assertTrue(red.GetLinkedControl() and yellow.GetLinkedControl())

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
