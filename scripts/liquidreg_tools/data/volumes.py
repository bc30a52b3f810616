"""Reading source volumes (NIfTI and FreeSurfer .mgz, hence nibabel) and writing the standard form.

The standard form every subject is converted to: 1 mm isotropic, RAS-ordered axes, cropped to
the head (or brain) with a small margin.  Geometry goes through :mod:`LiquidRegLib.grid`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from LiquidRegLib.grid import Grid, resample


def load(path) -> tuple[np.ndarray, Grid]:
    """Array ``[i, j, k]`` and grid of a NIfTI or MGH/MGZ file."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), Grid(img.shape[:3], img.affine)


def save(path, array: np.ndarray, grid: Grid) -> None:
    """Write a NIfTI atomically (temp file in the same folder, then rename)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array), grid.affine)
    img.set_qform(grid.affine, code=1)
    img.set_sform(grid.affine, code=1)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def ras_grid(grid: Grid, spacing_mm: float = 1.0) -> Grid:
    """RAS-ordered isotropic grid over ``grid``'s field of view (same voxel centres when the
    source is already axis-aligned at that spacing, so conversion is then lossless)."""
    return grid.canonical_working_grid(spacing_mm, multiple=1, max_size=100000)


def crop_grid(grid: Grid, mask: np.ndarray, margin: int) -> tuple[Grid, tuple[slice, ...]]:
    """Sub-grid of ``grid`` around ``mask``'s bounding box plus ``margin`` voxels."""
    where = np.argwhere(mask)
    if where.size == 0:
        raise ValueError("cannot crop to an empty mask")
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + margin + 1, grid.shape)
    shift = np.eye(4)
    shift[:3, 3] = lo
    window = tuple(slice(a, b) for a, b in zip(lo, hi))
    return Grid(tuple((hi - lo).tolist()), grid.affine @ shift), window


def to_standard(arrays: dict, grid: Grid, crop_mask_key: str, margin: int = 4,
                spacing_mm: float = 1.0) -> tuple[dict, Grid]:
    """Resample named arrays (same ``grid``) to the RAS 1 mm standard form, cropped around one of
    them.  Integer arrays are resampled nearest-neighbour, float arrays linearly."""
    target = ras_grid(grid, spacing_mm)
    out = {}
    for key, arr in arrays.items():
        order = "linear" if np.issubdtype(np.asarray(arr).dtype, np.floating) else "nearest"
        out[key] = resample(arr, grid, target, order=order)
    cropped, window = crop_grid(target, out[crop_mask_key] > 0, margin)
    return {k: v[window] for k, v in out.items()}, cropped
