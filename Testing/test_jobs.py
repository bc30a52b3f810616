"""The job runner (``LiquidRegLib.jobs``): how Slicer runs ``liquidreg`` in the background.

Inside Slicer the worker is started through ``PythonSlicer``, a launcher that forwards no signals.
``helpers/launcher.py`` behaves the same way, so these tests show that Cancel reaches the real
worker through such a launcher, and that a cancelled job never yields a result.  The worker is the
real ``liquidreg`` command with a stand-in registration (``helpers/engine_stand_in.py``); the real
engine is cancelled the same way in ``slicer_tests.test_cancel_stops_the_command``.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from LiquidRegLib import io, jobs
from LiquidRegLib.grid import Grid

HELPERS = Path(__file__).resolve().parent / "helpers"
LAUNCHER = HELPERS / "launcher.py"
ENGINE = HELPERS / "engine_stand_in.py"
pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and pids: POSIX checks")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _worker_pid(pidfile: Path) -> int:
    _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
    return int(pidfile.read_text())


@pytest.fixture
def images(tmp_path):
    grid = Grid((12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0]))
    values = np.random.default_rng(0).random(grid.shape).astype(np.float32) + 1
    paths = [tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"]
    for path in paths:
        io.write_volume(path, values, grid)
    return paths


def _register_job(tmp_path, images, *, stdin=True, kill_after_s=30.0, env=None):
    """A cancellable ``liquidreg register`` job started through the launcher stand-in."""
    pidfile, cancel_file = tmp_path / "worker.pid", tmp_path / "job.cancel"
    python = [sys.executable, LAUNCHER, pidfile, sys.executable, ENGINE]
    command = jobs.liquidreg_command(["register", *images, "-o", tmp_path / "out"], cancel_file,
                                     python=python)
    if not stdin:
        command.remove("--exit-with-stdin")
    job = jobs.Job(command, cancel_file=cancel_file, kill_after_s=kill_after_s, env=env)
    return job, pidfile


def test_terminating_the_launcher_leaves_the_worker_running(tmp_path):
    """The premise: what Slicer's launcher does with a signal, the stand-in does too."""
    pidfile = tmp_path / "worker.pid"
    launcher = subprocess.Popen([sys.executable, LAUNCHER, pidfile, sys.executable, "-c",
                                 "import time; time.sleep(60)"])
    worker = _worker_pid(pidfile)
    try:
        launcher.terminate()
        launcher.wait(timeout=30)
        time.sleep(0.2)
        assert _alive(worker), "the launcher stand-in forwarded the signal; it must not"
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("channel", ["cancel file and stdin", "stdin only", "cancel file only"])
def test_cancel_reaches_the_worker_through_the_launcher(tmp_path, images, channel):
    """Cancel stops the real worker itself, promptly (exit code 130 through the launcher, nothing
    killed), over either channel alone; nothing is written."""
    job, pidfile = _register_job(tmp_path, images, stdin=channel != "cancel file only")
    if channel == "stdin only":
        job.cancel_file = None
    worker = _worker_pid(pidfile)
    _wait_for(lambda: job.poll() or job.events)
    started = time.monotonic()
    job.cancel()
    job.wait(timeout=60)
    assert job.outcome() == ("cancelled", jobs.CANCELLED)
    assert not job.killed and job.process.returncode == 130, job.process.returncode
    assert time.monotonic() - started < 10
    assert not _alive(worker)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "job.cancel").exists() == (channel != "stdin only")


def test_a_worker_that_ignores_cancel_is_killed_with_its_launcher(tmp_path, images):
    env = {**jobs.job_environment(), "STAND_IN_ENGINE": "stuck"}
    job, pidfile = _register_job(tmp_path, images, kill_after_s=0.5, env=env)
    worker = _worker_pid(pidfile)
    _wait_for(lambda: job.poll() or job.events)
    job.cancel()
    job.wait(timeout=60)
    assert job.killed and job.outcome()[0] == "cancelled"
    _wait_for(lambda: not _alive(worker), timeout=10)
    assert not _alive(job.process.pid)


def test_a_job_outlives_no_driver(tmp_path, images):
    """If the program that started the job dies (its end of stdin closes), the worker stops."""
    job, pidfile = _register_job(tmp_path, images)
    job.cancel_file = None
    worker = _worker_pid(pidfile)
    _wait_for(lambda: job.poll() or job.events)
    job.process.stdin.close()  # what the operating system does when Slicer dies
    _wait_for(lambda: not _alive(worker), timeout=30)
    job.wait(timeout=30)
    assert job.process.returncode == 130 and not job.killed


def _python_job(code: str) -> jobs.Job:
    return jobs.Job([sys.executable, "-c", code], env=dict(os.environ))


def test_a_cancelled_job_never_yields_its_result():
    """Even when the worker has already reported "done" (or exited), Cancel wins."""
    done = json.dumps({"event": "done", "output": "somewhere"})
    job = _python_job(f"import time; print({done!r}, flush=True); time.sleep(1)")
    _wait_for(lambda: job.poll() or job.events)
    assert job.events[-1]["event"] == "done"
    job.cancel()
    job.wait(timeout=30)
    assert job.outcome() == ("cancelled", jobs.CANCELLED)

    job = _python_job(f"print({done!r})")
    job.process.wait(timeout=30)
    job.cancel()  # clicked after the process ended, before the panel's timer saw it
    job.wait(timeout=30)
    assert job.outcome()[0] == "cancelled"

    job = _python_job(f"print({done!r})")
    job.wait(timeout=30)
    assert job.outcome() == ("done", "somewhere")


def test_worker_output_is_logged_and_undecodable_bytes_are_replaced(caplog):
    code = ("import sys; sys.stderr.buffer.write(b'warning: caf\\xe9 \\xff\\n'); "
            "sys.stdout.buffer.write(b'not json \\xfe\\n'); sys.exit(3)")
    job = _python_job(code)
    with caplog.at_level(logging.INFO):
        job.wait(timeout=30)
    logged = [r.getMessage() for r in caplog.records]
    assert "LiquidReg worker: warning: caf\ufffd \ufffd" in logged, logged
    assert "LiquidReg worker: not json \ufffd" in logged, logged
    status, message = job.outcome()
    assert status == "error" and "exit code 3" in message and "caf\ufffd" in message
    assert "--debug" not in message and "log" in message


def test_stage_names_match_what_the_engine_reports():
    """Every stage the engine reports has a status-line name, and no name is left over."""
    import ast

    emitted = set()
    for path in (Path(jobs.__file__).parent).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                position = {"report": 1, "ProgressEvent": 0}.get(name)
                arguments = list(node.args)
                if position is not None and len(arguments) > position:
                    emitted.add(arguments[position])
                emitted.update(k.value for k in node.keywords if k.arg == "stage")
            elif isinstance(node, ast.FunctionDef):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                defaults = [None] * (len(node.args.args) - len(node.args.defaults))
                defaults += node.args.defaults + node.args.kw_defaults
                emitted.update(d for n, d in zip(names, defaults) if n == "stage" and d)
    constants = {n.value for n in emitted if isinstance(n, ast.Constant)}
    assert {"prepare", "finetune", "instance"} <= constants, constants
    assert constants == set(jobs.STAGE_NAMES), constants ^ set(jobs.STAGE_NAMES)
    assert jobs.describe_progress({"stage": "instance", "step": 5, "total": 50,
                                   "metrics": {"eta_s": 12.4}}) == \
        (10, "Instance optimisation (5/50), about 12 s left")
