"""A registration result as a folder of files: what is written, and how a folder is replaced.

The folder is made whole beside its final place and then takes that place in one step, so a
reader (or a crash) only ever sees the previous complete result or the new complete one, never
a mix; a folder that holds anything else is never touched.
"""
from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

import numpy as np

from .errors import InputError, OutputError
from .grid import Grid
from .io import (Volume, check_writable, staging_folder, write_displacement, write_json,
                 write_volume)
from .progress import report

RESULT_FILES = {"warped": "warped.nii.gz", "warp": "warp.nii.gz",
                "inverse_warp": "inverse_warp.nii.gz", "jacobian": "jacobian.nii.gz",
                "summary": "summary.json", "overview": "overview.png"}
#: Hidden folders that earlier versions left inside a result folder (they are replaced with it).
_LEGACY_STAGING = ".liquidreg-staging-"


# ---- the output folder ----------------------------------------------------------------------
def check_output_folder(out_dir, *, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output folder whose content would be lost or mixed.

    A non-empty folder is replaced only with ``overwrite``, and only if it holds nothing but a
    previous result (files other than LiquidReg's are never deleted).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output '{out_dir}' is an existing file; choose a folder for the results")
    check_writable(out_dir)
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return out_dir
    if not overwrite:
        raise InputError(f"output folder '{out_dir}' is not empty; choose a new or empty folder, "
                         "or allow overwriting to replace the previous result in it")
    foreign = [name for name in entries if name not in RESULT_FILES.values()
               and not name.startswith(_LEGACY_STAGING)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"output folder '{out_dir}' holds files LiquidReg did not write ({shown}); "
                         "choose another folder (overwriting replaces the whole folder)")
    return out_dir


def bytes_needed(fixed_grid: Grid, moving_grid: Grid) -> int:
    """An upper bound of a result folder's size: the four volumes uncompressed (float32 fields
    on the fixed grid: 3 + 1 + 1 values per voxel; the inverse warp on the moving grid: 3)."""
    return 4 * (5 * int(np.prod(fixed_grid.shape)) + 3 * int(np.prod(moving_grid.shape))) + (1 << 20)


def check_space(out_dir, fixed_grid: Grid, moving_grid: Grid) -> None:
    """Refuse, before any work, to start a registration whose result cannot fit on the disk."""
    check_free_space(out_dir, bytes_needed(fixed_grid, moving_grid), "the result")


def check_free_space(out_dir, need: int, what: str, fix: str = "") -> None:
    """Refuse, before any work, to write ``need`` bytes (``what``) where the disk lacks them."""
    existing = Path(out_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        raise OutputError(f"not enough free disk space for {what} in '{existing}': about "
                          f"{need / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free; free some "
                          f"space or choose another output location{fix}")


# ---- one run per output ---------------------------------------------------------------------
_LOCK = ".liquidreg-lock"     # ".<output name>.liquidreg-lock" beside the output
_CLAIMED: dict = {}           # outputs this process holds: absolute path -> [thread, depth]


def _lock_file(lock: Path, out: Path) -> int:
    """Open and lock ``lock`` (without waiting); its descriptor.  The lock is the kernel's
    (flock; a byte-range lock on Windows), so it ends with its process, however that ends: a
    lock file a killed run left behind is locked again at once."""
    while True:
        fd, holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666), ""
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
                return fd  # a file system without locks (rare): go on unlocked
            with suppress(OSError):  # Windows cannot read a locked byte
                holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise InputError(f"output '{out}' is being written by another liquidreg run "
                             f"({holder or 'another process'}); wait for it to finish, or "
                             "choose another output") from None
        try:  # the run that held it may have removed the file just before we locked it
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return fd


@contextmanager
def claim(out):
    """Hold the output ``out`` (a result folder, a batch's folder) for this run, from before
    the work until its result is in place: a second run into the same output is refused at once
    with one line, instead of both computing and the later silently replacing the earlier.

    Re-entrant within a thread (``save_result`` claims what the command already holds).  The
    folders made here to hold the lock file are removed again if the run leaves them empty.
    """
    target = Path(out).absolute()
    held = _CLAIMED.get(target)
    if held is not None and held[0] == threading.get_ident():
        held[1] += 1
        try:
            yield target
        finally:
            held[1] -= 1
        return
    if held is not None:
        raise InputError(f"output '{out}' is being written by another registration in this "
                         "program; wait for it to finish, or choose another output")
    check_writable(target)
    created = next((p for p in reversed(target.parents) if not p.exists()), None)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder '{target.parent}' ({exc.strerror}); "
                         "choose a writable location") from None
    lock = target.parent / f".{target.name}{_LOCK}"
    try:
        fd = _lock_file(lock, Path(out))
    except BaseException:
        _remove_empty_folders(target.parent, created)
        raise
    _CLAIMED[target] = [threading.get_ident(), 1]
    try:
        yield target
    finally:
        del _CLAIMED[target]
        if fcntl is not None:  # unlinked while locked: a run waiting on it re-checks the name
            os.unlink(lock)
            os.close(fd)
        else:
            os.close(fd)
            with suppress(OSError):
                os.unlink(lock)
        _remove_empty_folders(target.parent, created)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _take_place(staging: Path, out_dir: Path) -> None:
    """Put the complete ``staging`` folder at ``out_dir``, replacing a previous result whole."""
    if not out_dir.exists():
        os.rename(staging, out_dir)  # atomic; also replaces an empty folder made meanwhile
        return
    if _exchange(staging, out_dir):
        shutil.rmtree(staging)  # now the previous result
        return
    previous = staging.with_name(staging.name + "-previous")  # a staging name: cleaned if stale
    os.rename(out_dir, previous)
    os.rename(staging, out_dir)
    shutil.rmtree(previous)


# ---- what a result folder holds ---------------------------------------------------------------
def _grid_summary(grid: Grid) -> dict:
    return {"shape": list(grid.shape), "spacing_mm": grid.spacing.tolist(),
            "orientation": grid.orientation, "voxel_to_ras": grid.affine.tolist()}


def _summary(result) -> dict:
    from . import __version__
    content = dict(result.summary or {})
    content.setdefault("liquidreg_version", __version__)
    content["affine_ras_fixed_to_moving"] = np.asarray(result.affine).tolist()
    content["fixed_grid"] = _grid_summary(result.fixed_grid)
    content["moving_grid"] = _grid_summary(result.moving_grid)
    content["conventions"] = ("warp.nii.gz: ITK/ANTs displacement field on the fixed grid (LPS mm), "
                              "fixed point x -> moving point x + u(x); inverse_warp.nii.gz: the "
                              "same on the moving grid, moving -> fixed")
    return content


def _render_overview(path, result, fixed, moving) -> None:
    """Runs in a writer thread.  Its torch work is a few tiny slice resamplings, for which
    OpenMP's fork/join across the cores the other writers are using costs ~20x: one thread here
    (the setting is per OpenMP thread, so the caller's own torch threads are untouched)."""
    import torch

    from .figures import save_overview
    torch.set_num_threads(1)
    save_overview(path, result, fixed=fixed, moving=moving)


def save_result(result, out_dir, *, overwrite: bool = False, png: bool = True,
                fixed: Volume | None = None, moving: Volume | None = None,
                progress=None, compress: bool = True) -> dict:
    """Write a registration result as the folder ``out_dir``; returns {kind: path}.

    The files are written (in parallel threads: zlib and file I/O release the GIL) into a hidden
    folder beside ``out_dir``, which then takes ``out_dir``'s place whole
    (:func:`check_output_folder` says when a previous result may be replaced).  A failure or
    Ctrl-C leaves ``out_dir`` as it was.  ``fixed``/``moving`` feed the overview figure (skipped
    when Pillow is not installed).  ``compress=False`` deflates nothing (a result read once and
    deleted: the Slicer panel's).
    """
    with claim(out_dir):
        return _save(result, check_output_folder(out_dir, overwrite=overwrite), png, fixed,
                     moving, progress, compress)


def _save(result, out_dir: Path, png: bool, fixed, moving, progress, compress: bool) -> dict:
    check_space(out_dir, result.fixed_grid, result.moving_grid)
    target = out_dir.absolute()
    staging = staging_folder(target)
    staged = {k: staging / name for k, name in RESULT_FILES.items()}
    # Longest jobs first so the threads finish together.
    jobs = {"warp": lambda: write_displacement(staged["warp"], result.displacement,
                                               result.fixed_grid)}
    if png and importlib.util.find_spec("PIL") is not None:  # Slicer's Python may lack it
        jobs["overview"] = lambda: _render_overview(staged["overview"], result, fixed, moving)
    if result.inverse_displacement is not None:  # None: not computed (register(inverse=False))
        jobs["inverse_warp"] = lambda: write_displacement(
            staged["inverse_warp"], result.inverse_displacement, result.moving_grid)
    jobs.update({
        "warped": lambda: write_volume(staged["warped"], result.warped, result.fixed_grid,
                                       compress=None if compress else False),
        "jacobian": lambda: write_volume(staged["jacobian"], result.jacobian, result.fixed_grid,
                                         compress=None if compress else False),
        "summary": lambda: write_json(staged["summary"], _summary(result)),
    })
    start = time.perf_counter()
    # As many writers as files or cores (zlib, numpy and file I/O release the GIL); measured by
    # scripts/benchmark_worker.py (writing).
    pool = ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1),
                              thread_name_prefix="liquidreg-write")
    try:
        report(progress, "write", 0, len(jobs), "writing results")
        futures = [pool.submit(job) for job in jobs.values()]
        for done, future in enumerate(futures, 1):
            future.result()
            report(progress, "write", done, len(jobs), "writing results")
        pool.shutdown(wait=True)
        _take_place(staging, target)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report(progress, "write", len(jobs), len(jobs), "results written",
           seconds=round(time.perf_counter() - start, 2))
    return {kind: out_dir / RESULT_FILES[kind] for kind in jobs}


def _remove_empty_folders(folder: Path, top: Path | None) -> None:
    """Remove the folders this call created (``top`` and below it, up to ``folder``), if empty."""
    if top is None:
        return
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return
        folder = folder.parent
