#!/usr/bin/env python
"""Benchmark LiquidReg against ANTs SyN and elastix on the held-out brains, side by side.

    python scripts/fetch_data.py --out data                      # once
    python scripts/benchmark.py --data data --out bench_out      # full run (hours on 2 cores)
    python scripts/benchmark.py --data data --out /tmp/b --downsample 4 --max-pairs 1 \\
        --iterations 2 --methods identity liquidreg_net liquidreg_io   # smoke test (minutes)
    python scripts/benchmark.py --data data --out /tmp/b --groups cross --max-pairs 1   # one
        # cross-contrast pair, every method

Every method registers the SAME inter-subject pairs of the "test" split (never a training
subject) in ONE run, in two groups reported apart:

* ``same``: same-contrast pairs, every held-out pair once in T1 (``data.fetch.benchmark_pairs``);
* ``cross``: cross-contrast pairs, each template's T1 (fixed) against each held-out individual
  rendered T2-like and PD-like (moving): a T2 or PD scan onto a T1 atlas.

The methods:

* ``identity``: no registration (labels compared through world coordinates);
* ``affine``: LiquidReg's affine stage alone (``affine.affine_register``);
* ``liquidreg_net``: LiquidReg Fast mode, the network only (``register(..., mode="fast")``);
* ``liquidreg_io``: LiquidReg Accurate mode, network + instance optimisation
  (``mode="accurate"``; ``--iterations N`` overrides its step count);
* ``ants_syn``: ``ants.registration(fixed, moving, type_of_transform="SyN")``, defaults;
* ``elastix``: itk-elastix default "affine" then "bspline" parameter maps.

Each (pair, method) runs in a fresh subprocess with the same number of threads, which reports
the registration's wall time (reading the images to having the transform; library import
excluded) and its peak resident memory (VmHWM right after registering), so methods cannot
pollute each other.  Every result is converted to one convention (RAS mm displacement on the
fixed grid, fixed -> moving; see liquidreg_tools.peers) and scored identically: moving labels warped
nearest-neighbour through ``grid.resample``, mean Dice and HD95 over the labels both subjects
reliably annotate (``data.labels.shared_labels``), and the Jacobian determinant
(``diffeo.jacobian_determinant_ras``) inside the fixed brain mask: % voxels with J <= 0 and
std(log J).

Pairs and images follow the data package's documented benchmark path (DATA.md):
``data.fetch.benchmark_pairs`` (templates fixed, every held-out pair once); subjects with a T1
(templates) use it, label-only subjects (Allen donors) their fixed, deterministic T1-like
rendering ``<name>_t1synth.nii.gz`` (``data.synth.rendering``, 1 mm), and for the cross group
their T2-like and PD-like renderings made the same way here; all skull-stripped by the
subject's brain mask.

Outputs in ``--out``: ``results.md`` (per-pair tables and the mean per method), ``results.json``
(everything, per label, plus the machine), and ``work/`` (inputs, each run's displacement and
log).  ``--resume`` reuses finished runs found in ``work/``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from liquidreg_tools.measure import (THREAD_VARIABLES, machine, machine_line, memory_mb,
                                     run_measured, write_report)

# Heavy modules (torch, ants, itk) are imported inside functions: this file is also the child
# process of every measured run, which must load only its own method's libraries.

METHODS = {
    "identity": "Identity (no registration)",
    "affine": "LiquidReg affine stage only",
    "liquidreg_net": "LiquidReg Fast (network only)",
    "liquidreg_io": "LiquidReg Accurate (+ instance opt.)",
    "ants_syn": "ANTs SyN",
    "elastix": "elastix affine + B-spline",
}
RESULT, DISPLACEMENT = "result.json", "displacement.nii.gz"


# ---- the measured child process -------------------------------------------------------------
def run_child(method: str, fixed: str, moving: str, workdir: str, iterations: int | None,
              weights: str | None, threads: int) -> dict:
    """Register one pair with one method; write the displacement (our convention) and timings."""
    work = Path(workdir)
    extra: dict = {}
    if method == "affine":
        import numpy as np
        import torch

        torch.set_num_threads(threads)
        from LiquidRegLib import io
        from LiquidRegLib.affine import affine_register
        from LiquidRegLib.grid import mapped_voxels
        baseline = memory_mb("VmRSS")
        start = time.perf_counter()
        fixed_volume = io.read_volume(fixed, name="fixed image")
        world_map = affine_register(fixed_volume, io.read_volume(moving, name="moving image"),
                                    device="cpu")
        seconds, peak = time.perf_counter() - start, memory_mb()
        grid = fixed_volume.grid  # fixed point x -> A x: displacement (A - I) x
        field = mapped_voxels(grid.shape, (world_map - np.eye(4)) @ grid.affine).numpy()
        extra = {"affine": np.asarray(world_map).tolist()}
    elif method.startswith("liquidreg"):
        import torch

        torch.set_num_threads(threads)
        from LiquidRegLib import io, register
        from LiquidRegLib.devices import reuse_freed_memory
        reuse_freed_memory()  # as the `liquidreg` command does
        baseline = memory_mb("VmRSS")
        start = time.perf_counter()
        fixed_volume = io.read_volume(fixed, name="fixed image")
        moving_volume = io.read_volume(moving, name="moving image")
        accurate = method == "liquidreg_io"
        result = register.register(fixed_volume, moving_volume, device="cpu", weights=weights,
                                   mode="accurate" if accurate else "fast",
                                   iterations=iterations if accurate else None)
        seconds, peak = time.perf_counter() - start, memory_mb()
        extra = {"stage_seconds": result.summary.get("timings_s"),
                 "model": result.summary.get("model"),
                 "working_grid": result.summary.get("working_grid"),
                 "instance_optimisation": result.summary.get("instance_optimisation")}
        field, grid = result.displacement, result.fixed_grid
    elif method == "ants_syn":
        import ants  # noqa: F401  (loaded before timing)

        from liquidreg_tools import peers
        baseline = memory_mb("VmRSS")
        start = time.perf_counter()
        transforms = peers.ants_register(fixed, moving, work, type_of_transform="SyN")
        seconds, peak = time.perf_counter() - start, memory_mb()
        field, grid = peers.ants_displacement(fixed, transforms, work)
        extra = {"transforms": [Path(t).name for t in transforms]}
    elif method == "elastix":
        import itk

        from liquidreg_tools import peers
        # itk loads its wrappers lazily (tens of seconds): touch them before the clock starts
        for name in ("imread", "ElastixRegistrationMethod", "ParameterObject", "TransformixFilter"):
            getattr(itk, name)
        parameters = peers.elastix_parameters()
        baseline = memory_mb("VmRSS")
        start = time.perf_counter()
        transform = peers.elastix_register(fixed, moving, work, parameters=parameters,
                                           threads=threads)
        seconds, peak = time.perf_counter() - start, memory_mb()
        field, grid = peers.elastix_displacement(fixed, transform, work)
        extra = {"parameter_maps": list(peers.ELASTIX_MAPS)}
    else:
        raise ValueError(f"unknown method {method!r}")
    from LiquidRegLib import io
    io.write_displacement(work / DISPLACEMENT, field, grid)
    return {"ok": True, "seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline,
            "threads": threads, **extra}


def child_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py --child")
    parser.add_argument("method", choices=[m for m in METHODS if m != "identity"])
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("workdir")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--weights")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    try:
        content = run_child(args.method, args.fixed, args.moving, args.workdir, args.iterations,
                            args.weights, args.threads)
    except Exception as exc:  # recorded, so one failing method does not stop the benchmark
        content = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    from LiquidRegLib import io
    io.write_json(work / RESULT, content)
    return 0 if content["ok"] else 1


# ---- preparing the held-out pairs -------------------------------------------------------------
#: Renderings of the label-only held-out subjects that the cross-contrast group registers to
#: each template's T1.
CROSS_CONTRASTS = ("t2", "pd")
GROUPS = {"same": "same-contrast pairs (T1 to T1)",
          "cross": "cross-contrast pairs (T2-like or PD-like onto a T1 template)"}


def benchmark_pairs_by_group(entries: dict, same_pairs: list[tuple[str, str]]) -> list[dict]:
    """Every pair of the run: the same-contrast ``same_pairs`` in T1, then each template (T1,
    fixed) against each label-only individual in every :data:`CROSS_CONTRASTS` (moving)."""
    pairs = [{"fixed": f, "moving": m, "fixed_contrast": "t1", "moving_contrast": "t1",
              "group": "same"} for f, m in same_pairs]
    templates = sorted(n for n, e in entries.items() if e["kind"] == "template")
    rendered = sorted(n for n, e in entries.items() if "t1" not in e["files"])
    pairs += [{"fixed": f, "moving": m, "fixed_contrast": "t1", "moving_contrast": c,
               "group": "cross"} for f in templates for m in rendered for c in CROSS_CONTRASTS]
    return pairs


def held_out(data: Path) -> tuple[dict, list[tuple[str, str]]]:
    """Manifest entries of the held-out ("test") subjects and the benchmark pairs over them."""
    from liquidreg_tools.data.fetch import MANIFEST, benchmark_pairs
    from LiquidRegLib.errors import InputError

    path = data / MANIFEST
    if not path.exists():
        raise InputError(f"{path} not found; run scripts/fetch_data.py --out {data} first")
    manifest = json.loads(path.read_text())
    entries = {e["name"]: e for e in manifest["subjects"].values() if e["split"] == "test"}
    templates = sum(e["kind"] == "template" for e in entries.values())
    if not templates or len(entries) - templates < 2:
        raise InputError(f"{path} has {templates} test template(s) and {len(entries) - templates} "
                         "test individual(s); the benchmark needs at least 1 and 2: finish "
                         f"scripts/fetch_data.py --out {data}")
    return entries, benchmark_pairs(manifest)


def subject_image(data: Path, entry: dict, subject):
    """The subject's skull-stripped image on its 1 mm grid: its T1, else its T1-like rendering."""
    import numpy as np

    from liquidreg_tools.data import volumes
    from LiquidRegLib.errors import InputError
    from LiquidRegLib.preprocess import normalise_intensity

    if subject.t1 is not None:
        image, how = normalise_intensity(subject.t1, subject.brainmask), "T1"
    elif "t1_synth" in entry["files"]:
        image = np.asarray(volumes.load(data / entry["files"]["t1_synth"])[0], np.float32)
        how = "T1-like rendering of its labels (data.synth.rendering)"
    else:
        raise InputError(f"{entry['name']} has neither a T1 nor a t1synth image; re-run "
                         f"scripts/fetch_data.py --out {data} to write it")
    return np.where(subject.brainmask > 0, image, 0).astype(np.float32), how + ", skull-stripped"


def prepare_subjects(data: Path, entries: dict, work: Path, downsample: float | None,
                     log=print) -> dict:
    """Write each subject's images (T1, and for label-only subjects the renderings of
    :data:`CROSS_CONTRASTS`), labels and brain mask (optionally downsampled) once."""
    import numpy as np

    from LiquidRegLib import io
    from liquidreg_tools.data.fetch import load_subject
    from liquidreg_tools.data.synth import rendering
    from liquidreg_tools.data.volumes import ras_grid
    from LiquidRegLib.grid import resample

    out = {}
    for entry in entries.values():
        subject = load_subject(data, entry)
        folder = work / "subjects"
        folder.mkdir(parents=True, exist_ok=True)
        image, how = subject_image(data, entry, subject)
        images = {"t1": image}
        if subject.t1 is None:
            for contrast in CROSS_CONTRASTS:
                images[contrast] = np.where(subject.brainmask > 0,
                                            rendering(subject.labels, contrast), 0)
        paths = {k: folder / f"{subject.name}_{k}.nii.gz" for k in ("labels", "brainmask")}
        paths["images"] = {c: folder / f"{subject.name}_image_{c}.nii.gz" for c in images}
        labels, mask, grid = subject.labels.astype(np.int16), subject.brainmask.astype(np.uint8), subject.grid
        if downsample:
            target = ras_grid(grid, downsample)
            images = {c: resample(i, grid, target) for c, i in images.items()}
            labels = resample(labels, grid, target, order="nearest")
            mask = resample(mask, grid, target, order="nearest")
            grid = target
        for contrast, array in images.items():
            io.write_volume(paths["images"][contrast], array.astype(np.float32), grid)
        io.write_volume(paths["labels"], labels, grid)
        io.write_volume(paths["brainmask"], mask, grid)
        out[subject.name] = {"entry": entry, "paths": paths, "shape": list(grid.shape),
                             "spacing_mm": [round(float(s), 3) for s in grid.spacing],
                             "image": how, "contrasts": sorted(images)}
        log(f"prepared {subject.name}: {how}, {grid}")
    return out


# ---- running and scoring ----------------------------------------------------------------------
def run_method(method: str, fixed: Path, moving: Path, workdir: Path, args) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    result_path = workdir / RESULT
    if args.resume and result_path.exists() and (workdir / DISPLACEMENT).exists():
        return json.loads(result_path.read_text())
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, **{name: str(args.threads) for name in THREAD_VARIABLES})
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(fixed),
               str(moving), str(workdir), "--threads", str(args.threads)]
    if args.iterations is not None:
        command += ["--iterations", str(args.iterations)]
    if args.weights:
        command += ["--weights", str(args.weights)]
    process = run_measured(command, env, workdir / "log.txt", args.timeout)
    if result_path.exists():
        content = {**json.loads(result_path.read_text()), **process}
    else:
        tail = (workdir / "log.txt").read_text(errors="replace").strip().splitlines()[-1:]
        content = {"ok": False, "error": ("timed out" if process["timed_out"] else
                                          f"child exited with {process['exit_code']}: "
                                          + " ".join(tail)), **process}
    from LiquidRegLib import io
    io.write_json(result_path, content)
    return content


def score(fixed: dict, moving: dict, displacement_path: Path | None) -> dict:
    """Dice / HD95 over the pair's shared reliable labels and Jacobian health in the brain."""
    import numpy as np
    import torch

    from LiquidRegLib import diffeo, io, metrics
    from liquidreg_tools.data import labels as L
    from LiquidRegLib.grid import resample

    level, ids = L.shared_labels(fixed["entry"], moving["entry"])
    fixed_labels = io.read_volume(fixed["paths"]["labels"], dtype=np.int16)
    moving_labels = io.read_volume(moving["paths"]["labels"], dtype=np.int16)
    mask = io.read_volume(fixed["paths"]["brainmask"], dtype=np.uint8).array
    grid = fixed_labels.grid
    displacement = None
    if displacement_path is not None:
        field, field_grid = io.read_displacement(displacement_path)
        if field_grid != grid:
            raise ValueError(f"displacement grid {field_grid} is not the fixed grid {grid}")
        displacement = torch.as_tensor(field)
    warped = resample(L.to_level(moving_labels.array, level), moving_labels.grid, grid,
                      displacement=displacement, order="nearest")
    reference = L.to_level(fixed_labels.array, level)
    dice = metrics.dice_per_label(reference, warped, labels=ids)
    groups = {"cortical": [k for k in ids if L.is_dk([k])[0] or k in (3, 42)],
              "subcortical": [k for k in ids if not (L.is_dk([k])[0] or k in (3, 42))]}
    hd95 = metrics.hd95_per_label(reference, warped, grid, labels=ids)
    finite_hd = [v for v in hd95.values() if np.isfinite(v)]
    if displacement is None:
        jacobian = np.ones(grid.shape, np.float32)
    else:
        jacobian = diffeo.jacobian_determinant_ras(displacement, grid).numpy()
    jac = metrics.jacobian_stats(jacobian, mask=mask)
    return {"level": level, "labels": len(ids), "dice": metrics.mean_dice(dice),
            **{f"dice_{group}": metrics.mean_dice({k: dice[k] for k in members})
               for group, members in groups.items() if members},
            "labels_per_group": {group: len(members) for group, members in groups.items()},
            "hd95_mm": float(np.mean(finite_hd)) if finite_hd else float("nan"),
            "labels_lost": len(ids) - len(finite_hd),
            "pct_folding": jac["pct_folding"], "std_log_jac": jac["std_log_jac"],
            "jacobian_min": jac["min"], "jacobian_max": jac["max"],
            "dice_per_label": {str(k): v for k, v in dice.items()},
            "hd95_per_label_mm": {str(k): v for k, v in hd95.items()}}


# ---- reporting --------------------------------------------------------------------------------
COLUMNS = (("dice", "Dice", "{:.3f}"), ("dice_subcortical", "Dice subcortical", "{:.3f}"),
           ("dice_cortical", "Dice cortical", "{:.3f}"), ("hd95_mm", "HD95 (mm)", "{:.2f}"),
           ("pct_folding", "% J<=0", "{:.3f}"), ("std_log_jac", "std log J", "{:.3f}"),
           ("seconds", "time (s)", "{:.1f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
           ("baseline_rss_mb", "of which imports (MB)", "{:.0f}"))


def _cell(value, fmt) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return fmt.format(value)


def _table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = ["| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, values in rows:
        cells = [_cell(values.get(key), fmt) for key, _, fmt in COLUMNS]
        if values.get("error"):
            cells = [f"failed: {values['error'][:80]}"] + [""] * (len(COLUMNS) - 1)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def summarise(runs: list[dict], methods: list[str]) -> dict:
    """Mean of each column per method over the pairs where it succeeded."""
    import numpy as np

    means = {}
    for method in methods:
        done = [r for r in runs if r["method"] == method and r.get("ok")]
        means[method] = {"pairs": len(done), "failed": sum(1 for r in runs if r["method"] == method
                                                           and not r.get("ok"))}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in done if r.get(key) is not None and np.isfinite(r[key])]
            means[method][key] = float(np.mean(values)) if values else None
    return means


def pair_title(pair: dict) -> str:
    return (f"{pair['fixed']} ({pair['fixed_contrast'].upper()}, fixed) <- {pair['moving']} "
            f"({pair['moving_contrast'].upper()}, moving)")


def same_pair(run: dict, pair: dict) -> bool:
    return all(run[k] == pair[k] for k in ("fixed", "moving", "fixed_contrast", "moving_contrast"))


def markdown(report: dict) -> str:
    m = report["machine"]
    config = report["config"]
    lines = ["# LiquidReg vs ANTs SyN vs elastix: held-out brain pairs", "",
             machine_line(m),
             f"Every method: {config['threads']} threads, fresh subprocess per run; "
             f"LiquidReg Accurate: {config['iterations'] or 'its default'} instance-optimisation "
             "steps; "
             f"voxel size {config['downsample_mm'] or 1} mm.", "",
             "Dice and HD95: mean over the labels both subjects annotate (cortical: the "
             "Desikan-Killiany parcels, or the cortex where a subject has no parcels; subcortical: "
             "every other structure); % J<=0 and std log J: "
             "inside the fixed brain mask; time: reading the images to having the transform; "
             "peak RSS: the subprocess right after registering (imports: its resident memory "
             "before reading the images, i.e. the method's libraries).  Same-contrast and "
             "cross-contrast pairs are reported apart."]
    for group, means in report["mean"].items():
        lines += ["", f"## Mean over the {GROUPS[group]}", ""]
        lines += _table([(METHODS[k], v) for k, v in means.items()])
    for pair in report["pairs"]:
        lines += ["", f"## {pair_title(pair)}: {pair['labels']} labels, {pair['level']} level", ""]
        lines += _table([(METHODS[r["method"]], r) for r in report["runs"] if same_pair(r, pair)])
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--data", default="data", help="folder written by scripts/fetch_data.py")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--iterations", type=int,
                        help="instance-optimisation steps of liquidreg_io (default: Accurate "
                             "mode's own, options.ACCURATE_ITERATIONS)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--max-pairs", type=int, help="only the first N pairs")
    parser.add_argument("--downsample", type=float, metavar="MM",
                        help="resample every input to MM mm voxels first (smoke tests only)")
    parser.add_argument("--weights", help="LiquidReg weights (default: the shipped ones)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every method")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in OUT/work")
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS),
                        help="which pairs: same-contrast (T1/T1), cross-contrast, or both")
    args = parser.parse_args(argv)

    from LiquidRegLib.errors import LiquidRegError

    out = Path(args.out)
    work = out / "work"
    try:
        entries, same_pairs = held_out(Path(args.data))
    except LiquidRegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {"machine": machine(),
              "config": {"iterations": args.iterations, "threads": args.threads,
                         "downsample_mm": args.downsample, "groups": args.groups,
                         "weights": args.weights or "shipped", "methods": args.methods}}
    subjects = prepare_subjects(Path(args.data), entries, work, args.downsample)
    report["subjects"] = {name: {k: v for k, v in s.items() if k not in ("entry", "paths")}
                          for name, s in subjects.items()}
    pairs = [p for p in benchmark_pairs_by_group(entries, same_pairs) if p["group"] in args.groups]
    report["pairs"], report["runs"] = [], []
    for pair in pairs[:args.max_pairs]:
        fixed, moving = subjects[pair["fixed"]], subjects[pair["moving"]]
        pair_name = (f"{pair['fixed']}_{pair['fixed_contrast']}__{pair['moving']}_"
                     f"{pair['moving_contrast']}")
        pair_record = dict(pair)
        for method in args.methods:
            record = {**pair_record, "method": method}
            if method == "identity":
                run = {"ok": True}
                displacement = None
            else:
                run = run_method(method, fixed["paths"]["images"][pair["fixed_contrast"]],
                                 moving["paths"]["images"][pair["moving_contrast"]],
                                 work / "runs" / pair_name / method, args)
                displacement = work / "runs" / pair_name / method / DISPLACEMENT
            record.update(run)
            if run.get("ok"):
                record.update(score(fixed, moving, displacement))
                pair_record.update(level=record["level"], labels=record["labels"])
            report["runs"].append(record)
            print(f"{pair_name} {method}: " + ", ".join(
                f"{title} {_cell(record.get(key), fmt)}" for key, title, fmt in COLUMNS)
                  + (f" FAILED {record['error']}" if not record.get("ok") else ""), flush=True)
        pair_record.setdefault("level", "-")
        pair_record.setdefault("labels", "-")
        report["pairs"].append(pair_record)
    report["mean"] = {group: summarise([r for r in report["runs"] if r["group"] == group],
                                       args.methods)
                      for group in args.groups if any(r["group"] == group for r in report["runs"])}
    write_report(out, "results", report, markdown(report))
    return 0 if all(r.get("ok") for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
