#!/usr/bin/env python
"""Pairs per minute for a cohort: a shell loop of ``liquidreg register`` against
``liquidreg batch --workers 1`` and ``--workers 2``, Fast mode (network only), CPU.

    python scripts/benchmark_batch.py --out batch_out --pairs 6 --repeats 2

The pairs come from the bundled sample pair (two real brains, 1 mm): the images as shipped,
mirrored left-right, shifted by a few mm, and resampled at 1.25 mm, combined into ``--pairs``
distinct pairs.  Every method is a process started as a user would (the loop is a real bash
``for`` loop), timed end to end with its outputs written (the same files, overview included);
methods alternate within each repeat so a change in the machine's load hits all of them.
Writes ``batch.json`` and ``batch.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from benchmark import THREAD_VARIABLES, machine, run_measured, write_report

METHODS = {"loop": "shell loop of `liquidreg register`",
           "workers1": "`liquidreg batch --workers 1`",
           "workers2": "`liquidreg batch --workers 2`"}


def make_images(folder: Path) -> dict:
    """The sample's T1s and simple variants of them, as files; {name: path}."""
    import numpy as np

    from LiquidRegLib import io, resources
    from LiquidRegLib.grid import Grid, resample

    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for role in ("fixed", "moving"):
        volume = io.read_volume(resources.sample_paths()[f"{role}_t1"])
        grid = volume.grid
        left_right = int(np.argmax(np.abs(grid.affine[0, :3])))  # the array axis along R-L
        shifted = grid.affine.copy()
        shifted[:3, 3] += (6.0, -4.0, 3.0)
        coarse_shape = tuple(int(round(s / 1.25)) for s in grid.shape)
        coarse = grid.affine @ np.diag([1.25, 1.25, 1.25, 1.0])
        variants = {
            role: (volume.array, grid),
            f"{role}_mirrored": (np.flip(volume.array, left_right).copy(), grid),
            f"{role}_shifted": (volume.array, Grid(grid.shape, shifted)),
            f"{role}_1.25mm": (resample(volume.array, grid, Grid(coarse_shape, coarse)),
                               Grid(coarse_shape, coarse)),
        }
        for name, (array, on) in variants.items():
            images[name] = folder / f"{name}.nii.gz"
            io.write_volume(images[name], array, on)
    return images


def make_pairs(images: dict, count: int) -> list[tuple[str, str, str]]:
    """``count`` distinct (fixed, moving, name) pairs across the two brains and their variants."""
    fixed = [n for n in images if n.startswith("fixed")]
    moving = [n for n in images if n.startswith("moving")]
    combos = [(f, m) for m in moving for f in fixed] + [(m, f) for f in fixed for m in moving]
    if count > len(combos):
        raise SystemExit(f"--pairs can be at most {len(combos)}")
    step = len(combos) / count  # spread over the variants
    chosen = [combos[int(i * step)] for i in range(count)]
    return [(str(images[f]), str(images[m]), f"{m}_to_{f}") for f, m in chosen]


def command(method: str, csv_path: Path, out: Path, liquidreg: str) -> list[str]:
    if method == "loop":  # what a user writes: read the CSV, one process per pair
        script = ('tail -n +2 "$2" | while IFS=, read -r fixed moving name; do '
                  '"$1" register "$fixed" "$moving" -o "$3/$name" --device cpu --quiet '
                  '|| exit 1; done')
        return ["bash", "-c", script, "loop", liquidreg, str(csv_path), str(out)]
    workers = {"workers1": "1", "workers2": "2"}[method]
    return [liquidreg, "batch", str(csv_path), "-o", str(out), "--workers", workers,
            "--device", "cpu", "--quiet"]


def markdown(report: dict) -> str:
    cpu = report["machine"]
    lines = [f"# Batch registration throughput ({report['pairs']} pairs, Fast mode, CPU)", "",
             f"{cpu['cpu']}, {cpu['cores']} cores, load average at start "
             f"{', '.join(f'{v:.1f}' for v in cpu['load_average_at_start'])}; median of "
             f"{report['repeats']} repeat(s); wall time from start to the last file written.", "",
             "| method | wall (s) | pairs per minute | s per pair | vs shell loop | "
             "peak RSS (MB) |", "|---|---:|---:|---:|---:|---:|"]
    loop = report["summary"]["loop"]["wall_s"]
    for method, label in METHODS.items():
        row = report["summary"][method]
        lines.append(f"| {label} | {row['wall_s']:.1f} | {row['pairs_per_minute']:.1f} | "
                     f"{row['wall_s'] / report['pairs']:.2f} | {loop / row['wall_s']:.2f}x | "
                     f"{row['peak_rss_mb']:.0f} |")
    lines += ["", "Pairs:", ""] + [f"- {name}" for _, _, name in report["pair_list"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the whole machine")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    import os

    liquidreg = shutil.which("liquidreg") or str(Path(sys.executable).parent / "liquidreg")
    pairs = make_pairs(make_images(args.out / "images"), args.pairs)
    csv_path = args.out / "pairs.csv"
    csv_path.write_text("fixed,moving,output\n" + "".join(f"{f},{m},{n}\n" for f, m, n in pairs))
    env = dict(os.environ, **{name: str(args.threads) for name in THREAD_VARIABLES})
    report = {"machine": machine(), "pairs": len(pairs), "repeats": args.repeats,
              "threads": args.threads, "pair_list": pairs, "runs": []}
    for repeat in range(args.repeats):
        for method in METHODS:
            out = args.out / "runs" / f"{method}_{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            measured = run_measured(command(method, csv_path, out, liquidreg), env,
                                    args.out / "runs" / f"{method}_{repeat}.log", args.timeout)
            done = sum((out / name / "summary.json").is_file() for _, _, name in pairs)
            if measured["exit_code"] != 0 or done != len(pairs):
                raise SystemExit(f"{method} failed (exit {measured['exit_code']}, {done} of "
                                 f"{len(pairs)} pairs); see {out}.log")
            wall = measured["process_seconds"]
            report["runs"].append({"method": method, "repeat": repeat, "wall_s": wall,
                                   "pairs_per_minute": 60 * len(pairs) / wall,
                                   "peak_rss_mb": measured["process_peak_rss_mb"]})
            print(f"{method} repeat {repeat}: {wall:.1f} s", flush=True)
    report["summary"] = {}
    for method in METHODS:
        runs = [r for r in report["runs"] if r["method"] == method]
        wall = statistics.median(r["wall_s"] for r in runs)
        report["summary"][method] = {"wall_s": wall, "pairs_per_minute": 60 * len(pairs) / wall,
                                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    write_report(args.out, "batch", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
