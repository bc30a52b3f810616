"""Register a cohort: one task per pair, on this machine's processes or on a Dask cluster.

Why a module of its own: a shell loop of ``liquidreg register`` pays Python, torch and the
weights for every pair, and one bad file stops it.  Here a worker loads the network once and
keeps it for every pair it gets; a pair that fails becomes a row with its one-line error while
the others go on; and a pair whose result folder is complete is skipped, so a rerun after a crash
finishes only the rest.  Every result is the same folder ``register`` writes.

Where pairs run: ``workers=1`` in the calling process; ``workers=N`` in N local worker processes
of our own (so a worker that dies costs only its pair, and stopping kills them); ``scheduler=``
on an existing ``dask.distributed`` cluster, one task per pair.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError, LiquidRegError
from .options import RegistrationOptions

#: The cohort table, written into the batch's output folder.
TABLE_CSV, TABLE_JSON = "batch_summary.csv", "batch_summary.json"
PAIR_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "output")


@dataclass(frozen=True)
class Pair:
    """One registration of a cohort: image paths and the name of its result folder."""

    fixed: Path
    moving: Path
    name: str = ""          # result folder inside the batch's output; default "<moving>_to_<fixed>"
    fixed_mask: Path | None = None
    moving_mask: Path | None = None

    def __post_init__(self):
        for role in ("fixed", "moving", "fixed_mask", "moving_mask"):
            value = getattr(self, role)
            if value is not None:  # absolute: a Dask worker does not share our working folder
                object.__setattr__(self, role, Path(value).expanduser().absolute())
        object.__setattr__(self, "name", _folder_name(self.name or _default_name(self)))

    def inputs(self) -> dict:
        return {role: None if getattr(self, role) is None else str(getattr(self, role))
                for role in ("fixed", "moving", "fixed_mask", "moving_mask")}


def _stem(path: Path) -> str:
    from .io import image_extension
    name = path.name
    return name[:len(name) - len(image_extension(name))] if image_extension(name) else path.stem


def _default_name(pair: Pair) -> str:
    return f"{_stem(Path(pair.moving))}_to_{_stem(Path(pair.fixed))}"


def _folder_name(name: str) -> str:
    name = str(name).strip()
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\"):
        raise InputError(f"result name '{name}' is not a plain folder name; give each pair a name "
                         "without '/' that does not start with '.'")
    return name


@dataclass
class PairResult:
    """What became of one pair: a row of the cohort table."""

    name: str
    status: str                      # "ok", "resumed" (complete from an earlier run), "failed"
    #                                  or "cancelled" (the batch stopped before it finished)
    error: str = ""                  # one line naming the problem and the fix
    warning: str = ""                # what the result's summary warns about (e.g. a partial view)
    time_s: float | None = None      # wall time of this run on the pair (read, register, write)
    registration_s: float | None = None  # the engine's own time (summary.json timings_s.total)
    pct_folding: float | None = None     # % of voxels with J <= 0
    std_log_jac: float | None = None
    similarity_before: float | None = None  # mean LNCC before any alignment
    similarity_after: float | None = None   # ... and after the registration
    output: str = ""
    fixed: str = ""
    moving: str = ""
    worker: str = ""                 # which process ran it (host:pid)
    model_loaded: bool = False       # whether this task loaded the network (once per worker)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "resumed")

    def row(self) -> dict:
        return asdict(self)


def _result(pair: Pair, folder: Path, status: str, summary: dict | None = None, **extra):
    summary = summary or {}
    similarity = summary.get("similarity") or {}
    return PairResult(
        name=pair.name, status=status, output=str(folder), fixed=str(pair.fixed),
        moving=str(pair.moving), registration_s=(summary.get("timings_s") or {}).get("total"),
        pct_folding=summary.get("pct_folding"), std_log_jac=summary.get("std_log_jac"),
        similarity_before=similarity.get("before"), similarity_after=similarity.get("after"),
        warning=" ".join(summary.get("warnings", [])), **extra)


def cancelled(pairs: Iterable[Pair], results: Iterable[PairResult], out,
              options: RegistrationOptions) -> list[PairResult]:
    """Rows for the pairs of ``pairs`` that have no result when the batch stops.  A pair whose
    folder already holds its result finished as the batch stopped, before word of it came back:
    it is "ok".  The others were stopped with nothing written: "cancelled"."""
    done, settings = {r.name for r in results}, Settings(options)
    rows = []
    for pair in pairs:
        if pair.name in done:
            continue
        finished = _earlier(pair, Path(out), settings, overwrite=False)
        rows.append(replace(finished, status="ok") if finished and finished.status == "resumed"
                    else _result(pair, Path(out) / pair.name, "cancelled", error=(
                        "the batch was cancelled before this pair finished; rerun the same "
                        "command to register it")))
    return rows


# ---- the pairs file --------------------------------------------------------------------------
def read_pairs(csv_path) -> list[Pair]:
    """Pairs from a CSV with columns fixed,moving[,fixed_mask,moving_mask,output].

    Relative paths are relative to the CSV's folder.  Files are not opened here: a pair whose
    file is missing or corrupt fails on its own when it runs (on a cluster, only the workers may
    see the files).
    """
    from .io import read_csv_table
    rows = read_csv_table(csv_path, required=("fixed", "moving"),
                          optional=("fixed_mask", "moving_mask", "output"), paths=PAIR_COLUMNS[:4])
    pairs = []
    for line, row in rows:
        try:
            pairs.append(Pair(row["fixed"], row["moving"], row.get("output") or "",
                              row.get("fixed_mask"), row.get("moving_mask")))
        except InputError as error:
            raise InputError(f"{Path(csv_path).name} line {line}: {error}") from None
    return pairs


def _unique(pairs: list[Pair]) -> None:
    seen = {}
    for pair in pairs:
        if pair.name in seen:
            raise InputError(f"two pairs write to the same result folder '{pair.name}' "
                             f"({seen[pair.name].moving.name} and {pair.moving.name}); give each "
                             "row its own name in an 'output' column")
        seen[pair.name] = pair


# ---- one pair, on whichever worker runs it ---------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How every pair of a batch is registered (sent to the workers with each pair)."""

    options: RegistrationOptions
    png: bool = True
    threads: int | None = None  # torch threads per worker (None: as the worker is set up)

    def request(self, pair: Pair) -> dict:
        """What a result folder must have been made from to be reused (the device aside)."""
        weights = self.options.weights
        options = {**self.options.summary(),
                   "weights": None if weights is None else str(Path(weights).absolute())}
        return json.loads(json.dumps({"inputs": pair.inputs(), "options": options}))


_MODELS: dict = {}  # (weights, device) -> (network, info): each worker process loads it once


def _network(weights, device) -> tuple[tuple, bool]:
    from .checkpoint import load_model
    key = (None if weights is None else str(Path(weights).absolute()), str(device))
    loaded = key not in _MODELS
    if loaded:
        _MODELS[key] = load_model(weights, device)
    return _MODELS[key], loaded


def _worker_name() -> str:
    import socket
    return f"{socket.gethostname()}:{os.getpid()}"


def run_pair(pair: Pair, out, settings: Settings, device: str | None = None) -> PairResult:
    """Register one pair into ``out/<name>``; a failure is returned as a row, never raised.

    ``device`` overrides the options' device (a local worker's own GPU).  Ctrl-C and
    termination still propagate: they stop the batch, not the pair.
    """
    from . import register as registration
    from .devices import resolve_device
    from .io import read_volume
    from .results import save_result

    started = time.perf_counter()
    folder = Path(out) / pair.name
    loaded = False
    options = settings.options if device is None else replace(settings.options, device=device)
    try:
        if settings.threads:
            import torch
            torch.set_num_threads(settings.threads)
        fixed = read_volume(pair.fixed, name="fixed image")
        moving = read_volume(pair.moving, name="moving image")
        masks = {role: read_volume(path, name=f"{role} mask", dtype=None)
                 for role, path in (("fixed", pair.fixed_mask), ("moving", pair.moving_mask))
                 if path is not None}
        model, loaded = _network(options.weights, resolve_device(options.device))
        result = registration.register(fixed, moving, options, fixed_mask=masks.get("fixed"),
                                       moving_mask=masks.get("moving"), model=model)
        result.summary["request"] = settings.request(pair)
        # _earlier let this pair run: its folder is absent, or holds only what an interrupted
        # or superseded run of it left (LiquidReg's own files), which the new result replaces.
        save_result(result, folder, overwrite=True, png=settings.png, fixed=fixed, moving=moving)
    except Exception as error:  # this pair only: bad input, or a bug or out-of-memory on it
        from .memory import allocation_failure
        message = " ".join(str(allocation_failure(error) or error).split())
        if not isinstance(error, LiquidRegError) and allocation_failure(error) is None:
            message = f"unexpected {type(error).__name__}: {message}"
        return _result(pair, folder, "failed", error=message, worker=_worker_name(),
                       model_loaded=loaded, time_s=round(time.perf_counter() - started, 3))
    return _result(pair, folder, "ok", result.summary, worker=_worker_name(), model_loaded=loaded,
                   time_s=round(time.perf_counter() - started, 3))


# ---- what an earlier run left ----------------------------------------------------------------
def _earlier(pair: Pair, out: Path, settings: Settings, overwrite: bool) -> PairResult | None:
    """The row of a pair that must not run now (complete already, or its folder is not ours
    to replace); None when it should run."""
    from .results import RESULT_FILES, check_output_folder
    folder = out / pair.name
    if not folder.exists():
        return None
    try:
        check_output_folder(folder, overwrite=True)  # files LiquidReg did not write: never
    except InputError as error:
        return _result(pair, folder, "failed", error=" ".join(str(error).split()))
    try:
        summary = json.loads((folder / RESULT_FILES["summary"]).read_text())
    except (OSError, ValueError):
        return None  # empty, or what an older version's interrupted write left
    if overwrite:
        return None
    if summary.get("request") == settings.request(pair):
        return _result(pair, folder, "resumed", summary)
    return _result(pair, folder, "failed", error=f"result folder '{folder}' holds a result of "
                   "other inputs or settings; move it away, or pass --overwrite "
                   "(overwrite=True) to replace it")


# ---- the API ---------------------------------------------------------------------------------
def register_many(pairs: Iterable, out, options: RegistrationOptions | None = None, *,
                  workers: int = 1, scheduler=None, threads: int | None = None,
                  overwrite: bool = False, png: bool = True, **settings) -> Iterator[PairResult]:
    """Register every pair into ``out/<pair name>``: an iterator of :class:`PairResult`, one as
    each pair finishes.  Bad arguments are refused here, before any pair is looked at; the space
    the results need is checked before the first pair starts.

    ``pairs``: :class:`Pair` objects or (fixed, moving) tuples.  ``workers``: local processes
    (1 = this process).  ``scheduler``: a Dask scheduler address ("tcp://host:8786") or a
    ``distributed.Client``; one task per pair.  ``threads``: torch threads per worker (default:
    this machine's cores shared among the local workers; Dask workers keep their own setting).
    Pairs whose result is complete from an earlier run with the same inputs and settings are
    yielded first, as "resumed", and not run again unless ``overwrite``.  ``options`` and
    ``settings`` say how each pair is registered, as for :func:`LiquidRegLib.register.register`
    (e.g. ``mode="accurate", device="cuda"``).
    """
    options = RegistrationOptions.of(options, **settings)
    pairs = [p if isinstance(p, Pair) else Pair(*p) for p in pairs]
    _unique(pairs)
    if int(workers) < 1:
        raise InputError(f"the number of workers must be 1 or more, not {workers}")
    if threads is not None and int(threads) < 1:
        raise InputError(f"the number of threads per worker must be 1 or more, not {threads}")
    out = Path(out).expanduser().absolute()
    if scheduler is None:  # here, a device this machine lacks is one error, not one per pair
        from .devices import resolve_device
        resolve_device(options.device)
        if workers > 1 and threads is None:
            threads = max(1, _cpu_count() // int(workers))
    return _register_all(pairs, out, Settings(options, png, threads), int(workers), scheduler,
                         overwrite)


def _register_all(pairs: list[Pair], out: Path, run: Settings, workers: int, scheduler,
                  overwrite: bool) -> Iterator[PairResult]:
    from .results import claim
    with claim(out):  # one batch per output folder
        pending = []
        for pair in pairs:
            earlier = _earlier(pair, out, run, overwrite)
            if earlier is None:
                pending.append(pair)
            else:
                yield earlier
        if not pending:
            return
        _check_space(pending, out)
        if scheduler is not None:
            client = _dask_client(scheduler)  # before OUT is made: unreachable, nothing is left
            out.mkdir(parents=True, exist_ok=True)
            yield from _on_dask(pending, out, run, client, own=client is not scheduler)
        else:
            out.mkdir(parents=True, exist_ok=True)
            if workers == 1:
                for pair in pending:
                    yield run_pair(pair, out, run)
            else:
                yield from _on_processes(pending, out, run, workers)


def _check_space(pending: list[Pair], out: Path) -> None:
    """Refuse, before any work, a cohort whose results cannot all fit on the disk.  Only the
    headers are read; a pair whose files cannot be read here (missing, corrupt, or visible only
    to a cluster's workers) fails or runs on its own."""
    from .io import read_grid
    from .results import bytes_needed, check_free_space
    need = 0
    for pair in pending:
        try:
            need += bytes_needed(read_grid(pair.fixed), read_grid(pair.moving))
        except LiquidRegError:
            continue
    check_free_space(out, need, f"the results of {len(pending)} pairs",
                     ", or register the cohort in parts")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---- local worker processes ------------------------------------------------------------------
def _serve(connection, parent: int, device) -> None:
    """A local worker: take pairs from the parent, one at a time, until it hangs up."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, _interrupt)     # stop cleanly: a half-written result is removed
    _die_with(parent)
    try:
        while True:
            connection.send(run_pair(*connection.recv(), device=device))
    except (EOFError, OSError, KeyboardInterrupt):  # hung up, or stopped mid-pair (cleaned up)
        pass
    os._exit(0)  # every result is written and sent: skip the interpreter's slow teardown


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _die_with(parent: int) -> None:
    """Linux: end this worker when the batch's process dies, even by SIGKILL."""
    import signal
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the worker ends at its next recv() (the pipe closes)
    if os.getppid() != parent:
        os._exit(1)


def _worker_device(settings: Settings, slot: int):
    """One GPU per local worker when there are several (worker k takes GPU k mod n)."""
    if settings.options.device not in ("auto", "cuda"):
        return None
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{slot % count}" if count > 1 else None


class _Worker:
    def __init__(self, context, slot: int, device):
        self.slot = slot
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, os.getpid(), device),
                                       name=f"liquidreg-worker-{slot}", daemon=True)
        self.process.start()
        child.close()
        self.pair = None

    def give(self, pair: Pair, out: Path, settings: Settings) -> None:
        self.pair = pair
        self.connection.send((pair, out, settings))

    def stop(self) -> None:
        """An idle worker leaves when its pipe closes; a busy one is terminated mid-pair."""
        self.connection.close()
        if self.pair is not None:
            self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _process_context():
    """Fresh interpreters ('spawn'): safe with torch's threads and CUDA.  Inside the Slicer
    application the interpreter is PythonSlicer, not the application itself."""
    import multiprocessing

    from .jobs import python_command
    context = multiprocessing.get_context("spawn")
    context.set_executable(python_command()[0])
    return context


def _on_processes(pending: list[Pair], out: Path, settings: Settings, workers: int):
    from multiprocessing.connection import wait
    context = _process_context()
    queue = list(reversed(pending))
    pool = []
    try:
        for slot in range(min(workers, len(queue))):
            worker = _Worker(context, slot, _worker_device(settings, slot))
            worker.give(queue.pop(), out, settings)
            pool.append(worker)
        while any(w.pair is not None for w in pool):
            busy = {w.connection: w for w in pool if w.pair is not None}
            busy.update({w.process.sentinel: w for w in pool if w.pair is not None})
            for ready in wait(list(busy)):
                worker = busy[ready]
                if worker.pair is None:
                    continue  # both its pipe and its sentinel were ready
                pair, worker.pair = worker.pair, None
                try:
                    result = worker.connection.recv()
                except (EOFError, OSError):  # the process died on this pair: replace it
                    worker.stop()
                    result = _result(pair, out / pair.name, "failed", error=(
                        f"the worker process died (exit code {worker.process.exitcode}; -9 is "
                        "usually the system running out of memory); rerun the batch to retry "
                        "it, with fewer workers"))
                    pool[pool.index(worker)] = worker = _Worker(
                        context, worker.slot, _worker_device(settings, worker.slot))
                if queue:
                    worker.give(queue.pop(), out, settings)
                yield result
    finally:
        for worker in pool:
            worker.stop()


# ---- Dask ------------------------------------------------------------------------------------
def _dask_client(scheduler):
    """A ``distributed.Client`` of ``scheduler`` (an address, or a client, returned as is)."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError("a Dask scheduler was given but Dask is not installed; pip install "
                         "'liquidreg[dask]' (dask[distributed])") from None
    if isinstance(scheduler, Client):
        return scheduler
    try:
        return Client(scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError) as error:
        raise InputError(f"cannot reach the Dask scheduler at '{scheduler}' ({error}); "
                         "start one with 'dask scheduler' and pass its address") from None


def _on_dask(pending: list[Pair], out: Path, settings: Settings, client, own: bool):
    from distributed import as_completed
    batch = uuid.uuid4().hex[:8]
    futures = {client.submit(run_pair, pair, out, settings, key=f"liquidreg-{pair.name}-{batch}",
                             pure=False): pair for pair in pending}
    try:
        for future in as_completed(futures):
            pair = futures[future]
            if future.status == "finished":
                yield future.result()
            else:  # the task itself failed: its worker died (run_pair returns every other error)
                error = future.exception()
                yield _result(pair, out / pair.name, "failed", error=(
                    f"the Dask worker running it failed ({type(error).__name__}: "
                    f"{' '.join(str(error).split())}); rerun the batch to retry it"))
    finally:
        client.cancel(list(futures))
        if own:
            client.close()


# ---- the cohort table ------------------------------------------------------------------------
TABLE_FIELDS = tuple(f.name for f in fields(PairResult))


def write_table(results: Iterable[PairResult], out) -> dict:
    """Write the cohort table (CSV and JSON) into ``out``; returns {"csv": path, "json": path}."""
    import csv

    from .io import atomic_output, write_json
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    counts = {status: sum(r["status"] == status for r in rows)
              for status in ("ok", "resumed", "failed", "cancelled")}
    paths = {"csv": out / TABLE_CSV, "json": out / TABLE_JSON}
    with atomic_output(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    write_json(paths["json"], {"pairs": len(rows), "counts": counts, "results": rows})
    return paths
