"""Affine pre-alignment: the 4x4 RAS matrix taking each fixed point to its moving point.

Why it is built this way:

* **Similarity: mutual information** (Mattes-style, Gaussian Parzen windows, 32 bins) over a set
  of fixed points.  MI does not care about intensity scale, non-linear contrast differences or
  modality (T1 vs T2), where global NCC does; on points it costs O(points x bins), so the finest
  level stays cheap, whereas local NCC needs a dense resample and box filters every iteration.
  It is also what ANTs and elastix use for their affine stages.
* **Pyramid by box averaging**: each image is averaged over integer blocks of voxels to about
  8, 4 and 2 mm in its own voxel order, so anisotropic, oblique or LPS-stored files need no
  resampling and nothing is interpolated twice; the fixed image's block centres are the points,
  the moving image is read at the mapped points with :func:`grid.sample`.
* **Parametrisation**: ``A = A0 @ D(p)`` with ``D(x) = c + (I + L/r)(x - c) + t``, ``c`` the fixed
  image's centre of mass and ``r`` its radius of gyration.  Every one of the 12 parameters is then
  "millimetres of motion at the edge of the head", so one Adam learning rate suits them all.
* **Start**: centres of mass, then the principal-axes rotations closest to identity (scanner
  images are rarely more than ~45 degrees apart); each candidate gets a short run at the coarsest
  level and the most similar one goes on.  A given ``initial`` matrix is the only candidate.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .grid import Grid, identity_voxels, resample, sample, voxel_to_world
from .progress import check, report

LEVELS_MM = (8.0, 4.0, 2.0)     # coarse to fine
ITERATIONS = (80, 50, 30)       # Adam steps per level
LEARNING_RATE_MM = (3.0, 1.5, 0.75)
FINAL_LR_FRACTION = 0.1         # exponential decay within a level: big moves first, then settle
MAX_POINTS = 20000              # fixed points per level (a regular subsample beyond that)
BINS = 32
MAX_START_ANGLE_DEG = 50.0
START_CANDIDATES = 3            # principal-axes rotations tried besides the pure translation


@dataclass
class _Level:
    """One pyramid level of one image: intensities in [0, 1], an optional mask, and its grid."""

    image: torch.Tensor            # (1, 1, I, J, K)
    mask: torch.Tensor | None      # (I, J, K) bool
    grid: Grid


def affine_register(fixed, moving, *, initial=None, fixed_mask=None, moving_mask=None,
                    device="cpu", progress=None, cancel=None) -> np.ndarray:
    """Return the 4x4 RAS matrix ``A`` with ``A @ fixed_point = moving_point``.

    ``fixed``/``moving`` are any objects with ``.array`` ([i, j, k]) and ``.grid``; masks are
    arrays on their image's grid or objects with ``.array``/``.grid`` (any grid).  Resample with
    ``grid.resample(moving.array, moving.grid, fixed.grid, world_map=A)``.
    """
    device = torch.device(device)
    start = None if initial is None else _checked_initial(initial)
    fixed_levels = _pyramid(fixed, fixed_mask, device, "fixed")
    moving_levels = _pyramid(moving, moving_mask, device, "moving")

    points = [_fixed_points(level) for level in fixed_levels]
    centre, radius = _centre_and_radius(*points[1])
    candidates = [start] if start is not None else _start_candidates(points[1], moving_levels[1])

    n_levels = len(LEVELS_MM)
    best = None
    for index in range(n_levels):
        report(progress, "affine", index, n_levels, f"{LEVELS_MM[index]:g} mm")
        iterations = ITERATIONS[index] // (2 if index == 0 and len(candidates) > 1 else 1)
        results = [_optimise(points[index], moving_levels[index], a0, centre, radius,
                             iterations, LEARNING_RATE_MM[index], cancel)
                   for a0 in (candidates if best is None else [best])]
        best, loss = min(results, key=lambda r: r[1])
        if index == 0 and len(candidates) > 1:  # finish the coarse level for the winner
            best, loss = _optimise(points[0], moving_levels[0], best, centre, radius,
                                   ITERATIONS[0] - iterations, LEARNING_RATE_MM[0], cancel)
    report(progress, "affine", n_levels, n_levels, "done", mutual_information=-loss)
    return best


# ---- inputs ------------------------------------------------------------------------------------
def _checked_initial(initial) -> np.ndarray:
    m = np.asarray(initial, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-6:
        raise InputError("initial affine must be a finite, invertible 4x4 RAS matrix (fixed point "
                         "-> moving point); fix: pass such a matrix or leave it out")
    return m


def _image_tensor(volume, name: str, device) -> torch.Tensor:
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"{name} image must be 3-D, got shape {array.shape}; "
                         "fix: pass a single 3-D volume")
    return torch.from_numpy(array.astype(np.float32, copy=False)).to(device)[None, None]


def _mask_tensor(mask, image_grid: Grid, name: str, device) -> torch.Tensor | None:
    """The mask as float (1, 1, I, J, K) on the image's grid (resampled if it has its own)."""
    if mask is None:
        return None
    if hasattr(mask, "grid"):
        array = np.asarray(mask.array)
        if mask.grid != image_grid:
            array = resample((array > 0).astype(np.uint8), mask.grid, image_grid, order="nearest")
    else:
        array = np.asarray(mask)
        if array.shape != image_grid.shape:
            raise InputError(f"{name} mask has shape {array.shape} but its image has "
                             f"{image_grid.shape}; fix: pass a mask on the image's grid")
    tensor = torch.from_numpy(np.ascontiguousarray(array > 0)).to(device, torch.float32)
    if not tensor.any():
        raise InputError(f"{name} mask is empty (or does not overlap its image); "
                         "fix: pass a mask with foreground voxels, or no mask")
    return tensor[None, None]


def _pyramid(volume, mask, device, name: str) -> list[_Level]:
    """Box-averaged levels at about LEVELS_MM, coarse to fine, intensities scaled to [0, 1]."""
    image = _image_tensor(volume, name, device)
    weight = _mask_tensor(mask, volume.grid, name, device)
    grid = volume.grid
    levels = []
    for spacing in sorted(LEVELS_MM):
        factors = [max(1, int(spacing / s + 0.5)) for s in grid.spacing]
        if max(factors) > 1:
            image = F.avg_pool3d(image, factors, factors, ceil_mode=True)
            weight = None if weight is None else F.avg_pool3d(weight, factors, factors,
                                                              ceil_mode=True)
            grid = _pooled_grid(grid, factors)
        levels.append(_Level(image, None if weight is None else weight[0, 0] >= 0.5, grid))
    if not torch.isfinite(levels[0].image).all():  # averaging keeps NaN/Inf: check the small copy
        raise InputError(f"{name} image contains NaN or infinite values; "
                         "fix: replace them (e.g. with 0) before registering")
    levels.reverse()
    lo, hi = _intensity_range(levels[1], name)
    for level in levels:
        level.image = ((level.image - lo) / (hi - lo)).clamp(0.0, 1.0)
    return levels


def _pooled_grid(grid: Grid, factors) -> Grid:
    """Grid of an array averaged over blocks of ``factors`` voxels (block centres)."""
    block = np.diag([*map(float, factors), 1.0])
    block[:3, 3] = (np.asarray(factors) - 1) / 2.0
    shape = [math.ceil(n / f) for n, f in zip(grid.shape, factors)]
    return Grid(tuple(shape), grid.affine @ block)


def _intensity_range(level: _Level, name: str) -> tuple[float, float]:
    values = level.image[0, 0]
    values = values[level.mask] if level.mask is not None else values.flatten()
    lo, hi = torch.quantile(values.float(), torch.tensor([0.005, 0.995], device=values.device))
    if not hi > lo:
        raise InputError(f"{name} image is constant; fix: check that the right file was loaded")
    return float(lo), float(hi)


# ---- fixed points and moments ---------------------------------------------------------------
def _fixed_points(level: _Level) -> tuple[torch.Tensor, torch.Tensor]:
    """World positions (P, 3) and intensities (P,) of the fixed points of one level."""
    voxels = identity_voxels(level.grid.shape, level.image.device)
    values = level.image[0, 0]
    if level.mask is not None:
        voxels, values = voxels[level.mask], values[level.mask]
    voxels, values = voxels.reshape(-1, 3), values.reshape(-1)
    if len(values) > MAX_POINTS:  # a fixed random subset (reproducible), in memory order
        generator = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(values), generator=generator)[:MAX_POINTS].sort().values
        keep = keep.to(values.device)
        voxels, values = voxels[keep], values[keep]
    return voxel_to_world(voxels.double(), level.grid.affine).float(), values


def _otsu(values: torch.Tensor, bins: int = 64) -> float:
    hist = torch.histc(values, bins, 0.0, 1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0) / w0.clamp(min=1)
    m1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp(min=1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(between.argmax())])


def _moments(points: torch.Tensor, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centre of mass and covariance over the Otsu foreground."""
    w = (values * (values > _otsu(values))).double()
    if w.sum() <= 0:
        w = values.double() + 1e-12
    p = points.double()
    centre = (w[:, None] * p).sum(0) / w.sum()
    d = p - centre
    cov = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / w.sum()
    return centre.cpu().numpy(), cov.cpu().numpy()


def _centre_and_radius(points, values) -> tuple[np.ndarray, float]:
    centre, cov = _moments(points, values)
    return centre, float(np.sqrt(np.trace(cov)))


def _moving_points(level: _Level) -> tuple[torch.Tensor, torch.Tensor]:
    voxels = identity_voxels(level.grid.shape, level.image.device).reshape(-1, 3)
    values = level.image.reshape(-1)
    if level.mask is not None:
        keep = level.mask.reshape(-1)
        voxels, values = voxels[keep], values[keep]
    return voxel_to_world(voxels.double(), level.grid.affine).float(), values


def _start_candidates(fixed_points, moving_level: _Level) -> list[np.ndarray]:
    """Centre-of-mass translation plus principal-axes rotations close to identity."""
    cf, cov_f = _moments(*fixed_points)
    cm, cov_m = _moments(*_moving_points(moving_level))
    uf = np.linalg.eigh(cov_f)[1]
    um = np.linalg.eigh(cov_m)[1]
    rotations = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            p = np.zeros((3, 3))
            p[np.arange(3), perm] = signs
            r = um @ p @ uf.T
            if np.linalg.det(r) < 0:
                continue
            angle = math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)))
            if angle <= MAX_START_ANGLE_DEG:
                rotations.append((angle, r))
    rotations.sort(key=lambda ar: ar[0])
    candidates = []
    for r in [np.eye(3)] + [r for _, r in rotations[:START_CANDIDATES]]:
        m = np.eye(4)
        m[:3, :3] = r
        m[:3, 3] = cm - r @ cf
        candidates.append(m)
    return candidates


# ---- similarity and optimisation ------------------------------------------------------------
def _fixed_bins(values: torch.Tensor) -> torch.Tensor:
    """Hard histogram bin of each fixed intensity (Mattes: the fixed side needs no smoothing)."""
    return (values * BINS).long().clamp(0, BINS - 1)


def _mutual_information(fixed_bins, moving_values, weights) -> torch.Tensor:
    """MI of the joint histogram, moving side smoothed by a cubic B-spline Parzen window.

    Each point adds to 4 neighbouring moving bins only, so this costs O(points), and the B-spline
    makes the histogram (hence MI) twice differentiable in the moving intensities.
    """
    u = 1.0 + moving_values * (BINS - 3)
    base = u.detach().floor()
    t = u - base
    spline = torch.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4,
                          -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3], dim=1) / 6
    moving_bins = (base.long()[:, None] + torch.arange(-1, 3, device=u.device)).clamp(0, BINS - 1)
    index = fixed_bins[:, None] * BINS + moving_bins
    joint = torch.zeros(BINS * BINS, device=u.device, dtype=u.dtype)
    joint = joint.index_add(0, index.reshape(-1), (spline * weights[:, None]).reshape(-1))
    joint = joint.view(BINS, BINS) / joint.sum().clamp(min=1e-12)
    pf = joint.sum(1, keepdim=True)
    pm = joint.sum(0, keepdim=True)
    eps = 1e-10
    return (joint * (torch.log(joint + eps) - torch.log(pf + eps) - torch.log(pm + eps))).sum()


def _optimise(fixed_points, moving: _Level, a0: np.ndarray, centre, radius: float,
              iterations: int, lr: float, cancel) -> tuple[np.ndarray, float]:
    """Adam on the 12 parameters of ``D``; returns (A0 @ D, final loss)."""
    points, values = fixed_points
    device = points.device
    fixed_bins = _fixed_bins(values)
    to_voxel = torch.as_tensor(moving.grid.inverse @ a0, dtype=torch.float32, device=device)
    c = torch.as_tensor(centre, dtype=torch.float32, device=device)
    local = points - c
    shape = torch.as_tensor(moving.grid.shape, dtype=torch.float32, device=device)
    params = torch.zeros(12, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([params], lr=lr)
    mask = None if moving.mask is None else moving.mask[None, None].float()
    loss = None
    for step in range(iterations + 1):
        check(cancel)
        linear = torch.eye(3, device=device) + params[3:].view(3, 3) / radius
        world = local @ linear.T + c + params[:3]
        voxel = world @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        with torch.no_grad():
            inside = ((voxel >= 0) & (voxel <= shape - 1)).all(-1).float()
            if mask is not None:
                inside = inside * sample(mask, voxel[None, :, None, None], "nearest")[0, 0, :, 0, 0]
        warped = sample(moving.image, voxel[None, :, None, None])[0, 0, :, 0, 0]
        loss = -_mutual_information(fixed_bins, warped, inside)
        if step == iterations:
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.param_groups[0]["lr"] = lr * FINAL_LR_FRACTION ** (step / max(iterations - 1, 1))
        optimiser.step()
    d = np.eye(4)
    p = params.detach().double().cpu().numpy()
    d[:3, :3] += p[3:].reshape(3, 3) / radius
    d[:3, 3] = centre + p[:3] - d[:3, :3] @ centre
    return a0 @ d, float(loss.detach())
