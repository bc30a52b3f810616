"""Memory: the estimate made before a registration, what the machine or container allows, and a
clear refusal instead of a process killed without a word."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from LiquidRegLib import io, memory
from LiquidRegLib.grid import Grid, resample
from LiquidRegLib.model import ModelConfig
from LiquidRegLib.preprocess import working_grid
from LiquidRegLib.resources import sample_paths


def _write(folder, relative: str, text: str) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_of_the_cgroup_and_its_ancestors(tmp_path):
    _write(tmp_path, "proc/self/cgroup", "0::/jobs/job42\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", "max\n")
    _write(tmp_path, "sys/fs/cgroup/jobs/memory.max", str(8 * 2 ** 30))
    _write(tmp_path, "sys/fs/cgroup/jobs/memory.current", str(3 * 2 ** 30))
    _write(tmp_path, "sys/fs/cgroup/jobs/memory.stat", "anon 1\nfile 0\n")
    _write(tmp_path, "sys/fs/cgroup/jobs/job42/memory.max", str(6 * 2 ** 30))
    _write(tmp_path, "sys/fs/cgroup/jobs/job42/memory.current", str(2 * 2 ** 30))
    _write(tmp_path, "sys/fs/cgroup/jobs/job42/memory.stat", f"anon 5\nfile {2 ** 30}\n")
    # job42: 6 GB - (2 GB - 1 GB of page cache) = 5 GB; its parent: 8 - 3 = 5 GB... the tighter
    assert memory._cgroup_room(tmp_path) == 5 * 2 ** 30
    _write(tmp_path, "sys/fs/cgroup/jobs/memory.current", str(4 * 2 ** 30))
    assert memory._cgroup_room(tmp_path) == 4 * 2 ** 30


def test_cgroup_v1_and_no_limit(tmp_path):
    _write(tmp_path, "proc/self/cgroup", "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n")
    _write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", str(6 * 2 ** 30))
    _write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes", str(2 ** 30))
    _write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.stat", "total_inactive_file 0\n")
    assert memory._cgroup_room(tmp_path) == 5 * 2 ** 30
    _write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
           "9223372036854771712")  # "no limit"
    assert memory._cgroup_room(tmp_path) is None


def test_too_little_memory_is_one_line_before_any_work(run_cli, tmp_path, monkeypatch):
    from LiquidRegLib.options import RegistrationOptions
    grid = Grid((40, 48, 40), np.diag([2.0, 2.0, 2.0, 1.0]))
    image = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    for name in ("fixed", "moving"):
        io.write_volume(tmp_path / f"{name}.nii.gz", image, grid)
    work = working_grid(grid, ModelConfig().working_spacing, ModelConfig().divisor)
    need = memory.estimate(grid, grid, work, RegistrationOptions().steps)
    monkeypatch.setattr(memory, "resident", lambda: 0)
    monkeypatch.setattr(memory, "available", lambda: need - 2 ** 20)
    code, _, err = run_cli("register", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz",
                           "-o", tmp_path / "out", "--device", "cpu", "--quiet")
    assert code != 0 and err.count("\n") == 1, err
    assert "needs about" in err and "coarser voxel size" in err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "available", lambda: need + 2 ** 20)
    code, _, err = run_cli("register", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz",
                           "-o", tmp_path / "out", "--device", "cpu", "--quiet", "--no-png",
                           "--no-affine")
    assert code == 0, err


def test_the_estimate_bounds_the_measured_peak_closely(tmp_path):
    """A real ``liquidreg register`` (the sample pair on a 160^3 grid of 1 mm, in its own
    process): its peak resident memory lies below the estimate, and not far below."""
    paths = []
    for role in ("fixed", "moving"):
        volume = io.read_volume(sample_paths()[f"{role}_t1"])
        affine = np.eye(4)
        affine[:3, 3] = volume.grid.center - 79.5
        grid = Grid((160, 160, 160), affine)
        paths.append(tmp_path / f"{role}.nii.gz")
        io.write_volume(paths[-1], resample(volume.array, volume.grid, grid), grid)
    process = subprocess.Popen([sys.executable, "-m", "LiquidRegLib", "register", *map(str, paths),
                                "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet"],
                               env=dict(os.environ, OMP_NUM_THREADS="2"))
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    peak = usage.ru_maxrss * 1024
    config = ModelConfig()
    estimate = memory.estimate(grid, grid, working_grid(grid, config.working_spacing,
                                                        config.divisor), steps=0)
    assert peak <= estimate <= 1.4 * peak, (peak / 2 ** 20, estimate / 2 ** 20)
