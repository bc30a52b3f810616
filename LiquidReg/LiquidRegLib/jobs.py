"""Background jobs: LiquidReg's work in processes of their own, driven without blocking.

The Slicer module runs its work this way: torch never loads into the application, a crash cannot
take it down, and the GUI keeps running while a timer polls.  A :class:`Job` is one ``liquidreg``
command in a process of its own (fine-tuning); the :class:`Worker` is one process that stays,
keeping torch and the network loaded, and registers request after request (the panel's
Register: only the first one pays for starting it; see ``worker.py`` for its line protocol).
Both are polled the same way (``poll``, ``finished``, ``cancel``, ``outcome``; scripts and tests
simply ``wait``).  Nothing here needs Slicer, Qt or torch.

Cancel reaches the real worker.  Inside Slicer the interpreter is ``PythonSlicer``, a CTK
AppLauncher that starts ``python-real`` as its child through QProcess and neither handles nor
forwards signals (commontk/AppLauncher, ``ctkAppLauncherPrivate::runProcess``), so terminating it
would end only the launcher and leave the worker running; SlicerMONAIAuto3DSeg kills the children
for the same reason.  The launcher does give its child its own standard input
(``QProcess::ForwardedInputChannel``).  So :meth:`Job.cancel` creates the job's cancel file and
closes the worker's stdin; the command (``--cancel-file``, ``--exit-with-stdin``) checks both
through the engine's cancel hook and stops at its next step, writing nothing (exit code 130).
Closed stdin also stops a worker whose Slicer has died.  A worker still running ``kill_after_s``
after a cancel (inside one long computation) is killed together with its launcher: the whole
process group (POSIX) or process tree (Windows).  The warm worker reads its requests on stdin,
so there a cancel is a line for the request (the worker stays warm), closed stdin ends the
worker, and one that does not stop within :data:`CANCEL_GRACE_S` is killed the same way.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

#: Status-line names of the stages the engine reports (a test keeps them equal to what it emits).
STAGE_NAMES = {"prepare": "Preparing the pairs", "affine": "Affine alignment",
               "network": "Network", "instance": "Instance optimisation",
               "resample": "Full resolution", "write": "Saving results",
               "train": "Training", "finetune": "Fine-tuning the network",
               "evaluate": "Evaluating", "pairs": "Registering pairs"}

CANCELLED = "cancelled by the user; nothing was changed"
_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)


def python_command() -> list[str]:
    """The interpreter for jobs: Slicer's ``PythonSlicer`` inside the application (it sets up
    Slicer's Python environment; found on PATH as ``slicer.util.executePythonModule`` does), the
    current interpreter everywhere else."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return [found]
    return [sys.executable]


def liquidreg_command(arguments, cancel_file, python=None) -> list[str]:
    """The full command line of a cancellable ``liquidreg`` job that reports JSON progress
    (``python``: the interpreter command, default :func:`python_command`)."""
    return [*(python or python_command()), "-m", "LiquidRegLib.cli", *map(str, arguments),
            "--progress", "json", "--cancel-file", str(cancel_file), "--exit-with-stdin"]


def job_environment() -> dict:
    """The worker's environment: finds this package, writes unbuffered UTF-8 (read back with
    ``errors="replace"``, so no code page can break the reader)."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def parse_progress_line(line: str) -> dict | None:
    """One ``--progress json`` line as a dict, or None for anything else the command printed."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def describe_progress(event: dict) -> tuple[int | None, str]:
    """Percent done in the current stage (None when unknown) and a one-line status."""
    stage = str(event.get("stage", ""))
    step, total = event.get("step"), event.get("total")
    percent = int(100 * step / total) if isinstance(step, (int, float)) and total else None
    text = STAGE_NAMES.get(stage, stage.capitalize())
    if event.get("message"):
        text += f": {event['message']}"
    if total:
        text += f" ({step}/{total})"
    eta = (event.get("metrics") or {}).get("eta_s")
    if isinstance(eta, (int, float)):
        text += f", about {eta:.0f} s left"
    return percent, text


def kill_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything it started (it was started as a group/tree root)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                       creationflags=_NO_WINDOW)
        return
    try:  # the group outlives its leader: a launcher that already exited still has its worker
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Process:
    """A command in its own process group (POSIX) or tree (Windows), its stdout and stderr read
    line by line by two daemon threads, so polling never blocks.  Every stderr line is logged
    (``logging``) when polled, in the polling thread."""

    def __init__(self, command, env=None):
        self.command = [str(part) for part in command]
        self.killed = False
        self._lines: queue.Queue = queue.Queue()
        self._stderr: deque = deque(maxlen=40)
        if os.name == "nt":
            group = {"creationflags": _NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            group = {"start_new_session": True}
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1,
            env=job_environment() if env is None else env, **group)
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.process.stdout, "out"),
                                              (self.process.stderr, "err"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    def _stdout_lines(self) -> list[str]:
        """The stdout lines printed since the last call; stderr lines are logged."""
        lines = []
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if name == "err":
                self._stderr.append(line)
                logging.warning("LiquidReg worker: %s", line)
            else:
                lines.append(line)

    def _events(self) -> list[dict]:
        """The progress events printed since the last call; other stdout lines are logged."""
        events = []
        for line in self._stdout_lines():
            event = parse_progress_line(line)
            if event is not None:
                events.append(event)
            elif line.strip():
                logging.info("LiquidReg worker: %s", line)
        return events

    def _ended(self) -> bool:
        """The launcher has exited and the worker closed its output (so it has exited too)."""
        return self.process.poll() is not None and not any(r.is_alive() for r in self._readers)

    def _kill(self) -> None:
        self.killed = True
        kill_tree(self.process)

    def _stopped_unexpectedly(self, what: str, hint: str = "") -> str:
        lines = [line.strip() for line in self._stderr if line.strip()]
        detail = lines[-1] if lines else "no error message"
        return (f"{what} stopped unexpectedly (exit code {self.process.returncode}): {detail}; "
                f"{hint}the full output is in the application log")


class _Running:
    """What the panel polls and scripts wait for: a :class:`Job`, or one request to the
    :class:`Worker`.  Subclasses keep ``events`` and ``_cancel_time`` and give ``poll``,
    ``finished``, ``cancel`` and ``_crash_message``."""

    events: list
    _cancel_time: float | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel_time is not None

    def wait(self, timeout: float | None = None, on_event=None) -> None:
        """Block until it ends (scripts and tests); past ``timeout`` it is cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self.finished:
                return
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(0.05)

    def outcome(self) -> tuple[str, str]:
        """("done", output), ("cancelled", message) or ("error", one-line message).  Once
        cancelled, the outcome is "cancelled" whatever the worker still reported, so its result
        is never used."""
        if self.cancelled:
            return "cancelled", CANCELLED
        ends = [e for e in self.events if e.get("event") in ("done", "error")]
        if ends and ends[-1]["event"] == "done":
            return "done", str(ends[-1].get("output", ""))
        if ends:
            return "error", str(ends[-1].get("message", "the command failed"))
        return "error", self._crash_message()


class Job(_Process, _Running):
    """A command running in a process of its own, never blocking.

    ``command`` should stop cleanly when ``cancel_file`` appears or its stdin closes (see the
    module docstring); :meth:`cancel` asks for both and kills the tree ``kill_after_s`` later.
    """

    def __init__(self, command, *, cancel_file=None, env=None, kill_after_s: float = 10.0):
        self.cancel_file = Path(cancel_file) if cancel_file is not None else None
        self.kill_after_s = kill_after_s
        self.events: list[dict] = []
        self._cancel_time = None
        super().__init__(command, env)

    def poll(self) -> list[dict]:
        """Progress events printed since the last call; kills a job that ignores its cancel for
        too long."""
        new = self._events()
        self.events += new
        if (self._cancel_time is not None and not self.killed and not self._ended()
                and time.monotonic() - self._cancel_time > self.kill_after_s):
            logging.warning("LiquidReg: the worker did not stop %.0f s after Cancel; killing it",
                            self.kill_after_s)
            self._kill()
        return new

    @property
    def finished(self) -> bool:
        """True once the process tree has exited and all its output has been polled."""
        return self._ended() and self._lines.empty()

    def cancel(self) -> None:
        """Ask the worker to stop (cancel file + closed stdin)."""
        if self._cancel_time is not None:
            return
        self._cancel_time = time.monotonic()
        if self.cancel_file is not None:
            try:
                self.cancel_file.touch()
            except OSError:  # its folder is gone: the closed stdin still reaches the worker
                pass
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def _crash_message(self) -> str:
        return self._stopped_unexpectedly("LiquidReg")


# ---- the warm worker --------------------------------------------------------------------------
#: Seconds a cancelled request may run on before the warm worker is killed (cancel within 2 s).
CANCEL_GRACE_S = 1.5


def worker_command(python=None) -> list[str]:
    """The command line of the warm worker (``python``: as for :func:`liquidreg_command`)."""
    return [*(python or python_command()), "-m", "LiquidRegLib.worker"]


class Worker(_Process):
    """The warm worker (``LiquidRegLib.worker``): one process that keeps PyTorch, the device and
    the network loaded and registers request after request, one at a time, so that only the
    first Register pays for starting it.

    :meth:`submit` sends a request (the arguments of ``liquidreg register``) and returns its
    :class:`WorkerRequest`.  Cancelling a request asks the worker to stop it at the engine's
    next step, which keeps the worker warm; a worker still on it ``cancel_grace_s`` later is
    killed with its launcher, and :attr:`alive` turns False (the owner starts a new one).
    :meth:`stop` ends the worker.  The worker also ends by itself when its input closes, so it
    never outlives the program that started it.
    """

    def __init__(self, command, *, env=None, cancel_grace_s: float = CANCEL_GRACE_S):
        self.cancel_grace_s = cancel_grace_s
        self.pid = None       # the worker's own process id (behind the launcher), once ready
        self.request = None   # the latest request
        self._numbers = itertools.count(1)
        super().__init__(command, env)

    @property
    def alive(self) -> bool:
        return not self.killed and self.process.poll() is None

    @property
    def busy(self) -> bool:
        return self.request is not None and not self.request.finished

    def submit(self, arguments) -> WorkerRequest:
        """Send one registration; the worker must be idle."""
        if self.busy:
            raise RuntimeError("the LiquidReg worker is still busy with a request")
        self.request = WorkerRequest(self, next(self._numbers), [str(a) for a in arguments])
        self._send({"request": self.request.number, "arguments": self.request.arguments})
        return self.request  # a worker gone meanwhile ends the request at the next poll

    def _send(self, message: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError):  # the worker is gone (BrokenPipe) or its input closed
            pass

    def poll(self) -> None:
        """Hand the events printed since the last call to their request; end the request when
        the worker dies; kill a worker that ignores a cancel for too long."""
        request = self.request
        for event in self._events():
            if event.get("event") == "ready":
                self.pid = event.get("pid")
            elif request is not None and event.get("request") == request.number:
                request._take(event)
        if request is None or request.finished:
            return
        if self._ended():
            request._end()
        elif (request.cancelled and not self.killed
              and time.monotonic() - request._cancel_time > self.cancel_grace_s):
            logging.warning("LiquidReg: the worker did not stop %.1f s after Cancel; killing it "
                            "(the next Register starts a new one)", self.cancel_grace_s)
            self._kill()

    def stop(self, wait_s: float = 2.0) -> None:
        """End the worker and reap it.  Idle, it leaves by itself once its input closes; busy
        (its request is then cancelled) or still there after ``wait_s``, it is killed with its
        launcher.  Blocks at most ``wait_s``."""
        if self.busy:
            self.request.cancel()
            self._kill()
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self._kill()
            self.process.wait()
        kill_tree(self.process)  # anything the worker left in its group


class WorkerRequest(_Running):
    """One registration sent to the :class:`Worker`; polled like a :class:`Job`."""

    def __init__(self, worker: Worker, number: int, arguments: list[str]):
        self.worker, self.number, self.arguments = worker, number, arguments
        self.events: list[dict] = []
        self._new: list[dict] = []
        self._cancel_time = None
        self._finished = False

    def _take(self, event: dict) -> None:
        if self._finished:
            return
        self.events.append(event)
        self._new.append(event)
        if event.get("event") in ("done", "error"):
            self._finished = True

    def _end(self) -> None:
        self._finished = True

    def poll(self) -> list[dict]:
        """Progress events of this request since the last call."""
        self.worker.poll()
        new, self._new = self._new, []
        return new

    @property
    def finished(self) -> bool:
        """True once the worker reported this request's end, or died."""
        return self._finished

    @property
    def killed(self) -> bool:
        return self.worker.killed

    def cancel(self) -> None:
        """Ask the worker to stop this request (the worker stays warm); from now on the outcome
        is "cancelled"."""
        if self._cancel_time is not None:
            return
        self._cancel_time = time.monotonic()
        if not self._finished:
            self.worker._send({"cancel": self.number})

    def _crash_message(self) -> str:
        return self.worker._stopped_unexpectedly(
            "the LiquidReg worker", "a new one starts with the next Register; ")
