"""The Slicer integration, tested in CI without the Slicer application.

``slicer-core`` provides Slicer's real MRML libraries as a wheel: ``import slicer`` gives the MRML
classes and ``slicer.util``; there is no application, so each test makes its own scene and sets
``slicer.mrmlScene`` to it, exactly as a plain-Python user would.  The test bodies live in
``LiquidRegLib/slicer_tests.py`` and also run inside Slicer (``LiquidRegTest``).
"""
import re
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")  # the slicer-core wheel

from LiquidRegLib import logic, slicer_tests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LiquidReg"


@pytest.fixture
def scene():
    """A fresh MRML scene installed as ``slicer.mrmlScene`` (what slicer.util works on)."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


@pytest.mark.parametrize("body", slicer_tests.ALL_TESTS, ids=lambda body: body.__name__)
def test_shared_body(body, scene, tmp_path):
    body(tmp_path)  # the engine runs use the shipped weights


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
    """What the Slicer module pip-installs is what the engine declares (Slicer ships numpy and
    the PyTorch extension provides torch)."""
    tomllib = pytest.importorskip("tomllib")

    def by_name(specs):
        return {re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower(): spec for spec in specs}

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = by_name(project["dependencies"])
    expected = {name: spec for name, spec in declared.items() if name not in ("numpy", "torch")}
    assert by_name(_module_constant("PIP_REQUIREMENTS").values()) == expected
    torch_spec = declared["torch"].replace("torch", "", 1)
    assert _module_constant("TORCH_REQUIREMENT") == torch_spec


def test_module_never_imports_torch_when_loaded():
    """Slicer loads LiquidReg.py at startup: no torch or engine import at module level
    (PyTorch is installed on first use, with a prompt)."""
    import ast

    top = [node for node in _module_source().body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top for alias in node.names]
    names += [node.module or "" for node in top if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("torch", "LiquidRegLib", "numpy")], names


def test_cmake_lists_every_file():
    """The module CMakeLists.txt installs every Python file and UI resource by name, and the
    engine's package data (which holds no code) beside the engine, where the wheel puts it."""
    listed = (MODULE / "CMakeLists.txt").read_text()
    package_data = MODULE / "LiquidRegLib" / "resources"
    engine = [path for path in (MODULE / "LiquidRegLib").rglob("*.py")
              if "__pycache__" not in path.parts]
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


def test_ui_matches_the_parameter_node_and_widget():
    """Every SlicerParameterName in the .ui is a parameter, every ``self.ui.X`` exists, and every
    node selector gets the scene."""
    import ast
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(MODULE / "Resources" / "UI" / "LiquidReg.ui").getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    parameters = {}
    for node in _module_source().body:
        if isinstance(node, ast.ClassDef) and node.name == "LiquidRegParameterNode":
            parameters = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    parameter_names = {w.findtext("property[@name='SlicerParameterName']/string")
                       for w in widgets.values()}
    bound = parameter_names - {None}
    assert bound and set(bound) <= parameters, set(bound) - parameters
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "LiquidReg.py").read_text()))
    assert used <= set(widgets), used - set(widgets)
    selectors = {name for name, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors and selectors == connected, selectors ^ connected


def test_extension_metadata():
    """Index entry, extension CMake, icon and licence agree with each other and with pyproject."""
    import json

    entry = json.loads((ROOT / "LiquidReg.json").read_text())
    extension = (ROOT / "CMakeLists.txt").read_text()
    assert entry["category"] == "Registration" and 'EXTENSION_CATEGORY "Registration"' in extension
    assert entry["build_dependencies"] == ["PyTorch"] and 'EXTENSION_DEPENDS "PyTorch"' in extension
    assert entry["scm_url"].removesuffix(".git") in extension
    header = (ROOT / "LiquidReg.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    size = (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big"))
    assert size == (128, 128)
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


# ---- LiquidReg.py itself, with stand-ins for the application-only pieces ---------------------
@pytest.fixture
def module(monkeypatch, scene):
    """LiquidReg.py imported as Slicer would, with minimal stand-ins for what only the application
    has (Qt, the scripted-module base classes, the parameter node wrapper, translations).  MRML,
    slicer.util and the engine are real."""
    import importlib
    import sys
    import types

    class Base:
        def __init__(self, parent=None):
            self.parent = parent

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                 "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (Base,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: args
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    stand_ins = {"qt": types.ModuleType("qt"), "slicer.ScriptedLoadableModule": scripted,
                 "slicer.parameterNodeWrapper": wrapper, "slicer.i18n": i18n}
    for name, stand_in in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.syspath_prepend(str(MODULE))
    monkeypatch.delitem(sys.modules, "LiquidReg", raising=False)
    yield importlib.import_module("LiquidReg")
    sys.modules.pop("LiquidReg", None)


def test_module_metadata(module):
    import types

    parent = types.SimpleNamespace()
    module.LiquidReg(parent)
    assert parent.title == "LiquidReg" and parent.categories == ["Registration"]
    assert parent.contributors and parent.acknowledgementText.strip()
    assert "Register" in parent.helpText and "LiquidRegLogic().register(" in parent.helpText


def test_module_logic_delegates_to_the_engine_logic(module):
    """``LiquidReg.LiquidRegLogic().register`` is the engine logic's register (all dependencies
    present here, so nothing is asked)."""
    import numpy as np

    from LiquidRegLib.errors import InputError

    volume = slicer_tests.add_volume(np.ones((9, 9, 9), np.float32), np.eye(4), "only")
    with pytest.raises(InputError, match="same volume"):
        module.LiquidRegLogic().register(volume, volume, iterations=0, device="cpu")


def _pretend_missing(monkeypatch, module, missing):
    real = module.importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real(name, *a))


def test_missing_pip_packages_are_installed_only_when_the_user_agrees(module, monkeypatch):
    import contextlib

    installed, answers = [], []
    monkeypatch.setattr(slicer.util, "pip_install", installed.append)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: answers.pop(0))
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
    _pretend_missing(monkeypatch, module, {"tqdm"})
    answers[:] = [False]
    assert module.LiquidRegLogic().ensureDependencies() is False and installed == []
    answers[:] = [True]
    assert module.LiquidRegLogic().ensureDependencies() is True
    assert installed == [["tqdm>=4.60"]]


def test_pytorch_comes_from_the_pytorch_extension(module, monkeypatch):
    import sys
    import types

    errors, requests = [], []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    _pretend_missing(monkeypatch, module, {"torch"})
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    assert module.LiquidRegLogic().ensureDependencies() is False
    assert errors and "PyTorch extension" in errors[0] and "Extensions Manager" in errors[0]

    class PyTorchUtilsLogic:
        def installTorch(self, **options):
            requests.append(options)
            return None  # the user declined PyTorch's own confirmation

    monkeypatch.setitem(sys.modules, "PyTorchUtils",
                        types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    assert module.LiquidRegLogic().ensureDependencies() is False
    assert requests == [{"askConfirmation": True, "torchVersionRequirement": ">=2.1"}]
