"""Affine pre-alignment: the 4x4 RAS matrix taking each fixed point to its moving point.

Why it is built this way:

* **Similarity: mutual information** (Mattes: hard fixed bins, cubic B-spline Parzen window on
  the moving side, 32 bins) over a set of fixed points.  MI does not care about intensity scale,
  non-linear contrast differences or modality (T1 vs T2), where global NCC does; on points it
  costs O(points), so even the finest level is cheap, whereas local NCC needs a dense resample
  and box filters every iteration.  ANTs and elastix use the same metric for their affine stages.
* **Pyramid by box averaging**: each image is averaged over integer blocks of its own voxels to
  about 8, 4 and 2 mm (inside its mask, if any).  Anisotropic, oblique or LPS-stored files need no
  resampling onto a working grid, and the 1 mm volumes are read once.  Fixed points are random
  positions in the fixed blocks, the moving image is read at the mapped points, both by trilinear
  interpolation (:func:`grid.sample`), so both sides are blurred alike and the optimum is unbiased.
* **Parametrisation**: ``A = A0 @ D(p)`` with ``D(x) = c + expm(M/r)(x - c) + t``, ``c`` the fixed
  image's centre of mass and ``r`` its radius of gyration.  Every one of the 12 parameters is then
  "millimetres of motion at the edge of the head", so one Adam learning rate suits them all, and
  the exponential makes a rotation a rotation all the way (no stretching on the way to 45
  degrees).  The coarsest level fits rotation and isotropic scale only, so shear cannot stand in
  for a rotation there; 4 and 2 mm fit all 12.
* **Start**: centres of mass, plus the principal-axes poses closest to identity (eigenvectors
  have no sign, and no order when a head is nearly round in some plane); each candidate gets a
  short run at the coarsest level and the most similar one goes on.  A given ``initial`` matrix
  is the only candidate.  Measured capture range: 60-70 degrees about any axis.
* **Too few points** (a small field of view or mask) make MI noisy and let it rise by sliding the
  images apart; levels with fewer than ``MIN_POINTS`` are skipped.
* **Points outside the moving field of view (or mask) are left out** of the histogram rather than
  read as background, so a moving scan that stops mid-head is not pulled towards its edge.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .grid import Grid, identity_voxels, sample, voxel_to_world
from .progress import check, report
from .validate import mask_on_grid

LEVELS_MM = (8.0, 4.0, 2.0)     # coarse to fine
ITERATIONS = (40, 30, 30)       # Adam steps per level
SIMILARITY_LEVELS = 1           # coarsest levels that fit rotation + isotropic scale only
SCREEN_ITERATIONS = 25          # coarse-level steps each start candidate gets before the choice
SCREEN_POINTS = 4000            # ... on this many points
LEARNING_RATE_MM = (3.0, 1.5, 0.75)
FINAL_LR_FRACTION = 0.1         # exponential decay within a level: big moves first, then settle
ADAM_BETAS = (0.9, 0.999)
MAX_POINTS = 15000              # fixed points per level (a fixed random subset beyond that)
MIN_POINTS = 1000               # levels with fewer fixed or moving points are skipped: MI from so
                                # few samples is noisy, and sliding the images apart raises it
BINS = 32
START_CANDIDATES = 2            # principal-axes rotations (closest to identity) tried besides
                                # the pure centre-of-mass translation


@dataclass
class _Level:
    """One pyramid level of one image: intensities in [0, 1], an optional mask, and its grid."""

    image: torch.Tensor            # (1, 1, I, J, K)
    mask: torch.Tensor | None      # (1, 1, I, J, K) float, 1 where at least half the block is in
    grid: Grid


def affine_register(fixed, moving, *, initial=None, fixed_mask=None, moving_mask=None,
                    device="cpu", progress=None, cancel=None) -> np.ndarray:
    """Return the 4x4 RAS matrix ``A`` with ``A @ fixed_point = moving_point``.

    ``fixed``/``moving`` are any objects with ``.array`` ([i, j, k]) and ``.grid``; masks are
    arrays on their image's grid or objects with ``.array``/``.grid`` (any grid).  Resample with
    ``grid.resample(moving.array, moving.grid, fixed.grid, world_map=A)``.
    """
    with _one_thread():
        return _register(fixed, moving, initial, fixed_mask, moving_mask, torch.device(device),
                         progress, cancel)


def _register(fixed, moving, initial, fixed_mask, moving_mask, device, progress, cancel):
    start = None if initial is None else _checked_initial(initial)
    fixed_levels = _pyramid(fixed, fixed_mask, device, "fixed")
    moving_levels = _pyramid(moving, moving_mask, device, "moving")

    points = [_level_points(level, MAX_POINTS, jitter=True) for level in fixed_levels]
    # a small image (or mask) has too few blocks at the coarse levels: start finer
    levels = [i for i, level in enumerate(moving_levels)
              if min(len(points[i][1]), _voxel_count(level)) >= MIN_POINTS]
    if not levels:
        raise InputError(f"too little to align: fewer than {MIN_POINTS} voxels of "
                         f"{LEVELS_MM[-1]:g} mm in an image (or inside its mask); "
                         "fix: pass larger images or masks")
    moments = levels[-2] if len(levels) > 1 else levels[-1]  # 4 mm: fine enough, and cheap
    centre, radius = _centre_and_radius(*points[moments])
    candidates = ([start] if start is not None
                  else _start_candidates(points[moments], moving_levels[moments]))

    first = levels[0]
    if len(candidates) > 1:
        report(progress, "affine", 0, len(levels),
               f"choosing among {len(candidates)} starting poses")
        subset = tuple(p[:: max(1, len(p) // SCREEN_POINTS)] for p in points[first])
        screened = [_optimise(subset, moving_levels[first], a0, centre, radius, SCREEN_ITERATIONS,
                              LEARNING_RATE_MM[first], cancel, similarity=True)
                    for a0 in candidates]
        candidates = [min(screened, key=lambda result: result[1])[0]]
    best = candidates[0]
    for step, index in enumerate(levels):
        report(progress, "affine", step, len(levels), f"{LEVELS_MM[index]:g} mm")
        best, loss = _optimise(points[index], moving_levels[index], best, centre, radius,
                               ITERATIONS[index], LEARNING_RATE_MM[index], cancel,
                               similarity=step < SIMILARITY_LEVELS)
    report(progress, "affine", len(levels), len(levels), "done", mutual_information=-loss)
    return best


@contextmanager
def _one_thread():
    """Run on one CPU thread, restoring the caller's setting afterwards.

    Apart from one box average of each volume, everything here works on ~15k points: handing
    such small ops to a second thread saves little, and when the machine is busy a descheduled
    helper thread stalls every op (measured 2-5x slower on a loaded 2-core machine, even for the
    box averages).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    """The mask as float (1, 1, I, J, K) on its image's grid (resampled if it has its own grid)."""
    if mask is None:
        return None
    if hasattr(mask, "grid"):
        array = mask_on_grid(mask, image_grid)
    else:
        array = np.asarray(mask) > 0
        if array.shape != image_grid.shape:
            raise InputError(f"{name} mask has shape {array.shape} but its image has "
                             f"{image_grid.shape}; fix: pass a mask on the image's grid")
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, torch.float32)[None, None]


def _ras_order(tensor: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A (1, 1, I, J, K) volume with its axes in RAS order (``grid.ras_ordered()``)."""
    order = grid.ras_axes()
    if order is None:
        return tensor
    perm, flips = order
    tensor = tensor.permute(0, 1, *(2 + axis for axis in perm))
    flipped = [2 + r for r in range(3) if flips[r]]
    return torch.flip(tensor, flipped) if flipped else tensor


def _pyramid(volume, mask, device, name: str) -> list[_Level]:
    """Box-averaged levels at about LEVELS_MM, coarse to fine, intensities scaled to [0, 1].

    The blocks are taken on the RAS-ordered grid, so they start at the same corner of the world
    whatever order the file stores its voxels in (RAS, LPS, LIP...): the same image always gives
    the same pyramid, hence the same affine.  With a mask, each block is the average of its
    voxels inside the mask only, so whatever the mask leaves out (an artefact, a lesion) does not
    bleed into the blocks along its border.
    """
    image = _ras_order(_image_tensor(volume, name, device), volume.grid)
    weight = _mask_tensor(mask, volume.grid, name, device)
    if weight is not None:
        weight = _ras_order(weight, volume.grid)
    grid = volume.grid.ras_ordered()
    levels = []
    for spacing in sorted(LEVELS_MM):
        factors = [max(1, int(spacing / s + 0.5)) for s in grid.spacing]
        if max(factors) > 1:
            if weight is None:
                image = F.avg_pool3d(image, factors, factors, ceil_mode=True)
            else:
                total = F.avg_pool3d(image * weight, factors, factors, ceil_mode=True)
                weight = F.avg_pool3d(weight, factors, factors, ceil_mode=True)
                image = torch.where(weight > 0, total / weight.clamp(min=1e-6), 0.0)
            grid = grid.pooled(factors)
        levels.append(_Level(image, None if weight is None else (weight >= 0.5).float(), grid))
    if not torch.isfinite(levels[0].image).all():  # averaging keeps NaN/Inf: check the small copy
        raise InputError(f"{name} image contains NaN or infinite values; "
                         "fix: replace them (e.g. with 0) before registering")
    lo, hi = _intensity_range(levels[0], name)
    levels.reverse()
    for level in levels:
        level.image = ((level.image - lo) / (hi - lo)).clamp(0.0, 1.0)
    return levels


def _voxel_count(level: _Level) -> int:
    return level.image.numel() if level.mask is None else int(level.mask.sum())


def _intensity_range(level: _Level, name: str) -> tuple[float, float]:
    """0.5 and 99.5 percentiles (inside the mask) of the finest level, from <= 200k voxels."""
    values = level.image.reshape(-1)
    if level.mask is not None:
        values = values[level.mask.reshape(-1) > 0]
    if values.numel() == 0:
        raise InputError(f"{name} mask does not cover any of its image; "
                         "fix: pass the mask drawn on this image, or none")
    values = values[:: max(1, values.numel() // 200_000)]
    lo, hi = torch.quantile(values, torch.tensor([0.005, 0.995], device=values.device))
    if not hi > lo:
        raise InputError(f"{name} image is constant; fix: check that the right file was loaded")
    return float(lo), float(hi)


# ---- fixed points and moments ---------------------------------------------------------------
def _level_points(level: _Level, max_points: int, jitter: bool = False):
    """World positions (P, 3) and intensities (P,) of a level's voxels (inside its mask).

    Beyond ``max_points`` a fixed random subset (reproducible, stratified so it covers the image
    evenly) is kept, in memory order so that sampling the other image stays cache-friendly.
    ``jitter`` moves each point randomly within its voxel and reads the image there by trilinear
    interpolation, like the moving image is read: with both sides blurred alike, the optimum of
    MI is not pulled off the truth by the difference between "exact voxel" and "interpolated".
    """
    voxels = identity_voxels(level.grid.shape, level.image.device).reshape(-1, 3)
    values = level.image.reshape(-1)
    if level.mask is not None:
        keep = level.mask.reshape(-1) > 0
        voxels, values = voxels[keep], values[keep]
    generator = torch.Generator().manual_seed(0)
    if len(values) > max_points:  # one random voxel per stratum
        stride = len(values) / max_points
        offset = torch.rand(max_points, generator=generator, dtype=torch.float64)
        keep = ((torch.arange(max_points, dtype=torch.float64) + offset) * stride).long()
        voxels, values = voxels[keep.to(values.device)], values[keep.to(values.device)]
    if jitter:
        shift = torch.rand(voxels.shape, generator=generator) - 0.5
        upper = torch.tensor(level.grid.shape, dtype=voxels.dtype) - 1
        voxels = torch.minimum(torch.clamp(voxels + shift.to(voxels.device), min=0),
                               upper.to(voxels.device))
        values = sample(level.image, voxels[None, :, None, None])[0, 0, :, 0, 0]
        if level.mask is not None:  # keep points read from in-mask blocks only
            keep = _read_inside_mask(level.mask, voxels)
            voxels, values = voxels[keep], values[keep]
    return voxel_to_world(voxels.double(), level.grid.affine).float(), values


def _read_inside_mask(mask: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """True where trilinear interpolation at ``voxels`` reads in-mask blocks only."""
    return sample(mask, voxels[None, :, None, None])[0, 0, :, 0, 0] > 0.999


def _otsu(values: torch.Tensor, bins: int = 64) -> float:
    hist = torch.histc(values, bins, 0.0, 1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0) / w0.clamp(min=1)
    m1 = ((hist * centres).sum() - (hist * centres).cumsum(0)) / w1.clamp(min=1)
    between = w0 * w1 * (m0 - m1) ** 2
    return (int(between.argmax()) + 1) / bins  # upper edge of the last background bin


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


def _start_candidates(fixed_points, moving_level: _Level) -> list[np.ndarray]:
    """Centre-of-mass translation plus the principal-axes rotations closest to identity.

    Eigenvectors have no sign and, when two eigenvalues are close (a head is nearly round in
    some planes), no reliable order either, so every proper signed permutation is a candidate
    and the ones needing the least rotation are kept; the similarity decides among them.
    """
    cf, cov_f = _moments(*fixed_points)
    cm, cov_m = _moments(*_level_points(moving_level, MAX_POINTS))
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
            rotations.append((-np.trace(r), r))  # larger trace: smaller rotation angle
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


def _residual_matrix(params: torch.Tensor, centre: torch.Tensor, radius: float,
                     similarity: bool = False) -> torch.Tensor:
    """4x4 ``D(p)``: translation ``p[:3]`` mm, linear part ``expm(M / r)`` about ``centre``.

    The matrix exponential turns the skew part of ``M`` into an exact rotation (no stretching on
    the way to 30 degrees) and the symmetric part into scale and shear.  ``similarity`` keeps only
    rotation and isotropic scale: at the coarsest level shear could otherwise stand in for a
    rotation (an ellipse turned by 30 degrees is also an ellipse sheared), a wrong local optimum.
    """
    m = params[3:].view(3, 3) / radius
    if similarity:
        eye = torch.eye(3, dtype=params.dtype, device=params.device)
        m = (m - m.T) / 2 + eye * torch.diagonal(m).mean()
    linear = torch.linalg.matrix_exp(m)
    top = torch.cat([linear, (centre + params[:3] - linear @ centre)[:, None]], dim=1)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=params.dtype, device=params.device)
    return torch.cat([top, bottom])


def _optimise(fixed_points, moving: _Level, a0: np.ndarray, centre, radius: float,
              iterations: int, lr: float, cancel, similarity: bool = False
              ) -> tuple[np.ndarray, float]:
    """Adam on the 12 parameters of ``D``; returns (A0 @ D, final loss).

    Adam is written out (a few lines on 12 numbers) because constructing ``torch.optim.Adam``
    the first time imports the compiler stack, ~1-2 s of every command-line registration.
    """
    points, values = fixed_points
    device = points.device
    homogeneous = torch.cat([points, torch.ones_like(points[:, :1])], dim=1)
    fixed_bins = _fixed_bins(values)
    to_voxel = torch.as_tensor(moving.grid.inverse @ a0, dtype=torch.float64, device=device)
    c = torch.as_tensor(centre, dtype=torch.float64, device=device)
    shape = torch.as_tensor(moving.grid.shape, dtype=torch.float32, device=device)
    params = torch.zeros(12, dtype=torch.float64, device=device, requires_grad=True)
    mean, square = torch.zeros_like(params), torch.zeros_like(params)
    for step in range(iterations + 1):
        check(cancel)
        fixed_to_voxel = (to_voxel @ _residual_matrix(params, c, radius, similarity))[:3].float()
        voxel = homogeneous @ fixed_to_voxel.T
        with torch.no_grad():
            inside = ((voxel >= 0) & (voxel <= shape - 1)).all(-1).float()
            if moving.mask is not None:
                inside = inside * _read_inside_mask(moving.mask, voxel).float()
        warped = sample(moving.image, voxel[None, :, None, None])[0, 0, :, 0, 0]
        loss = -_mutual_information(fixed_bins, warped, inside)
        if step == iterations:
            break
        (grad,) = torch.autograd.grad(loss, params)
        with torch.no_grad():
            mean.mul_(ADAM_BETAS[0]).add_(grad, alpha=1 - ADAM_BETAS[0])
            square.mul_(ADAM_BETAS[1]).addcmul_(grad, grad, value=1 - ADAM_BETAS[1])
            rate = lr * FINAL_LR_FRACTION ** (step / max(iterations - 1, 1))
            unbiased = square / (1 - ADAM_BETAS[1] ** (step + 1))
            params -= (rate / (1 - ADAM_BETAS[0] ** (step + 1))) * mean / (unbiased.sqrt() + 1e-8)
    d = _residual_matrix(params.detach(), c, radius, similarity).cpu().numpy()
    return a0 @ d, float(loss.detach())
