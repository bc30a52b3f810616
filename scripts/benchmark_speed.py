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

Writes ``speed.json`` and ``speed.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmark import THREAD_VARIABLES, machine, memory_mb, run_measured, write_report

BRAIN_SHAPE = (193, 229, 193)


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
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "LiquidRegLib.cli", "register", str(fixed), str(moving),
               "-o", str(out), "--device", "cpu", "--iterations", str(iterations),
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


def train_child(size: int, steps: int, threads: int) -> dict:
    """Seconds per ``train.run`` step on an N^3 working grid (run inside the measured child)."""
    import torch

    torch.set_num_threads(threads)
    from LiquidRegLib import train
    from LiquidRegLib.data.synth import gaussian_blur, synthesize
    from LiquidRegLib.model import LiquidReg, ModelConfig

    baseline = memory_mb("VmRSS")
    generator = torch.Generator().manual_seed(0)
    shape = (1, 1, size, size, size)

    def random_labels(classes: int = 13) -> torch.Tensor:
        """Smooth random regions: 12 structures plus background, quantised smooth noise."""
        noise = gaussian_blur(torch.randn(shape, generator=generator), size / 16)
        edges = torch.quantile(noise.flatten()[::97], torch.linspace(0, 1, classes + 1)[1:-1])
        return torch.bucketize(noise, edges)

    fixed_labels, moving_labels = random_labels(), random_labels()
    batch = {"fixed": synthesize(fixed_labels, generator),
             "moving": synthesize(moving_labels, generator),
             "fixed_labels": fixed_labels, "moving_labels": moving_labels, "num_labels": 13,
             "fixed_mask": (fixed_labels > 0).float()}
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


# ---- report -----------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# LiquidReg speed", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; torch "
             f"{m['versions'].get('torch')}; {report['config']['threads']} threads; load average "
             f"at start {', '.join(f'{v:.1f}' for v in m['load_average_at_start'])}.", ""]
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
    io_row = report["instance_optimisation"]
    lines += ["", "## Instance optimisation", "",
              f"{io_row['input']}, {io_row['iterations']} iterations: "
              f"**{io_row['seconds_per_step']:.2f} s per step** (instance stage / iterations); "
              f"{io_row['seconds_per_step_from_totals']:.2f} s per step from the difference of "
              f"wall times to the network-only run; peak RSS {io_row['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child-train"]:
        size, steps, threads, result = argv[1:5]
        content = train_child(int(size), int(steps), int(threads))
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
    args = parser.parse_args(argv)
    quick = args.quick
    brain_spacing = 3.0 if quick else 1.0
    brain_shape = tuple(-(-n // 3) for n in BRAIN_SHAPE) if quick else BRAIN_SHAPE
    sizes = args.sizes or ([32, 48, 64] if quick else [128, 192, 256])
    train_sizes = args.train_sizes or ([32, 48] if quick else [96, 128])
    args.train_steps = args.train_steps or (2 if quick else 5)
    iterations = args.iterations or (2 if quick else 10)

    out = Path(args.out)
    inputs, runs = out / "inputs", out / "runs"
    report = {"machine": machine(),
              "config": {"threads": args.threads, "quick": quick, "weights": args.weights or "shipped"}}
    brain_name = f"sample pair on {'x'.join(map(str, brain_shape))} @ {brain_spacing:g} mm"
    fixed, moving = write_pair(inputs / "brain", brain_shape, brain_spacing)

    print(f"(a) {brain_name}", flush=True)
    brain = {"input": brain_name, **register_cli(fixed, moving, runs / "brain_net", args)}
    report["register"] = [brain]
    for size in sizes:
        print(f"(b) {size}^3 @ {brain_spacing:g} mm", flush=True)
        pair = write_pair(inputs / f"cube_{size}", (size,) * 3, brain_spacing)
        report["register"].append({"input": f"sample pair on {size}^3 @ {brain_spacing:g} mm",
                                   **register_cli(*pair, runs / f"cube_{size}_net", args)})
    report["train"] = []
    for size in train_sizes:
        print(f"(c) training step at {size}^3", flush=True)
        report["train"].append(train_step(size, runs, args))
    print(f"(d) instance optimisation, {iterations} iterations", flush=True)
    refined = register_cli(fixed, moving, runs / f"brain_io{iterations}", args, iterations)
    report["instance_optimisation"] = {
        "input": brain_name, "iterations": iterations,
        "seconds_per_step": refined["stages_s"]["instance_optimisation"] / iterations,
        "seconds_per_step_from_totals": (refined["wall_s"] - brain["wall_s"]) / iterations,
        "peak_rss_mb": refined["peak_rss_mb"], "run": refined}
    write_report(out, "speed", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
