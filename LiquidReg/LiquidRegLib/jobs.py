"""Background jobs: the ``liquidreg`` command in a process of its own, driven without blocking.

The Slicer module runs registration and fine-tuning this way: torch never loads into the
application, a crash cannot take it down, and the GUI keeps running while a timer polls the
:class:`Job`.  Scripts and tests simply :meth:`Job.wait`.  Nothing here needs Slicer, Qt or torch.

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
process group (POSIX) or process tree (Windows).
"""
from __future__ import annotations

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


class Job:
    """A command running in its own process group, read by two daemon threads, never blocking.

    ``command`` should stop cleanly when ``cancel_file`` appears or its stdin closes (see the
    module docstring); :meth:`cancel` asks for both and kills the tree ``kill_after_s`` later.
    Every stderr line is logged (``logging``) when polled, in the polling thread.
    """

    def __init__(self, command, *, cancel_file=None, env=None, kill_after_s: float = 10.0):
        self.command = [str(part) for part in command]
        self.cancel_file = Path(cancel_file) if cancel_file is not None else None
        self.kill_after_s = kill_after_s
        self.events: list[dict] = []
        self.killed = False
        self._cancel_time = None
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

    def poll(self) -> list[dict]:
        """Progress events printed since the last call; logs stderr; kills a job that ignores
        its cancel for too long."""
        new = []
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if name == "err":
                self._stderr.append(line)
                logging.warning("LiquidReg worker: %s", line)
                continue
            event = parse_progress_line(line)
            if event is not None:
                new.append(event)
            elif line.strip():
                logging.info("LiquidReg worker: %s", line)
        self.events += new
        if (self._cancel_time is not None and not self.killed and not self._ended()
                and time.monotonic() - self._cancel_time > self.kill_after_s):
            self.killed = True
            logging.warning("LiquidReg: the worker did not stop %.0f s after Cancel; killing it",
                            self.kill_after_s)
            kill_tree(self.process)
        return new

    def _ended(self) -> bool:
        """The launcher has exited and the worker closed its output (so it has exited too)."""
        return self.process.poll() is not None and not any(r.is_alive() for r in self._readers)

    @property
    def finished(self) -> bool:
        """True once the process tree has exited and all its output has been polled."""
        return self._ended() and self._lines.empty()

    @property
    def cancelled(self) -> bool:
        return self._cancel_time is not None

    def cancel(self) -> None:
        """Ask the worker to stop (cancel file + closed stdin); from now on the outcome is
        "cancelled", whatever the worker still prints, so its result is never used."""
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

    def wait(self, timeout: float | None = None, on_event=None) -> None:
        """Block until the job ends (scripts and tests); past ``timeout`` it is cancelled."""
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
        """("done", output), ("cancelled", message) or ("error", one-line message)."""
        if self._cancel_time is not None:
            return "cancelled", CANCELLED
        ends = [e for e in self.events if e.get("event") in ("done", "error")]
        if ends and ends[-1]["event"] == "done":
            return "done", str(ends[-1].get("output", ""))
        if ends:
            return "error", str(ends[-1].get("message", "the command failed"))
        lines = [line.strip() for line in self._stderr if line.strip()]
        detail = lines[-1] if lines else "no error message"
        return "error", (f"LiquidReg stopped unexpectedly (exit code {self.process.returncode}): "
                         f"{detail}; the full output is in the application log")
