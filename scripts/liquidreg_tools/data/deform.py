"""Random smooth diffeomorphisms for training pairs: affine jitter composed with the exponential
of a random stationary velocity field.

Displacements are (N, 3, I, J, K) in voxel units of the working grid (the convention of
:mod:`LiquidRegLib.diffeo`), mapping voxel ``x`` to ``x + d(x)``.  The velocity is drawn on a
coarse control grid and upsampled, so it is smooth; scaling and squaring makes its exponential a
diffeomorphism, and an affine with positive determinant keeps the composition one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from LiquidRegLib.diffeo import integrate_velocity, resize_field
from LiquidRegLib.grid import Grid, constant, identity_voxels, to_device
from .synth import gaussian_blur


@dataclass(frozen=True)
class DeformConfig:
    velocity_std_max: float = 2.0     # voxels; per-sample std uniform in [0, max]
    control_spacing: int = 8          # voxels between velocity control points
    rotation_deg: float = 12.0        # per axis, uniform in [-max, max]
    translation_mm: float = 10.0      # per axis, uniform in [-max, max]
    scale_range: tuple = (0.9, 1.1)   # per axis
    shear_max: float = 0.03


def _host_uniform(generator: torch.Generator, low: float, high: float, n: int) -> torch.Tensor:
    """``n`` host draws, uniform in [low, high) (float32 draws, as the validation pairs were made
    with: they are a pure function of the seed)."""
    return (low + (high - low) * torch.rand(n, generator=generator)).double()


def random_velocity(shape, generator, config: DeformConfig, device=None, batch: int = 1,
                    size=None) -> torch.Tensor:
    """Smooth random velocity field (N, 3, *size) in voxel units of a grid of ``shape``.

    Control points sit every ``config.control_spacing`` voxels of ``shape``; the field is
    upsampled to ``size`` (default ``shape``) — the same field, sampled more or less finely.
    """
    coarse = tuple(max(2, int(math.ceil(n / config.control_spacing)) + 1) for n in shape)
    std = to_device(_host_uniform(generator, 0.0, config.velocity_std_max, batch).float(), device)
    # a few thousand host draws (the validation pairs' stream), blurred where they are used
    noise = gaussian_blur(to_device(torch.randn((batch, 3) + coarse, generator=generator), device),
                          0.7)
    # Blurring shrinks the amplitude: rescale so ``std`` is the field's actual spread.
    unit = noise / noise.flatten(1).std(1).clamp_min(1e-8).view(-1, 1, 1, 1, 1)
    return F.interpolate(unit * std.view(-1, 1, 1, 1, 1),
                         size=tuple(size or shape), mode="trilinear", align_corners=True)


def random_affine(generator, config: DeformConfig) -> np.ndarray:
    """4x4 RAS matrix about the origin: rotation, scale, shear, translation (det > 0).

    Its twelve numbers are host draws of ``generator``: the matrix is built on the host."""
    draws = torch.cat([_host_uniform(generator, -config.rotation_deg, config.rotation_deg, 3),
                       _host_uniform(generator, *config.scale_range, 3),
                       _host_uniform(generator, -config.shear_max, config.shear_max, 3),
                       _host_uniform(generator, -config.translation_mm, config.translation_mm, 3),
                       ]).numpy()
    angles, scales, shears, translation = np.deg2rad(draws[:3]), draws[3:6], draws[6:9], draws[9:]
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    shear = np.eye(3)
    shear[np.triu_indices(3, 1)] = shears
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ shear @ np.diag(scales)
    m[:3, 3] = translation
    return m


def voxel_affine(matrix_ras: np.ndarray, grid: Grid) -> np.ndarray:
    """The voxel -> voxel matrix of a RAS affine applied about the grid centre."""
    centre = np.eye(4)
    centre[:3, 3] = grid.center
    return grid.inverse @ centre @ matrix_ras @ np.linalg.inv(centre) @ grid.affine


def random_deformation(grid: Grid, generator, config: DeformConfig = DeformConfig(),
                       device=None) -> torch.Tensor:
    """One random diffeomorphic displacement (1, 3, I, J, K): x -> A(x + s(x)), ``s`` the
    exponential of a random SVF and ``A`` a random affine.

    The SVF is integrated at the resolution of its control grid's double (it is smooth there),
    then upsampled; the affine is composed analytically (A(x + s) = Ax + A_lin s), so the only
    full-resolution work is one trilinear upsampling.
    """
    coarse = tuple(max(8, int(math.ceil(2 * n / config.control_spacing))) for n in grid.shape)
    velocity = random_velocity(grid.shape, generator, config, device, size=coarse)
    # Velocity is in voxels of the full grid; express it in coarse voxels to integrate there.
    to_coarse = constant(tuple((c - 1) / (n - 1) for c, n in zip(coarse, grid.shape)),
                         velocity.device, velocity.dtype).view(1, 3, 1, 1, 1)
    svf = resize_field(integrate_velocity(velocity * to_coarse), grid.shape)
    m = to_device(torch.as_tensor(voxel_affine(random_affine(generator, config), grid),
                                  dtype=torch.float32), svf.device)
    ident = identity_voxels(grid.shape, svf.device, torch.float32).permute(3, 0, 1, 2)[None]
    linear = torch.einsum("ab,nbijk->naijk", m[:3, :3], ident + svf)
    return linear + m[:3, 3].view(1, 3, 1, 1, 1) - ident
