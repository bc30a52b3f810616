"""The package as users install it: a wheel (no editable install, no source tree) registers the
bundled sample pair from any folder, with the weights and sample it carries."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (as from a clean clone: no stale build/)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "LiquidReg", source / "LiquidReg",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(source)], check=True,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    (path,) = dist.glob("liquidreg-*.whl")
    return path


def test_wheel_holds_the_runtime_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    from LiquidRegLib import resources
    assert f"LiquidRegLib/resources/weights/{resources.DEFAULT_WEIGHTS_FILE}" in names
    for file_name in resources.SAMPLE_FILES.values():
        assert f"LiquidRegLib/resources/sample/{file_name}" in names
    assert "LiquidRegLib/register.py" in names and "LiquidRegLib/cli.py" in names
    tooling = [n for n in names if n.startswith(("LiquidRegTesting/", "liquidreg_tools/"))
               or n in ("LiquidRegLib/peers.py", "LiquidRegLib/slicer_tests.py")
               or n.startswith("LiquidRegLib/data/")]
    assert not tooling, f"tooling or test bodies in the wheel: {tooling}"


def test_installed_wheel_registers_the_sample_pair_from_another_folder(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(site), str(wheel)], check=True,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import LiquidRegLib; print(LiquidRegLib.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    run = subprocess.run([sys.executable, "-m", "LiquidRegLib", "register", "-o", "out",
                          "--device", "cpu", "--no-png", "--quiet"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads((elsewhere / "out" / "summary.json").read_text())
    assert Path(summary["model"]["path"]).is_relative_to(site)
    assert summary["pct_folding"] < 0.1


def test_ci_runs_the_readme_commands_and_registering_needs_no_test_stack():
    """The README's Quick start is what CI runs, line for line; its first command installs the
    package alone (with a PNG writer for overview.png), the second the test extras."""
    import re
    tomllib = pytest.importorskip("tomllib")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"not in .ci/run: {command}"
    install, tests = commands
    assert "pip install -q -e . " in install and "[test]" not in install
    assert "liquidreg register" in install
    assert '-e ".[test]"' in tests and "pytest" in tests
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.lower().startswith("pillow") for d in project["dependencies"])
