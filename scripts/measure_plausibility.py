#!/usr/bin/env python
"""The measurements behind the plausibility checks of ``validate`` (and the address-space
margin of ``memory``): what real inputs score, so each threshold is chosen with its margin known.

    python scripts/measure_plausibility.py labels  --data data --out plaus_out
    python scripts/measure_plausibility.py overlap --out plaus_out --threads 2
    python scripts/measure_plausibility.py address-space --out plaus_out

``labels``: ``validate.label_statistics`` of every image of the sample pair and of ``--data``
(``scripts/fetch_data.py``: T1s, T1-like renderings, label maps, brain masks), as stored and as
uint8 / int16 copies, label maps at 2 and 3 mm, masks, and a CT-like int16 image (Hounsfield
units with noise, air clipped at exactly -1024 and padding of -3024 outside a cylinder, the
special values that make an intensity image partly flat).  Prints the smallest label score, the
largest intensity score and the margin to ``validate.LABELS_ABOVE``.  Images and label maps
upsampled by nearest neighbour (blocks of equal voxels) are among them.

``overlap``: ``liquidreg register`` (Fast, in its own process, the refusal turned off) of the
sample pair with the moving image cut down to partial fields of view (cubes of 48-128 mm, slabs,
a hemisphere, a front half), and the same with the fixed image cut: the share of the fixed
image's content that the moving image covers after the affine (``validate.coverage``), the
similarity gain, the largest Jacobian, and the Dice of the labels inside the covered region,
against the affine alone and the whole pair's registration there.  The warning and refusal
thresholds of ``validate`` come from this table.

``address-space``: the smallest ``RLIMIT_AS`` under which ``liquidreg register`` of the sample
pair (or ``--images``) succeeds with the address-space check off, against what the check
requires (virtual size at the check + the estimate's growth + ``memory.ADDRESS_SPACE_EXTRA``),
and the message of a run below the limit (one line, not "unexpected").

Writes ``<section>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from LiquidRegLib import io, validate
from LiquidRegLib.grid import Grid, resample
from LiquidRegLib.resources import sample_paths


# ---- labels -----------------------------------------------------------------------------------
def _coarser(volume, factor: int, order: str):
    grid = Grid(tuple(max(2, s // factor) for s in volume.grid.shape),
                volume.grid.affine @ np.diag([factor, factor, factor, 1.0]))
    return resample(volume.array, volume.grid, grid, order=order)


def _blocks(array: np.ndarray, factor: int = 2) -> np.ndarray:
    """``array`` upsampled by nearest neighbour: blocks of ``factor``^3 equal voxels."""
    for axis in range(3):
        array = np.repeat(array, factor, axis)
    return array


def ct_like(labels: np.ndarray, rng) -> np.ndarray:
    """An int16 CT-like rendering of a label map: tissue in HU with noise, air clipped at -1024
    exactly, -3024 outside the reconstruction cylinder (as scanners store it)."""
    hu = np.where(labels > 0, 35.0, -1000.0)
    hu[np.isin(labels, (4, 43, 14, 15, 24))] = 8.0        # ventricles, CSF
    hu[np.isin(labels, (2, 41, 7, 46))] = 28.0             # white matter
    hu += rng.normal(0.0, 12.0, hu.shape) * (labels > 0) \
        + rng.normal(0.0, 15.0, hu.shape) * (labels == 0)
    ct = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    ct[labels == 0] = -1024                                # air: clipped flat
    i, j = np.indices(labels.shape[:2])
    centre = (np.array(labels.shape[:2]) - 1) / 2
    outside = ((i - centre[0]) ** 2 + (j - centre[1]) ** 2) > (0.48 * min(labels.shape[:2])) ** 2
    ct[outside] = -3024
    return ct


def label_cases(data: Path | None):
    """(name, kind, array) for every image and its variants; kind is "labels" or "image"."""
    rng = np.random.default_rng(0)
    files = [(key, path) for key, path in sample_paths().items()]
    if data is not None and (data / "manifest.json").exists():
        files += [(p.name.split(".")[0], p) for p in sorted(data.glob("*.nii.gz"))]
    for name, path in files:
        volume = io.read_volume(path, dtype=None)
        kind = "labels" if ("labels" in name or "brainmask" in name) else "image"
        yield name, kind, volume.array
        if kind == "labels":
            for factor in (2, 3):
                yield f"{name} at {factor}x the spacing", kind, _coarser(volume, factor, "nearest")
            yield (f"{name} at 2x the spacing, back at 1x by nearest neighbour", kind,
                   _blocks(_coarser(volume, 2, "nearest")))
            yield f"{name} as a mask", kind, (volume.array > 0).astype(np.uint8)
            if "brainmask" not in name:
                yield f"CT-like from {name}", "image", ct_like(volume.array, rng)
        else:
            image = volume.array.astype(np.float32)
            high = np.percentile(image, 99.9)
            uint8 = np.clip(np.round(image / high * 255), 0, 255).astype(np.uint8)
            yield f"{name} as uint8", kind, uint8
            yield f"{name} as int16 (0-4095)", kind, np.clip(np.round(image / high * 4095), 0,
                                                             4095).astype(np.int16)
            coarse = np.round(_coarser(io.Volume(uint8.astype(np.float32), volume.grid), 2,
                                       "linear"))
            yield f"{name} as uint8 at 2x the spacing", kind, coarse
            yield f"{name} as uint8 at 2x the spacing, back at 1x by nearest neighbour", kind, \
                _blocks(coarse)


def measure_labels(args) -> dict:
    rows = []
    for name, kind, array in label_cases(args.data):
        start = time.perf_counter()
        stats = validate.label_statistics(array)
        seconds = time.perf_counter() - start
        score = None if stats is None else min(stats.values())
        rows.append({"name": name, "kind": kind, "shape": list(array.shape),
                     "dtype": str(array.dtype), **(stats or {}), "score": score,
                     "labels": validate.looks_like_labels(array), "seconds": round(seconds, 3)})
        shown = "not whole numbers" if stats is None else (
            f"same {stats['same_neighbour']:.3f} flat {stats['flat_values']:.3f}")
        print(f"{kind:6s} {name:48s} {shown:32s} -> labels={rows[-1]['labels']} ({seconds:.2f} s)")
    labels = [r["score"] for r in rows if r["kind"] == "labels"]
    images = [r["score"] or 0.0 for r in rows if r["kind"] == "image"]
    summary = {"threshold": validate.LABELS_ABOVE, "lowest_label_score": min(labels),
               "highest_image_score": max(images),
               "margin": min(min(labels) - validate.LABELS_ABOVE,
                             validate.LABELS_ABOVE - max(images)),
               "wrong": [r["name"] for r in rows if r["labels"] != (r["kind"] == "labels")]}
    print(json.dumps(summary, indent=1))
    return {"rows": rows, "summary": summary}


# ---- overlap ----------------------------------------------------------------------------------
def _cut(volume, labels, keep):
    """The volume and labels cut to the voxel box ``keep`` (slices), on the matching grid."""
    start = np.eye(4)
    start[:3, 3] = [s.start or 0 for s in keep]
    grid = Grid(volume.array[keep].shape, volume.grid.affine @ start)
    return (io.Volume(np.ascontiguousarray(volume.array[keep]), grid),
            io.Volume(np.ascontiguousarray(labels.array[keep]), grid))


def overlap_cases(volume, labels):
    """(name, keep) partial fields of view of a brain: cubes around its centre, axial slabs,
    the left hemisphere (RAS-ordered 1 mm grids: voxels are mm)."""
    inside = np.argwhere(labels.array > 0)
    centre = np.round(inside.mean(0)).astype(int)
    for size in (48, 64, 96, 128):
        yield f"cube {size} mm", tuple(slice(max(0, c - size // 2), c + size // 2) for c in centre)
    for thickness in (20, 40, 60):
        yield f"axial slab {thickness} mm", (slice(None), slice(None),
                                             slice(centre[2] - thickness // 2,
                                                   centre[2] + thickness // 2))
    yield "left hemisphere", (slice(0, centre[0]), slice(None), slice(None))
    yield "front half", (slice(None), slice(centre[1], None), slice(None))


#: ``liquidreg register`` with the coverage refusal off, to see what a refused pair would give.
UNREFUSED = ("import sys; from LiquidRegLib import validate; validate.REFUSE_COVERED = 0.0; "
             "from LiquidRegLib.cli import entry_point; sys.argv[0] = 'liquidreg'; entry_point()")


def _register(fixed_path, moving_path, out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    run = subprocess.run([sys.executable, "-c", UNREFUSED, "register", str(fixed_path),
                          str(moving_path), "-o", str(out), "--device", "cpu", "--no-png",
                          "--quiet", "--overwrite"], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": run.stderr.strip()}
    return json.loads((out / "summary.json").read_text())


def _warped_labels(fixed_labels, moving_labels, warp: Path | np.ndarray) -> np.ndarray:
    """The moving labels through a warp file, or through a 4x4 affine (fixed -> moving RAS)."""
    if isinstance(warp, np.ndarray):
        return resample(moving_labels.array, moving_labels.grid, fixed_labels.grid,
                        order="nearest", world_map=warp)
    import torch

    from LiquidRegLib.cli import _displacement_on
    field = _displacement_on(warp, fixed_labels.grid)
    return resample(moving_labels.array, moving_labels.grid, fixed_labels.grid, order="nearest",
                    displacement=torch.from_numpy(field))


def _dice_in(fixed_labels, warped: np.ndarray, region: np.ndarray) -> float:
    from LiquidRegLib.metrics import dice_per_label, mean_dice
    keep = region & (fixed_labels.array > 0)
    return mean_dice(dice_per_label(np.where(keep, fixed_labels.array, 0),
                                    np.where(keep, warped, 0)))


def _covered(fixed_grid: Grid, moving_grid: Grid, world_map: np.ndarray) -> np.ndarray:
    """Fixed voxels that the affine places inside the moving field of view."""
    ijk = np.indices(fixed_grid.shape).reshape(3, -1).T
    ras = fixed_grid.voxel_to_ras(ijk) @ world_map[:3, :3].T + world_map[:3, 3]
    inside = moving_grid.ras_to_voxel(ras)
    return np.all((inside >= -0.5) & (inside <= np.array(moving_grid.shape) - 0.5),
                  axis=1).reshape(fixed_grid.shape)


def measure_overlap(args) -> dict:
    work = args.out / "overlap"
    work.mkdir(parents=True, exist_ok=True)
    paths = sample_paths()
    images = {role: io.read_volume(paths[f"{role}_t1"]) for role in ("fixed", "moving")}
    labels = {role: io.read_volume(paths[f"{role}_labels"], dtype=None)
              for role in ("fixed", "moving")}
    reference = work / "whole"
    _register(paths["fixed_t1"], paths["moving_t1"], reference, args.threads)
    rows = []
    for partial in ("moving", "fixed"):
        for name, keep in overlap_cases(images[partial], labels[partial]):
            image, label = dict(images), dict(labels)
            image[partial], label[partial] = _cut(images[partial], labels[partial], keep)
            files = {role: work / f"{role}.nii.gz" for role in ("fixed", "moving")}
            for role, path in files.items():
                io.write_volume(path, image[role].array, image[role].grid)
            out = work / "out"
            summary = _register(files["fixed"], files["moving"], out, args.threads)
            row = {"case": name, "partial": partial}
            if "error" in summary:
                row["error"] = summary["error"]
                world_map = None
            else:
                world_map = np.asarray(summary["affine_ras_fixed_to_moving"])
            if world_map is None:  # it failed: score the coverage after the whole pair's affine
                whole = json.loads((reference / "summary.json").read_text())
                world_map = np.asarray(whole["affine_ras_fixed_to_moving"])
            row.update(validate.coverage(image["fixed"], image["moving"], world_map))
            region = _covered(label["fixed"].grid, image["moving"].grid, world_map)
            row["dice_whole_pair_in_region"] = _dice_in(
                label["fixed"], _warped_labels(label["fixed"], labels["moving"],
                                               reference / "warp.nii.gz"), region)
            if "error" not in summary:
                row.update(affine_volume_scale=float(np.linalg.det(world_map[:3, :3])),
                           similarity_gain=summary["similarity"]["after"]
                           - summary["similarity"]["before"],
                           jacobian_max=summary["jacobian"]["max"],
                           dice_in_region=_dice_in(label["fixed"], _warped_labels(
                               label["fixed"], label["moving"], out / "warp.nii.gz"), region),
                           dice_affine_in_region=_dice_in(label["fixed"], _warped_labels(
                               label["fixed"], label["moving"], world_map), region),
                           warnings=summary.get("warnings", []))
            rows.append(row)
            print(json.dumps(row))
    return {"rows": rows}


# ---- address space ----------------------------------------------------------------------------
#: ``liquidreg register`` with the address-space part of the memory check off (to find the real
#: smallest limit), printing what the check would have compared.
UNCHECKED = """
import sys
from LiquidRegLib import memory
real_room, real_check = memory.address_space_room, memory.check
def check(fixed, moving, work, steps):
    need = memory.estimate(fixed, moving, work, steps)
    loaded = memory.BASE_BYTES + 4 * sum(int(memory.np.prod(g.shape)) for g in (fixed, moving))
    mapped = memory._proc_bytes("/proc/self/status", "VmSize")
    print("CHECK", mapped + need - min(memory.resident(), loaded) + memory.ADDRESS_SPACE_EXTRA,
          file=sys.stderr)
    memory.address_space_room = lambda: None
    real_check(fixed, moving, work, steps)
memory.check = check
from LiquidRegLib.cli import entry_point
sys.argv[0] = "liquidreg"
entry_point()
"""


def _register_under(limit_mb: int, out: Path, images) -> subprocess.CompletedProcess:
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2 ** 20, limit_mb * 2 ** 20))
    return subprocess.run([sys.executable, "-c", UNCHECKED, "register", *map(str, images), "-o",
                           str(out), "--device", "cpu", "--no-png", "--quiet", "--overwrite"],
                          env=dict(os.environ, OMP_NUM_THREADS="2"), preexec_fn=limit,
                          capture_output=True, text=True)


def measure_address_space(args) -> dict:
    """Bisect the smallest RLIMIT_AS (MB) under which the sample pair registers, with the
    address-space check off; what the check would require; what a run below the limit says."""
    out, images = args.out / "address_space", args.images or []
    low, high, steps, check_mb = 1000, 6000, [], None
    while high - low > 50:
        middle = (low + high) // 2
        run = _register_under(middle, out, images)
        lines = run.stderr.strip().splitlines()
        check_mb = next((int(l.split()[1]) / 2 ** 20 for l in lines if l.startswith("CHECK")),
                        check_mb)
        steps.append({"limit_mb": middle, "code": run.returncode,
                      "message": next((l for l in lines if not l.startswith("CHECK")), "")})
        print(steps[-1])
        low, high = (low, middle) if run.returncode == 0 else (middle, high)
    result = {"smallest_limit_mb": high, "check_requires_mb": round(check_mb),
              "refused_needlessly_mb": round(check_mb - high), "steps": steps}
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=("labels", "overlap", "address-space"))
    parser.add_argument("--data", type=Path, help="scripts/fetch_data.py's folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", nargs=2, type=Path, metavar=("FIXED", "MOVING"),
                        help="address-space: this pair instead of the sample pair")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    measure = {"labels": measure_labels, "overlap": measure_overlap,
               "address-space": measure_address_space}[args.section]
    result = measure(args)
    (args.out / f"{args.section}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
