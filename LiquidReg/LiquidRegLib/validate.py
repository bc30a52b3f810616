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
    if looks_like_labels(array):
        raise InputError(f"{label} looks like a label map (a segmentation or mask: whole "
                         "numbers, constant over regions), not an image; register the intensity "
                         "images, then carry label maps through the result with nearest-neighbour "
                         "interpolation ('liquidreg apply' with nearest interpolation, or the "
                         "result transform in Slicer)")


def check_labels(volume, name: str | None = None) -> None:
    """Reject an image where a label map is expected (scoring Dice on intensities means
    nothing)."""
    label = _label(volume, name)
    if label_statistics(volume.array) is None:
        raise InputError(f"{label} has non-integer values; pass a label map (segmentation), not "
                         "an intensity image")
    if not looks_like_labels(volume.array):
        raise InputError(f"{label} looks like an intensity image (its values change from voxel "
                         "to voxel), not a label map; pass segmentations, whose labels are "
                         "constant over each structure")


def _whole_numbers(a: np.ndarray) -> bool:
    """Whether every voxel holds a whole number (checked in slabs: no full-size temporaries, and
    an intensity image is told apart at its first slab)."""
    if np.issubdtype(a.dtype, np.integer):
        return True
    if not np.issubdtype(a.dtype, np.floating):
        return False
    step = max(1, (1 << 20) // max(1, a[0].size))
    return all(np.all(np.isfinite(a[i:i + step])) and not np.any(np.mod(a[i:i + step], 1))
               for i in range(0, a.shape[0], step))


def _value_index(a: np.ndarray) -> np.ndarray:
    """Each voxel's whole-number value as a small non-negative int32 (an index of the values)."""
    low, high = a.min(), a.max()
    if float(high) - float(low) >= 2 ** 24:  # huge label numbers: number the values present
        return np.unique(a, return_inverse=True)[1].reshape(a.shape).astype(np.int32)
    index = np.empty(a.shape, np.int32)
    # int32 arithmetic is exact for any integer type here (the differences are below 2^24)
    np.subtract(a, low, out=index, casting="unsafe",
                dtype=np.float64 if np.issubdtype(a.dtype, np.floating) else np.int32)
    return index


def _one_voxel_per_block(a: np.ndarray) -> np.ndarray:
    """``a`` with blocks of k = 2-4 identical slices along an axis (nearest-neighbour
    upsampling) taken once, as a view: an image so enlarged is judged at its own resolution (its
    blocks alone would look like labels), a label map so enlarged still looks like labels."""
    for axis in range(3):
        x = np.moveaxis(a, axis, 0)
        same = np.all(x[1:] == x[:-1], axis=(1, 2))  # slice i equals slice i + 1
        if same.all():
            continue
        for k in (4, 3, 2):  # the largest factor that explains every pair of slices
            start = next((o for o in range(k) if np.all(same[np.arange(same.size) % k != o])),
                         None)
            if start is not None and x.shape[0] >= 2 * k:
                a = np.moveaxis(x[(start + 1) % k::k], 0, axis)
                break
    return a


def label_statistics(array) -> dict | None:
    """How much an image looks like a label map (None: its values are not whole numbers).

    ``same_neighbour``: the fraction of voxels (the background, its most common value, left out)
    equal to their previous voxel along each axis; ``flat_values``: the fraction of its values
    (each held by 20 voxels or more) whose voxels equal their previous voxel more than one time
    in four.  A label map is constant over regions, so both are high; an intensity image, even
    stored as integers, changes from voxel to voxel, and only a few special values are flat (the
    background, a clipped range such as CT air at -1024, padding outside the scanned field).
    ``flat_values`` keeps such an image from passing as labels when those special values cover
    much of it.  Measured values: ``scripts/measure_plausibility.py labels``.
    """
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.view(np.uint8)
    while a.ndim == 3 and a.size > 2 ** 24 and min(a.shape) >= 4:  # as at twice the spacing:
        a = a[::2, ::2, ::2]  # bounded time and memory (labels still score high, measured)
    if a.ndim != 3 or min(a.shape) < 2 or not _whole_numbers(a):
        return None
    a = _one_voxel_per_block(a)
    index = _value_index(a)
    counts = np.bincount(index.ravel())
    background = int(np.argmax(counts))
    same = np.zeros(len(counts))
    equal = 0
    for axis in range(3):
        x = np.moveaxis(index, axis, 0)
        repeated = x[1:][x[1:] == x[:-1]]  # the values of voxels equal to their previous one
        same += np.bincount(repeated, minlength=len(counts))
        equal += repeated.size - int(np.count_nonzero(repeated == background))
    counted = 3 * (index.size - int(counts[background]))  # the edges miss a few: immaterial
    present = counts >= 20
    return {"same_neighbour": min(1.0, equal / counted) if counted else 1.0,
            "flat_values": float(np.mean(same[present] / (3 * counts[present]) > 0.25))
            if present.any() else 1.0}


#: Both statistics of :func:`label_statistics` above this: a label map.  Measured on the sample
#: pair and the brains of ``scripts/fetch_data.py`` (``scripts/measure_plausibility.py labels``,
#: 150 images): label maps and masks at 1-3 mm, also enlarged by nearest neighbour, score at
#: least 0.55 (the smaller statistic); images stored as uint8 or int16, CT-like images and
#: images enlarged by nearest neighbour at most 0.16.
LABELS_ABOVE = 0.4


def looks_like_labels(array) -> bool:
    """Whether an image holds labels (a segmentation or a mask) rather than intensities.

    A look at its middle 64^3 voxels comes first: an image stored as whole numbers is told apart
    there at a fiftieth of the cost (every image of the measurement was), so only what might be a
    label map is looked at whole."""
    a = np.asarray(array)
    if a.ndim == 3:
        middle = label_statistics(a[tuple(slice(max(0, n // 2 - 32), n // 2 + 32)
                                          for n in a.shape)])
        if middle is None or min(middle.values()) < LABELS_ABOVE / 2:
            return False
    stats = label_statistics(a)
    return stats is not None and min(stats.values()) > LABELS_ABOVE


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
                         "the affine step on, give an initial affine, or fix the image origins")


# ---- how much of each image the other one covers ----------------------------------------------
#: Below this share of the fixed image's content inside the moving image's field of view (after
#: the affine), a registration gets a warning: the result holds moving data only where they
#: overlap.  Below REFUSE_COVERED it is refused.  Measured on the sample pair with the moving
#: image cut down (``scripts/measure_plausibility.py overlap``; Dice of the labels in the covered
#: region): 48 and 64 mm cubes (6 %, 11 %) end below the affine alone, a 20 mm slab (22 %) just
#: above it, 40-60 mm slabs, a hemisphere and a front half (42-61 %) well above it, and from 60 %
#: the result there is within 0.005 of the whole pair's.
WARN_COVERED = 0.8
REFUSE_COVERED = 0.15


def _sample_points(grid: Grid, samples: int) -> np.ndarray:
    """A regular lattice of at most ``samples`` voxel positions per axis (voxel indices)."""
    axes = [np.linspace(0, n - 1, min(n, samples)) for n in grid.shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _inside(grid: Grid, ras: np.ndarray) -> np.ndarray:
    ijk = grid.ras_to_voxel(ras)
    return np.all((ijk >= -0.5) & (ijk <= np.array(grid.shape) - 0.5), axis=1)


def _content(volume, mask, ijk: np.ndarray) -> np.ndarray:
    """Which lattice points hold the image's content: inside its mask when it has one, else
    brighter than a tenth of its range above its 1st percentile (not the background)."""
    index = tuple(np.round(ijk).astype(int).T)
    if mask is not None:
        return np.asarray(mask.array)[index] > 0
    values = np.asarray(volume.array)[index].astype(np.float64)
    low, high = np.percentile(values, (1, 99))
    content = values > low + 0.1 * (high - low)
    return content if content.any() else np.ones_like(content)


def coverage(fixed, moving, world_map=None, fixed_mask=None, moving_mask=None,
             samples: int = 32) -> dict:
    """The share of each image's content that lies inside the other's field of view once
    ``world_map`` (fixed RAS -> moving RAS) places them: ``fixed_covered`` (how much of the
    result, on the fixed grid, has moving data) and ``moving_covered``."""
    world_map = np.eye(4) if world_map is None else np.asarray(world_map, dtype=np.float64)
    shares = {}
    for name, image, mask, other, to_other in (
            ("fixed_covered", fixed, fixed_mask, moving, world_map),
            ("moving_covered", moving, moving_mask, fixed, np.linalg.inv(world_map))):
        ijk = _sample_points(image.grid, samples)
        content = _content(image, mask, ijk)
        ras = image.grid.voxel_to_ras(ijk[content])
        inside = _inside(other.grid, ras @ to_other[:3, :3].T + to_other[:3, 3])
        shares[name] = round(float(inside.mean()), 3)
    return shares


def check_coverage(fixed, moving, world_map, fixed_mask=None, moving_mask=None) -> dict:
    """Refuse a pair whose fields of view share too little after the affine; otherwise return
    :func:`coverage` with a ``warning`` (one line) when the moving image covers only part of the
    fixed one."""
    shares = coverage(fixed, moving, world_map, fixed_mask, moving_mask)
    covered = shares["fixed_covered"]
    if covered < REFUSE_COVERED:
        raise InputError(
            f"after the affine alignment only {covered:.0%} of {_label(fixed, None)} lies inside "
            f"the field of view of {_label(moving, None)}: too little is shared for a meaningful "
            "registration; register the partial image as the fixed image (its every point then "
            "has a partner), crop the fixed image to the region both show, or give an initial "
            "affine if the alignment went wrong")
    if covered < WARN_COVERED:
        shares["warning"] = (
            f"only {covered:.0%} of {_label(fixed, None)} lies inside the field of view of "
            f"{_label(moving, None)} after the affine alignment; the result holds moving data "
            "only there (register the partial image as the fixed image to use all of it)")
    return shares
