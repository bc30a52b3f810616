"""Bring a pair onto the network's working grid, the same way for registration, fine-tuning and
training, so the network always sees what it was trained on: RAS-ordered isotropic voxels
covering the fixed field of view, moving resampled through the affine, intensities in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .grid import Grid, resampled, to_device


def percentile_normalise(image: torch.Tensor, mask: torch.Tensor | None = None,
                         low: float = 0.5, high: float = 99.5) -> torch.Tensor:
    """Robust rescale to [0, 1]: percentiles of the foreground, so scanner scaling doesn't matter.

    The one intensity policy of the network's inputs, for registration and for training alike
    (training images go through it too, so the network never sees another scaling).  The
    foreground is ``mask`` if given, else every voxel above the image minimum; percentiles come
    from a strided subsample of at most ~500k voxels (fast, and deterministic).  The result is
    float32, made in one new array (a full-resolution volume is large).
    """
    a = image.float()
    values = a[mask > 0] if mask is not None else a[a > a.min()]
    if values.numel() == 0:
        values = a.flatten()
    values = values[:: max(1, values.numel() // 500_000)]
    lo, hi = torch.quantile(values, torch.tensor([low / 100, high / 100], device=a.device,
                                                 dtype=values.dtype)).tolist()
    if hi <= lo:
        hi = lo + 1.0
    out = a.sub(lo)
    return out.div_(hi - lo).clamp_(0.0, 1.0)


def normalise_intensity(array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """:func:`percentile_normalise` of a numpy array (float32)."""
    return percentile_normalise(torch.as_tensor(np.asarray(array, dtype=np.float32)),
                                None if mask is None else torch.as_tensor(np.asarray(mask))).numpy()


@dataclass
class WorkingPair:
    """A pair on the working grid, as (1, 1, I, J, K) tensors.  ``moving_unaligned``: the moving
    image without the affine (what "before registration" compares), when asked for."""
    grid: Grid
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None
    moving_unaligned: torch.Tensor | None = None


def working_grid(fixed_grid: Grid, spacing_mm: float, divisor: int) -> Grid:
    return fixed_grid.canonical_working_grid(spacing_mm, multiple=divisor)


def normalised_image(volume, mask=None, device="cpu") -> torch.Tensor:
    """``volume`` under the one intensity policy (:func:`percentile_normalise`; ``mask`` on the
    image's own grid), as an (I, J, K) float32 tensor on ``device``: the full-resolution image is
    sent to the device once and normalised there."""
    if mask is not None and mask.grid != volume.grid:
        raise ValueError("the mask must lie on its image's grid; pass it through validate.check_mask")

    def on_device(array):
        return to_device(torch.as_tensor(np.asarray(array, dtype=np.float32)), device)
    return percentile_normalise(on_device(volume.array), None if mask is None else on_device(mask.array))


def working_image(volume, grid: Grid, world_map=None, mask=None, device="cpu") -> torch.Tensor:
    """One image, intensity-normalised (inside ``mask``, on the image's own grid: see
    ``validate.check_mask``), on ``grid``: (1, 1, I, J, K)."""
    return resampled(normalised_image(volume, mask, device), volume.grid, grid,
                     world_map=world_map)[None, None]


def working_mask(mask, grid: Grid, world_map=None, device="cpu") -> torch.Tensor | None:
    if mask is None:
        return None
    array = to_device(torch.as_tensor(np.asarray(mask.array, dtype=np.float32)), device)
    return (resampled(array, mask.grid, grid, world_map=world_map) > 0.5).float()[None, None]


def to_working(fixed, moving, world_map: np.ndarray, grid: Grid, *, fixed_mask=None,
               moving_mask=None, device="cpu", unaligned: bool = False) -> WorkingPair:
    """Resample both volumes onto ``grid`` (moving through ``world_map``: fixed RAS -> moving RAS).
    ``unaligned``: also the moving image without ``world_map``, from the same normalisation."""
    fixed_image = working_image(fixed, grid, None, fixed_mask, device)  # one full image at a time
    normalised = normalised_image(moving, moving_mask, device)
    return WorkingPair(grid, fixed_image,
                       resampled(normalised, moving.grid, grid, world_map=world_map)[None, None],
                       working_mask(fixed_mask, grid, None, device),
                       working_mask(moving_mask, grid, world_map, device),
                       resampled(normalised, moving.grid, grid)[None, None] if unaligned else None)
