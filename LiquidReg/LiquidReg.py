"""LiquidReg: fast diffeomorphic learned registration of brain MRI, as a 3D Slicer module.

The engine (``LiquidRegLib``, PyTorch) is never imported when Slicer loads this module: PyTorch
may not be installed yet, and importing it takes seconds.  Registration and fine-tuning run the
``liquidreg`` command in a background process (``--progress json``), so the GUI never freezes;
results come back through ``LiquidRegLib.logic``, which scripts can also use directly.
"""
import importlib.util
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTransformNode
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

#: Pip requirements of the engine beyond what Slicer ships (numpy) and what the PyTorch extension
#: provides (torch), keyed by import name.  Kept equal to pyproject.toml by a test.
PIP_REQUIREMENTS = {"scipy": "scipy>=1.9", "SimpleITK": "SimpleITK>=2.2", "tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENT = ">=2.1"

MODES = ["Fast", "Accurate"]
FINETUNE_SOURCES = {"Current pair": "pair", "Folder": "folder", "List of volumes": "list"}


#
# LiquidReg
#
class LiquidReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LiquidReg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiquidReg contributors"]
        self.parent.helpText = _("""
Registers one brain MRI onto another in seconds with a learned diffeomorphic (fold-free)
deformation.
<ol>
<li>Choose the <b>Fixed</b> (reference) and <b>Moving</b> volumes; masks are optional.</li>
<li>Choose <b>Fast</b> (network only, seconds) or <b>Accurate</b> (the network, then a number of
optimisation steps on this pair; set them under Advanced).</li>
<li>Click <b>Register</b>. The work runs in the background; <b>Cancel</b> stops it and changes
nothing.</li>
<li>Results: a transform (the moving volume can be shown through it), a Jacobian-determinant map
shown over the fixed volume (blue: tissue shrinks, white: unchanged, red: it grows; folding is
reported in the status line) and the warped moving volume. Outputs left empty are created;
selected ones are updated in place.</li>
</ol>
A linear transform on the moving volume is used as the starting alignment.
<b>Fine-tune</b> adapts the network to your scans and saves new weights; the shipped weights are
never changed.
<p>Scripting: <code>LiquidReg.LiquidRegLogic().register(fixedNode, movingNode, iterations=0,
device="auto")</code> returns the transform, Jacobian and warped volume nodes.</p>
""")
        self.parent.acknowledgementText = _("""
LiquidReg uses PyTorch through the SlicerPyTorch extension (Fernando Perez-Garcia, Andras Lasso)
and follows the conventions of 3D Slicer's registration modules. The sample pair is derived from
the MNI ICBM152 2009a template and FreeSurfer's fsaverage; their terms are in
LiquidRegLib/resources/sample/LICENSES of the extension.
""")


#
# LiquidRegParameterNode
#
@parameterNodeWrapper
class LiquidRegParameterNode:
    """Everything the panel shows, saved with the scene."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLScalarVolumeNode
    movingMask: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["Auto", "CPU", "GPU"])] = "Auto"
    mode: Annotated[str, Choice(MODES)] = "Fast"
    outputTransform: vtkMRMLTransformNode
    outputJacobian: vtkMRMLScalarVolumeNode
    outputWarped: vtkMRMLScalarVolumeNode
    applyToMoving: bool = True
    affine: bool = True
    iterations: Annotated[int, WithinRange(1, 5000)] = 100
    regularisation: Annotated[float, WithinRange(0.0, 100.0)] = 1.0
    weights: str = ""  # empty: the shipped weights
    finetuneSource: Annotated[str, Choice(list(FINETUNE_SOURCES))] = "Current pair"
    finetuneFolder: str = ""
    finetuneFiles: list[str]
    finetuneSteps: Annotated[int, WithinRange(1, 100000)] = 200
    finetuneOutput: str = ""  # empty: a new dated file in the user's LiquidReg folder


#
# LiquidRegWidget
#
class LiquidRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None            # the running LiquidRegLib.logic.CliJob, if any
        self._jobFolder = None
        self._jobFinished = None   # called when the job succeeded
        self._jobStarted = 0.0
        self._gpuLabel = _("GPU")
        self._gpuProbe = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiquidReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiquidRegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.addFilesButton.connect("clicked(bool)", self.onAddFinetuneFiles)
        self.ui.clearFilesButton.connect("clicked(bool)", self.onClearFinetuneFiles)
        # Paths have no automatic GUI connection for "empty means default": kept in sync here.
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)",
                                            lambda path: self._setParameter("weights", path))
        self.ui.finetuneFolderButton.connect(
            "directoryChanged(QString)", lambda path: self._setParameter("finetuneFolder", path))
        self.ui.finetuneOutputPathLineEdit.connect(
            "currentPathChanged(QString)", lambda path: self._setParameter("finetuneOutput", path))

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(200)
        self._jobTimer.connect("timeout()", self.onJobTimer)
        self._probeTimer = qt.QTimer()
        self._probeTimer.setInterval(300)
        self._probeTimer.connect("timeout()", self.onGpuProbe)

        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.initializeParameterNode()
        self.detectGpu()

    def cleanup(self) -> None:
        if self.job is not None:
            self.job.cancel()
        self._jobTimer.stop()
        self._probeTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.fixedVolume and volumes:
            self._parameterNode.fixedVolume = volumes[0]
        if not self._parameterNode.movingVolume and len(volumes) > 1:
            self._parameterNode.movingVolume = volumes[1]

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    def _setParameter(self, name, value) -> None:
        if self._parameterNode and getattr(self._parameterNode, name) != value:
            setattr(self._parameterNode, name, value)

    def updateGUI(self, caller=None, event=None) -> None:
        """Show what the parameter node holds beyond the automatic connections."""
        p = self._parameterNode
        if p is None:
            return
        self.ui.deviceComboBox.setItemText(2, self._gpuLabel)
        for widget, value in ((self.ui.weightsPathLineEdit, p.weights),
                              (self.ui.finetuneOutputPathLineEdit, p.finetuneOutput)):
            if widget.currentPath != value:
                widget.currentPath = value
        if p.finetuneFolder and self.ui.finetuneFolderButton.directory != p.finetuneFolder:
            self.ui.finetuneFolderButton.directory = p.finetuneFolder
        listed = [self.ui.finetuneFilesList.item(i).text()
                  for i in range(self.ui.finetuneFilesList.count)]
        if listed != list(p.finetuneFiles):
            self.ui.finetuneFilesList.clear()
            self.ui.finetuneFilesList.addItems(list(p.finetuneFiles))
        source = FINETUNE_SOURCES[p.finetuneSource]
        self.ui.finetuneFolderButton.visible = source == "folder"
        self.ui.finetuneFilesWidget.visible = source == "list"
        self.ui.iterationsSpinBox.enabled = p.mode == "Accurate"
        self.ui.regularisationSpinBox.enabled = p.mode == "Accurate"
        idle = self.job is None
        pair = bool(p.fixedVolume and p.movingVolume)
        self.ui.registerButton.enabled = idle and pair
        self.ui.registerButton.toolTip = (_("Register the moving volume onto the fixed volume.")
                                          if pair else _("Select the fixed and moving volumes."))
        self.ui.finetuneButton.enabled = idle and (source != "pair" or pair)

    # ---- device -----------------------------------------------------------------------------
    def detectGpu(self) -> None:
        """Name the NVIDIA GPU in the device menu, asking the driver in the background (no
        PyTorch import, which would freeze the GUI for seconds)."""
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self._showGpu("")
            return
        self._gpuProbe = subprocess.Popen(
            [smi, "--query-gpu=name", "--format=csv,noheader"], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        self._probeTimer.start()

    def onGpuProbe(self) -> None:
        if self._gpuProbe is None or self._gpuProbe.poll() is None:
            return
        self._probeTimer.stop()
        output = self._gpuProbe.stdout.read() if self._gpuProbe.returncode == 0 else ""
        self._gpuProbe = None
        self._showGpu(output.strip().splitlines()[0] if output.strip() else "")

    def _showGpu(self, name: str) -> None:
        self._gpuLabel = (_("GPU ({name})").format(name=name) if name
                          else _("GPU (none detected; Auto uses the CPU)"))
        self.ui.deviceComboBox.setItemText(2, self._gpuLabel)

    # ---- running jobs -----------------------------------------------------------------------
    def _newJobFolder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="LiquidReg-", dir=slicer.app.temporaryPath))

    def _showError(self, message: str) -> None:
        self.ui.statusLabel.text = _("Failed: {message}").format(message=message)
        slicer.util.errorDisplay(message, windowTitle=_("LiquidReg"))

    def _prepare(self, build):
        """Run ``build(folder)`` (checks and input files) and return (arguments, folder), or
        show the one-line problem and return None; nothing is left behind on failure."""
        if not self.logic.ensureDependencies():
            self.ui.statusLabel.text = _("LiquidReg needs PyTorch and a few Python packages; "
                                         "nothing was started.")
            return None
        from LiquidRegLib.errors import LiquidRegError

        folder = self._newJobFolder()
        try:
            with slicer.util.WaitCursor():
                return build(folder), folder
        except LiquidRegError as error:
            shutil.rmtree(folder, ignore_errors=True)
            self._showError(str(error))
        except Exception as error:
            shutil.rmtree(folder, ignore_errors=True)
            logging.exception("LiquidReg could not start")
            self._showError(_("could not start: {error}").format(error=error))
        return None

    def _startJob(self, arguments, folder, onSuccess, description) -> None:
        from LiquidRegLib.logic import CliJob

        self.job = CliJob(arguments)
        self._jobFolder, self._jobFinished = folder, onSuccess
        self._jobStarted = time.monotonic()
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.cancelButton.show()
        self.ui.cancelButton.enabled = True
        self.ui.statusLabel.text = description
        self.updateGUI()
        self._jobTimer.start()

    def onJobTimer(self) -> None:
        from LiquidRegLib.logic import describe_progress

        if self.job is None:
            self._jobTimer.stop()
            return
        for event in self.job.poll():
            if event.get("event") != "progress":
                continue
            percent, text = describe_progress(event)
            if percent is None:
                self.ui.progressBar.setRange(0, 0)  # busy indicator
            else:
                self.ui.progressBar.setRange(0, 100)
                self.ui.progressBar.value = percent
            if not self.job.cancelled:
                elapsed = time.monotonic() - self._jobStarted
                self.ui.statusLabel.text = f"{text} [{elapsed:.0f} s]"
        if self.job.finished:
            self._jobTimer.stop()
            self._finishJob()

    def _finishJob(self) -> None:
        from LiquidRegLib.errors import LiquidRegError

        job, folder, onSuccess = self.job, self._jobFolder, self._jobFinished
        elapsed = time.monotonic() - self._jobStarted
        status, detail = job.outcome()
        try:
            if status == "done":
                with slicer.util.WaitCursor():
                    onSuccess(elapsed)
            elif status == "cancelled":
                self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            else:
                self._showError(detail)
        except LiquidRegError as error:
            self._showError(str(error))
        except Exception as error:
            logging.exception("LiquidReg could not load its result")
            self._showError(_("could not load the result: {error}").format(error=error))
        finally:
            self.job = None
            shutil.rmtree(folder, ignore_errors=True)
            self.ui.progressBar.hide()
            self.ui.cancelButton.hide()
            self.updateGUI()

    def onCancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.ui.cancelButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling...")

    # ---- register ---------------------------------------------------------------------------
    def onRegister(self) -> None:
        p = self._parameterNode
        accurate = p.mode == "Accurate"

        def build(folder):
            from LiquidRegLib import logic as engine

            self._request = engine.RegistrationRequest(
                p.fixedVolume, p.movingVolume, p.fixedMask, p.movingMask, p.outputTransform,
                p.outputJacobian, p.outputWarped, p.applyToMoving)
            inputs = engine.read_request(self._request)
            return engine.register_arguments(
                engine.write_cli_inputs(inputs, folder / "inputs"), folder / "result",
                mode="accurate" if accurate else "fast",
                iterations=p.iterations if accurate else 0, device=engine.DEVICES[p.device],
                affine=p.affine, weights=p.weights or None, regularisation=p.regularisation)

        prepared = self._prepare(build)
        if prepared is None:
            return
        arguments, folder = prepared
        request = self._request
        self._startJob(arguments, folder,
                       lambda elapsed: self._showRegistration(request, folder / "result", elapsed),
                       _("Starting the registration..."))

    def _showRegistration(self, request, resultFolder, elapsed) -> None:
        from LiquidRegLib import logic as engine

        nodes = engine.load_cli_result(request, resultFolder)
        engine.show_result(request.fixedVolumeNode, nodes)
        summary = nodes.summary
        folding = summary.get("pct_folding")
        folding_text = f"{folding:.3f} %" if isinstance(folding, (int, float)) else "?"
        self.ui.statusLabel.text = _(
            "Done in {seconds:.1f} s on {device}; folding {folding} of voxels. Transform "
            "'{transform}', Jacobian '{jacobian}', warped '{warped}'.").format(
                seconds=elapsed, device=summary.get("device", "?"), folding=folding_text,
                transform=nodes.transformNode.GetName(),
                jacobian=nodes.jacobianVolumeNode.GetName(),
                warped=nodes.warpedVolumeNode.GetName())

    # ---- fine-tune --------------------------------------------------------------------------
    def onAddFinetuneFiles(self) -> None:
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), _("Volumes to fine-tune on"), "",
            _("Volumes (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd)"))
        if paths:
            files = list(self._parameterNode.finetuneFiles)
            self._parameterNode.finetuneFiles = files + [p for p in paths if p not in files]

    def onClearFinetuneFiles(self) -> None:
        self._parameterNode.finetuneFiles = []

    def onFinetune(self) -> None:
        p = self._parameterNode
        source = FINETUNE_SOURCES[p.finetuneSource]

        def build(folder):
            from LiquidRegLib import logic as engine

            output = engine.check_new_weights_path(
                p.finetuneOutput or engine.default_weights_path(self.logic.weightsFolder()))
            output.parent.mkdir(parents=True, exist_ok=True)
            self._finetuneOutput = output
            files = [p.finetuneFolder] if source == "folder" else list(p.finetuneFiles)
            arguments = engine.finetune_source_arguments(
                source, folder, fixedNode=p.fixedVolume, movingNode=p.movingVolume, files=files)
            return engine.finetune_arguments(arguments, output, steps=p.finetuneSteps,
                                             device=engine.DEVICES[p.device],
                                             weights=p.weights or None)

        prepared = self._prepare(build)
        if prepared is None:
            return
        arguments, folder = prepared
        output = self._finetuneOutput
        self._startJob(arguments, folder, lambda elapsed: self._useFinetuned(output, elapsed),
                       _("Starting fine-tuning..."))

    def _useFinetuned(self, output, elapsed) -> None:
        self._parameterNode.weights = str(output)
        self._parameterNode.finetuneOutput = ""  # the next run makes a new file
        self.ui.statusLabel.text = _(
            "Fine-tuned in {seconds:.0f} s. New weights '{path}' are selected for registration "
            "(Advanced).").format(seconds=elapsed, path=output)


#
# LiquidRegLogic
#
class LiquidRegLogic(ScriptedLoadableModuleLogic):
    """The module's logic: its parameter node, its dependencies, and registration for scripts.

    ``register`` has the signature of ``LiquidRegLib.logic.LiquidRegLogic.register`` (the same
    logic without Qt, usable outside Slicer) and blocks until the result is in the scene.
    """

    def getParameterNode(self):
        return LiquidRegParameterNode(super().getParameterNode())

    def weightsFolder(self) -> Path:
        """Default folder for fine-tuned weights: the user's Slicer documents, not the extension."""
        return Path(slicer.app.defaultScenePath) / "LiquidReg"

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """PyTorch through the PyTorch extension, the rest with pip; asks first, only on use."""
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_(
                    "LiquidReg needs the PyTorch extension: install 'PyTorch' from the Extensions "
                    "Manager, restart Slicer, and try again."), windowTitle=_("LiquidReg"))
                return False
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                return False
        missing = [spec for module, spec in PIP_REQUIREMENTS.items()
                   if importlib.util.find_spec(module) is None]
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(_(
                    "LiquidReg needs these Python packages: {packages}. Install them now?").format(
                        packages=", ".join(missing)), windowTitle=_("LiquidReg")):
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(missing)
        return True

    def register(self, fixedNode, movingNode, **options):
        """Register ``movingNode`` onto ``fixedNode``; see LiquidRegLib.logic.LiquidRegLogic."""
        if not self.ensureDependencies():
            raise RuntimeError("LiquidReg needs PyTorch and its Python packages to register")
        from LiquidRegLib.logic import LiquidRegLogic as EngineLogic

        return EngineLogic().register(fixedNode, movingNode, **options)


#
# LiquidRegTest
#
class LiquidRegTest(ScriptedLoadableModuleTest):
    """Runs the checks CI runs with slicer-core (LiquidRegLib/slicer_tests.py), then the panel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.assertTrue(LiquidRegLogic().ensureDependencies(askConfirmation=False))
        self.test_SharedChecks()
        self.test_PanelRegistersInBackground()

    def test_SharedChecks(self):
        from LiquidRegLib import slicer_tests

        for body in slicer_tests.ALL_TESTS:
            self.setUp()
            self.delayDisplay(body.__name__)
            with tempfile.TemporaryDirectory() as workdir:
                body(Path(workdir))

    def test_PanelRegistersInBackground(self):
        """Register clicked in the panel: the GUI keeps running and the results appear."""
        self.setUp()
        from LiquidRegLib import logic as engine
        from LiquidRegLib import slicer_tests

        fixed = engine.read_volume_node(slicer_tests.SAMPLE_DIR / "fixed_t1.nii.gz", "fixed")
        moving = engine.read_volume_node(slicer_tests.SAMPLE_DIR / "moving_t1.nii.gz", "moving")
        slicer.util.selectModule("LiquidReg")
        widget = slicer.modules.liquidreg.widgetRepresentation().self()
        parameters = widget._parameterNode
        parameters.fixedVolume, parameters.movingVolume, parameters.mode = fixed, moving, "Fast"
        widget.ui.registerButton.click()
        self.assertIsNotNone(widget.job, widget.ui.statusLabel.text)
        deadline = time.monotonic() + 900
        while widget.job is not None and time.monotonic() < deadline:
            slicer.app.processEvents()  # the GUI stays responsive while the process works
            time.sleep(0.05)
        self.assertIsNone(widget.job, "the registration did not finish in time")
        self.assertTrue(widget.ui.statusLabel.text.startswith("Done"), widget.ui.statusLabel.text)
        transform = moving.GetParentTransformNode()
        self.assertIsNotNone(transform, "the moving volume is not shown through the result")
        fixedRole = slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()
        self.assertEqual(transform.GetNodeReferenceID(fixedRole), fixed.GetID())
        self.delayDisplay("Registration from the panel passed")
