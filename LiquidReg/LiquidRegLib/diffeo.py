"""Velocity fields to diffeomorphisms: scaling and squaring, warping, composition, Jacobians.

Fields here are torch tensors of shape (N, 3, I, J, K) in *voxel units of their own grid*, with
components in (i, j, k) order.  A displacement ``d`` maps voxel ``x`` to ``x + d(x)``.  The
inverse of ``exp(v)`` is ``exp(-v)``.  Geometry in millimetres lives in :mod:`grid`; the only
bridge is :func:`jacobian_determinant_ras` / :func:`voxel_to_ras_vectors`.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .grid import (Grid, constant, identity_voxels, mapped_voxels, normalising_scale,
                   normalized_coordinates, sample, sample_at)

#: Minimum number of squarings; 2^7 = 128 sub-steps keep each step far below a voxel.
MIN_SQUARINGS = 7


@functools.lru_cache(maxsize=8)
def _identity(shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return identity_voxels(shape, device, dtype)


@functools.lru_cache(maxsize=8)
def _identity_grid(shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``grid_sample`` coordinates of every voxel of ``shape``, (I, J, K, 3)."""
    return mapped_voxels(shape, normalized_coordinates(shape), device, dtype)


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` at ``x + disp(x)``; both on the same grid.

    Use ``padding_mode="border"`` for displacement fields (composition) and "zeros" for images.
    """
    ident = _identity(tuple(disp.shape[2:]), disp.device, disp.dtype)
    points = ident + disp.permute(0, 2, 3, 4, 1)
    return sample(image, points, mode=mode, padding_mode=padding_mode)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> outer(inner(x))``: ``inner + outer(x + inner)``."""
    return inner + warp(outer, inner, padding_mode="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = MIN_SQUARINGS) -> torch.Tensor:
    """exp(v) by scaling and squaring with ``steps`` (>= 7) squarings; border-padded compositions."""
    per_axis = normalising_scale(velocity.shape[2:])
    disp = _squarings(velocity, steps)
    return torch.stack([disp[..., 2 - axis] / per_axis[axis] for axis in range(3)], dim=1)


def exp_grid(velocity: torch.Tensor, steps: int = MIN_SQUARINGS) -> torch.Tensor:
    """``grid_sample`` coordinates of ``x + exp(v)(x)`` for every voxel ``x``: (N, I, J, K, 3).

    What warping by exp(v) needs, without converting the displacement back to voxel units."""
    return _identity_grid(tuple(velocity.shape[2:]), velocity.device, velocity.dtype) + \
        _squarings(velocity, steps)


def _squarings(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """exp(v) - identity in ``grid_sample`` units, channels last ((k, j, i) order).

    Scaling and squaring works in the sampler's own units, so a squaring is one sampling and two
    additions, with no unit conversions or host copies in the loop (each would stall a GPU)."""
    if steps < MIN_SQUARINGS:
        raise ValueError(f"scaling and squaring needs at least {MIN_SQUARINGS} steps, got {steps}")
    shape = tuple(velocity.shape[2:])
    identity = _identity_grid(shape, velocity.device, velocity.dtype)
    per_axis = normalising_scale(shape)
    disp = torch.stack([velocity[:, axis] * (per_axis[axis] / 2 ** steps)
                        for axis in (2, 1, 0)], dim=-1)
    for _ in range(steps):
        sampled = sample_at(disp.permute(0, 4, 1, 2, 3), identity + disp, padding_mode="border")
        disp = disp + sampled.permute(0, 2, 3, 4, 1)
    return disp


def exp_velocity(velocity: torch.Tensor, shape=None, steps: int = MIN_SQUARINGS) -> torch.Tensor:
    """exp(v) integrated on the velocity's own (coarser) grid, then resampled to ``shape``.

    Integrating an SVF at half resolution is ~10x cheaper than on the working grid and loses
    little: the field is smooth at that scale.
    """
    disp = integrate_velocity(velocity, steps)
    return disp if shape is None else resize_field(disp, shape)


def resize_field(field: torch.Tensor, shape) -> torch.Tensor:
    """Resample a voxel-unit field to another shape of the same field of view, rescaling vectors.

    With align_corners=True geometry, voxel i of size n sits at i/(n-1) of the extent, so vectors
    scale by (n_new - 1)/(n_old - 1) per axis.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(field.shape[2:]) == shape:
        return field
    out = torch.nn.functional.interpolate(field, size=shape, mode="trilinear", align_corners=True)
    scale = tuple((n - 1) / max(o - 1, 1) for n, o in zip(shape, field.shape[2:]))
    return out * constant(scale, out.device, out.dtype).view(1, 3, 1, 1, 1)


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """det(I + grad d) of an (N, 3, I, J, K) voxel-unit displacement: (N, 1, I, J, K).

    Central differences inside, one-sided at the border.  For a map between two grids with the
    same voxel-to-world matrix this is also the physical Jacobian determinant.
    """
    grads = torch.gradient(disp, dim=(2, 3, 4))  # d/di, d/dj, d/dk, each (N, 3, I, J, K)
    m = [[grads[col][:, row] + (1.0 if row == col else 0.0) for col in range(3)]
         for row in range(3)]
    det = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
           - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
           + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    return det.unsqueeze(1)


def voxel_to_ras_vectors(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(N, 3, I, J, K) voxel-unit displacement on ``grid`` -> (N, I, J, K, 3) RAS mm vectors."""
    m = torch.tensor(grid.affine[:3, :3], dtype=disp.dtype, device=disp.device)
    return disp.permute(0, 2, 3, 4, 1) @ m.T


def ras_to_voxel_vectors(displacement_ras: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(..., I, J, K, 3) RAS mm vectors on ``grid`` -> (N, 3, I, J, K) voxel units."""
    inv = torch.as_tensor(np.linalg.inv(grid.affine[:3, :3]), dtype=displacement_ras.dtype,
                          device=displacement_ras.device)
    vox = displacement_ras @ inv.T
    if vox.dim() == 4:
        vox = vox[None]
    return vox.permute(0, 4, 1, 2, 3)


def jacobian_determinant_ras(displacement_ras: torch.Tensor, grid: Grid) -> torch.Tensor:
    """det of d(x + u(x))/dx for an (I, J, K, 3) RAS mm displacement on ``grid``: (I, J, K).

    In voxel coordinates the map is ijk -> ijk + A^-1 u, whose Jacobian determinant equals the
    physical one (the A and A^-1 cancel), so any orientation or spacing is handled exactly.
    """
    return jacobian_determinant(ras_to_voxel_vectors(displacement_ras, grid))[0, 0]
