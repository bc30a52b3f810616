"""Catch unusable inputs before any work starts, with one-line messages that say how to fix them.

A registration that silently runs on an empty, NaN-filled or non-overlapping image produces
garbage that looks like a result; these checks turn that into an immediate, actionable error.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .grid import Grid, resample

#: Smallest useful size along any axis (the network's feature pyramid needs a few levels).
MIN_SIZE = 8


def _label(volume, name) -> str:
    """The volume's own description (e.g. "moving image 'sub-02.nii.gz'") unless it has none."""
    own = getattr(volume, "name", None)
    return own if own and own != "image" else (name or "image")


def check_image(volume, name: str | None = None) -> None:
    """Reject images that cannot be registered: not 3-D, tiny, non-finite, empty or constant."""
    label = _label(volume, name)
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"{label} is {array.ndim}-D (shape {array.shape}); pass a 3-D volume")
    if min(array.shape) == 1:
        raise InputError(f"{label} is 2-D (a single slice, shape {array.shape}); pass a 3-D volume")
    if min(array.shape) < MIN_SIZE:
        raise InputError(f"{label} is too small ({'x'.join(map(str, array.shape))} voxels); "
                         f"pass a volume with at least {MIN_SIZE} voxels along each axis")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(f"{label} contains {bad} NaN/Inf voxels; replace them (e.g. with 0) "
                             "before registering")
    if not np.any(array):
        raise InputError(f"{label} is empty (all voxels are zero); check that the right file was "
                         "passed and that it was exported with its voxel data")
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"{label} is constant (every voxel is {low}); pass an image with "
                         "anatomical contrast")


def mask_on_grid(mask, grid: Grid) -> np.ndarray:
    """The mask as a boolean array on ``grid`` (resampled by nearest neighbour if needed)."""
    if mask.grid == grid:
        return np.asarray(mask.array) > 0
    return resample((np.asarray(mask.array) > 0).astype(np.uint8), mask.grid, grid,
                    order="nearest") > 0


def check_mask(mask, image, name: str | None = None):
    """Check a mask against its image and return it on the image's grid (an ``io.Volume`` of
    uint8 0/1).  A mask may be stored on its own grid (cropped, another orientation or spacing):
    this is the one place it is resampled, once, for every caller (command line, Slicer, API)."""
    from .io import Volume

    label = _label(mask, name)
    array = np.asarray(mask.array)
    if array.ndim != 3:
        raise InputError(f"{label} is {array.ndim}-D; pass a 3-D mask")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(f"{label} contains NaN/Inf voxels; pass a binary mask (0 outside, "
                         "1 inside)")
    if not np.any(array):
        raise InputError(f"{label} is empty (all zero); pass a mask that covers the region to "
                         "register, or omit it")
    on_grid = mask_on_grid(mask, image.grid)
    if not on_grid.any():
        raise InputError(f"{label} does not overlap {_label(image, None)} in world space; pass "
                         "the mask that was drawn on this image")
    return Volume(on_grid.view(np.uint8), image.grid, label)


def overlap_fraction(fixed_grid: Grid, moving_grid: Grid, world_map=None, samples: int = 24) -> float:
    """Fraction of the fixed field of view that lands inside the moving one (coarse sampling)."""
    axes = [np.linspace(0, n - 1, min(n, samples)) for n in fixed_grid.shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    mapped = fixed_grid if world_map is None else Grid(fixed_grid.shape,
                                                        np.asarray(world_map) @ fixed_grid.affine)
    moving_ijk = moving_grid.ras_to_voxel(mapped.voxel_to_ras(ijk))
    inside = np.all((moving_ijk >= -0.5) & (moving_ijk <= np.array(moving_grid.shape) - 0.5), 1)
    return float(inside.mean())


def check_overlap(fixed, moving, world_map=None, minimum: float = 0.01) -> None:
    """Reject pairs whose fields of view do not overlap after ``world_map`` (fixed -> moving)."""
    fraction = overlap_fraction(fixed.grid, moving.grid, world_map)
    if fraction < minimum:
        fc = ", ".join(f"{v:.0f}" for v in fixed.grid.center)
        mc = ", ".join(f"{v:.0f}" for v in moving.grid.center)
        raise InputError(f"{_label(fixed, None)} and {_label(moving, None)} do not overlap in world "
                         f"space (centres at ({fc}) and ({mc}) mm RAS); align them first: keep "
                         "the affine step on, pass --initial-affine, or fix the image origins")
