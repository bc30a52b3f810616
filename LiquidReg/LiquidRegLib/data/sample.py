"""The small real sample pair shipped in ``LiquidRegLib/resources/sample`` (demo default and test-suite brain).

Fixed and moving are two different real brains, skull-stripped with their own brain masks,
cropped to the brain at 1 mm and stored compactly (uint8 T1, int16 shared-scheme labels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import resources
from . import volumes
from .subjects import Subject


def sample_paths(folder=None) -> dict:
    """{"fixed_t1": path, ...} of the sample pair (default: the shipped one)."""
    if folder is None:
        return resources.sample_paths()
    return {key: Path(folder) / name for key, name in resources.SAMPLE_FILES.items()}


def _brain_uint8(subject: Subject) -> tuple[np.ndarray, np.ndarray, object]:
    """Skull-stripped T1 scaled to 0..255 and labels, cropped around the brain (3 voxel margin)."""
    grid, window = volumes.crop_grid(subject.grid, subject.brainmask > 0, margin=3)
    mask = subject.brainmask[window] > 0
    t1 = np.where(mask, subject.t1[window], 0.0)
    top = np.percentile(t1[mask], 99.9)
    t1 = np.clip(np.rint(255.0 * t1 / top), 0, 255).astype(np.uint8)
    return t1, subject.labels[window].astype(np.int16), grid


def write_sample_pair(fixed: Subject, moving: Subject, folder=None) -> dict:
    """Write the four sample files; returns their paths."""
    if fixed.t1 is None or moving.t1 is None:
        raise ValueError("the sample pair needs two subjects with a real T1")
    paths = sample_paths(folder)
    for role, subject in (("fixed", fixed), ("moving", moving)):
        t1, labels, grid = _brain_uint8(subject)
        volumes.save(paths[f"{role}_t1"], t1, grid)
        volumes.save(paths[f"{role}_labels"], labels, grid)
    return paths
