"""The ``liquidreg`` command: register, apply, evaluate and finetune from a terminal or a script.

Errors are one line (``liquidreg: error: <problem and fix>``) with a non-zero exit code; Ctrl-C
exits with 130 and leaves no partial output.  ``--progress json`` turns stdout into one JSON
object per line so other programs (the Slicer module) can drive the command as a subprocess.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
from contextlib import closing, nullcontext, suppress
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, LiquidRegError
from .options import ACCURATE_ITERATIONS, DEFAULT_REGULARISATION, MODES, RegistrationOptions
from .progress import ProgressEvent, check

PROG = "liquidreg"


# ---- progress --------------------------------------------------------------------------------
class Reporter:
    """Receives ProgressEvents: a tqdm bar per stage on stderr, JSON lines on stdout, or nothing.

    Bars appear only for stages that run longer than a second, so quick steps stay silent.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self._bar = None
        self._stage = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.mode == "json":
            self._emit({"event": "progress", **event.as_dict()})
        elif self.mode == "bar":
            self._update_bar(event)

    def _emit(self, content: dict) -> None:
        from .io import to_json
        sys.stdout.write(to_json(content) + "\n")
        sys.stdout.flush()

    def _update_bar(self, event: ProgressEvent) -> None:
        from tqdm import tqdm
        if event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=event.stage, delay=1.0, file=sys.stderr,
                             unit="pair" if event.stage == "pairs" else "step",
                             dynamic_ncols=True, leave=True)
        bar = self._bar
        if event.total is not None and event.total != bar.total:
            bar.total = event.total
        shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in event.metrics.items() if isinstance(v, (int, float, str))]
        bar.set_postfix_str(", ".join(([event.message] if event.message else []) + shown),
                            refresh=False)
        bar.update(max(event.step - bar.n, 0))

    def pair(self, row: dict) -> None:
        """One finished pair of a batch: a JSON line, or its error above the bar."""
        if self.mode == "json":
            self._emit({"event": "pair", **row})
        elif self.mode == "bar" and row.get("error"):
            from tqdm import tqdm
            tqdm.write(f"{row['name']}: {row['status']}: {row['error']}", file=sys.stderr)

    def info(self, text: str) -> None:
        """A human message: stdout in bar mode, nowhere in json/none mode (stdout is data)."""
        if self.mode == "bar":
            self.close()
            print(text)

    def result(self, text: str) -> None:
        """What the user asked for (e.g. a metrics table): stdout, even when quiet; in json
        mode it travels in the "done" event instead."""
        if self.mode != "json":
            self.close()
            print(text)

    def warn(self, text: str) -> None:
        """Something the user should know although the command goes on: stderr, one line (in
        json mode also a "warning" event)."""
        self.close()
        if self.mode == "json":
            self._emit({"event": "warning", "message": text})
        print(f"{PROG}: warning: {text}", file=sys.stderr)

    def done(self, **fields) -> None:
        self.close()
        if self.mode == "json":
            self._emit({"event": "done", **fields})

    def error(self, message: str) -> None:
        self.close()
        if self.mode == "json":
            self._emit({"event": "error", "message": message})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        self._stage = None


# ---- shared helpers --------------------------------------------------------------------------
def _sample_pair() -> tuple[Path, Path]:
    """The bundled sample pair, used when FIXED and MOVING are omitted."""
    from .resources import sample_paths
    paths = sample_paths()
    fixed, moving = paths["fixed_t1"], paths["moving_t1"]
    if not fixed.is_file() or not moving.is_file():
        raise InputError("no FIXED and MOVING images were given and the bundled sample pair is "
                         "missing from this installation; pass FIXED and MOVING image files")
    return fixed, moving


def _check_output_file(out: Path, what: str) -> None:
    """Fail before the long computation if the output file cannot be written."""
    from .io import check_writable
    if out.is_dir():
        raise InputError(f"output '{out}' is a folder; pass a file name for the {what}")
    check_writable(out)


# ---- register --------------------------------------------------------------------------------
def _import_in_background(module: str) -> threading.Thread:
    """Start importing ``module`` on a thread, so that a slow import (torch: seconds) overlaps
    other start-up work; join it, then import as usual (which raises any import error)."""
    def load():
        try:
            importlib.import_module(module)
        except BaseException:  # reported by the import that follows the join
            pass

    thread = threading.Thread(target=load, name="liquidreg-import", daemon=True)
    thread.start()
    return thread


def registration_options(args) -> RegistrationOptions:
    """The register command's options as the engine takes them (the inverse of
    :func:`option_arguments`)."""
    from .io import read_affine
    initial = read_affine(args.initial_affine) if args.initial_affine else None
    return RegistrationOptions(mode=args.mode, iterations=args.iterations,
                               refinement_steps=args.refinement_steps,
                               regularisation=args.regularisation, affine=not args.no_affine,
                               initial_affine=initial, weights=args.weights, device=args.device)


def option_arguments(options: RegistrationOptions) -> list[str]:
    """``liquidreg register`` arguments that give ``options`` (defaults left out).  A matrix
    cannot travel on a command line: an initial affine goes in a file (``--initial-affine``)."""
    if options.initial_affine is not None:
        raise ValueError("write the initial affine to a file and pass --initial-affine FILE")
    defaults = RegistrationOptions()
    arguments = ["--mode", options.mode, "--device", options.device]
    if options.iterations is not None:
        arguments += ["--iterations", str(options.iterations)]
    if options.refinement_steps is not None:
        arguments += ["--refinement-steps", str(options.refinement_steps)]
    if options.regularisation != defaults.regularisation:
        arguments += ["--regularisation", repr(options.regularisation)]
    if not options.affine:
        arguments.append("--no-affine")
    if options.weights is not None:
        arguments += ["--weights", str(options.weights)]
    return arguments


def run_register(args, reporter: Reporter, cancel=None, model=None, compress=True) -> None:
    """``model``: a loaded (network, info) pair to use (the Slicer panel's warm worker keeps
    one); None loads ``--weights``.  ``compress=False``: deflate no file (a result read once)."""
    engine = _import_in_background(f"{__package__}.register")  # torch, while the images load
    from .io import read_volume
    from .results import check_output_folder, check_space, save_result
    from .validate import check_overlap

    if (args.fixed is None) != (args.moving is None):
        raise InputError("pass both FIXED and MOVING (or neither, to register the bundled sample "
                         "pair)")
    fixed_path, moving_path = ((args.fixed, args.moving) if args.fixed is not None
                               else _sample_pair())
    options = registration_options(args)
    out = check_output_folder(args.output, overwrite=args.overwrite)  # before any work
    fixed = read_volume(fixed_path, name="fixed image")
    moving = read_volume(moving_path, name="moving image")
    masks = {role: read_volume(path, name=f"{role} mask", dtype=None)
             for role, path in (("fixed", args.fixed_mask), ("moving", args.moving_mask)) if path}
    if not options.affine or options.initial_affine is not None:  # fail before loading the network
        check_overlap(fixed, moving, options.initial_affine)
    check_space(out, fixed.grid, moving.grid)
    engine.join()
    from . import register as registration
    # register() validates images and masks itself (for every caller: CLI, Slicer, scripts).
    result = registration.register(fixed, moving, options, fixed_mask=masks.get("fixed"),
                                   moving_mask=masks.get("moving"), progress=reporter,
                                   cancel=cancel, inverse=not args.no_inverse, model=model)
    check(cancel)
    result.summary["inputs"] = {role: None if path is None else str(Path(path).absolute())
                                for role, path in (("fixed", fixed_path), ("moving", moving_path),
                                                   ("fixed_mask", args.fixed_mask),
                                                   ("moving_mask", args.moving_mask))}
    for warning in result.summary.get("warnings", []):
        reporter.warn(warning)
    paths = save_result(result, out, overwrite=args.overwrite, png=not args.no_png, fixed=fixed,
                        moving=moving, progress=reporter, compress=compress)
    if not args.no_png and "overview" not in paths:
        reporter.warn("overview.png was not drawn: Pillow is not installed in this Python; "
                      "pip install pillow (or pass --no-png)")
    summary = getattr(result, "summary", None) or {}
    reporter.info(f"results written to {out}/: " + ", ".join(p.name for p in paths.values()))
    if isinstance(summary.get("pct_folding"), (int, float)):
        reporter.info(f"folding: {summary['pct_folding']:.4f} % of voxels")
    reporter.done(output=str(out), files={k: str(v) for k, v in paths.items()})


# ---- batch -----------------------------------------------------------------------------------
def run_batch(args, reporter: Reporter, cancel=None) -> None:
    from . import batch
    from .errors import BatchIncomplete, Cancelled
    from .io import check_writable

    if args.scheduler and args.workers is not None:
        raise InputError("pass --workers (local processes) or --scheduler (a Dask cluster), not "
                         "both; a cluster's size is set where its workers are started")
    options = registration_options(args)
    pairs = batch.read_pairs(args.pairs)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"output '{out}' is an existing file; pass a folder for the results")
    check_writable(out / batch.TABLE_CSV)  # before any work: the pairs and the table go inside
    made = not out.exists()
    order = {pair.name: index for index, pair in enumerate(pairs)}
    results = []  # kept in the order of PAIRS.csv
    running = batch.register_many(pairs, out, options,
                                  workers=1 if args.workers is None else args.workers,
                                  scheduler=args.scheduler, threads=args.threads,
                                  overwrite=args.overwrite, png=not args.no_png)
    reporter(ProgressEvent("pairs", 0, len(pairs), "registering"))
    try:
        with closing(running):  # leaving early stops the workers at once
            for result in running:
                check(cancel)
                results.append(result)
                results.sort(key=lambda r: order[r.name])
                batch.write_table(results, out)
                reporter.pair(result.row())
                reporter(ProgressEvent("pairs", len(results), len(pairs), result.name,
                                       {"failed": sum(not r.ok for r in results)}))
    except (KeyboardInterrupt, Cancelled):
        if results:  # every pair gets its row: those not finished are "cancelled"
            batch.write_table(sorted(results + batch.cancelled(pairs, results, out, options),
                                     key=lambda r: order[r.name]), out)
        elif made:
            with suppress(OSError):
                out.rmdir()  # nothing was finished: no empty folder left behind
        raise Cancelled(f"cancelled by the user; the {sum(r.ok for r in results)} finished pairs "
                        f"are kept in '{out}'; rerun the same command to finish the rest") from None
    table = batch.write_table(results, out)
    failed = [r for r in results if not r.ok]
    resumed = sum(r.status == "resumed" for r in results)
    reporter.info(f"{len(results) - len(failed)} of {len(results)} pairs registered "
                  f"({resumed} complete from an earlier run), {len(failed)} failed; table: "
                  f"{table['csv']}")
    if failed:
        raise BatchIncomplete(f"{len(failed)} of {len(results)} pairs failed (first: "
                              f"{failed[0].name}: {failed[0].error}); each error is in "
                              f"{table['csv']}: fix them and rerun the same command, finished "
                              "pairs are kept and skipped")
    reporter.done(output=str(out), table={k: str(v) for k, v in table.items()},
                  pairs=len(results), resumed=resumed)


# ---- apply -----------------------------------------------------------------------------------
def _displacement_on(path, reference_grid):
    """The warp's RAS displacement on the reference grid (zero outside the warp, as ITK does)."""
    from .grid import resample
    from .io import read_displacement
    field, field_grid = read_displacement(path)
    if field_grid == reference_grid:
        return field
    return np.stack([resample(field[..., c], field_grid, reference_grid) for c in range(3)], -1)


def run_apply(args, reporter: Reporter, cancel=None) -> None:
    import torch

    from .grid import resample
    from .io import image_extension, read_affine, read_grid, read_volume, write_volume

    out = Path(args.output)
    if not image_extension(out):
        raise InputError(f"output '{out}' has no image extension; end it with .nii.gz, .nrrd or "
                         ".mha")
    _check_output_file(out, "resampled image")
    if out.exists() and not args.overwrite:  # the rule of register's output folder
        raise InputError(f"output '{out}' already exists; choose a new file name, or pass "
                         "--overwrite to replace it")
    from .validate import looks_like_labels

    reference = read_grid(args.reference, name="reference image")
    nearest = args.interpolation == "nearest"
    moving = read_volume(args.moving, name="moving image", dtype=None)
    if not nearest:
        if looks_like_labels(moving.array):
            reporter.warn(f"{moving.name} looks like a label map; linear interpolation blends "
                          "neighbouring labels into values that are no label: use "
                          "--interpolation nearest for label maps")
        moving.array = moving.array.astype(np.float32, copy=False)
    if image_extension(args.transform):
        displacement = torch.from_numpy(_displacement_on(args.transform, reference))
        world_map = None
    else:
        displacement, world_map = None, read_affine(args.transform, name="transform")
    reporter(ProgressEvent("resample", 0, 1, "resampling"))
    array = resample(moving.array, moving.grid, reference, world_map=world_map,
                     displacement=displacement, order=args.interpolation)
    reporter(ProgressEvent("resample", 1, 1, "resampled"))
    write_volume(out, array, reference)
    reporter.info(f"wrote {out}")
    reporter.done(output=str(out))


# ---- evaluate --------------------------------------------------------------------------------
def _parse_labels(text):
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise InputError(f"--labels '{text}' is not a comma-separated list of integers; e.g. "
                         "--labels 2,3,41,42") from None


def evaluate_files(fixed_labels_path, moving_labels_path, *, transform=None, jacobian=None,
                   labels=None) -> dict:
    """Dice per label, mean Dice, HD95 and Jacobian statistics for one registered pair."""
    import torch

    from .diffeo import jacobian_determinant_ras
    from .grid import resample
    from .io import read_volume
    from .metrics import dice_per_label, hd95_per_label, jacobian_stats, mean_dice
    from .validate import check_labels

    fixed = read_volume(fixed_labels_path, name="fixed label map", dtype=None)
    moving = read_volume(moving_labels_path, name="moving label map", dtype=None)
    for volume in (fixed, moving):
        check_labels(volume)
    if labels is not None:
        held = set(np.unique(fixed.array).tolist()) | set(np.unique(moving.array).tolist())
        absent = [label for label in labels if label not in held]
        if absent:
            shown = sorted(int(v) for v in held - {0})[:8]
            raise InputError(f"label(s) {', '.join(map(str, absent))} are in neither label map; "
                             f"pass labels the maps hold (e.g. {', '.join(map(str, shown))})")
    field = _displacement_on(transform, fixed.grid) if transform else None
    warped = resample(moving.array, moving.grid, fixed.grid, order="nearest",
                      displacement=None if field is None else torch.from_numpy(field))
    dice = dice_per_label(fixed.array, warped, labels)
    report = {"fixed_labels": str(fixed_labels_path), "moving_labels": str(moving_labels_path),
              "transform": None if transform is None else str(transform),
              "mean_dice": mean_dice(dice), "dice": dice,
              "hd95_mm": hd95_per_label(fixed.array, warped, fixed.grid, list(dice))}
    if jacobian is not None:
        jac = read_volume(jacobian, name="Jacobian map").array
        report["jacobian"] = jacobian_stats(jac)
    elif field is not None:
        report["jacobian"] = jacobian_stats(
            jacobian_determinant_ras(torch.from_numpy(field), fixed.grid).numpy())
    return report


def run_evaluate(args, reporter: Reporter, cancel=None) -> None:
    from .io import write_json
    labels = _parse_labels(args.labels)
    if args.output:
        _check_output_file(Path(args.output), "report")
    reporter(ProgressEvent("evaluate", 0, 1, "computing metrics"))
    report = evaluate_files(args.fixed_labels, args.moving_labels, transform=args.transform,
                            jacobian=args.jacobian, labels=labels)
    reporter(ProgressEvent("evaluate", 1, 1, "done"))
    if not report["dice"]:
        raise InputError("the two label maps share no non-zero label; check that both use the "
                         "same label numbering")
    if args.output:
        write_json(args.output, report)
    lines = [f"{'label':>7} {'Dice':>7} {'HD95 mm':>8}"]
    lines += [f"{label:>7} {d:7.4f} {report['hd95_mm'][label]:8.2f}"
              for label, d in report["dice"].items()]
    lines.append(f"{'mean':>7} {report['mean_dice']:7.4f}")
    if "jacobian" in report:
        j = report["jacobian"]
        lines.append(f"Jacobian: {j['pct_folding']:.4f} % folding (J <= 0), std log J "
                     f"{j['std_log_jac']:.4f}, min {j['min']:.3f}, max {j['max']:.3f}")
    reporter.result("\n".join(lines))
    reporter.done(output=args.output, metrics=report)


# ---- finetune --------------------------------------------------------------------------------
def pairs_from_csv(csv_path) -> list[tuple]:
    """PairSpec tuples from a CSV with columns fixed,moving[,fixed_labels,moving_labels]."""
    from .io import read_csv_table
    columns = ("fixed", "moving", "fixed_labels", "moving_labels")
    pairs = []
    for line, row in read_csv_table(csv_path, required=columns[:2], optional=columns[2:],
                                    paths=columns):
        for column in columns:
            if row[column] is not None and not row[column].is_file():
                raise InputError(f"{Path(csv_path).name} line {line}: {column} '{row[column]}' "
                                 "does not exist; fix the path")
        pairs.append(tuple(row[column] for column in columns))
    return pairs


def pairs_from_folder(folder, reporter=None) -> list[tuple]:
    """Every ordered pair of distinct intensity images in ``folder`` (no labels).  Label maps and
    masks found there are left out (fine-tuning on them would teach the network nonsense); with
    labels, pass a pairs CSV."""
    from .io import is_image_file, read_volume
    from .validate import looks_like_labels
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"images folder '{folder}' does not exist; check the path")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    labels = [p for p in files if looks_like_labels(read_volume(p, name="image", dtype=None).array)]
    images = [p for p in files if p not in labels]
    skipped = (f" (left out {len(labels)} label map(s) or mask(s): "
               f"{', '.join(p.name for p in labels[:3])}{', ...' if len(labels) > 3 else ''})"
               if labels else "")
    if len(images) < 2:
        raise InputError(f"images folder '{folder}' holds {len(images)} image(s){skipped}; "
                         "fine-tuning needs at least 2 (.nii.gz, .nrrd or .mha)")
    if labels and reporter is not None:
        reporter.warn(f"fine-tuning on the {len(images)} images in '{folder}'{skipped}")
    return [(a, b, None, None) for a in images for b in images if a != b]


def run_finetune(args, reporter: Reporter, cancel=None) -> None:
    from . import train
    from .resources import check_new_weights_path

    out = check_new_weights_path(args.output, overwrite=args.overwrite)  # before any work
    _check_output_file(out, "weights")
    pairs = pairs_from_csv(args.pairs) if args.pairs else pairs_from_folder(args.images, reporter)
    reporter.info(f"fine-tuning on {len(pairs)} pair(s) for {args.steps} steps")
    summary = train.finetune(pairs, out, steps=args.steps, weights=args.weights,
                             device=args.device, overwrite=args.overwrite, progress=reporter,
                             cancel=cancel)
    reporter.info(f"wrote {out}")
    reporter.done(output=str(out), summary=summary)


# ---- parser ----------------------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-written line breaks of descriptions and examples; show meaningful defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _paragraph(text: str) -> str:
    import textwrap
    return textwrap.fill(" ".join(text.split()), width=88)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output and progress")
    group.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                       help="progress on stderr as bars, as JSON lines on stdout (for programs), "
                            "or none")
    group.add_argument("--quiet", "-q", action="store_true",
                       help="no progress bars or messages (errors are still printed)")
    group.add_argument("--debug", action="store_true",
                       help="show the full traceback of unexpected errors")
    driven = common.add_argument_group("when another program runs liquidreg (e.g. the Slicer "
                                       "module)")
    driven.add_argument("--cancel-file", metavar="FILE",
                        help="stop cleanly (exit code 130, nothing written) once FILE exists")
    driven.add_argument("--exit-with-stdin", action="store_true",
                        help="stop the same way when standard input closes (the program that "
                             "started liquidreg cancelled or exited)")
    return common


def cancel_hook(args):
    """The engine's ``cancel`` callable for ``--cancel-file``/``--exit-with-stdin`` (None without
    them).  Checked at every step of the work, so a driving program can stop this process even
    through a launcher that forwards no signals (Slicer's PythonSlicer)."""
    checks = []
    if getattr(args, "cancel_file", None):
        checks.append(Path(args.cancel_file).exists)
    if getattr(args, "exit_with_stdin", False):
        closed = threading.Event()

        def watch():  # the raw descriptor: no buffer lock for interpreter shutdown to wait on
            try:
                while os.read(sys.stdin.fileno(), 65536):
                    pass
            except (AttributeError, OSError, ValueError):  # no usable stdin counts as closed
                pass
            closed.set()

        threading.Thread(target=watch, name="liquidreg-stdin", daemon=True).start()
        checks.append(closed.is_set)
    if not checks:
        return None
    return lambda: any(check() for check in checks)


def _device_option(parser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to compute; auto uses a GPU when one is available")


def _registration_options(p) -> None:
    """The options of RegistrationOptions that register and batch share."""
    _device_option(p)
    p.add_argument("--mode", choices=MODES, default="fast",
                   help="fast: the network alone (seconds); accurate: the network, then "
                        f"{ACCURATE_ITERATIONS} optimisation steps on this pair")
    p.add_argument("--iterations", type=int, metavar="N",
                   help="for experts: this many optimisation steps instead of the mode's "
                        "(0 = network only)")
    p.add_argument("--refinement-steps", type=int, metavar="N",
                   help="for experts: the network's refinement steps at every level (default: "
                        "its own, 1-2 per level; more steps refine further and take longer)")
    p.add_argument("--regularisation", type=float, default=DEFAULT_REGULARISATION, metavar="W",
                   help="smoothness weight of the optimisation steps (higher = smoother)")
    p.add_argument("--no-affine", action="store_true",
                   help="skip the affine pre-alignment (images already aligned)")
    p.add_argument("--weights", metavar="W", help="network weights (default: the shipped ones)")


REGISTER_EXAMPLES = """examples:
  liquidreg register fixed.nii.gz moving.nii.gz -o out/
      affine + deformable registration; writes out/warped.nii.gz, warp.nii.gz (ITK/ANTs
      displacement field), inverse_warp.nii.gz, jacobian.nii.gz, summary.json, overview.png
  liquidreg register -o demo/
      register the bundled sample pair (two real brains)
  liquidreg register fixed.nrrd moving.nrrd -o out/ --mode accurate --fixed-mask brain.nrrd
      refine the network's answer on this pair, inside a brain mask
  liquidreg register fixed.nii.gz moving.nii.gz -o out/ --no-affine --initial-affine rigid.txt
      images already roughly aligned by another tool (4x4 RAS text or ITK .txt/.mat)

outputs follow ITK/ANTs conventions: warp.nii.gz maps fixed points to moving points, so
  antsApplyTransforms -r fixed.nii.gz -i moving_labels.nii.gz -t out/warp.nii.gz -n NearestNeighbor
gives the same result as 'liquidreg apply'."""

APPLY_EXAMPLES = """examples:
  liquidreg apply --reference fixed.nii.gz --transform out/warp.nii.gz moving.nii.gz -o warped.nii.gz
  liquidreg apply --reference fixed.nii.gz --transform out/warp.nii.gz \\
      moving_labels.nii.gz -o warped_labels.nii.gz --interpolation nearest
      label maps: nearest keeps the integer labels and the file's voxel type
  liquidreg apply --reference moving.nii.gz --transform out/inverse_warp.nii.gz fixed_seg.nrrd \\
      -o seg_on_moving.nrrd --interpolation nearest
      the inverse warp brings fixed-space data onto the moving image"""

EVALUATE_EXAMPLES = """examples:
  liquidreg evaluate fixed_labels.nii.gz moving_labels.nii.gz --transform out/warp.nii.gz
      warp the moving labels (nearest) and report Dice per label, mean Dice, HD95 (mm) and
      Jacobian statistics of the warp (% folding, std of log J)
  liquidreg evaluate fixed_labels.nii.gz warped_labels.nii.gz --jacobian out/jacobian.nii.gz -o report.json
      labels already resampled onto the fixed image; save the numbers as JSON
  liquidreg evaluate a.nii.gz b.nii.gz --labels 17,53 --transform out/warp.nii.gz
      only the hippocampi"""

BATCH_EXAMPLES = """examples:
  liquidreg batch pairs.csv -o cohort/ --workers 2
      pairs.csv has a header 'fixed,moving[,fixed_mask,moving_mask,output]'; relative paths are
      relative to the CSV's folder; each pair gets cohort/<output>/ with the files of 'register'
      (default name: <moving>_to_<fixed>) and cohort/batch_summary.csv/.json list every pair
  liquidreg batch pairs.csv -o cohort/ --mode accurate --scheduler tcp://head-node:8786
      one task per pair on an existing Dask cluster (pip install 'liquidreg[dask]'); the images
      and OUT must be on a file system the workers share
  liquidreg batch pairs.csv -o cohort/
      rerun after a crash or a failed pair: complete results are kept and skipped

exit code 0: every pair registered; 4: some pairs failed (each with its error in the table)."""

FINETUNE_EXAMPLES = """examples:
  liquidreg finetune --pairs pairs.csv -o my_weights.pt --steps 300
      pairs.csv has a header 'fixed,moving[,fixed_labels,moving_labels]'; relative paths are
      relative to the CSV's folder; with labels, the Dice loss guides the fine-tuning
  liquidreg finetune --images my_scans/ -o my_weights.pt
      every ordered pair of images in the folder (unsupervised: image similarity only)
  liquidreg register fixed.nii.gz moving.nii.gz -o out/ --weights my_weights.pt
      use the fine-tuned weights; the shipped weights are never modified"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="LiquidReg: fast diffeomorphic learned registration of 3D brain MRI.\n"
                    "Run 'liquidreg <command> --help' for the options and examples of each "
                    "command.",
        epilog="examples:\n  liquidreg register fixed.nii.gz moving.nii.gz -o out/\n"
               "  liquidreg apply --reference fixed.nii.gz --transform out/warp.nii.gz labels.nii.gz "
               "-o warped_labels.nii.gz --interpolation nearest\n"
               "  liquidreg evaluate fixed_labels.nii.gz moving_labels.nii.gz --transform "
               "out/warp.nii.gz\n"
               "  liquidreg batch pairs.csv -o cohort/ --workers 2\n"
               "  liquidreg finetune --pairs pairs.csv -o my_weights.pt")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    p = commands.add_parser(
        "register", parents=[common], formatter_class=_Formatter, epilog=REGISTER_EXAMPLES,
        help="register MOVING onto FIXED (affine + learned deformable)",
        description=_paragraph("Register the MOVING image onto the FIXED image: affine pre-alignment, then "
                    "the learned diffeomorphic network (optionally refined per pair). Images: "
                    "NIfTI, NRRD or MetaImage, any orientation and spacing."))
    p.add_argument("fixed", nargs="?", metavar="FIXED", help="fixed (reference) image; omit "
                   "FIXED and MOVING to use the bundled sample pair")
    p.add_argument("moving", nargs="?", metavar="MOVING", help="moving image, deformed onto FIXED")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder: new or empty (created if needed)")
    _registration_options(p)
    p.add_argument("--initial-affine", metavar="MAT",
                   help="starting fixed->moving transform: 4x4 RAS text matrix or ITK "
                        ".txt/.tfm/.mat file")
    p.add_argument("--fixed-mask", metavar="M", help="mask of the region of FIXED to align")
    p.add_argument("--moving-mask", metavar="M", help="mask of the region of MOVING to align")
    p.add_argument("--no-png", action="store_true", help="do not render overview.png")
    p.add_argument("--no-inverse", action="store_true",
                   help="do not compute or write inverse_warp.nii.gz (faster)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the previous result in OUT (as a whole; a folder holding other "
                        "files is never replaced)")
    p.set_defaults(run=run_register)

    p = commands.add_parser(
        "batch", parents=[common], formatter_class=_Formatter, epilog=BATCH_EXAMPLES,
        help="register many pairs listed in a CSV (local processes or a Dask cluster)",
        description=_paragraph("Register every pair listed in PAIRS.csv, each into its own result "
                    "folder. Each worker loads the network once; a pair that fails is recorded "
                    "with its error and the others go on; a rerun skips the pairs already done. "
                    "A table of every pair (status, time, folding, similarity) is written as CSV "
                    "and JSON."))
    p.add_argument("pairs", metavar="PAIRS.csv",
                   help="CSV with columns fixed,moving[,fixed_mask,moving_mask,output]")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output folder: one result folder per pair and the batch table")
    _registration_options(p)
    p.add_argument("--workers", type=int, metavar="N",
                   help="pairs registered at once in local processes (default 1: in this process)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a Dask scheduler, e.g. tcp://host:8786: one task per pair on "
                        "its workers")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per worker (default: the cores shared among --workers; "
                        "Dask workers keep their own setting)")
    p.add_argument("--overwrite", action="store_true",
                   help="register again the pairs that already have a result folder")
    p.add_argument("--no-png", action="store_true", help="do not render overview.png")
    p.set_defaults(run=run_batch, initial_affine=None)  # no one starting transform for all

    p = commands.add_parser(
        "apply", parents=[common], formatter_class=_Formatter, epilog=APPLY_EXAMPLES,
        help="resample an image or label map through a warp",
        description=_paragraph("Resample MOVING onto the REFERENCE grid through a transform: a displacement "
                    "field (warp.nii.gz / inverse_warp.nii.gz from 'register', or any ITK/ANTs "
                    "warp) or a linear transform (4x4 RAS text or ITK file)."))
    p.add_argument("moving", metavar="MOVING", help="image or label map to resample")
    p.add_argument("--reference", required=True, metavar="FIXED",
                   help="image whose grid the output takes (usually the fixed image)")
    p.add_argument("--transform", required=True, metavar="WARP",
                   help="displacement field (fixed -> moving) or linear transform file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output image file")
    p.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                   help="nearest for label maps (keeps integer labels and voxel type)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(run=run_apply)

    p = commands.add_parser(
        "evaluate", parents=[common], formatter_class=_Formatter, epilog=EVALUATE_EXAMPLES,
        help="Dice, HD95 and Jacobian statistics of a registration",
        description=_paragraph("Score a registration with label maps: Dice per label (labels present in "
                    "both maps), mean Dice, 95th-percentile Hausdorff distance in mm, and the "
                    "warp's Jacobian statistics (% of voxels with J <= 0, std of log J)."))
    p.add_argument("fixed_labels", metavar="FIXED_LABELS", help="label map of the fixed image")
    p.add_argument("moving_labels", metavar="MOVING_LABELS",
                   help="label map of the moving image (already warped if --transform is omitted)")
    p.add_argument("--transform", metavar="WARP",
                   help="warp to apply to MOVING_LABELS first (nearest neighbour)")
    p.add_argument("--jacobian", metavar="JAC", help="Jacobian map to summarise (default: "
                   "computed from --transform)")
    p.add_argument("--labels", metavar="L1,L2,...", help="only these labels")
    p.add_argument("-o", "--output", metavar="REPORT", help="also write the numbers as JSON")
    p.set_defaults(run=run_evaluate)

    p = commands.add_parser(
        "finetune", parents=[common], formatter_class=_Formatter, epilog=FINETUNE_EXAMPLES,
        help="adapt the network to your images",
        description=_paragraph("Fine-tune the registration network on your own images (with the stabilised "
                    "training loop: non-finite steps skipped, checkpoints written atomically). "
                    "Writes a new weights file for 'register --weights'."))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", metavar="CSV",
                        help="CSV with columns fixed,moving[,fixed_labels,moving_labels]")
    source.add_argument("--images", metavar="DIR", help="folder of images; all ordered pairs")
    p.add_argument("-o", "--output", required=True, metavar="WEIGHTS", help="new weights file")
    p.add_argument("--steps", type=int, default=200, metavar="N", help="training steps")
    p.add_argument("--weights", metavar="W", help="starting weights (default: the shipped ones)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _device_option(p)
    p.set_defaults(run=run_finetune)
    return parser


# ---- entry point -----------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    if argv is None:  # a real process, not a call from Python code
        from .devices import reuse_freed_memory
        reuse_freed_memory()
    args = build_parser().parse_args(argv)
    mode = args.progress
    if args.quiet and mode == "bar":
        mode = "none"
    return run_parsed(args, Reporter(mode), cancel_hook(args))


def run_parsed(args, reporter: Reporter, cancel=None) -> int:
    """Run a parsed command; returns its exit code.  An error is one line on stderr (and an
    "error" event in json mode).  The warm worker (``worker.py``) runs each request through here."""
    mode = reporter.mode
    # A terminating parent (e.g. Slicer's Cancel) gets the same clean exit as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _in_main_thread() else None
    try:
        with _claimed_output(args):
            args.run(args, reporter, cancel)
        return 0
    except LiquidRegError as error:
        message = _one_line(error)
        code = error.exit_code
    except KeyboardInterrupt:
        message, code = "cancelled by the user; nothing was written", 130
    except Exception as error:  # a bug, not bad input: still one line unless --debug
        from .memory import allocation_failure
        if args.debug:
            raise
        shortage = allocation_failure(error)  # not a bug: the machine's (or the job's) limit
        if shortage is not None:
            message, code = _one_line(shortage), shortage.exit_code
        else:
            message = f"unexpected {type(error).__name__}: {error}"
            if mode == "json":  # a program drives us (Slicer): it logs stderr, its user has
                #                 no flags
                traceback.print_exc(file=sys.stderr)
                message += " (the traceback is in the log; please report it)"
            else:
                message += " (rerun with --debug for the traceback and please report it)"
            message, code = _one_line(message), 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        reporter.close()
    reporter.error(message)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _claimed_output(args):
    """``register`` and ``batch`` hold their output folder for the whole run
    (:func:`results.claim`): a second run into it is refused before it does any work."""
    if args.command not in ("register", "batch"):
        return nullcontext()
    from .results import claim
    return claim(args.output)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def entry_point() -> None:
    """The ``liquidreg`` program: :func:`main`, then an immediate exit.

    Every output has been written, moved into place and closed when ``main`` returns; the normal
    interpreter shutdown with torch loaded would only add ~0.4 s of teardown.
    """
    try:
        code = main()
    except SystemExit as exit_:  # argparse: --help, usage errors
        code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
