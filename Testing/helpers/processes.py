"""Watching processes from the tests: is a pid running, wait for a condition, the worker's pid
that the launcher stand-in (``launcher.py``) writes."""
import os
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def launched_pid(pidfile: Path) -> int:
    """The pid of the process the launcher stand-in started (the real worker behind it)."""
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
    return int(pidfile.read_text())
