"""The warm worker: ``python -m LiquidRegLib.worker`` registers pair after pair for the Slicer
panel in one process that keeps PyTorch, the device and the network loaded.

Why: a fresh ``liquidreg`` process pays the Python and torch imports, the device's
initialisation, the weights and first-use costs before any work, seconds each time, while panel
users register, look, change a setting and register again.  ``jobs.Worker`` drives this process.

The line protocol (JSON, one object per line; one request at a time):

* stdin: ``{"request": N, "arguments": ["register", FIXED, MOVING, "-o", OUT, ...]}`` runs the
  ``liquidreg register`` command line; ``{"cancel": N}`` stops request N at the engine's next
  step (the worker stays); the end of the input stops what runs and ends the worker, so it never
  outlives its driver, even through a launcher that forwards no signals (Slicer's PythonSlicer).
* stdout: ``{"event": "ready", "pid": P}`` once the engine is imported, then for each request
  the events of ``liquidreg register --progress json`` with ``"request": N`` added, ending with
  one "done" or "error" event.

A request is the ``register`` command itself, parsed, checked, run and reported by ``cli`` (so
the panel gets the command line's result and messages; its files are not deflated, as the panel
reads them once), with the network kept here: loaded for the first request, loaded again only
when the weights file or the device changes.  First-use costs are paid at start, and between
requests the worker gives a registration's memory back.
"""
from __future__ import annotations

import gc
import json
import os
import queue
import sys
import threading
from pathlib import Path

from . import cli


def load_network(weights, device):
    """The (network, info) pair for ``weights`` (None: shipped) on ``device``."""
    from .checkpoint import load_model
    from .devices import resolve_device

    return load_model(weights, resolve_device(device))


class WarmNetwork:
    """The one network the worker keeps, with the weights file (path, size, modification time)
    and device it was loaded for: a fine-tuned file written over the same path is loaded again."""

    def __init__(self, load=None):
        self._load = load or load_network
        self._key = None
        self._network = None

    def get(self, weights, device):
        key = (_file_identity(weights), str(device))
        if key != self._key:
            self._key = self._network = None  # the old network goes before the new one comes
            gc.collect()
            self._network = self._load(weights, device)
            self._key = key
        return self._network


def _file_identity(path):
    if path is None:
        return None
    path = Path(path).expanduser().absolute()
    try:
        stat = path.stat()
    except OSError:
        return (str(path), None)  # missing: loading it gives the error
    return (str(path), stat.st_size, stat.st_mtime_ns)


class Requests:
    """Reads the input on a thread of its own, so a cancel arrives while a request runs:
    requests are queued for the main thread, cancels and the end of the input flagged at once."""

    def __init__(self, fd: int):
        self.queue: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self._cancelled: set = set()
        threading.Thread(target=self._read, args=(fd,), name="liquidreg-requests",
                         daemon=True).start()

    def _read(self, fd: int) -> None:
        pending = b""
        while True:
            try:  # the raw descriptor: no buffer lock for interpreter shutdown to wait on
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._take(line)
        self.closed.set()
        self.queue.put(None)

    def _take(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if isinstance(message, dict) and "cancel" in message:
            self._cancelled.add(message["cancel"])
        elif isinstance(message, dict) and "request" in message:
            self.queue.put(message)
        elif line.strip():
            print(f"liquidreg worker: ignored a line that is no request: {line[:200]!r}",
                  file=sys.stderr, flush=True)

    def cancel_hook(self, number):
        """The engine's ``cancel`` for request ``number``: its cancel, or the end of the input."""
        return lambda: self.closed.is_set() or number in self._cancelled


class RequestReporter(cli.Reporter):
    """``--progress json`` output with the request's number in every event."""

    def __init__(self, number):
        super().__init__("json")
        self.number = number

    def _emit(self, content: dict) -> None:
        super()._emit({**content, "request": self.number})


def serve(message: dict, network: WarmNetwork, requests: Requests) -> int:
    """Run one request; returns the command's exit code.  Ends with one "done" or "error"
    event, whatever happens."""
    number = message.get("request")
    reporter = RequestReporter(number)
    arguments = message.get("arguments")
    try:
        args = cli.build_parser().parse_args([str(a) for a in arguments or []])
    except SystemExit:  # argparse printed the reason on stderr
        args = None
    if args is None or args.command != "register":
        reporter.error(f"the worker only registers; request {number} was not a valid "
                       "'liquidreg register' command line (details in the log)")
        return 2

    def register_warm(args, reporter, cancel):  # the panel reads the files once: no deflating
        model = network.get(args.weights, args.device)
        cli.run_register(args, reporter, cancel, model=model, compress=False)

    args.run = register_warm
    return cli.run_parsed(args, reporter, requests.cancel_hook(number))


def tidy() -> None:
    """Between requests: free this request's arrays and give their memory back to the system,
    so the idle worker holds little more than the network."""
    from .devices import release_freed_memory

    gc.collect()
    release_freed_memory()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def pay_first_use_costs() -> None:
    """Import now what the engine would import in the middle of a registration: its modules, and
    what the first optimiser of a process imports (``torch._dynamo``, 1.5-2.6 s on the GPU
    machine, shared notes), so that even the first Accurate run after a Fast one is warm."""
    from . import io, register, results, validate  # noqa: F401

    import torch

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def main() -> None:
    from .devices import reuse_freed_memory

    reuse_freed_memory()  # within a request; tidy() returns the memory between requests
    requests = Requests(sys.stdin.fileno())
    pay_first_use_costs()
    network = WarmNetwork()
    cli.Reporter("json")._emit({"event": "ready", "pid": os.getpid()})
    while True:
        message = requests.queue.get()
        if message is None:
            break
        try:
            serve(message, network, requests)
        except BrokenPipeError:  # the driver is gone
            break
        if requests.queue.empty():  # while Slicer takes the result in (a next request reuses it)
            tidy()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to write; skip the interpreter's slow teardown with torch loaded


if __name__ == "__main__":
    main()
