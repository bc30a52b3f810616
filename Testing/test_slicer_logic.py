"""The Slicer integration, tested in CI without the Slicer application.

``slicer-core`` provides Slicer's real MRML libraries as a wheel: ``import slicer`` gives the MRML
classes and ``slicer.util``; there is no application, so each test makes its own scene and sets
``slicer.mrmlScene`` to it, exactly as a plain-Python user would.  The test bodies live in
``LiquidRegTesting/slicer_tests.py`` and also run inside Slicer (``LiquidRegTest``).
"""
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")  # the slicer-core wheel

from helpers import slicer_app  # noqa: E402
from helpers.processes import alive, launched_pid, wait_for  # noqa: E402
from LiquidRegLib import jobs  # noqa: E402
from LiquidRegLib.errors import InputError  # noqa: E402
from LiquidRegLib.options import ACCURATE_ITERATIONS  # noqa: E402
from LiquidRegTesting import slicer_tests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LiquidReg"
HELPERS = Path(__file__).resolve().parent / "helpers"
LAUNCHER, ENGINE = HELPERS / "launcher.py", HELPERS / "engine_stand_in.py"


@pytest.fixture
def scene():
    """A fresh MRML scene installed as ``slicer.mrmlScene`` (what slicer.util works on)."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


@pytest.mark.parametrize("body", slicer_tests.ALL_TESTS, ids=lambda body: body.__name__)
def test_shared_body(body, scene, tmp_path):
    """The engine runs use the shipped weights; Cancel goes through a launcher like Slicer's."""
    if body is slicer_tests.test_cancel_stops_the_command:
        body(tmp_path, python=[sys.executable, LAUNCHER, tmp_path / "worker.pid", sys.executable])
    else:
        body(tmp_path)


def _module_source():
    import ast

    return ast.parse((MODULE / "LiquidReg.py").read_text())


def _module_constant(name):
    import ast

    for node in _module_source().body:
        targets = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and name in targets:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not defined in LiquidReg.py")


def test_pip_requirements_match_pyproject():
    """What the Slicer module pip-installs is what the engine declares, less what Slicer ships
    (numpy), what the PyTorch extension provides (torch) and what only the terminal uses (tqdm,
    imported when a progress bar is drawn)."""
    tomllib = pytest.importorskip("tomllib")

    def by_name(specs):
        return {re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower(): spec for spec in specs}

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = by_name(project["dependencies"])
    terminal = {name.lower() for name in _module_constant("TERMINAL_ONLY_REQUIREMENTS")}
    expected = {name: spec for name, spec in declared.items()
                if name not in {"numpy", "torch"} | terminal}
    assert by_name(_module_constant("PIP_REQUIREMENTS").values()) == expected
    torch_spec = declared["torch"].replace("torch", "", 1)
    assert _module_constant("TORCH_REQUIREMENT") == torch_spec


def test_tqdm_is_only_imported_to_draw_a_terminal_bar(monkeypatch, capsys):
    """No engine module imports tqdm when loaded, and the JSON progress Slicer reads never does."""
    import ast

    for path in (MODULE / "LiquidRegLib").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not [n for n in names if n.split(".")[0] == "tqdm"], path
    from LiquidRegLib.cli import Reporter
    from LiquidRegLib.progress import ProgressEvent

    monkeypatch.setitem(sys.modules, "tqdm", None)  # any import of it now fails
    reporter = Reporter("json")
    reporter(ProgressEvent("network", 1, 2, "predicting"))
    reporter.done(output="x")
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["event"] == "done"


def test_cmake_lists_every_file():
    """The module CMakeLists.txt installs every Python file and UI resource by name, and the
    engine's package data (which holds no code) beside the engine, where the wheel puts it."""
    listed = (MODULE / "CMakeLists.txt").read_text()
    package_data = MODULE / "LiquidRegLib" / "resources"
    engine = [path for package in ("LiquidRegLib", "LiquidRegTesting")
              for path in (MODULE / package).rglob("*.py") if "__pycache__" not in path.parts]
    assert engine and not [p for p in engine if package_data in p.parents]
    expected = [path.relative_to(MODULE).as_posix() for path in engine]
    expected += [path.relative_to(MODULE).as_posix().replace("LiquidReg", "${MODULE_NAME}")
                 for path in (MODULE / "Resources").rglob("*") if path.is_file()]
    missing = [name for name in expected
               if not re.search(rf"^\s*{re.escape(name)}\s*$", listed, re.M)]
    assert not missing, f"add to LiquidReg/CMakeLists.txt: {missing}"
    glob = re.search(r"file\(GLOB_RECURSE (\w+) RELATIVE \$\{CMAKE_CURRENT_SOURCE_DIR\}\s+"
                     r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/LiquidRegLib/resources/\*\)", listed)
    assert glob and f"list(APPEND MODULE_PYTHON_RESOURCES ${{{glob.group(1)}}})" in listed
    assert any(package_data.rglob("*.pt")) and any(package_data.rglob("*.nii.gz"))
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in listed


def _ui_widgets():
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(MODULE / "Resources" / "UI" / "LiquidReg.ui").getroot()
    return root, {w.get("name"): w for w in root.iter("widget")}


def _ui_property(widget, name):
    found = widget.find(f"property[@name='{name}']")
    if found is None:
        return None
    if found.find("stringlist") is not None:
        return [item.text for item in found.iter("string")]
    return (found.findtext("string") or found.findtext("bool") or found.findtext("set"))


def test_ui_matches_the_parameter_node_and_widget():
    """Every SlicerParameterName in the .ui is a parameter, every ``self.ui.X`` exists, and every
    node selector gets the scene."""
    import ast

    root, widgets = _ui_widgets()
    parameters = {}
    for node in _module_source().body:
        if isinstance(node, ast.ClassDef) and node.name == "LiquidRegParameterNode":
            parameters = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    parameter_names = {_ui_property(w, "SlicerParameterName") for w in widgets.values()}
    bound = parameter_names - {None}
    assert bound and set(bound) <= parameters, set(bound) - parameters
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "LiquidReg.py").read_text()))
    assert used <= set(widgets), used - set(widgets)
    selectors = {name for name, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors and selectors == connected, selectors ^ connected


def test_volume_selectors_offer_plain_scalar_volumes(scene):
    """qMRMLNodeComboBox lists a node when its class is one of ``nodeTypes`` (or derives from one,
    if ``showChildNodeTypes``).  Applied to real MRML nodes of every volume class: fixed and
    moving offer plain scalar volumes only, masks also label maps, and no selector offers vector,
    tensor or diffusion volumes (all vtkMRMLScalarVolumeNode subclasses)."""
    _, widgets = _ui_widgets()
    classes = ["vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode",
               "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode"]
    nodes = [scene.AddNewNodeByClass(cls) for cls in classes]

    def offered(name):
        widget = widgets[name]
        types = _ui_property(widget, "nodeTypes")
        children = _ui_property(widget, "showChildNodeTypes") != "false"
        return [n.GetClassName() for n in nodes
                if any(n.IsA(t) if children else n.GetClassName() == t for t in types)]

    for name in ("fixedVolumeSelector", "movingVolumeSelector", "outputJacobianSelector",
                 "outputWarpedSelector"):
        assert offered(name) == ["vtkMRMLScalarVolumeNode"], (name, offered(name))
    for name in ("fixedMaskSelector", "movingMaskSelector"):
        assert offered(name) == ["vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode"], name


def test_weights_and_finetune_folder_are_bound_to_the_parameter_node():
    """The fine-tune folder button is bound by the parameter node wrapper (ctkDirectoryButton <->
    pathlib.Path, Slicer's ctkDirectoryButtonToPathConnector), so the folder shown is the folder
    used; "Use shipped weights" is a bound checkbox, because a ctkPathLineEdit with a *.pt filter
    never reports an empty path."""
    import ast
    import pathlib

    _, widgets = _ui_widgets()
    folder = widgets["finetuneFolderButton"]
    assert folder.get("class") == "ctkDirectoryButton"
    assert _ui_property(folder, "SlicerParameterName") == "finetuneFolder"
    shipped = widgets["useShippedWeightsCheckBox"]
    assert shipped.get("class") == "QCheckBox"
    assert _ui_property(shipped, "SlicerParameterName") == "useShippedWeights"
    annotations = {}
    for node in _module_source().body:
        if isinstance(node, ast.ClassDef) and node.name == "LiquidRegParameterNode":
            annotations = {item.target.id: ast.unparse(item.annotation) for item in node.body
                           if isinstance(item, ast.AnnAssign)}
    assert annotations["finetuneFolder"] in ("pathlib.Path", "Path"), annotations
    assert annotations["useShippedWeights"] == "bool"
    assert "directoryChanged" not in (MODULE / "LiquidReg.py").read_text()
    assert pathlib  # the annotation names the pathlib type the wrapper binds


def test_extension_metadata():
    """Index entry, extension CMake, icon, screenshot and licence agree with each other and with
    pyproject; every picture URL points at a PNG committed at that path (the Extensions Index
    downloads them)."""
    entry = json.loads((ROOT / "LiquidReg.json").read_text())
    extension = (ROOT / "CMakeLists.txt").read_text()
    assert entry["category"] == "Registration" and 'EXTENSION_CATEGORY "Registration"' in extension
    assert entry["build_dependencies"] == ["PyTorch"] and 'EXTENSION_DEPENDS "PyTorch"' in extension
    repository = entry["scm_url"].removesuffix(".git")
    assert repository in extension
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/")
    raw += f"/{entry['scm_revision']}/"
    # The Extensions Index reads these with set(EXTENSION_ICONURL "...") and
    # set(EXTENSION_SCREENSHOTURLS "...") (no space before the parenthesis).
    icon = re.findall(r'set\(EXTENSION_ICONURL "([^"]+)"\)', extension)
    screenshots = re.findall(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', extension)
    assert len(icon) == 1 and len(screenshots) == 1, (icon, screenshots)
    urls = icon + screenshots[0].split()
    for url in urls:
        assert url.startswith(raw), f"{url} is not a file of {raw}"
        path = ROOT / url.removeprefix(raw)
        assert path.is_file(), f"{url} points at {path}, which does not exist"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    size = lambda path: (int.from_bytes(path.read_bytes()[16:20], "big"),  # noqa: E731
                         int.from_bytes(path.read_bytes()[20:24], "big"))
    assert size(ROOT / icon[0].removeprefix(raw)) == (128, 128)
    for url in screenshots[0].split():
        path = ROOT / url.removeprefix(raw)
        assert min(size(path)) >= 300 and path.stat().st_size < 400_000, (size(path), path)
        assert path.name in (ROOT / "README.md").read_text(), "show the screenshot in the README"
    contributors = re.findall(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', extension)[0]
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c.strip()) for c in contributors.split(","))
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


# ---- LiquidReg.py itself, with stand-ins for the application-only pieces ---------------------
@pytest.fixture
def module(monkeypatch, scene):
    """LiquidReg.py imported as Slicer would, with the stand-ins of ``helpers/slicer_app.py``
    for what only the application has.  MRML, slicer.util and the engine are real."""
    import importlib

    for name, stand_in in slicer_app.stand_ins().items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(slicer, "app", slicer_app.App(), raising=False)
    monkeypatch.syspath_prepend(str(MODULE))
    monkeypatch.delitem(sys.modules, "LiquidReg", raising=False)
    yield importlib.import_module("LiquidReg")
    sys.modules.pop("LiquidReg", None)


def test_module_metadata(module):
    import types

    parent = types.SimpleNamespace()
    module.LiquidReg(parent)
    assert parent.title == "LiquidReg" and parent.categories == ["Registration"]
    assert parent.acknowledgementText.strip()
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", name) for name in parent.contributors), \
        "contributors are written 'Name (Organisation)' in Slicer"
    assert "Register" in parent.helpText and "LiquidRegLogic().register(" in parent.helpText
    assert "instance-optimisation" in parent.helpText


def test_sample_pair_is_offered_in_sample_data(module, monkeypatch, tmp_path):
    """At startup the module registers the bundled pair with the Sample Data module; the local
    file:// URIs are fetched the way SampleData fetches any URI (urllib.request.urlretrieve)."""
    import types
    import urllib.request

    from LiquidRegLib import io

    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **source: registered.append(source))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.LiquidReg(types.SimpleNamespace())
    (signal, slot), = slicer.app.connections
    assert signal == "startupCompleted()"
    slot()
    (source,) = registered
    assert source["category"] == "LiquidReg" and Path(source["thumbnailFileName"]).is_file()
    assert len(source["uris"]) == len(source["fileNames"]) == len(source["nodeNames"]) == 2
    for uri, name in zip(source["uris"], source["fileNames"]):
        copy, _ = urllib.request.urlretrieve(uri, tmp_path / name)
        assert io.read_volume(copy).array.ndim == 3


def test_ctest_runs_the_test_methods_after_setting_up_dependencies(module, monkeypatch):
    """ctest runs ``slicer.testing.runUnitTest``: unittest's loader, i.e. the ``test_*`` methods
    and ``setUpClass``, never ``runTest``; dependencies are set up in ``setUpClass``."""
    import unittest

    asked = []
    monkeypatch.setattr(module.LiquidRegLogic, "ensureDependencies",
                        lambda self, askConfirmation=True: asked.append(askConfirmation) or True)
    names = unittest.TestLoader().getTestCaseNames(module.LiquidRegTest)
    assert "test_SharedChecks" in names and len(names) >= 2
    assert "runTest" not in vars(module.LiquidRegTest)
    module.LiquidRegTest.setUpClass()
    assert asked == [False]
    monkeypatch.setattr(module.LiquidRegLogic, "ensureDependencies",
                        lambda self, askConfirmation=True: False)
    with pytest.raises(RuntimeError, match="PyTorch"):
        module.LiquidRegTest.setUpClass()


def test_module_logic_registers_in_this_process_for_scripts(module):
    """``LiquidReg.LiquidRegLogic().register`` is ``logic.register_nodes`` (all dependencies
    present here, so nothing is asked)."""
    volume = slicer_tests.add_volume(np.ones((9, 9, 9), np.float32), np.eye(4), "only")
    with pytest.raises(InputError, match="same volume"):
        module.LiquidRegLogic().register(volume, volume, iterations=0, device="cpu")


# ---- dependencies -----------------------------------------------------------------------------
@pytest.fixture
def installs(module, monkeypatch):
    """Records every question, message box, pip install and PyTorchUtils call; pretend
    ``missing`` packages (import names) are absent and ``torch_version`` is installed."""
    import contextlib
    import importlib.metadata
    import types

    record = {"asked": [], "errors": [], "pip": [], "torch": [], "answer": True,
              "torch_version": "2.13.0+cpu", "missing": set(), "fail": None}

    def confirm(text, **kw):
        record["asked"].append(text)
        return record["answer"]

    def pip_install(requirements):
        if record["fail"] == "pip":
            raise RuntimeError("pip failed: no network")
        record["pip"].append(requirements)

    class PyTorchUtilsLogic:
        def installTorch(self, **options):
            record["torch"].append(options)
            if record["fail"] == "torch":
                raise RuntimeError("light-the-torch failed")
            return types.SimpleNamespace(__version__="2.13.0") if record["answer"] else None

    def version(name):
        if name == "torch" and record["torch_version"] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return record["torch_version"] if name == "torch" else importlib.metadata.version(name)

    real_find_spec = module.importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name in record["missing"]
                        else real_find_spec(name, *a))
    monkeypatch.setattr(module.importlib.metadata, "version", version)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: record["errors"].append(text))
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
    monkeypatch.setitem(sys.modules, "PyTorchUtils",
                        types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return record


def test_tqdm_missing_asks_nothing(module, installs):
    installs["missing"] = {"tqdm"}
    assert module.LiquidRegLogic().ensureDependencies() is True
    assert installs["asked"] == installs["pip"] == installs["torch"] == installs["errors"] == []


def test_missing_pip_packages_are_installed_only_when_the_user_agrees(module, installs):
    installs["missing"], installs["answer"] = {"scipy"}, False
    assert module.LiquidRegLogic().ensureDependencies() is False and installs["pip"] == []
    installs["answer"] = True
    assert module.LiquidRegLogic().ensureDependencies() is True
    assert installs["pip"] == [["scipy>=1.9"]] and len(installs["asked"]) == 2


def test_missing_torch_gets_one_question_pytorchutils(module, installs):
    """PyTorchUtils asks its own question; the pip packages then come without a second one."""
    installs["torch_version"], installs["missing"] = None, {"scipy"}
    assert module.LiquidRegLogic().ensureDependencies() is True
    assert installs["torch"] == [{"askConfirmation": True, "torchVersionRequirement": ">=2.1"}]
    assert installs["asked"] == [] and installs["pip"] == [["scipy>=1.9"]]
    installs["answer"] = False  # the user declines PyTorchUtils' question
    assert module.LiquidRegLogic().ensureDependencies() is False
    assert installs["pip"] == [["scipy>=1.9"]]


def test_an_old_torch_is_named_and_not_used(module, installs):
    installs["torch_version"] = "2.0.1+cu118"
    assert module.LiquidRegLogic().ensureDependencies() is False
    (message,) = installs["errors"]
    assert "2.0.1+cu118" in message and ">=2.1" in message and "PyTorch Utils" in message
    assert installs["torch"] == [] and installs["pip"] == []


@pytest.mark.parametrize("failing", ["torch", "pip"])
def test_a_failed_install_is_a_message_box(module, installs, failing):
    installs["fail"], installs["missing"] = failing, {"scipy"}
    if failing == "torch":
        installs["torch_version"] = None
    assert module.LiquidRegLogic().ensureDependencies() is False
    (message,) = installs["errors"]
    assert "failed" in message and "log" in message


def test_no_pytorch_extension_is_a_message_box(module, installs, monkeypatch):
    installs["torch_version"] = None
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    assert module.LiquidRegLogic().ensureDependencies() is False
    assert "PyTorch extension" in installs["errors"][0]
    assert "Extensions Manager" in installs["errors"][0]


# ---- the panel's logic: jobs on real MRML, the worker through a launcher like Slicer's --------
def _pair(name="moving", grid=None):
    grid = grid or slicer_tests.Grid((12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0]))
    rng = np.random.default_rng(len(name))
    fixed = slicer.mrmlScene.GetFirstNodeByName("fixed") or slicer_tests.add_volume(
        rng.random(grid.shape).astype(np.float32) + 1, grid.affine, "fixed")
    moving = slicer_tests.add_volume(rng.random(grid.shape).astype(np.float32) + 1, grid.affine,
                                     name)
    return fixed, moving


@pytest.fixture
def panel(module, tmp_path, monkeypatch):
    """The module's logic, its worker started through the launcher stand-in with the instant
    stand-in engine, which records the options each run received (and the worker's network
    loads); ``panel.behave("slow")`` changes the engine's behaviour from the next run on.
    Cleaned up at the end as the module is, which must leave no process."""
    monkeypatch.setenv("STAND_IN_ENGINE", "instant")
    monkeypatch.setenv("STAND_IN_RECORD", str(tmp_path / "runs.jsonl"))
    monkeypatch.setenv("STAND_IN_ENGINE_FILE", str(tmp_path / "behaviour"))
    panel = module.LiquidRegLogic()
    panel.python = [sys.executable, LAUNCHER, tmp_path / "worker.pid", sys.executable, ENGINE]
    records = lambda: [json.loads(line) for line in  # noqa: E731
                       (tmp_path / "runs.jsonl").read_text().splitlines()]
    panel.runs = lambda: [run for run in records() if "steps" in run]
    panel.loads = lambda: [run for run in records() if "loaded" in run]
    panel.behave = (tmp_path / "behaviour").write_text
    launched = []  # (launcher, worker) pids of every worker started
    start = panel.registrationWorker

    def registrationWorker():
        if panel.worker is None or not panel.worker.alive:  # a new one will write its pid
            (tmp_path / "worker.pid").unlink(missing_ok=True)
        worker = start()
        if not launched or launched[-1][0] != worker.process.pid:
            launched.append((worker.process.pid, launched_pid(tmp_path / "worker.pid")))
        return worker

    panel.registrationWorker = registrationWorker
    panel.launched = launched
    yield panel
    panel.cleanup()
    if panel.job is not None:
        panel.job.wait(timeout=60)
    wait_for(lambda: not [pid for pids in launched for pid in pids if alive(pid)], timeout=5)


def _finish(panel, timeout=60):
    panel.job.wait(timeout=timeout)
    return panel.finishJob()


def test_panel_registers_twice_into_the_same_nodes(module, scene, panel):
    """Register (Fast), then Register again (Accurate): the created nodes are stored in the
    parameter node and updated in place; both runs start from the user's pre-alignment and the
    moving volume's own voxels.  Another pair gets new nodes and the first pair's stay."""
    fixed, moving = _pair()
    prealign = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pre-alignment")
    matrix = np.eye(4)
    matrix[:3, 3] = (4.0, -2.0, 1.0)
    prealign.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    moving.SetAndObserveTransformNodeID(prealign.GetID())
    p = slicer_app.parameters(module, fixedVolume=fixed, movingVolume=moving)

    panel.startRegistration(p)
    assert {"--no-png", "--no-inverse"} <= set(panel.job.arguments)  # files the panel never reads
    assert _finish(panel)[0] == "done"
    first = (p.outputTransform, p.outputJacobian, p.outputWarped)
    assert None not in first and moving.GetParentTransformNode() is p.outputTransform
    nodes = scene.GetNumberOfNodes()

    p.mode = "Accurate"
    panel.startRegistration(p)
    status, message = _finish(panel)
    assert status == "done", message
    assert (p.outputTransform, p.outputJacobian, p.outputWarped) == first
    assert scene.GetNumberOfNodes() == nodes, "the second run added nodes"
    field = slicer.util.arrayFromGridTransform(p.outputTransform)
    assert np.allclose(field[..., 0], 1 + ACCURATE_ITERATIONS / 100), "not updated in place"
    runs = panel.runs()
    assert [run["steps"] for run in runs] == [0, ACCURATE_ITERATIONS]
    assert not any(run["inverse"] for run in runs)
    for run in runs:
        assert np.allclose(run["initial_affine"], np.linalg.inv(matrix)), run

    _, other = _pair("another moving")
    p.movingVolume = other
    panel.startRegistration(p)
    assert _finish(panel)[0] == "done"
    assert p.outputTransform not in first and p.outputWarped not in first
    assert moving.GetParentTransformNode() is first[0]
    assert np.allclose(slicer.util.arrayFromGridTransform(first[0])[..., 0],
                       1 + ACCURATE_ITERATIONS / 100), "the first pair's result was overwritten"


def _started(panel):
    while not panel.job.events:
        panel.job.poll()
        time.sleep(0.02)


@pytest.mark.skipif(os.name == "nt", reason="pid checks are POSIX")
def test_panel_registers_in_one_warm_worker(module, scene, panel, tmp_path):
    """The first Register starts the worker, the next ones (another pair, another mode) reuse it
    and its network; changing the weights or the device loads the network again in it."""
    fixed, moving = _pair()
    p = slicer_app.parameters(module, fixedVolume=fixed, movingVolume=moving)
    for mode in ("Fast", "Accurate"):
        p.mode = mode
        panel.startRegistration(p)
        assert _finish(panel)[0] == "done"
    _, other = _pair("another moving")
    p.movingVolume = other
    panel.startRegistration(p)
    assert _finish(panel)[0] == "done"
    assert len(panel.launched) == 1 and len(panel.loads()) == 1
    assert {run["pid"] for run in panel.runs()} == {panel.launched[0][1]}
    assert all(run["warm"] for run in panel.runs())

    weights = tmp_path / "mine.pt"  # the stand-in engine never reads it
    p.useShippedWeights, p.weights = False, str(weights)
    panel.startRegistration(p)
    assert _finish(panel)[0] == "done"
    p.device = "CPU"
    panel.startRegistration(p)
    assert _finish(panel)[0] == "done"
    assert [(load["loaded"], load["device"]) for load in panel.loads()] == [
        (None, "auto"), (str(weights), "auto"), (str(weights), "cpu")]
    assert len(panel.launched) == 1


@pytest.mark.skipif(os.name == "nt", reason="pid checks are POSIX")
def test_panel_cancel_keeps_the_worker_and_changes_nothing(module, scene, panel, tmp_path):
    """Cancel stops the registration in the worker within 2 s and changes nothing; the worker
    stays warm and the next Register runs in it."""
    fixed, moving = _pair()
    p = slicer_app.parameters(module, fixedVolume=fixed, movingVolume=moving)
    panel.behave("slow")
    before = slicer_tests.scene_state()
    panel.startRegistration(p)
    folder = panel._task.folder
    _started(panel)
    started = time.monotonic()
    panel.cancel()
    job = panel.job
    status, message = _finish(panel)
    assert time.monotonic() - started < 2.0
    assert status == "cancelled" and message.startswith("Cancelled"), message
    assert not job.killed and not folder.exists() and panel.job is None
    assert p.outputTransform is None and slicer_tests.scene_state() == before
    panel.behave("instant")
    panel.startRegistration(p)
    assert _finish(panel)[0] == "done"
    assert len(panel.launched) == 1 and alive(panel.launched[0][1])


@pytest.mark.skipif(os.name == "nt", reason="pid checks are POSIX")
@pytest.mark.parametrize("failure", ["stuck", "crash"])
def test_panel_replaces_a_killed_or_crashed_worker(module, scene, panel, failure):
    """A worker that ignores Cancel is killed with its launcher within 2 s; a worker that dies
    gives one clear message.  Either way the next Register starts a new worker and works."""
    fixed, moving = _pair()
    p = slicer_app.parameters(module, fixedVolume=fixed, movingVolume=moving)
    panel.behave(failure)
    panel.startRegistration(p)
    if failure == "stuck":
        _started(panel)
        started = time.monotonic()
        panel.cancel()
    status, message = _finish(panel)
    if failure == "stuck":
        assert time.monotonic() - started < 2.5 and status == "cancelled"
    else:
        assert status == "error" and "worker stopped unexpectedly" in message, message
        assert "\n" not in message and "next Register" in message
    assert panel.worker is None
    wait_for(lambda: not any(alive(pid) for pid in panel.launched[0]), timeout=5)
    assert p.outputTransform is None
    panel.behave("instant")
    panel.startRegistration(p)
    assert _finish(panel)[0] == "done"
    assert len(panel.launched) == 2 and panel.runs()[-1]["pid"] == panel.launched[1][1]


@pytest.mark.skipif(os.name == "nt", reason="pid checks are POSIX")
@pytest.mark.parametrize("how", ["scene close", "module cleanup"])
@pytest.mark.parametrize("state", ["idle", "busy"])
def test_scene_close_and_module_cleanup_end_the_worker(module, scene, panel, how, state):
    """Closing the scene (File > Close Scene) or the module's cleanup (application exit, module
    reload) ends the worker, idle or registering (cancelled, nothing changed): no process is
    left, and nothing observes the scene any more."""
    import types

    fixed, moving = _pair()
    p = slicer_app.parameters(module, fixedVolume=fixed, movingVolume=moving)
    panel.startRegistration(p)
    assert _finish(panel)[0] == "done"
    if state == "busy":
        panel.behave("stuck")
        panel.startRegistration(p)
        folder = panel._task.folder
        _started(panel)
    pids = panel.launched[0]
    if how == "scene close":
        scene.Clear(0)
    else:  # what Slicer calls on application exit and module reload, on the panel's widget
        widget = module.LiquidRegWidget()
        widget.logic = panel
        widget._jobTimer = widget._probeTimer = types.SimpleNamespace(stop=lambda: None)
        widget.cleanup()
    assert panel.worker is None
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5)  # killed: gone at once
    if state == "busy":
        status, _ = _finish(panel, timeout=10)
        assert status == "cancelled" and not folder.exists()
    assert panel._sceneObservation is None
    scene.Clear(0)  # no observer left to react


def test_panel_weights_shipped_or_fine_tuned(module, scene, panel, tmp_path):
    """"Use shipped weights" wins over a remembered weights file; fine-tuning from a folder gives
    the job the folder the button shows and selects the new weights when it succeeds."""
    fixed, moving = _pair()
    p = slicer_app.parameters(module, fixedVolume=fixed, movingVolume=moving,
                              weights=str(tmp_path / "old.pt"))
    assert p.useShippedWeights and panel.registrationOptions(p).weights is None
    p.useShippedWeights = False
    assert panel.registrationOptions(p).weights == tmp_path / "old.pt"
    p.weights = ""
    with pytest.raises(InputError, match="Use shipped weights"):
        panel.registrationOptions(p)

    scans = tmp_path / "scans"
    scans.mkdir()
    done = json.dumps({"event": "done", "output": "ok"})
    panel.python = [sys.executable, "-c", f"print({done!r})"]  # a worker that succeeds at once
    p.finetuneSource, p.finetuneFolder = "Folder", scans
    p.finetuneOutput, p.useShippedWeights = str(tmp_path / "mine.pt"), True
    panel.startFinetune(p)
    command = panel.job.command
    assert command[command.index("--images") + 1] == str(scans) and "--weights" not in command
    assert _finish(panel)[0] == "done"
    assert p.weights == str(tmp_path / "mine.pt") and not p.useShippedWeights
    assert p.finetuneOutput == ""


def test_panel_defaults_pick_plain_scalar_volumes(module, scene):
    grid = slicer_tests.Grid((8, 8, 8), np.eye(4))
    slicer_tests.add_volume(np.ones(grid.shape, np.int16), grid.affine, "labels", labels=True)
    scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    first = slicer_tests.add_volume(np.ones(grid.shape, np.float32), grid.affine, "first")
    second = slicer_tests.add_volume(np.ones(grid.shape, np.float32), grid.affine, "second")
    p = slicer_app.parameters(module)
    module.LiquidRegLogic().setDefaults(p)
    assert (p.fixedVolume, p.movingVolume) == (first, second)
    assert p.finetuneFolder == Path.home()


def test_preparing_and_taking_in_a_job_never_imports_torch(tmp_path):
    """Slicer's process loads the module, prepares a registration, runs it in the background and
    takes in the result without ever importing torch (it would freeze the GUI for seconds)."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HELPERS.parent)!r})
        from helpers import slicer_app
        slicer_app.install()
        import numpy as np
        import slicer
        slicer.mrmlScene = slicer.vtkMRMLScene()
        import LiquidReg
        assert "torch" not in sys.modules, "loading the module imported torch"
        volumes = [slicer.util.addVolumeFromArray(
            np.random.default_rng(i).random((12, 12, 12)).astype(np.float32) + 1,
            np.diag([2.0, 2.0, 2.0, 1.0]), name) for i, name in enumerate(["fixed", "moving"])]
        logic = LiquidReg.LiquidRegLogic()
        logic.python = [sys.executable, {str(ENGINE)!r}]
        p = slicer_app.parameters(LiquidReg, fixedVolume=volumes[0], movingVolume=volumes[1])
        logic.startRegistration(p)
        assert "torch" not in sys.modules, "preparing the job imported torch"
        logic.job.wait(timeout=60)
        status, message = logic.finishJob()
        assert status == "done", message
        assert p.outputTransform is not None
        assert "torch" not in sys.modules, "taking in the result imported torch"
        print("torch-free")
    """)
    env = {**jobs.job_environment(), "STAND_IN_ENGINE": "instant",
           "STAND_IN_RECORD": str(tmp_path / "runs.jsonl")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0 and "torch-free" in done.stdout, done.stderr[-3000:]
