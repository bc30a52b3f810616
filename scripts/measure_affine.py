#!/usr/bin/env python
"""How the affine stage behaves on a real pair: stability, dispatched ops, time and Dice.

    python scripts/measure_affine.py                            # the bundled 1 mm sample pair
    python scripts/measure_affine.py --pad 193 229 193          # ... on a 1 mm brain-size grid
    python scripts/measure_affine.py --data data --strip --pairs fsaverage:donor_9861
    python scripts/measure_affine.py --device cuda              # on a GPU, plus CPU/CUDA agreement
    python scripts/measure_affine.py --capture                  # capture range (rotations)
    python scripts/measure_affine.py --registration             # ops of a whole Fast registration

For each pair (fixed <- moving) it prints one JSON line:

* ``perturbation_mm``: how far the affine moves (mean / max over the fixed brain, i.e. its labels)
  when the moving image is multiplied by (1 + 1e-6 x standard normal noise), for ``--seeds``
  noises; a converged optimisation moves by hundredths of a millimetre at most;
* ``rerun_mm``: the same, for a second run on unchanged input (run-to-run determinism);
* ``aten_ops``: aten operators one call dispatches (``torch.profiler``, every ``aten::`` event,
  nested ones included) and ``top_level_ops`` (those called from Python directly);
* ``wall_s`` / ``cpu_s``: best of ``--repeats`` calls after a warm-up, on the threads the stage
  chooses (it runs on one);
* ``dice``: mean Dice over the labels of both maps after the affine alone (moving labels
  resampled nearest-neighbour onto the fixed grid; all, subcortical, cortical),
  ``dice_identity`` before it and
  ``dice_perturbed`` after each perturbed run (how much of a Dice difference is noise);
* with ``--device cuda``: ``cpu_cuda_mm``, the distance between the CPU and the CUDA affine.

``--registration`` instead counts the aten ops of one whole Fast registration of the pair
(``register.register``, after a warm-up), for the affine stage's share of it.

``--capture`` instead turns the sample's moving brain (fsaverage) about each axis through its
centre, by 10, 20, ... 90 degrees, registers the original to each turned copy and prints the
largest angle up to which every turn was recovered within 2 mm on average over the brain.

The sample pair's fixed image is the MNI ICBM152 template: report on it, never choose settings
with it (see DATA.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def load_pair(args, fixed_name: str | None, moving_name: str | None):
    """(fixed_t1, fixed_labels, moving_t1, moving_labels) as io.Volume."""
    from LiquidRegLib import io
    from LiquidRegLib.resources import sample_paths

    if fixed_name is None:
        paths = sample_paths()
        files = [paths[key] for key in ("fixed_t1", "fixed_labels", "moving_t1", "moving_labels")]
    else:
        manifest = json.loads((Path(args.data) / "manifest.json").read_text())["subjects"]
        files = []
        masks = []
        for name in (fixed_name, moving_name):
            entry = manifest[name]["files"]
            image = entry.get("t1") or entry["t1_synth"]
            files += [Path(args.data) / image, Path(args.data) / entry["labels"]]
            masks.append(Path(args.data) / entry["brainmask"])
    volumes = [io.read_volume(f, dtype=None if i % 2 else np.float32) for i, f in enumerate(files)]
    if fixed_name is not None and args.strip:  # as the sample pair is made
        from liquidreg_tools.data.volumes import crop_grid

        for i, mask in zip((0, 2), masks):
            inside = io.read_volume(mask).array > 0
            grid, window = crop_grid(volumes[i].grid, inside, margin=3)
            volumes[i] = io.Volume((volumes[i].array * inside)[window], grid)
            volumes[i + 1] = io.Volume(volumes[i + 1].array[window], grid)
    if args.pad:
        volumes = [_on_brain_grid(v, args.pad, labels=bool(i % 2)) for i, v in enumerate(volumes)]
    return volumes


def _on_brain_grid(volume, shape, labels: bool):
    """``volume`` on a 1 mm grid of ``shape`` centred where it is (zero padded or cropped)."""
    from LiquidRegLib import io
    from LiquidRegLib.grid import Grid, resample

    affine = np.eye(4)
    affine[:3, 3] = volume.grid.center - (np.asarray(shape, float) - 1) / 2
    grid = Grid(tuple(shape), affine)
    return io.Volume(resample(volume.array, volume.grid, grid,
                              order="nearest" if labels else "linear"), grid)


def brain_points(labels) -> np.ndarray:
    return labels.grid.voxel_to_ras(np.argwhere(labels.array > 0))


def distances(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a - b
    return np.linalg.norm(points @ diff[:3, :3].T + diff[:3, 3], axis=1)


def affine_dice(fixed_labels, moving_labels, matrix, groups: bool = False):
    """Mean Dice over the labels of both maps after ``matrix`` (and, with ``groups``, over the
    subcortical and the cortical ones, as scripts/benchmark.py splits them)."""
    from liquidreg_tools.data import labels as L

    from LiquidRegLib import metrics
    from LiquidRegLib.grid import resample

    warped = resample(moving_labels.array, moving_labels.grid, fixed_labels.grid,
                      world_map=matrix, order="nearest")
    dice = metrics.dice_per_label(fixed_labels.array, warped)
    if not groups:
        return metrics.mean_dice(dice)
    cortical = {k: v for k, v in dice.items() if L.is_dk([k])[0] or k in (3, 42)}
    subcortical = {k: v for k, v in dice.items() if k not in cortical}
    return {name: round(metrics.mean_dice(part), 4)
            for name, part in (("all", dice), ("subcortical", subcortical),
                               ("cortical", cortical))}


def op_counts(run) -> tuple[int, int]:
    """(every aten op, top-level aten ops) dispatched by ``run()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    ids = {e.id for e in events}
    top = [e for e in events if e.cpu_parent is None or e.cpu_parent.id not in ids]
    return len(events), len(top)


def measure(pair, args) -> dict:
    from types import SimpleNamespace

    from LiquidRegLib.affine import affine_register

    fixed, fixed_labels, moving, moving_labels = pair
    points = brain_points(fixed_labels)

    def run(m=moving, device=args.device):
        return affine_register(fixed, m, device=device)

    reference = run()
    times, cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        again = run()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    rerun = distances(points, reference, again)
    moves, dice_perturbed = [], []
    for seed in range(args.seeds):
        noise = np.random.default_rng(seed).standard_normal(moving.array.shape)
        noisy = SimpleNamespace(array=(moving.array * (1 + 1e-6 * noise)).astype(np.float32),
                                grid=moving.grid)
        perturbed = run(noisy)
        moves.append(distances(points, reference, perturbed))
        dice_perturbed.append(round(affine_dice(fixed_labels, moving_labels, perturbed), 4))
    moves = np.concatenate(moves)
    ops, top = op_counts(run)
    result = {
        "fixed_shape": list(fixed.grid.shape), "moving_shape": list(moving.grid.shape),
        "device": args.device,
        "perturbation_mm": {"mean": round(float(moves.mean()), 4),
                            "max": round(float(moves.max()), 4), "seeds": args.seeds},
        "rerun_mm": {"mean": round(float(rerun.mean()), 5), "max": round(float(rerun.max()), 5)},
        "aten_ops": ops, "top_level_ops": top,
        "wall_s": round(min(times), 3), "cpu_s": round(min(cpu), 3),
        "dice_identity": round(affine_dice(fixed_labels, moving_labels, np.eye(4)), 4),
        "dice": affine_dice(fixed_labels, moving_labels, reference, groups=True),
        "dice_perturbed": dice_perturbed,
    }
    if args.device != "cpu":
        on_cpu = distances(points, reference, run(device="cpu"))
        result["cpu_cuda_mm"] = {"mean": round(float(on_cpu.mean()), 4),
                                 "max": round(float(on_cpu.max()), 4)}
    return result


def capture_range(args) -> dict:
    """Largest rotation about each axis recovered (mean error <= 2 mm) at every smaller angle."""
    from LiquidRegLib import io
    from LiquidRegLib.affine import affine_register
    from LiquidRegLib.grid import resample
    from LiquidRegLib.resources import sample_paths

    brain = io.read_volume(sample_paths()["moving_t1"])
    points = brain.grid.voxel_to_ras(np.argwhere(brain.array > 0.1 * brain.array.max())[::7])
    centre = points.mean(0)
    ranges = {}
    for axis, name in enumerate("RAS"):
        ranges[name] = 0
        for degrees in range(10, 100, 10):
            truth = np.eye(4)
            a = np.deg2rad(degrees)
            i, j = [k for k in range(3) if k != axis]
            truth[[i, i, j, j], [i, j, i, j]] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
            truth[:3, 3] = centre - truth[:3, :3] @ centre
            turned = io.Volume(resample(brain.array, brain.grid, brain.grid,
                                        world_map=np.linalg.inv(truth)), brain.grid)
            error = distances(points, truth, affine_register(brain, turned, device=args.device))
            if error.mean() > 2.0:
                break
            ranges[name] = degrees
    return {"capture_range_degrees": ranges}


def registration_ops(pair, args) -> dict:
    from LiquidRegLib import register

    fixed, _, moving, _ = pair
    register.register(fixed, moving, device=args.device)
    ops, top = op_counts(lambda: register.register(fixed, moving, device=args.device))
    return {"registration_aten_ops": ops, "registration_top_level_ops": top}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="folder of scripts/fetch_data.py")
    parser.add_argument("--pairs", nargs="+", metavar="FIXED:MOVING",
                        help="subjects of --data (default: the bundled sample pair)")
    parser.add_argument("--strip", action="store_true",
                        help="skull-strip the --data images and crop them to the brain plus 3 "
                             "voxels, as the sample pair is made")
    parser.add_argument("--pad", nargs=3, type=int, metavar=("I", "J", "K"),
                        help="resample both images onto a 1 mm grid of this shape first")
    parser.add_argument("--seeds", type=int, default=3, help="perturbations per pair")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--capture", action="store_true", help="measure the capture range")
    parser.add_argument("--registration", action="store_true",
                        help="count the ops of a whole Fast registration instead")
    args = parser.parse_args(argv)
    if args.capture:
        print(json.dumps(capture_range(args)))
        return 0
    pairs = [p.split(":") for p in args.pairs] if args.pairs else [(None, None)]
    for fixed_name, moving_name in pairs:
        pair = load_pair(args, fixed_name, moving_name)
        result = registration_ops(pair, args) if args.registration else measure(pair, args)
        name = f"{fixed_name or 'sample fixed'} <- {moving_name or 'sample moving'}"
        print(json.dumps({"pair": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
