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

from helpers.processes import alive, launched_pid, wait_for
from LiquidRegLib import io, jobs
from LiquidRegLib.grid import Grid

HELPERS = Path(__file__).resolve().parent / "helpers"
LAUNCHER = HELPERS / "launcher.py"
ENGINE = HELPERS / "engine_stand_in.py"
pytestmark = pytest.mark.skipif(os.name == "nt", reason="process groups and pids: POSIX checks")


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
    worker = launched_pid(pidfile)
    try:
        launcher.terminate()
        launcher.wait(timeout=30)
        time.sleep(0.2)
        assert alive(worker), "the launcher stand-in forwarded the signal; it must not"
    finally:
        os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("channel", ["cancel file and stdin", "stdin only", "cancel file only"])
def test_cancel_reaches_the_worker_through_the_launcher(tmp_path, images, channel):
    """Cancel stops the real worker itself, promptly (exit code 130 through the launcher, nothing
    killed), over either channel alone; nothing is written."""
    job, pidfile = _register_job(tmp_path, images, stdin=channel != "cancel file only")
    if channel == "stdin only":
        job.cancel_file = None
    worker = launched_pid(pidfile)
    wait_for(lambda: job.poll() or job.events)
    started = time.monotonic()
    job.cancel()
    job.wait(timeout=60)
    assert job.outcome() == ("cancelled", jobs.CANCELLED)
    assert not job.killed and job.process.returncode == 130, job.process.returncode
    assert time.monotonic() - started < 10
    assert not alive(worker)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "job.cancel").exists() == (channel != "stdin only")


def test_a_worker_that_ignores_cancel_is_killed_with_its_launcher(tmp_path, images):
    env = {**jobs.job_environment(), "STAND_IN_ENGINE": "stuck"}
    job, pidfile = _register_job(tmp_path, images, kill_after_s=0.5, env=env)
    worker = launched_pid(pidfile)
    wait_for(lambda: job.poll() or job.events)
    job.cancel()
    job.wait(timeout=60)
    assert job.killed and job.outcome()[0] == "cancelled"
    wait_for(lambda: not alive(worker), timeout=10)
    assert not alive(job.process.pid)


def test_a_job_outlives_no_driver(tmp_path, images):
    """If the program that started the job dies (its end of stdin closes), the worker stops."""
    job, pidfile = _register_job(tmp_path, images)
    job.cancel_file = None
    worker = launched_pid(pidfile)
    wait_for(lambda: job.poll() or job.events)
    job.process.stdin.close()  # what the operating system does when Slicer dies
    wait_for(lambda: not alive(worker), timeout=30)
    job.wait(timeout=30)
    assert job.process.returncode == 130 and not job.killed


def _python_job(code: str) -> jobs.Job:
    return jobs.Job([sys.executable, "-c", code], env=dict(os.environ))


def test_a_cancelled_job_never_yields_its_result():
    """Even when the worker has already reported "done" (or exited), Cancel wins."""
    done = json.dumps({"event": "done", "output": "somewhere"})
    job = _python_job(f"import time; print({done!r}, flush=True); time.sleep(1)")
    wait_for(lambda: job.poll() or job.events)
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


# ---- the warm worker (jobs.Worker, LiquidRegLib.worker) ----------------------------------------
@pytest.fixture
def warm(tmp_path, images):
    """A warm worker started through the launcher stand-in; the stand-in engine's behaviour is
    read from a file at every registration (``warm.behave("slow")``); its runs and network
    loads are recorded.  Stopped at the end, leaving no process."""
    record, behaviour = tmp_path / "runs.jsonl", tmp_path / "behaviour"
    env = {**jobs.job_environment(), "STAND_IN_ENGINE": "instant",
           "STAND_IN_RECORD": str(record), "STAND_IN_ENGINE_FILE": str(behaviour)}
    pidfile = tmp_path / "worker.pid"

    class Warm:
        def __init__(self):
            self.worker = self.start()

        def start(self):
            pidfile.unlink(missing_ok=True)
            worker = jobs.Worker(jobs.worker_command(
                [sys.executable, LAUNCHER, pidfile, sys.executable, ENGINE]), env=env)
            worker.real_pid = launched_pid(pidfile)
            return worker

        def behave(self, how):
            behaviour.write_text(how)

        def register(self, name, *options, worker=None):
            return (worker or self.worker).submit(
                ["register", *images, "-o", tmp_path / name, *options])

        def runs(self):
            return [json.loads(line) for line in record.read_text().splitlines()]

    warm = Warm()
    yield warm
    warm.worker.stop()
    wait_for(lambda: not alive(warm.worker.real_pid) and not alive(warm.worker.process.pid), 5)


def _started(request):
    wait_for(lambda: request.poll() or request.events)


def _cancel_once_started(warm, behaviour: str):
    """A request of the stand-in engine behaving so, cancelled once it reports progress; the
    request and the seconds from Cancel to its end."""
    warm.behave(behaviour)
    request = warm.register(behaviour)
    _started(request)
    started = time.monotonic()
    request.cancel()
    request.wait(timeout=30)
    return request, time.monotonic() - started


def test_the_worker_keeps_one_network_for_every_request(warm, tmp_path):
    """Two registrations in one process: the network is loaded once and handed to both; each
    request reports its own progress and result, the result files are the command line's."""
    first = warm.register("first")
    first.wait(timeout=60)
    second = warm.register("second", "--mode", "accurate")
    second.wait(timeout=60)
    assert first.outcome() == ("done", str(tmp_path / "first"))
    assert second.outcome() == ("done", str(tmp_path / "second"))
    assert all(e["request"] == 1 for e in first.events)
    assert all(e["request"] == 2 for e in second.events)
    assert [e["stage"] for e in second.events if e["event"] == "progress"][:1] == ["network"]
    loads = [run for run in warm.runs() if "loaded" in run]
    registrations = [run for run in warm.runs() if "steps" in run]
    assert len(loads) == 1 and [r["steps"] for r in registrations] == [0, 10]
    assert all(r["warm"] and r["pid"] == warm.worker.real_pid for r in registrations)
    assert warm.worker.pid == warm.worker.real_pid  # the "ready" event names the real worker
    assert (tmp_path / "second" / "summary.json").exists()
    # files the panel reads once and deletes: not deflated (the stand-in's warped image is 0s)
    assert (tmp_path / "second" / "warped.nii.gz").stat().st_size > 12 ** 3 * 4


def test_weights_or_device_changes_load_the_network_again(tmp_path):
    """The warm network is loaded again when the device or the weights file changes, including a
    file written anew at the same path (a fine-tuning run with overwrite)."""
    from LiquidRegLib.worker import WarmNetwork

    loads = []
    network = WarmNetwork(load=lambda weights, device: loads.append((weights, device)) or
                          len(loads))
    weights = tmp_path / "mine.pt"
    weights.write_bytes(b"one")
    assert network.get(None, "auto") == network.get(None, "auto") == 1
    assert network.get(None, "cpu") == 2
    assert network.get(weights, "cpu") == network.get(str(weights), "cpu") == 3
    os.utime(weights, ns=(1, 1))  # rewritten: another modification time
    assert network.get(weights, "cpu") == 4
    assert network.get(None, "cpu") == 5
    assert [w for w, _ in loads] == [None, None, weights, weights, None]


def test_cancel_stops_the_request_and_keeps_the_worker(warm, tmp_path):
    """Cancel reaches the engine's cancel hook at its next step, within the 2 s target, through
    the launcher: nothing is killed, nothing written, and the same process takes the next
    request."""
    request, seconds = _cancel_once_started(warm, "slow")
    assert seconds < 2.0
    assert request.outcome() == ("cancelled", jobs.CANCELLED)
    assert request.events[-1]["event"] == "error" and not request.killed
    assert warm.worker.alive and alive(warm.worker.real_pid)
    assert not (tmp_path / "slow").exists()
    warm.behave("instant")
    again = warm.register("again")
    again.wait(timeout=60)
    assert again.outcome()[0] == "done"
    assert {r["pid"] for r in warm.runs() if "steps" in r} == {warm.worker.real_pid}


def test_a_worker_that_ignores_cancel_is_killed_and_a_new_one_works(warm, tmp_path):
    """Inside one long computation the request cannot stop: the worker and its launcher are
    killed after the grace period (cancel within 2 s) and a new worker takes the next one."""
    request, seconds = _cancel_once_started(warm, "stuck")
    assert seconds < 2.0 + 0.5  # 1.5 s grace + polling
    assert request.killed and request.outcome() == ("cancelled", jobs.CANCELLED)
    wait_for(lambda: not alive(warm.worker.real_pid), timeout=5)
    assert not warm.worker.alive
    warm.worker.stop()
    warm.behave("instant")
    warm.worker = warm.start()
    again = warm.register("again")
    again.wait(timeout=60)
    assert again.outcome()[0] == "done"


def test_a_crashed_worker_gives_one_clear_message(warm, caplog):
    warm.behave("crash")
    request = warm.register("crashed")
    request.wait(timeout=60)
    status, message = request.outcome()
    assert status == "error" and "\n" not in message
    assert "worker stopped unexpectedly (exit code 137)" in message
    assert "next Register" in message and "log" in message
    assert not warm.worker.alive


def test_a_bad_request_is_refused_and_the_worker_stays(warm):
    request = warm.worker.submit(["apply", "--reference", "x", "--transform", "y", "z", "-o", "w"])
    request.wait(timeout=60)
    status, message = request.outcome()
    assert status == "error" and "only registers" in message
    assert warm.worker.alive
    with pytest.raises(RuntimeError, match="busy"):
        warm.behave("slow")
        busy = warm.register("busy")
        warm.register("second")
    busy.cancel()
    busy.wait(timeout=30)


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_stop_leaves_no_process(warm, state):
    """Ending the worker (scene close, module cleanup) leaves neither it nor its launcher, idle
    or in the middle of a registration (which is then cancelled)."""
    if state == "busy":
        warm.behave("stuck")
        request = warm.register("busy")
        _started(request)
    started = time.monotonic()
    warm.worker.stop()
    assert time.monotonic() - started < 2.0
    wait_for(lambda: not alive(warm.worker.real_pid) and not alive(warm.worker.process.pid), 5)
    if state == "busy":
        request.wait(timeout=10)
        assert request.outcome()[0] == "cancelled"


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_the_worker_outlives_no_driver(warm, state):
    """If the program that started it dies (its end of the worker's input closes), the worker
    stops what it runs and exits by itself, without being killed."""
    if state == "busy":
        warm.behave("slow")
        _started(warm.register("busy"))
    warm.worker.process.stdin.close()  # what the operating system does when Slicer dies
    wait_for(lambda: not alive(warm.worker.real_pid), timeout=10)
    assert warm.worker.process.wait(timeout=10) == 0 and not warm.worker.killed
