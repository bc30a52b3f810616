"""The files that ship inside the package, and the one rule that keeps them as shipped.

The network's weights (``resources/weights``) and the sample pair (``resources/sample``) are
package data: the wheel, an editable install and Slicer's CMake install all put them next to the
code, and :mod:`importlib.resources` finds them there, wherever the package was installed.
Nothing else computes a path to them.
"""
from __future__ import annotations

import atexit
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path

from .errors import InputError

#: The shipped weights' file name in ``resources/weights`` (new weights: change this line).
DEFAULT_WEIGHTS_FILE = "liquidreg_brain_v3.pt"
SAMPLE_FILES = {"fixed_t1": "fixed_t1.nii.gz", "fixed_labels": "fixed_labels.nii.gz",
                "moving_t1": "moving_t1.nii.gz", "moving_labels": "moving_labels.nii.gz"}

_extracted = ExitStack()  # resources of a zipped install, extracted once per process
atexit.register(_extracted.close)


def folder(*parts: str) -> Path:
    """``resources/<parts>`` of the installed package, as a real path (files are read by torch
    and ITK, which need one)."""
    return _extracted.enter_context(as_file(files(__package__).joinpath("resources", *parts)))


def default_weights() -> Path:
    """Where the shipped weights are (the training script exports there)."""
    return folder("weights", DEFAULT_WEIGHTS_FILE)


def sample_paths() -> dict[str, Path]:
    """{"fixed_t1": path, "fixed_labels": ..., "moving_t1": ..., "moving_labels": ...}."""
    return {key: folder("sample", name) for key, name in SAMPLE_FILES.items()}


def _is_inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def check_new_weights_path(path, *, overwrite: bool = False) -> Path:
    """The one rule for where new weights (fine-tuning) may be written: a ``.pt`` file outside the
    shipped resources, and not over an existing file unless ``overwrite``.  The write itself
    publishes without replacing when ``overwrite`` is off (``checkpoint.save``)."""
    if not str(path or "").strip():
        raise InputError("no file is chosen for the new weights; choose a new .pt file name")
    path = Path(path).expanduser()
    if path.suffix != ".pt":
        raise InputError(f"new weights '{path.name}' need the .pt extension; choose a name "
                         "ending in .pt")
    if _is_inside(path, folder()):
        raise InputError(f"'{path}' is among the files shipped with LiquidReg (the shipped weights "
                         "are never changed); choose a file in another folder")
    if path.is_dir():
        raise InputError(f"'{path}' is a folder; choose a file name for the new weights")
    if path.exists() and not overwrite:
        raise InputError(f"'{path}' already exists; choose a new file name, or allow overwriting "
                         "it")
    return path
