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

from LiquidRegLib import checkpoint, logic, slicer_tests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ONLY = {"test_register_matches_command_line", "test_cancel_stops_the_command"}


@pytest.fixture
def scene():
    """A fresh MRML scene installed as ``slicer.mrmlScene`` (what slicer.util works on)."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


@pytest.mark.parametrize("body", slicer_tests.ALL_TESTS, ids=lambda body: body.__name__)
def test_shared_body(body, scene, tmp_path):
    if body.__name__ in ENGINE_ONLY and not checkpoint.DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"shipped weights {checkpoint.DEFAULT_WEIGHTS.name} are not in Resources/Weights yet")
    body(tmp_path)


def test_pip_requirements_match_pyproject():
    """What the Slicer module pip-installs is what the engine declares (Slicer ships numpy and
    the PyTorch extension provides torch)."""
    tomllib = pytest.importorskip("tomllib")

    def by_name(specs):
        return {re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower(): spec for spec in specs}

    declared = by_name(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    expected = {name: spec for name, spec in declared.items() if name not in ("numpy", "torch")}
    assert by_name(logic.PIP_REQUIREMENTS.values()) == expected


def test_module_lists_every_python_file():
    """The module CMakeLists.txt installs every engine module, so the extension is complete."""
    listed = (ROOT / "LiquidReg" / "CMakeLists.txt").read_text()
    package = ROOT / "LiquidReg" / "LiquidRegLib"
    missing = [str(path.relative_to(ROOT / "LiquidReg")) for path in package.rglob("*.py")
               if "__pycache__" not in path.parts
               and str(path.relative_to(ROOT / "LiquidReg")) not in listed]
    assert not missing, f"add to LiquidReg/CMakeLists.txt: {missing}"


def test_module_imports_no_torch_at_load():
    """Loading the Slicer module never imports torch (PyTorch is installed on first use)."""
    source = (ROOT / "LiquidReg" / "LiquidReg.py").read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "torch" in line or "LiquidRegLib" in line], top_level
