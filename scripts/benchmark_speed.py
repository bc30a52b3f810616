#!/usr/bin/env python
"""How fast LiquidReg is, and how its cost grows: registration end to end, training steps,
instance-optimisation steps.  Every measurement runs in its own subprocess (wall time and peak
resident memory from the kernel), with the same thread count.

    python scripts/benchmark_speed.py --out speed_out            # full (tens of minutes)
    python scripts/benchmark_speed.py --out /tmp/s --quick       # tiny sizes, smoke test

(a) ``liquidreg register`` network only, end to end INCLUDING reading and writing files, on the
    bundled sample pair resampled onto a 1 mm 193x229x193 grid (the size of a typical 1 mm brain).
(b) The same at 128^3, 192^3 and 256^3 voxels of 1 mm (the sample pair cropped / padded around
    the brain's centre), with the per-stage breakdown from summary.json: the rest of the wall
    time is start-up (imports) and file I/O.
(c) Seconds per training step and peak memory at 96^3 and 128^3 working grids: ``train.run`` on a
    fixed synthetic batch (12 labels, the shipped recipe's loss: Dice + smoothness + folding), so
    data sampling is excluded; the first step (warm-up) is not counted.
(d) Seconds per instance-optimisation step on the 1 mm brain: ``register --iterations K`` (stage
    time / K from summary.json, and the difference to the network-only run / K).
(e) Memory of a large pair: the sample pair on 400^3 voxels of 0.5 mm (two 256 MB volumes),
    network only, end to end: peak resident memory against the 4 GB bound, and the estimate
    ``liquidreg`` makes before starting (``memory.estimate``).
(f) What one Fast registration of the 1 mm brain (a) dispatches, by stage (affine, network,
    outputs, reports; ``liquidreg_tools.dispatch``): aten operators under ``torch.profiler``,
    and on ``--device cuda`` CUDA kernels, copies, host waits and GPU-busy time.  In process,
    after one unprofiled warm-up registration (first-use costs paid); once with the affine
    stage, once without it (the same pair, its affine given).  Stage times come from a second,
    unprofiled registration.  Then the same for training steps (``train.run``, the v2 recipe's
    loss, 96x112x96 working grid, batch 1 on the CPU and 4 on a GPU, fixed synthetic batch):
    aten operators (and kernels) per step, and seconds per step without the profiler.

``--sections`` runs some of them only (default: all).  ``--device`` runs (a), (b), (d), (e) and
(f) on another device than the CPU (e.g. ``cuda``).

Writes ``speed.json`` and ``speed.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from liquidreg_tools.measure import (THREAD_VARIABLES, machine, machine_line, memory_mb,
                                     run_measured, write_report)

BRAIN_SHAPE = (193, 229, 193)
LARGE_SHAPE, LARGE_SPACING = (400, 400, 400), 0.5


# ---- inputs -----------------------------------------------------------------------------------
def brain_grid(source_grid, shape, spacing: float = 1.0):
    """An RAS grid of ``shape`` voxels of ``spacing`` mm centred on ``source_grid``'s centre."""
    import numpy as np

    from LiquidRegLib.grid import Grid

    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = source_grid.center - spacing * (np.asarray(shape, float) - 1) / 2
    return Grid(tuple(int(s) for s in shape), affine)


def write_pair(folder: Path, shape, spacing: float = 1.0) -> tuple[Path, Path]:
    """The sample pair resampled onto ``shape`` voxels of ``spacing`` mm (zero padded/cropped)."""
    from LiquidRegLib import io
    from LiquidRegLib.resources import sample_paths
    from LiquidRegLib.grid import resample

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for role in ("fixed", "moving"):
        volume = io.read_volume(sample_paths()[f"{role}_t1"], name=f"sample {role}")
        target = brain_grid(volume.grid, shape, spacing)
        path = folder / f"{role}.nii.gz"
        io.write_volume(path, resample(volume.array, volume.grid, target), target)
        out.append(path)
    return out[0], out[1]


# ---- measured runs ----------------------------------------------------------------------------
def _environment(threads: int) -> dict:
    import os

    return dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})


def register_cli(fixed: Path, moving: Path, out: Path, args, iterations: int = 0) -> dict:
    """``liquidreg register`` as a user runs it; wall time, peak RSS, stages from summary.json."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "LiquidRegLib.cli", "register", str(fixed), str(moving),
               "-o", str(out), "--device", args.device, "--iterations", str(iterations),
               "--progress", "none", "--quiet"]
    if args.weights:
        command += ["--weights", str(args.weights)]
    measured = run_measured(command, _environment(args.threads), out.parent / f"{out.name}.log",
                            args.timeout)
    if measured["exit_code"] != 0 or not (out / "summary.json").exists():
        log = (out.parent / f"{out.name}.log").read_text(errors="replace").strip()
        raise RuntimeError(f"liquidreg register failed ({measured['exit_code']}): {log[-300:]}")
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["timings_s"]
    return {"wall_s": measured["process_seconds"], "peak_rss_mb": measured["process_peak_rss_mb"],
            "stages_s": stages,
            "startup_and_io_s": measured["process_seconds"] - stages["total"],
            "working_grid": summary.get("working_grid")}


def estimate_mb(fixed: Path, moving: Path) -> float:
    """What ``liquidreg register`` estimates it needs for this pair (network only, CPU)."""
    from LiquidRegLib import io, memory
    from LiquidRegLib.model import ModelConfig
    from LiquidRegLib.preprocess import working_grid

    grids = [io.read_grid(path) for path in (fixed, moving)]
    config = ModelConfig()
    work = working_grid(grids[0], config.working_spacing, config.divisor)
    return memory.estimate(*grids, work, steps=0) / 2 ** 20


def synthetic_batch(shape, batch: int = 1, device="cpu") -> dict:
    """A fixed training batch on a working grid of ``shape``: smooth random regions (12
    structures plus background, quantised smooth noise) rendered as random-contrast images,
    marked same-contrast so that every term of the loss runs."""
    import torch

    from liquidreg_tools.data.synth import gaussian_blur, synthesize

    generator = torch.Generator().manual_seed(0)
    full = (batch, 1, *shape)

    def random_labels(classes: int = 13) -> torch.Tensor:
        noise = gaussian_blur(torch.randn(full, generator=generator), min(shape) / 16)
        edges = torch.quantile(noise.flatten()[::97], torch.linspace(0, 1, classes + 1)[1:-1])
        return torch.bucketize(noise, edges)

    fixed_labels, moving_labels = random_labels(), random_labels()
    items = {"fixed": synthesize(fixed_labels, generator),
             "moving": synthesize(moving_labels, generator),
             "fixed_labels": fixed_labels, "moving_labels": moving_labels,
             "fixed_mask": (fixed_labels > 0).float()}
    return {**{k: v.to(device) for k, v in items.items()}, "num_labels": 13,
            "same_contrast": torch.ones(batch, dtype=torch.bool, device=device)}


def train_child(size: int, steps: int, threads: int) -> dict:
    """Seconds per ``train.run`` step on an N^3 working grid (run inside the measured child)."""
    import torch

    torch.set_num_threads(threads)
    from LiquidRegLib import train
    from LiquidRegLib.model import LiquidReg, ModelConfig

    baseline = memory_mb("VmRSS")
    batch = synthetic_batch((size,) * 3)
    model = LiquidReg(ModelConfig())
    config = train.TrainConfig(steps=steps + 1, checkpoint_every=0,
                               weights=train.LossWeights(similarity=0.0))
    stamps = []
    train.run(model, lambda step: batch, config, device="cpu",
              progress=lambda event: stamps.append(time.perf_counter()))
    per_step = [b - a for a, b in zip(stamps, stamps[1:])]  # first step (warm-up) not counted
    return {"size": size, "steps": steps, "seconds_per_step": statistics.median(per_step),
            "seconds_per_step_all": per_step, "peak_rss_mb": memory_mb(),
            "baseline_rss_mb": baseline, "parameters": sum(p.numel() for p in model.parameters())}


def train_step(size: int, folder: Path, args) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / f"train_{size}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child-train", str(size),
               str(args.train_steps), str(args.threads), str(result)]
    measured = run_measured(command, _environment(args.threads), folder / f"train_{size}.log",
                            args.timeout)
    if not result.exists():
        log = (folder / f"train_{size}.log").read_text(errors="replace").strip()
        raise RuntimeError(f"training step at {size}^3 failed: {log[-300:]}")
    return {**json.loads(result.read_text()), "process_peak_rss_mb": measured["process_peak_rss_mb"]}


#: The v2 recipe's loss (scripts/train.py defaults) and its training crop.
TRAIN_WEIGHTS = dict(similarity=1.0, dice=1.0, smoothness=1.0, folding=10.0, levels=0.5)
TRAIN_SHAPE = (96, 112, 96)


def dispatch_child(fixed: Path, moving: Path, device: str, threads: int, train_steps: int,
                   train_shape) -> dict:
    """(f), inside the measured child: what a Fast registration and a training step dispatch."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from LiquidRegLib import checkpoint, io, register, train
    from LiquidRegLib.devices import resolve_device
    from LiquidRegLib.model import LiquidReg, ModelConfig
    from liquidreg_tools.dispatch import count, profiled

    dev = resolve_device(device)
    volumes = io.read_volume(fixed, name="fixed"), io.read_volume(moving, name="moving")
    model = checkpoint.load_model(None, dev)
    started = time.perf_counter()
    first = register.register(*volumes, model=model, device=dev)  # warm-up: first-use costs
    result = {"device": str(dev), "first_registration_s": time.perf_counter() - started}
    affine = np.asarray(first.affine)
    for name, settings in (("with_affine", {}),
                           ("without_affine", {"affine": False, "initial_affine": affine})):
        with profiled(dev) as prof:
            register.register(*volumes, model=model, device=dev, **settings)
        timed = register.register(*volumes, model=model, device=dev, **settings)
        result[name] = {**count(prof), "timings_s": timed.summary["timings_s"]}

    batch_size = 4 if dev.type == "cuda" else 1
    batch = synthetic_batch(train_shape, batch_size, dev)
    torch.manual_seed(0)
    net = LiquidReg(ModelConfig())
    weights = train.LossWeights(**TRAIN_WEIGHTS)
    warm_up = train.TrainConfig(steps=1, checkpoint_every=0, weights=weights)
    train.run(net, lambda step: batch, warm_up, device=dev)  # first-use costs
    config = train.TrainConfig(steps=train_steps, checkpoint_every=0, weights=weights,
                               log_every=25)  # scripts/train.py's default
    with profiled(dev) as prof:
        train.run(net, lambda step: batch, config, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    train.run(net, lambda step: batch, config, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    counted = count(prof)["total"]
    result["train"] = {"shape": list(train_shape), "batch": batch_size, "steps": train_steps,
                       "seconds_per_step": (time.perf_counter() - started) / train_steps,
                       **{f"{k}_per_step": v / train_steps for k, v in counted.items()}}
    return result


def dispatch(fixed: Path, moving: Path, folder: Path, args) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "dispatch.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child-dispatch", str(fixed),
               str(moving), args.device, str(args.threads), str(args.train_steps),
               "x".join(map(str, args.dispatch_train_shape)), str(result)]
    measured = run_measured(command, _environment(args.threads), folder / "dispatch.log",
                            args.timeout)
    if not result.exists():
        log = (folder / "dispatch.log").read_text(errors="replace").strip()
        raise RuntimeError(f"dispatch count failed: {log[-300:]}")
    return {**json.loads(result.read_text()), "process_peak_rss_mb": measured["process_peak_rss_mb"]}


def dispatch_markdown(row: dict) -> list[str]:
    cuda = "kernels" in row["with_affine"]["total"]
    columns = ["aten_ops", "aten_calls"] + (["kernel_launches", "copies", "host_waits"] if cuda else [])
    lines = ["", f"## What one Fast registration dispatches ({row['input']}, {row['device']})", "",
             "In process, after a warm-up registration (which took "
             f"{row['first_registration_s']:.1f} s); counts under `torch.profiler`, times from an "
             "unprofiled run (summary.json `timings_s`: network includes preprocessing, resample "
             "is outputs and reports).", "",
             "| run | stage | " + " | ".join(columns) + " | s (profiled) |",
             "|---|---|" + "---:|" * (len(columns) + 1)]
    for name in ("with_affine", "without_affine"):
        counted = row[name]
        for stage, counts in [*counted["stages"].items(), ("total", counted["total"])]:
            seconds = counted["stage_seconds"].get(stage)
            lines.append(f"| {name.replace('_', ' ')} | {stage} | "
                         + " | ".join(str(counts.get(c, 0)) for c in columns)
                         + f" | {'' if seconds is None else f'{seconds:.2f}'} |")
        timings = ", ".join(f"{k} {v:.2f}" for k, v in counted["timings_s"].items())
        lines.append(f"| {name.replace('_', ' ')} | unprofiled stage times (s) | {timings} |"
                     + " |" * len(columns))
        if cuda:
            total = counted["total"]
            lines.append(f"| {name.replace('_', ' ')} | CUDA kernels / GPU busy | "
                         f"{total['kernels']} / {total['gpu_busy_s']:.3f} s |" + " |" * len(columns))
    step = row["train"]
    lines += ["", f"Training step (`train.run`, v2 loss, {'x'.join(map(str, step['shape']))}, "
              f"batch {step['batch']}): **{step['seconds_per_step']:.2f} s per step**, "
              f"{step.get('aten_ops_per_step', 0):.0f} aten ops per step "
              f"({step.get('aten_calls_per_step', 0):.0f} outermost)"
              + (f", {step['kernels_per_step']:.0f} CUDA kernels, "
                 f"{step.get('host_waits_per_step', 0):.0f} host waits, GPU busy "
                 f"{step['gpu_busy_s_per_step'] / step['seconds_per_step']:.0%}"
                 if "kernels_per_step" in step else "") + ".", ""]
    return lines


# ---- report -----------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# LiquidReg speed", "",
             machine_line(m, f"{report['config']['threads']} threads"), ""]
    stage_names = ["load", "affine", "network", "resample"]
    lines += ["## Registration, network only, end to end (`liquidreg register`, incl. file I/O)", "",
              "| input | working grid | wall (s) | peak RSS (MB) | " +
              " | ".join(stage_names) + " | start-up + I/O (s) |",
              "|---|---|---:|---:|" + "---:|" * len(stage_names) + "---:|"]
    for row in report["register"]:
        stages = row["stages_s"]
        grid = row.get("working_grid") or {}
        lines.append(f"| {row['input']} | {'x'.join(map(str, grid.get('shape', [])))} @ "
                     f"{grid.get('spacing_mm', 0):.2g} mm | {row['wall_s']:.1f} | "
                     f"{row['peak_rss_mb']:.0f} | " +
                     " | ".join(f"{stages.get(s, 0):.2f}" for s in stage_names) +
                     f" | {row['startup_and_io_s']:.1f} |")
    lines += ["", "## Training step (`train.run`, fixed synthetic batch, Dice + smoothness + folding)",
              "", "| working grid | s / step | peak RSS (MB) | of which imports (MB) |",
              "|---|---:|---:|---:|"]
    for row in report["train"]:
        lines.append(f"| {row['size']}^3 | {row['seconds_per_step']:.2f} | {row['peak_rss_mb']:.0f} "
                     f"| {row['baseline_rss_mb']:.0f} |")
    io_row = report.get("instance_optimisation")
    if io_row:
        from_totals = io_row["seconds_per_step_from_totals"]
        lines += ["", "## Instance optimisation", "",
                  f"{io_row['input']}, {io_row['iterations']} iterations: "
                  f"**{io_row['seconds_per_step']:.2f} s per step** (instance stage / iterations)"
                  + (f"; {from_totals:.2f} s per step from the difference of wall times to the "
                     "network-only run" if from_totals is not None else "")
                  + f"; peak RSS {io_row['peak_rss_mb']:.0f} MB.", ""]
    large = report.get("large")
    if large:
        lines += ["", "## Memory of a large pair", "",
                  f"{large['input']}, network only, end to end: **peak RSS "
                  f"{large['peak_rss_mb']:.0f} MB** (bound: 4096 MB; estimated before starting: "
                  f"{large['estimate_mb']:.0f} MB), wall {large['wall_s']:.1f} s "
                  f"(full-resolution outputs {large['stages_s'].get('resample', 0):.1f} s).", ""]
    if report.get("dispatch"):
        lines += dispatch_markdown(report["dispatch"])
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child-train"]:
        size, steps, threads, result = argv[1:5]
        content = train_child(int(size), int(steps), int(threads))
        from LiquidRegLib import io
        io.write_json(Path(result), content)
        return 0
    if argv[:1] == ["--child-dispatch"]:
        fixed, moving, device, threads, steps, shape, result = argv[1:8]
        content = dispatch_child(Path(fixed), Path(moving), device, int(threads), int(steps),
                                 tuple(int(n) for n in shape.split("x")))
        from LiquidRegLib import io
        io.write_json(Path(result), content)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", default="speed_out")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (3 mm voxels, 32-64^3 volumes, 2 steps): a smoke test")
    parser.add_argument("--weights", help="LiquidReg weights (default: the shipped ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", help="(b) cube sizes, default 128 192 256")
    parser.add_argument("--train-sizes", type=int, nargs="+", help="(c) default 96 128")
    parser.add_argument("--train-steps", type=int, help="(c) timed steps, default 5")
    parser.add_argument("--iterations", type=int, help="(d) instance-optimisation steps, default 10")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--sections", nargs="+", choices=list("abcdef"), default=list("abcdef"),
                        help="which measurements to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)
    quick = args.quick
    brain_spacing = 3.0 if quick else 1.0
    brain_shape = tuple(-(-n // 3) for n in BRAIN_SHAPE) if quick else BRAIN_SHAPE
    sizes = args.sizes or ([32, 48, 64] if quick else [128, 192, 256])
    train_sizes = args.train_sizes or ([32, 48] if quick else [96, 128])
    args.train_steps = args.train_steps or (2 if quick else 5)
    iterations = args.iterations or (2 if quick else 10)
    sections = set(args.sections)

    out = Path(args.out)
    inputs, runs = out / "inputs", out / "runs"
    report = {"machine": machine(),
              "config": {"threads": args.threads, "quick": quick, "sections": sorted(sections),
                         "weights": args.weights or "shipped", "device": args.device}}
    brain_name = f"sample pair on {'x'.join(map(str, brain_shape))} @ {brain_spacing:g} mm"
    report["register"], report["train"], brain = [], [], None
    args.dispatch_train_shape = (32, 40, 32) if quick else TRAIN_SHAPE
    if sections & {"a", "d", "f"}:
        fixed, moving = write_pair(inputs / "brain", brain_shape, brain_spacing)
    if "a" in sections:
        print(f"(a) {brain_name}", flush=True)
        brain = {"input": brain_name, **register_cli(fixed, moving, runs / "brain_net", args)}
        report["register"].append(brain)
    for size in sizes if "b" in sections else []:
        print(f"(b) {size}^3 @ {brain_spacing:g} mm", flush=True)
        pair = write_pair(inputs / f"cube_{size}", (size,) * 3, brain_spacing)
        report["register"].append({"input": f"sample pair on {size}^3 @ {brain_spacing:g} mm",
                                   **register_cli(*pair, runs / f"cube_{size}_net", args)})
    for size in train_sizes if "c" in sections else []:
        print(f"(c) training step at {size}^3", flush=True)
        report["train"].append(train_step(size, runs, args))
    if "d" in sections:
        print(f"(d) instance optimisation, {iterations} iterations", flush=True)
        refined = register_cli(fixed, moving, runs / f"brain_io{iterations}", args, iterations)
        report["instance_optimisation"] = {
            "input": brain_name, "iterations": iterations,
            "seconds_per_step": refined["stages_s"]["instance_optimisation"] / iterations,
            "seconds_per_step_from_totals": (None if brain is None else
                                             (refined["wall_s"] - brain["wall_s"]) / iterations),
            "peak_rss_mb": refined["peak_rss_mb"], "run": refined}
    if "e" in sections:
        shape = tuple(n // 8 for n in LARGE_SHAPE) if quick else LARGE_SHAPE
        spacing = LARGE_SPACING * (8 if quick else 1)
        name = f"sample pair on {'x'.join(map(str, shape))} @ {spacing:g} mm"
        print(f"(e) {name}", flush=True)
        pair = write_pair(inputs / "large", shape, spacing)
        report["large"] = {"input": name, "estimate_mb": estimate_mb(*pair),
                           **register_cli(*pair, runs / "large_net", args)}
    if "f" in sections:
        print(f"(f) dispatch counts, {brain_name}", flush=True)
        report["dispatch"] = {"input": brain_name, **dispatch(fixed, moving, runs / "dispatch", args)}
    write_report(out, "speed", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
