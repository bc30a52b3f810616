#!/usr/bin/env python
"""What a click costs: the Slicer panel's Register through its warm worker, the ``liquidreg``
start-up, and writing the outputs, on a 1 mm brain.

    python scripts/benchmark_worker.py --out worker_out            # CPU, 2 threads
    python scripts/benchmark_worker.py --out worker_out --device cuda --threads 16

(a) The panel's path, as in Slicer but without the application: the module's own Logic
    (``LiquidReg.py``) on real MRML nodes (the ``slicer-core`` wheel, with the test suite's
    smallest stand-ins for Qt), its worker started through the launcher stand-in that behaves
    like PythonSlicer (``Testing/helpers/launcher.py``), the real engine.  The bundled sample
    pair resampled onto a 193x229x193 1 mm grid is registered ``--repeats`` + 1 times (Fast),
    then once in Accurate mode: each time from the click (``startRegistration``) to the result
    nodes in the scene (``finishJob``), split into preparing the inputs (Slicer side), the
    worker's time and taking the result in, against the engine's own time (``summary.json``
    ``timings_s.total``).  The first Register pays for starting the worker; the others do not.
(b) Cancel in the middle of the network stage: seconds from Cancel to the job's end, whether
    the worker had to be killed, and whether the next Register works.
(c) Module cleanup: the worker and its launcher are gone afterwards.
(d) ``liquidreg`` start-up: a bare ``import torch``, ``liquidreg register --help`` and a real
    ``liquidreg register`` (Fast, every output) end to end against its engine time, each a
    process of its own (median of ``--repeats``); what the real run imports (``-X importtime``,
    largest top-level imports) and how long loading the weights takes.
(e) Writing the outputs: ``results.save_result`` of the result of (d), all files and the
    panel's files, and each writer alone.

Writes ``worker.json`` and ``worker.md`` in ``--out``.  Timings depend on the machine's load:
the report records the load average at the start.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from liquidreg_tools.measure import (THREAD_VARIABLES, machine, machine_line, run_measured,
                                     write_report)

ROOT = Path(__file__).resolve().parents[1]
TESTING = ROOT / "Testing"
LAUNCHER = TESTING / "helpers" / "launcher.py"


# ---- (a)-(c) the panel's worker ----------------------------------------------------------------
def panel_logic(workdir: Path):
    """The module's Logic on a fresh slicer-core scene, its worker behind the launcher stand-in."""
    from helpers import slicer_app

    slicer_app.install()
    import slicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    import LiquidReg

    logic = LiquidReg.LiquidRegLogic()
    logic.python = [sys.executable, str(LAUNCHER), str(workdir / "worker.pid"), sys.executable]
    return LiquidReg, logic


def resident_mb(pid) -> float | None:
    """The resident memory of process ``pid`` (MB), None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, TypeError):
        return None
    return next(int(line.split()[1]) / 1024 for line in status.splitlines()
                if line.startswith("VmRSS:"))


def click(logic, parameters, *, cancel_at_stage=None) -> dict:
    """One Register from the click to the result in the scene; times in seconds (CPU: this
    process, i.e. Slicer's side)."""
    idle_mb = resident_mb(logic.worker.pid) if logic.worker is not None else None
    t0, c0 = time.perf_counter(), time.process_time()
    logic.startRegistration(parameters)
    t1, c1 = time.perf_counter(), time.process_time()
    job, cancelled_at = logic.job, None
    while not job.finished:
        for event in job.poll():
            if (cancel_at_stage and cancelled_at is None and event.get("event") == "progress"
                    and event.get("stage") == cancel_at_stage):
                cancelled_at = time.perf_counter()
                logic.cancel()
        time.sleep(0.005)
    t2, c2 = time.perf_counter(), time.process_time()
    killed = getattr(job, "killed", False)
    status, message = logic.finishJob()
    t3, c3 = time.perf_counter(), time.process_time()
    row = {"status": status, "message": message, "wall_s": t3 - t0, "prepare_s": t1 - t0,
           "worker_s": t2 - t1, "take_in_s": t3 - t2, "prepare_cpu_s": c1 - c0,
           "take_in_cpu_s": c3 - c2, "killed": killed, "worker_idle_rss_mb": idle_mb}
    if cancelled_at is not None:
        row["cancel_to_end_s"] = t2 - cancelled_at
    if status == "done":
        summary = json.loads(parameters.outputTransform.GetAttribute("LiquidReg.Summary"))
        row["engine_s"] = summary["timings_s"]["total"]
        row["engine_stages_s"] = summary["timings_s"]
        row["overhead_s"] = row["wall_s"] - row["engine_s"]
        row["worker_beyond_engine_s"] = row["worker_s"] - row["engine_s"]
    return row


def panel_section(fixed_path: Path, moving_path: Path, workdir: Path, args) -> dict:
    sys.path.insert(0, str(TESTING))  # the stand-ins for the application, as the tests use
    from helpers import slicer_app
    from helpers.processes import alive, launched_pid

    from LiquidRegLib.logic import read_volume_node

    module, logic = panel_logic(workdir)
    fixed, moving = read_volume_node(fixed_path, "fixed"), read_volume_node(moving_path, "moving")
    device = {"cpu": "CPU", "cuda": "GPU", "auto": "Auto"}[args.device]
    p = slicer_app.parameters(module, fixedVolume=fixed, movingVolume=moving, device=device)
    rows = []
    for index in range(args.repeats + 1):
        print(f"(a) Register {index + 1} (Fast)", flush=True)
        rows.append({"register": index + 1, "mode": "Fast", **click(logic, p)})
        if index == 0:
            pids = (logic.worker.process.pid, launched_pid(workdir / "worker.pid"))
    p.mode = "Accurate"
    print("(a) Register (Accurate)", flush=True)
    rows.append({"register": len(rows) + 1, "mode": "Accurate", **click(logic, p)})
    p.mode = "Fast"
    print("(b) Cancel during the network stage", flush=True)
    cancel = click(logic, p, cancel_at_stage="network")
    after = click(logic, p)
    same_worker = logic.worker is not None and logic.worker.process.pid == pids[0]
    print("(c) module cleanup", flush=True)
    worker_pids = {pids, (logic.worker.process.pid, logic.worker.pid)}
    logic.cleanup()
    deadline = time.monotonic() + 5
    while any(alive(pid) for pair in worker_pids for pid in pair if pid):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    left = [pid for pair in worker_pids for pid in pair if pid and alive(pid)]
    return {"registers": rows, "cancel": cancel, "after_cancel": after,
            "same_worker_after_cancel": same_worker, "processes_left_after_cleanup": left}


# ---- (d) start-up -------------------------------------------------------------------------------
def timed(command, env, log: Path, timeout: float) -> dict:
    measured = run_measured([str(c) for c in command], env, log, timeout)
    if measured["exit_code"] != 0:
        raise RuntimeError(f"{command[:4]} failed: {log.read_text(errors='replace')[-400:]}")
    return measured


#: What ``liquidreg register`` imports that takes time (its own modules are small).
HEAVY_IMPORTS = ("torch", "numpy", "SimpleITK", "PIL", "LiquidRegLib.register")


def import_seconds(importtime_log: str) -> dict:
    """Cumulative seconds of each of :data:`HEAVY_IMPORTS` in a ``-X importtime`` log, wherever
    it was first imported (torch is imported on a thread, so nesting says little)."""
    seconds = {}
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            if name.strip() in HEAVY_IMPORTS:
                seconds.setdefault(name.strip(), int(cumulative) / 1e6)
    return seconds


def startup_section(fixed: Path, moving: Path, workdir: Path, env: dict, args) -> dict:
    python = [sys.executable]
    cli = [*python, "-m", "LiquidRegLib.cli"]
    out = workdir / "cli"
    runs = {"import_torch": [], "help": [], "register": [], "engine": []}
    for repeat in range(args.repeats):
        print(f"(d) start-up, repeat {repeat + 1}", flush=True)
        runs["import_torch"].append(timed([*python, "-c", "import torch"], env,
                                          workdir / "torch.log", args.timeout)["process_seconds"])
        runs["help"].append(timed([*cli, "register", "--help"], env, workdir / "help.log",
                                  args.timeout)["process_seconds"])
        shutil.rmtree(out, ignore_errors=True)
        measured = timed([*cli, "register", fixed, moving, "-o", out, "--device", args.device,
                          "--quiet"], env, workdir / "register.log", args.timeout)
        runs["register"].append(measured["process_seconds"])
        runs["engine"].append(json.loads((out / "summary.json").read_text())["timings_s"]["total"])
    importtime = subprocess.run(
        [*python, "-X", "importtime", "-m", "LiquidRegLib.cli", "register", str(fixed),
         str(moving), "-o", str(workdir / "cli_importtime"), "--device", args.device, "--quiet"],
        env=env, capture_output=True, text=True, timeout=args.timeout)
    weights = subprocess.run(
        [*python, "-c", "import time, torch; from LiquidRegLib.checkpoint import load_model; "
         f"t = time.perf_counter(); load_model(None, {args.device!r} if {args.device!r} != 'auto' "
         "else ('cuda' if torch.cuda.is_available() else 'cpu')); "
         "print(time.perf_counter() - t)"], env=env, capture_output=True, text=True,
        timeout=args.timeout)
    median = {name: statistics.median(values) for name, values in runs.items()}
    return {"runs": runs, "median": median,
            "slack_s": median["import_torch"] + median["engine"] + 1.0 - median["register"],
            "imports": import_seconds(importtime.stderr),
            "weights_load_s": float(weights.stdout.strip().splitlines()[-1])}


# ---- (e) writing the outputs -------------------------------------------------------------------
@contextlib.contextmanager
def writer_threads(count):
    """``results.save_result`` with ``count`` writer threads (None: its own choice)."""
    from concurrent.futures import ThreadPoolExecutor

    from LiquidRegLib import results

    if count is None:
        yield
        return
    results.ThreadPoolExecutor = lambda max_workers, **options: ThreadPoolExecutor(count, **options)
    try:
        yield
    finally:
        results.ThreadPoolExecutor = ThreadPoolExecutor


def writing_section(result_dir: Path, workdir: Path, args) -> dict:
    import types

    import numpy as np

    from LiquidRegLib import io, results

    disp, grid = io.read_displacement(result_dir / "warp.nii.gz")
    inverse, moving_grid = io.read_displacement(result_dir / "inverse_warp.nii.gz")
    jacobian = io.read_volume(result_dir / "jacobian.nii.gz").array
    warped = io.read_volume(result_dir / "warped.nii.gz").array
    summary = json.loads((result_dir / "summary.json").read_text())
    result = types.SimpleNamespace(fixed_grid=grid, moving_grid=moving_grid, displacement=disp,
                                   inverse_displacement=inverse, jacobian=jacobian, warped=warped,
                                   affine=np.asarray(summary["affine_ras_fixed_to_moving"]),
                                   summary=summary)
    fixed = io.read_volume(args.fixed_path)
    moving = io.read_volume(args.moving_path)
    out = workdir / "writing"

    def best(job) -> dict:
        times = []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            wall, cpu = time.perf_counter(), time.process_time()
            job()
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        wall, cpu = min(times)
        return {"wall_s": wall, "cpu_s": cpu}

    panel = types.SimpleNamespace(**{**vars(result), "inverse_displacement": None})
    rows = {}
    for threads in (None, 1, 2, 3):  # None: save_result's own choice
        name = "default writer threads" if threads is None else f"{threads} writer threads"
        with writer_threads(threads):
            rows[f"command line (all files, overview), {name}"] = best(
                lambda: results.save_result(result, out / "r", fixed=fixed, moving=moving))
            rows[f"panel (warp, warped, Jacobian; stored), {name}"] = best(
                lambda: results.save_result(panel, out / "r", png=False, compress=False))
    rows.update({
        "warp.nii.gz alone": best(lambda: io.write_displacement(out / "w.nii.gz", disp, grid)),
        "warped.nii.gz alone": best(lambda: io.write_volume(out / "w.nii.gz", warped, grid)),
        "warped.nii.gz alone, stored": best(
            lambda: io.write_volume(out / "w.nii.gz", warped, grid, compress=False)),
        "jacobian.nii.gz alone": best(lambda: io.write_volume(out / "j.nii.gz", jacobian, grid)),
    })
    inputs = []  # as the panel writes them
    for volume, name in ((fixed, "fixed.nii"), (moving, "moving.nii")):
        io.write_volume(workdir / name, volume.array, volume.grid)
        inputs.append(workdir / name)
    from LiquidRegLib.worker import WarmNetwork

    network = WarmNetwork(load=lambda weights, device: None)  # kept, as the worker keeps it
    rows["a panel request without the engine (the worker's share)"] = best(
        lambda: worker_request_without_engine(panel, inputs, out, network, args))
    sizes = {path.name: path.stat().st_size for path in result_dir.iterdir()}
    return {"rows": rows, "file_bytes": sizes}


def worker_request_without_engine(result, inputs, out: Path, network, args) -> None:
    """What the warm worker does for a request beyond the engine: ``worker.serve`` on the
    panel's input files, with ``register.register`` handing back ``result``."""
    import io as text
    import types

    from LiquidRegLib import register, worker

    engine, register.register = register.register, lambda *arguments, **options: result
    try:
        with contextlib.redirect_stdout(text.StringIO()):  # its JSON events
            code = worker.serve(
                {"request": 1, "arguments": ["register", *map(str, inputs), "-o", str(out / "r"),
                                             "--no-png", "--no-inverse", "--device", args.device]},
                network, types.SimpleNamespace(cancel_hook=lambda number: None))
    finally:
        register.register = engine
    if code != 0:
        raise RuntimeError("the worker's request failed; run it by hand to see why")


# ---- report -------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    config = report["config"]
    lines = ["# What a click costs", "",
             machine_line(m, f"device {config['device']}, {config['threads']} threads")
             + f"  Input: {config['input']}.", ""]
    panel = report.get("panel")
    if panel:
        lines += ["## The panel's Register through the warm worker", "",
                  "Beyond the engine: preparing the inputs and taking the result in (Slicer's "
                  "side, wall and CPU seconds) and the worker's own time beyond the engine "
                  "(reading, writing, start-up for the first).", "",
                  "| Register | mode | click to result (s) | engine (s) | beyond the engine (s) "
                  "| prepare (CPU) | worker beyond engine | take in (CPU) | worker idle RSS (MB) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in panel["registers"]:
            idle = row.get("worker_idle_rss_mb")
            lines.append(f"| {row['register']} | {row['mode']} | {row['wall_s']:.2f} | "
                         f"{row.get('engine_s', float('nan')):.2f} | "
                         f"{row.get('overhead_s', float('nan')):.2f} | {row['prepare_s']:.2f} "
                         f"({row['prepare_cpu_s']:.2f}) | "
                         f"{row.get('worker_beyond_engine_s', float('nan')):.2f} | "
                         f"{row['take_in_s']:.2f} ({row['take_in_cpu_s']:.2f}) | "
                         f"{'-' if idle is None else f'{idle:.0f}'} |")
        cancel = panel["cancel"]
        lines += ["", f"Cancel during the network stage: the job ended "
                  f"{cancel.get('cancel_to_end_s', float('nan')):.2f} s after Cancel "
                  f"({'the worker was killed' if cancel['killed'] else 'the worker stopped it'}); "
                  f"the next Register: {panel['after_cancel']['status']} in "
                  f"{panel['after_cancel']['wall_s']:.2f} s "
                  f"({'same' if panel['same_worker_after_cancel'] else 'a new'} worker).  After "
                  f"module cleanup, processes left: {len(panel['processes_left_after_cleanup'])}.",
                  ""]
    startup = report.get("startup")
    if startup:
        med = startup["median"]
        lines += ["## `liquidreg` start-up (median of each, a process each)", "",
                  "| what | s |", "|---|---:|",
                  f"| bare `python -c 'import torch'` | {med['import_torch']:.2f} |",
                  f"| `liquidreg register --help` | {med['help']:.2f} |",
                  f"| `liquidreg register` (Fast, every output), end to end | "
                  f"{med['register']:.2f} |",
                  f"| of which the engine (`timings_s.total`) | {med['engine']:.2f} |",
                  f"| loading the weights (inside the engine's time) | "
                  f"{startup['weights_load_s']:.2f} |", "",
                  f"Target (import torch + engine + 1 s) minus the wall time: "
                  f"**{startup['slack_s']:+.2f} s** (positive: met).  What a real run "
                  "imports (cumulative, `-X importtime`): " + ", ".join(
                      f"{name} {seconds:.2f} s" for name, seconds in startup["imports"].items())
                  + ".", ""]
    writing = report.get("writing")
    if writing:
        lines += ["## Writing the outputs (`results.save_result`, best of the repeats)", "",
                  "| what | wall (s) | CPU (s) |", "|---|---:|---:|"]
        for name, row in writing["rows"].items():
            lines.append(f"| {name} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", default="worker_out")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="warm Registers after the first; runs of each start-up figure")
    parser.add_argument("--sections", nargs="+", choices=["panel", "startup", "writing"],
                        default=["panel", "startup", "writing"])
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)

    for name in THREAD_VARIABLES:  # this process, its workers and its children alike
        os.environ[name] = str(args.threads)
    env = dict(os.environ)
    out = Path(args.out).absolute()
    workdir = out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    from benchmark_speed import BRAIN_SHAPE, write_pair

    args.fixed_path, args.moving_path = write_pair(workdir / "inputs", BRAIN_SHAPE)
    report = {"machine": machine(),
              "config": {"device": args.device, "threads": args.threads,
                         "repeats": args.repeats, "input": "the sample pair on 193x229x193 @ 1 mm"}}
    if "startup" in args.sections or "writing" in args.sections:
        report["startup"] = startup_section(args.fixed_path, args.moving_path, workdir, env, args)
    if "writing" in args.sections:
        print("(e) writing the outputs", flush=True)
        report["writing"] = writing_section(workdir / "cli", workdir, args)
    if "panel" in args.sections:
        report["panel"] = panel_section(args.fixed_path, args.moving_path, workdir, args)
    write_report(out, "worker", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
