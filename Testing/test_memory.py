"""Memory: the estimate made before a registration, what the machine or container allows, and a
clear refusal instead of a process killed without a word."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
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


# ---- an address-space limit (ulimit -v, prlimit --as) and allocation failures ----------------
#: ``liquidreg`` stopped at its memory check, printing its mapped size and the growth the check
#: expects from there.
PROBE = """
import os, sys
from LiquidRegLib import memory
def check(fixed, moving, work, steps):
    need = memory.estimate(fixed, moving, work, steps)
    loaded = memory.BASE_BYTES + 4 * sum(int(memory.np.prod(g.shape)) for g in (fixed, moving))
    print(memory._proc_bytes("/proc/self/status", "VmSize"), need - min(memory.resident(), loaded))
    sys.stdout.flush()
    os._exit(0)
memory.check = check
from LiquidRegLib.cli import main
main(sys.argv[1:])
"""
#: ``liquidreg`` with the address-space part of its memory check off: the run goes ahead and
#: meets the limit wherever it first allocates too much.
UNCHECKED = ("import sys; from LiquidRegLib import memory; memory.address_space_room = "
             "lambda: None; from LiquidRegLib.cli import entry_point; sys.argv[0] = 'liquidreg'; "
             "entry_point()")


def _under_address_space_limit(command, limit: int, cwd):
    import resource

    def limit_it():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return subprocess.run(command, preexec_fn=limit_it, capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=600)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
def test_an_address_space_limit_is_refused_before_the_work_and_met_in_one_line(tmp_path):
    """The sample pair under an RLIMIT_AS that leaves, at the memory check, half the growth the
    estimate expects (the run needs ~80 % of it, measured): the check refuses it before the work
    with the limit named; with the check off, the allocation that fails mid-run gives the same
    kind of line, not "unexpected ... please report it".  Nothing is written either way."""
    register = ["register", "-o", "out", "--device", "cpu", "--quiet"]
    probe = subprocess.run([sys.executable, "-c", PROBE, *register], capture_output=True,
                           text=True, check=True, cwd=tmp_path)
    mapped, growth = map(int, probe.stdout.split())
    limit = mapped + growth // 2
    run = _under_address_space_limit([sys.executable, "-m", "LiquidRegLib", *register], limit,
                                     tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "more address space" in run.stderr and "ulimit" in run.stderr
    run = _under_address_space_limit([sys.executable, "-c", UNCHECKED, *register], limit,
                                     tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("liquidreg: error: ran out of memory (")
    assert "unexpected" not in run.stderr and "report" not in run.stderr
    assert os.listdir(tmp_path) == []


def test_allocation_failures_are_recognised_and_other_errors_are_not():
    import errno

    import torch
    cases = {
        MemoryError("Unable to allocate 1.19 GiB for an array with shape (400, 400, 400, 5)"):
            "1.19 GiB more could not be allocated",
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                     "memory: you tried to allocate 1073741824 bytes."): "1.00 GB more could",
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB "
                               "total capacity)"): "2.00 GiB more could not be allocated",
        OSError(errno.ENOMEM, "Cannot allocate memory"): "(OSError)",
        RuntimeError("can't start new thread"): "(RuntimeError)",
        ImportError("libtorch_cpu.so: failed to map segment from shared object"): "(ImportError)",
    }
    for error, expected in cases.items():
        shortage = memory.allocation_failure(error)
        assert shortage is not None and expected in str(shortage), (error, shortage)
        assert str(shortage).startswith("ran out of memory (") and "\n" not in str(shortage)
    for error in (RuntimeError("size mismatch"), ValueError("out of memory"), OSError(2, "x")):
        assert memory.allocation_failure(error) is None
