"""The package as users install it: a wheel (no editable install, no source tree) registers the
bundled sample pair from any folder, with the weights and sample it carries."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True,
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
