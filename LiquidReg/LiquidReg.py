"""LiquidReg: fast diffeomorphic learned registration of brain MRI, as a 3D Slicer module.

Nothing of PyTorch enters Slicer's process: torch may not be installed yet, and importing it
freezes the application for seconds.  ``LiquidRegLogic`` is the module's logic: the panel hands it
the parameter node (``startRegistration``, ``startFinetune``), its timer polls the background job
(``LiquidRegLib.jobs``: registrations go to a warm worker process that keeps PyTorch and the
network loaded between them, fine-tuning runs the ``liquidreg`` command in a process of its own;
both cancellable) and ``finishJob`` brings the result into the scene through
``LiquidRegLib.logic``.  The logic owns the worker: it starts it at the first Register and ends it
when the scene closes or the module is cleaned up.  The widget only shows what the logic reports.
Scripts call ``LiquidRegLogic().register(...)``, which blocks.
"""
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLScene, vtkMRMLTransformNode
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

# Torch-free (a test imports this module and checks): the defaults the panel shares with the CLI.
from LiquidRegLib.options import ACCURATE_ITERATIONS, DEFAULT_REGULARISATION

#: Pip requirements of the engine that Slicer's Python might lack (it ships numpy, scipy and
#: SimpleITK; the PyTorch extension provides torch), keyed by import name.  tqdm and Pillow are
#: left out: they draw the terminal's progress bars and the command line's overview.png, which
#: the panel does not ask for.  Kept equal to pyproject.toml by a test.
PIP_REQUIREMENTS = {"scipy": "scipy>=1.9", "SimpleITK": "SimpleITK>=2.2"}
TERMINAL_ONLY_REQUIREMENTS = ("tqdm", "pillow")
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
        self.parent.contributors = ["LiquidReg maintainers (LiquidReg project)"]
        self.parent.helpText = _("""
Registers one brain MRI onto another in seconds with a learned diffeomorphic (fold-free)
deformation.
<ol>
<li>Choose the <b>Fixed</b> (reference) and <b>Moving</b> volumes; masks are optional.</li>
<li>Choose <b>Fast</b> (network only, seconds) or <b>Accurate</b> (the network, then a number of
instance-optimisation steps on this pair; set them under Advanced).</li>
<li>Click <b>Register</b>. The work runs in the background; <b>Cancel</b> stops it and changes
nothing.</li>
<li>Results: a transform (the moving volume is shown through it), a Jacobian-determinant map
shown over the fixed volume (blue: tissue shrinks, white: unchanged, red: it grows; folding is
reported in the status line) and the warped moving volume. Register again (for example Accurate
after Fast) to update the same output nodes; it starts again from the moving volume's own voxels
and its linear starting alignment.</li>
</ol>
A linear transform on the moving volume is used as the starting alignment.
<b>Fine-tune</b> adapts the network to your scans and saves new weights; the shipped weights are
never changed, and <b>Use shipped weights</b> goes back to them.
<p>Sample data: <b>Sample Data &gt; LiquidReg</b> loads two brains to try it on.</p>
<p>Scripting: <code>LiquidReg.LiquidRegLogic().register(fixedNode, movingNode, iterations=0,
device="auto")</code> returns the transform, Jacobian and warped volume nodes.</p>
""")
        self.parent.acknowledgementText = _("""
LiquidReg uses PyTorch through the SlicerPyTorch extension (Fernando Perez-Garcia, Andras Lasso)
and follows the conventions of 3D Slicer's registration modules. The sample pair is derived from
the MNI ICBM152 2009a template and FreeSurfer's fsaverage; their terms are in
LiquidRegLib/resources/sample/LICENSES of the extension.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the bundled pair in the Sample Data module (local files, copied into its cache)."""
    import SampleData

    from LiquidRegLib.resources import sample_paths

    paths = sample_paths()
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="LiquidReg", sampleName="LiquidReg brain pair",
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons",
                                       "LiquidReg.png"),
        uris=[paths[kind].as_uri() for kind in ("fixed_t1", "moving_t1")],
        fileNames=["LiquidReg_fixed_t1.nii.gz", "LiquidReg_moving_t1.nii.gz"],
        nodeNames=["LiquidReg fixed", "LiquidReg moving"])


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
    # Outputs: the nodes of the last registration (created ones are stored here), updated in place.
    outputTransform: vtkMRMLTransformNode
    outputJacobian: vtkMRMLScalarVolumeNode
    outputWarped: vtkMRMLScalarVolumeNode
    applyToMoving: bool = True
    affine: bool = True
    iterations: Annotated[int, WithinRange(1, 5000)] = ACCURATE_ITERATIONS
    regularisation: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULT_REGULARISATION
    useShippedWeights: bool = True
    weights: str = ""  # used when useShippedWeights is off
    finetuneSource: Annotated[str, Choice(list(FINETUNE_SOURCES))] = "Current pair"
    finetuneFolder: pathlib.Path  # bound to the folder button by the wrapper
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
        # A ctkPathLineEdit with a file filter never reports an empty path, so "the shipped
        # weights" is a checkbox (bound in the .ui) and the two paths are kept in sync here.
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)",
                                            lambda path: self._setParameter("weights", path))
        self.ui.finetuneOutputPathLineEdit.connect(
            "currentPathChanged(QString)", lambda path: self._setParameter("finetuneOutput", path))

        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(50)  # a result is taken in at most 50 ms after it is ready
        self._jobTimer.connect("timeout()", self.onJobTimer)
        self._probeTimer = qt.QTimer()
        self._probeTimer.setInterval(300)
        self._probeTimer.connect("timeout()", self.onGpuProbe)

        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.initializeParameterNode()
        self.detectGpu()

    def cleanup(self) -> None:
        self.logic.cleanup()
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
        self.setParameterNode(None)  # the logic cancels a running job and ends its worker itself

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        self.logic.setDefaults(parameterNode)
        self.setParameterNode(parameterNode)

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
        self.ui.weightsPathLineEdit.enabled = not p.useShippedWeights
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
        idle = self.logic.job is None
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
            stderr=subprocess.DEVNULL, text=True, errors="replace",
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

    # ---- jobs -------------------------------------------------------------------------------
    def _showError(self, message: str) -> None:
        self.ui.statusLabel.text = _("Failed: {message}").format(message=message)
        slicer.util.errorDisplay(message, windowTitle=_("LiquidReg"))

    def _start(self, start, description) -> None:
        """Run ``start(parameterNode)`` (a logic method); a refused selection is one message."""
        if not self.logic.ensureDependencies():
            self.ui.statusLabel.text = _("LiquidReg needs PyTorch; nothing was started.")
            return
        from LiquidRegLib.errors import LiquidRegError

        try:
            with slicer.util.WaitCursor():
                start(self._parameterNode)
        except LiquidRegError as error:
            self._showError(str(error))
            return
        except Exception as error:
            logging.exception("LiquidReg could not start")
            self._showError(_("could not start: {error}").format(error=error))
            return
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.cancelButton.show()
        self.ui.cancelButton.enabled = True
        self.ui.statusLabel.text = description
        self.updateGUI()
        self._jobTimer.start()

    def onRegister(self) -> None:
        self._start(self.logic.startRegistration, _("Starting the registration..."))

    def onFinetune(self) -> None:
        self._start(self.logic.startFinetune, _("Starting fine-tuning..."))

    def onCancel(self) -> None:
        self.logic.cancel()
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = _("Cancelling...")

    def onJobTimer(self) -> None:
        job = self.logic.job
        if job is None:
            self._jobTimer.stop()
            return
        from LiquidRegLib.jobs import describe_progress

        for event in job.poll():
            if event.get("event") != "progress":
                continue
            percent, text = describe_progress(event)
            if percent is None:
                self.ui.progressBar.setRange(0, 0)  # busy indicator
            else:
                self.ui.progressBar.setRange(0, 100)
                self.ui.progressBar.value = percent
            if not job.cancelled:
                self.ui.statusLabel.text = f"{text} [{self.logic.elapsed():.0f} s]"
        if not job.finished:
            return
        self._jobTimer.stop()
        with slicer.util.WaitCursor():
            status, message = self.logic.finishJob()
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        if status == "error":
            self._showError(message)
        else:
            self.ui.statusLabel.text = message
        self.updateGUI()

    # ---- fine-tune files --------------------------------------------------------------------
    def onAddFinetuneFiles(self) -> None:
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), _("Volumes to fine-tune on"), "",
            _("Volumes (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd)"))
        if paths:
            files = list(self._parameterNode.finetuneFiles)
            self._parameterNode.finetuneFiles = files + [p for p in paths if p not in files]

    def onClearFinetuneFiles(self) -> None:
        self._parameterNode.finetuneFiles = []


#
# LiquidRegLogic
#
@dataclass
class _Task:
    """What the running job is for, so its result can be taken in when it ends."""

    kind: str                  # "register" or "finetune"
    parameterNode: object
    folder: pathlib.Path       # the job's private folder (inputs, result), removed at the end
    request: object = None     # register: LiquidRegLib.logic.RegistrationRequest
    preAlignment: object = None
    weights: pathlib.Path = None  # finetune: the new weights file


class LiquidRegLogic(ScriptedLoadableModuleLogic):
    """The module's logic: parameter node, dependencies, and the background jobs.

    One job at a time: ``startRegistration``/``startFinetune`` start it, ``job.poll()`` reports
    progress, ``cancel`` stops it (also when the scene closes) and ``finishJob`` takes in its
    result.  Registrations run in ``worker``, a warm worker process started by the first one and
    kept until the scene closes or ``cleanup`` (a killed or crashed worker is replaced by the
    next Register).  ``register`` is the blocking scripting entry point.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleLogic.__init__(self, parent)
        self.job = None
        self.worker = None  # the warm registration worker (LiquidRegLib.jobs.Worker)
        self.python = None  # interpreter command for jobs; None: PythonSlicer
        self._task = None
        self._started = 0.0
        self._sceneObservation = None

    def getParameterNode(self):
        return LiquidRegParameterNode(super().getParameterNode())

    def setDefaults(self, parameterNode) -> None:
        """Plain scalar volumes as fixed and moving when none is chosen (never a label map or a
        vector volume), and a real folder for the fine-tune folder button."""
        from LiquidRegLib.logic import plain_scalar_volumes

        p = parameterNode
        volumes = plain_scalar_volumes(slicer.mrmlScene)
        if not p.fixedVolume and volumes:
            p.fixedVolume = volumes[0]
        if not p.movingVolume:
            others = [v for v in volumes if v is not p.fixedVolume]
            if others:
                p.movingVolume = others[0]
        if p.finetuneFolder == pathlib.Path():
            p.finetuneFolder = pathlib.Path.home()

    def weightsFolder(self) -> pathlib.Path:
        """Default folder for fine-tuned weights: the user's Slicer documents, not the extension."""
        return pathlib.Path(slicer.app.defaultScenePath) / "LiquidReg"

    # ---- dependencies -----------------------------------------------------------------------
    @staticmethod
    def installedTorchVersion():
        """The installed torch version, read from its metadata without importing it."""
        try:
            return importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """PyTorch through the PyTorch extension, the rest with pip, on first use.

        At most one question: PyTorchUtils' own when torch is missing (what it installs then
        includes the pip packages), ours when only pip packages are missing.  A failed install
        is a message box, never a traceback.
        """
        from packaging.specifiers import SpecifierSet

        version = self.installedTorchVersion()
        if version is not None and not SpecifierSet(TORCH_REQUIREMENT).contains(
                version, prereleases=True):
            slicer.util.errorDisplay(_(
                "PyTorch {version} is installed, but LiquidReg needs torch{requirement}. Install a "
                "newer version with the PyTorch Utils module, restart Slicer, and try again."
            ).format(version=version, requirement=TORCH_REQUIREMENT), windowTitle=_("LiquidReg"))
            return False
        missing = [spec for module, spec in PIP_REQUIREMENTS.items()
                   if importlib.util.find_spec(module) is None]
        try:
            if version is None:
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay(_(
                        "LiquidReg needs the PyTorch extension: install 'PyTorch' from the "
                        "Extensions Manager, restart Slicer, and try again."),
                        windowTitle=_("LiquidReg"))
                    return False
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
                if torch is None:
                    return False
            elif missing and askConfirmation and not slicer.util.confirmOkCancelDisplay(_(
                    "LiquidReg needs these Python packages: {packages}. Install them now?").format(
                        packages=", ".join(missing)), windowTitle=_("LiquidReg")):
                return False
            if missing:
                with slicer.util.WaitCursor():
                    slicer.util.pip_install(missing)
        except Exception as error:
            logging.exception("LiquidReg could not install its dependencies")
            slicer.util.errorDisplay(_(
                "Installing LiquidReg's dependencies failed ({error}). Check the network "
                "connection and try again; the details are in the application log.").format(
                    error=error), windowTitle=_("LiquidReg"))
            return False
        return True

    # ---- jobs -------------------------------------------------------------------------------
    def _run(self, job, task: _Task) -> None:
        self.job, self._task, self._started = job, task, time.monotonic()
        self._observeSceneClose()

    def _runCommand(self, arguments, task: _Task) -> None:
        """Run ``liquidreg ARGUMENTS`` in a process of its own."""
        from LiquidRegLib import jobs

        cancelFile = task.folder / "cancel"
        self._run(jobs.Job(jobs.liquidreg_command(arguments, cancelFile, python=self.python),
                           cancel_file=cancelFile), task)

    def registrationWorker(self):
        """The warm worker, started now if there is none (or the last one was killed or died)."""
        from LiquidRegLib import jobs

        if self.worker is not None and not self.worker.alive:
            self.stopWorker()
        if self.worker is None:
            self.worker = jobs.Worker(jobs.worker_command(python=self.python))
            self._observeSceneClose()
        return self.worker

    def stopWorker(self) -> None:
        """End the warm worker, if any (a registration it runs is cancelled); no process is
        left.  The next Register starts a new one."""
        if self.worker is not None:
            worker, self.worker = self.worker, None
            worker.stop()
        self._observeSceneClose()

    def cleanup(self) -> None:
        """The module is going away (application exit, module reload): stop the job, end the
        worker."""
        self.cancel()
        self.stopWorker()

    def _observeSceneClose(self) -> None:
        """Observe the scene's close while a job or the worker exists (and only then: a logic a
        script made and dropped is not kept alive by the scene)."""
        wanted = self.job is not None or self.worker is not None
        if wanted and self._sceneObservation is None:
            self._sceneObservation = slicer.mrmlScene.AddObserver(
                vtkMRMLScene.StartCloseEvent, self._onSceneClose)
        elif not wanted and self._sceneObservation is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObservation)
            self._sceneObservation = None

    @contextlib.contextmanager
    def _jobFolder(self):
        """A new private folder for a job's files, removed again if the job is refused."""
        if self.job is not None:
            from LiquidRegLib.errors import InputError

            raise InputError("a LiquidReg job is already running; wait for it or cancel it")
        parent = getattr(getattr(slicer, "app", None), "temporaryPath", None)
        folder = pathlib.Path(tempfile.mkdtemp(prefix="LiquidReg-", dir=parent))
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _weights(self, p):
        """The weights file for jobs (None: the shipped weights)."""
        if p.useShippedWeights:
            return None
        if not str(p.weights).strip():
            from LiquidRegLib.errors import InputError

            raise InputError("no weights file is chosen; choose one under Advanced or tick "
                             "'Use shipped weights'")
        return p.weights

    def _outputs(self, p) -> list:
        """The parameter node's output nodes, except results made for another pair (a new node is
        created instead, so no earlier result is overwritten)."""
        from LiquidRegLib.logic import made_for_another_pair

        nodes = [p.outputTransform, p.outputJacobian, p.outputWarped]
        if not (p.fixedVolume and p.movingVolume):
            return nodes
        return [None if node is not None and made_for_another_pair(
            node, p.fixedVolume, p.movingVolume) else node for node in nodes]

    def registrationOptions(self, parameterNode):
        """The panel's choices as the engine's RegistrationOptions."""
        from LiquidRegLib.logic import DEVICES
        from LiquidRegLib.options import RegistrationOptions

        p = parameterNode
        accurate = p.mode == "Accurate"
        return RegistrationOptions(mode="accurate" if accurate else "fast",
                                   iterations=p.iterations if accurate else None,
                                   regularisation=p.regularisation, affine=p.affine,
                                   weights=self._weights(p), device=DEVICES[p.device])

    def startRegistration(self, parameterNode) -> None:
        """Check the selection, write the inputs and start ``liquidreg register``; a bad
        selection raises InputError and changes nothing."""
        from LiquidRegLib import logic as mrml

        p = parameterNode
        request = mrml.RegistrationRequest(p.fixedVolume, p.movingVolume, p.fixedMask,
                                           p.movingMask, *self._outputs(p), p.applyToMoving)
        options = self.registrationOptions(p)
        with self._jobFolder() as folder:
            inputs = mrml.read_request(request, vtk_order=True)
            arguments = mrml.register_arguments(
                mrml.write_cli_inputs(inputs, folder / "inputs"), folder / "result", options,
                panel=True)
            worker = self.registrationWorker()
            self._run(worker.submit(arguments),
                      _Task("register", p, folder, request, inputs.preAlignmentNode))

    def startFinetune(self, parameterNode) -> None:
        """Check the fine-tuning data and start ``liquidreg finetune`` into a new weights file."""
        from LiquidRegLib import logic as mrml

        p = parameterNode
        source = FINETUNE_SOURCES[p.finetuneSource]
        output = mrml.check_new_weights_path(
            p.finetuneOutput or mrml.default_weights_path(self.weightsFolder()))
        with self._jobFolder() as folder:
            files = [str(p.finetuneFolder)] if source == "folder" else list(p.finetuneFiles)
            sources = mrml.finetune_source_arguments(
                source, folder, fixedNode=p.fixedVolume, movingNode=p.movingVolume, files=files)
            output.parent.mkdir(parents=True, exist_ok=True)
            arguments = mrml.finetune_arguments(sources, output, steps=p.finetuneSteps,
                                                device=mrml.DEVICES[p.device],
                                                weights=self._weights(p))
            self._runCommand(arguments, _Task("finetune", p, folder, weights=output))

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def cancel(self) -> None:
        """Stop the running job, if any: its result is never taken in."""
        if self.job is not None:
            self.job.cancel()

    def _onSceneClose(self, caller, event) -> None:
        self.cancel()  # the job's nodes are going away
        self.stopWorker()

    def finishJob(self) -> tuple:
        """Take in the ended job: ("done" | "cancelled" | "error", status-line message).  Only a
        job that succeeded and was not cancelled changes the scene."""
        from LiquidRegLib.errors import LiquidRegError

        job, task = self.job, self._task
        elapsed = self.elapsed()
        status, message = job.outcome()
        try:
            if status == "done" and task.kind == "register":
                message = self._takeRegistration(task, elapsed)
            elif status == "done":
                message = self._takeWeights(task, elapsed)
            elif status == "cancelled":
                message = _("Cancelled; nothing was changed.")
        except LiquidRegError as error:
            status, message = "error", str(error)
        except Exception as error:
            logging.exception("LiquidReg could not load its result")
            status, message = "error", _("could not load the result: {error}").format(error=error)
        finally:
            self.job = self._task = None
            if self.worker is not None and not self.worker.alive:
                self.stopWorker()  # killed on Cancel or crashed: the next Register starts anew
            self._observeSceneClose()
            shutil.rmtree(task.folder, ignore_errors=True)
        return status, message

    def _takeRegistration(self, task: _Task, elapsed: float) -> str:
        from LiquidRegLib import logic as mrml

        nodes = mrml.load_cli_result(task.request, task.folder / "result", task.preAlignment)
        p = task.parameterNode
        p.outputTransform = nodes.transformNode
        p.outputJacobian = nodes.jacobianVolumeNode
        p.outputWarped = nodes.warpedVolumeNode
        mrml.show_result(task.request.fixedVolumeNode, nodes)
        folding = nodes.summary.get("pct_folding")
        foldingText = f"{folding:.3f} %" if isinstance(folding, (int, float)) else "?"
        return _("Done in {seconds:.1f} s on {device}; folding {folding} of voxels. Transform "
                 "'{transform}', Jacobian '{jacobian}', warped '{warped}'.").format(
                     seconds=elapsed, device=nodes.summary.get("device", "?"),
                     folding=foldingText, transform=nodes.transformNode.GetName(),
                     jacobian=nodes.jacobianVolumeNode.GetName(),
                     warped=nodes.warpedVolumeNode.GetName())

    def _takeWeights(self, task: _Task, elapsed: float) -> str:
        p = task.parameterNode
        p.weights = str(task.weights)
        p.useShippedWeights = False
        p.finetuneOutput = ""  # the next run makes a new file
        return _("Fine-tuned in {seconds:.0f} s. The new weights '{path}' are selected for "
                 "registration (Advanced; 'Use shipped weights' goes back).").format(
                     seconds=elapsed, path=task.weights)

    # ---- scripting --------------------------------------------------------------------------
    def register(self, fixedNode, movingNode, **options):
        """Register ``movingNode`` onto ``fixedNode`` in this process and return the result
        nodes; blocks.  Options: see ``LiquidRegLib.logic.register_nodes``."""
        if not self.ensureDependencies():
            raise RuntimeError("LiquidReg needs PyTorch and its Python packages to register")
        from LiquidRegLib.logic import register_nodes

        return register_nodes(fixedNode, movingNode, **options)


#
# LiquidRegTest
#
class LiquidRegTest(ScriptedLoadableModuleTest):
    """Run by ctest through ``slicer.testing.runUnitTest``, which runs the ``test_*`` methods
    (never ``runTest``), so dependencies are set up once in ``setUpClass``.  The shared checks are
    the ones CI runs with slicer-core (LiquidRegTesting/slicer_tests.py); then the panel itself."""

    @classmethod
    def setUpClass(cls):
        if not LiquidRegLogic().ensureDependencies(askConfirmation=False):
            raise RuntimeError("LiquidReg's dependencies (PyTorch) could not be installed")

    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_SharedChecks(self):
        from LiquidRegTesting import slicer_tests

        for body in slicer_tests.ALL_TESTS:
            self.setUp()
            self.delayDisplay(body.__name__)
            with tempfile.TemporaryDirectory() as workdir:
                body(pathlib.Path(workdir))

    def _clickAndWait(self, widget, button, cancel=False):
        button.click()
        self.assertIsNotNone(widget.logic.job, widget.ui.statusLabel.text)
        if cancel:
            widget.ui.cancelButton.click()
        deadline = time.monotonic() + 900
        while widget.logic.job is not None and time.monotonic() < deadline:
            slicer.app.processEvents()  # the GUI stays responsive while the process works
            time.sleep(0.05)
        self.assertIsNone(widget.logic.job, "the job did not finish in time")
        return widget.ui.statusLabel.text

    def test_PanelRegistersCancelsAndRegistersAgain(self):
        """Register (Fast), Cancel, Register again (Accurate): the same output nodes are updated
        and the moving volume keeps its own pre-alignment; closing the scene ends the worker."""
        from LiquidRegLib.resources import sample_paths

        paths = sample_paths()
        fixed = slicer.util.loadVolume(str(paths["fixed_t1"]))
        moving = slicer.util.loadVolume(str(paths["moving_t1"]))
        prealign = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "prealign")
        moving.SetAndObserveTransformNodeID(prealign.GetID())
        slicer.util.selectModule("LiquidReg")
        widget = slicer.modules.liquidreg.widgetRepresentation().self()
        parameters = widget._parameterNode
        parameters.fixedVolume, parameters.movingVolume, parameters.mode = fixed, moving, "Fast"

        status = self._clickAndWait(widget, widget.ui.registerButton)
        self.assertTrue(status.startswith("Done"), status)
        transform = moving.GetParentTransformNode()
        self.assertIs(transform, parameters.outputTransform)
        fixedRole = slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()
        self.assertEqual(transform.GetNodeReferenceID(fixedRole), fixed.GetID())
        nodes = slicer.mrmlScene.GetNumberOfNodes()

        status = self._clickAndWait(widget, widget.ui.registerButton, cancel=True)
        self.assertTrue(status.startswith("Cancelled"), status)

        parameters.mode, parameters.iterations = "Accurate", 5
        status = self._clickAndWait(widget, widget.ui.registerButton)
        self.assertTrue(status.startswith("Done"), status)
        self.assertIs(moving.GetParentTransformNode(), transform)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.assertIs(transform.GetNodeReference("LiquidReg.preAlignment"), prealign)

        worker = widget.logic.worker  # kept warm for the next Register...
        self.assertTrue(worker is not None and worker.alive)
        slicer.mrmlScene.Clear(0)  # ...until the scene closes
        self.assertIsNone(widget.logic.worker)
        self.assertFalse(worker.alive)
        self.delayDisplay("Register, Cancel and Register again from the panel passed")
