"""Bring a pair onto the network's working grid, the same way for registration, fine-tuning and
training, so the network always sees what it was trained on: RAS-ordered isotropic voxels
covering the fixed field of view, moving resampled through the affine, intensities in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .grid import Grid, resample


def normalise_intensity(array: np.ndarray, mask: np.ndarray | None = None,
                        low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Robust rescale to [0, 1]: percentiles of the foreground, so scanner scaling doesn't matter."""
    a = np.asarray(array, dtype=np.float32)
    values = a[mask > 0] if mask is not None else a[a > a.min()]
    if values.size == 0:
        values = a.ravel()
    lo, hi = np.percentile(values[:: max(1, values.size // 500_000)], [low, high])  # subsampled: fast
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class WorkingPair:
    """A pair on the working grid, as (1, 1, I, J, K) tensors."""
    grid: Grid
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None


def working_grid(fixed_grid: Grid, spacing_mm: float, divisor: int) -> Grid:
    return fixed_grid.canonical_working_grid(spacing_mm, multiple=divisor)


def to_working(fixed, moving, world_map: np.ndarray, grid: Grid, *, fixed_mask=None,
               moving_mask=None, device="cpu") -> WorkingPair:
    """Resample both volumes onto ``grid`` (moving through ``world_map``: fixed RAS -> moving RAS)."""
    def tensor(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)[None, None]

    f = resample(normalise_intensity(fixed.array, _array(fixed_mask)), fixed.grid, grid, device=device)
    m = resample(normalise_intensity(moving.array, _array(moving_mask)), moving.grid, grid,
                 world_map=world_map, device=device)
    fm = mm = None
    if fixed_mask is not None:
        fm = tensor(resample(fixed_mask.array.astype(np.float32), fixed_mask.grid, grid,
                             device=device) > 0.5)
    if moving_mask is not None:
        mm = tensor(resample(moving_mask.array.astype(np.float32), moving_mask.grid, grid,
                             world_map=world_map, device=device) > 0.5)
    return WorkingPair(grid, tensor(f), tensor(m), fm, mm)


def _array(volume):
    return None if volume is None else volume.array
