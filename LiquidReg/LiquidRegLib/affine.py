"""Affine pre-alignment: the 4x4 RAS matrix taking each fixed point to its moving point.

Why it is built this way:

* **Similarity: mutual information** (Mattes: hard fixed bins, cubic B-spline Parzen window on
  the moving side, 32 bins) over a set of fixed points.  MI does not care about intensity scale,
  non-linear contrast differences or modality (T1 vs T2), where global NCC does; on points it
  costs O(points), so even the finest level is cheap, whereas local NCC needs a dense resample
  and box filters every iteration.  ANTs and elastix use the same metric for their affine stages.
* **The device samples, the CPU optimises.**  An evaluation sends one 3x4 matrix per start pose
  to the device, which reads the moving image at the mapped points, sums the joint histogram
  and returns MI with its gradient with respect to that matrix (written out, no autograd): 13
  numbers per pose.  The 12 parameters, the matrix exponential and its derivative and the
  optimiser are float64 numpy on the CPU.  About 60 device operations per evaluation, one copy
  each way, whatever the device.
* **Deterministic**: the histogram is summed in float64 without atomics (a sequential
  index-add on the CPU, a one-hot matrix product on a GPU), so runs repeat exactly and the order
  of the points changes the sums by rounding only; CPU and GPU then differ by rounding too.
* **Converged**: BFGS with a backtracking line search on each level, until a step moves no
  corner of the fixed image by ``TOLERANCE_MM`` (0.01 mm at the finest level, scaled by the
  spacing on coarser ones).  That only means something if the objective is smooth at that
  scale: trilinear interpolation bends at every voxel face, which leaves tiny local optima a
  few tenths of a millimetre apart, so every level of both images is smoothed by a Gaussian
  of 2 mm first (:func:`_smoothed`).  Then a 1e-6 change of the moving image's intensities
  moves the answer by thousandths of a millimetre at most (measured on real 1 mm brains), and
  CPU and GPU, which differ by rounding, should agree as closely (not yet run on a GPU).
* **Pyramid by box averaging**: each image is averaged over integer blocks of its own voxels to
  about 8, 4 and 2 mm (inside its mask, if any).  Anisotropic, oblique or LPS-stored files need no
  resampling onto a working grid, and the 1 mm volumes are read once.  Fixed points are random
  positions in the fixed blocks, the moving image is read at the mapped points, both by trilinear
  interpolation (:func:`grid.sample`), so both sides are blurred alike and the optimum is unbiased.
* **Parametrisation**: ``A = A0 @ D(p)`` with ``D(x) = c + expm(M/r)(x - c) + t``, ``c`` the fixed
  image's centre of mass and ``r`` its radius of gyration.  Every one of the 12 parameters is then
  "millimetres of motion at the edge of the head", so one step length suits them all, and the
  exponential makes a rotation a rotation all the way (no stretching on the way to 45 degrees).
  The coarsest level fits rotation and isotropic scale only, so shear cannot stand in for a
  rotation there; 4 and 2 mm fit all 12.
* **Start**: centres of mass, plus the principal-axes poses closest to identity (eigenvectors
  have no sign, and no order when a head is nearly round in some plane).  The candidates are
  optimised together at the coarsest level (one batched evaluation per step), for at most
  ``SCREEN_EVALUATIONS`` steps; the first (least rotated) one goes on unless another is better
  by ``CHOICE_MARGIN``, so that noise cannot flip a near-tie.  A given ``initial`` matrix is the
  only candidate.  Measured capture range: 80 degrees about any axis
  (``scripts/measure_affine.py --capture``).
* **Too few points** (a small field of view or mask) make MI noisy and let it rise by sliding the
  images apart; levels with fewer than ``MIN_POINTS`` are skipped.
* **Points outside the moving field of view (or mask) fade out** of the histogram (within a
  voxel of its edge) rather than being read as background, so a moving scan that stops
  mid-head is not pulled towards its edge, and the objective stays continuous; near a mask's
  edge, where the smoothing is one-sided, points count less.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .grid import Grid, identity_voxels, normalized_coordinates, sample, voxel_to_world
from .progress import check, report
from .validate import mask_on_grid

LEVELS_MM = (8.0, 4.0, 2.0)     # coarse to fine
SIMILARITY_LEVELS = 1           # coarsest levels that fit rotation + isotropic scale only
TOLERANCE_MM = 0.01             # converged: no corner of the fixed image moves this far in a
                                # step (finest level; coarser levels scale it by their spacing)
FIRST_STEP_MM = (3.0, 1.5, 0.75)  # the first (gradient) step of a level moves a corner this far
MAX_STEP_MM = (20.0, 10.0, 5.0)   # ... and no later step farther (keeps the search in its basin)
MAX_EVALUATIONS = 100           # per start and level: a safety net, convergence comes first
SUFFICIENT_DECREASE = 1e-4      # Armijo's constant of the line search
CHOICE_MARGIN = 1e-3            # MI (nats) a later start candidate must gain to be chosen
SCREEN_EVALUATIONS = 15         # the start candidates are compared after at most this many
MAX_POINTS = 15000              # fixed points per level (a fixed random subset beyond that)
MIN_POINTS = 1000               # levels with fewer fixed or moving points are skipped: MI from so
                                # few samples is noisy, and sliding the images apart raises it
BINS = 32
SMOOTHING_MM = 2.0              # Gaussian blur (sigma) of every level: a voxel of the finest
START_CANDIDATES = 2            # principal-axes rotations (closest to identity) tried besides
                                # the pure centre-of-mass translation


@dataclass
class _Level:
    """One pyramid level of one image: intensities in [0, 1], an optional mask, and its grid."""

    image: torch.Tensor            # (1, 1, I, J, K)
    mask: torch.Tensor | None      # (1, 1, I, J, K) float, 1 where at least half the block is in
    grid: Grid
    weight: torch.Tensor | None = None  # the share of the smoothing window in the mask and field
                                        # of view, in [0, 1] (see _smoothed)


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

    if len(candidates) > 1:
        report(progress, "affine", 0, len(levels),
               f"choosing among {len(candidates)} starting poses")
    corners = _corners(points[levels[-1]][0])
    evaluations = 0
    for step, index in enumerate(levels):
        report(progress, "affine", step, len(levels), f"{LEVELS_MM[index]:g} mm")
        similarity = _MutualInformation(*points[index], centre, moving_levels[index])
        searches = [_Search(_Pose(a0, centre, radius, similarity=step < SIMILARITY_LEVELS),
                            corners, FIRST_STEP_MM[index], MAX_STEP_MM[index],
                            TOLERANCE_MM * LEVELS_MM[index] / LEVELS_MM[-1],
                            SCREEN_EVALUATIONS if len(candidates) > 1 else MAX_EVALUATIONS)
                    for a0 in candidates]
        evaluations += _run(similarity, searches, cancel)
        chosen = _chosen(searches)
        chosen.resume(MAX_EVALUATIONS)  # a start chosen before converging goes on alone
        evaluations += _run(similarity, [chosen], cancel)
        candidates = [chosen.pose.matrix(chosen.q)]
    report(progress, "affine", len(levels), len(levels), "done",
           mutual_information=-chosen.loss, evaluations=evaluations, converged=chosen.converged)
    return candidates[0]


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
        level.image, level.weight = _smoothed(((level.image - lo) / (hi - lo)).clamp(0.0, 1.0),
                                              level.mask, level.grid.spacing)
    return levels


def _smoothed(image: torch.Tensor, mask: torch.Tensor | None, spacing
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (voxels of ``spacing`` mm) blurred by a Gaussian of ``SMOOTHING_MM``, and the
    share of that Gaussian inside the mask (1 without one).

    Why: trilinear interpolation bends at every voxel face, by as much as the image changes
    from one voxel to the next; MI summed over the points then has tiny local optima that trap
    any optimiser a few tenths of a millimetre apart, so that noise in the last bits of an
    image moves the answer that far.  Without the detail finer than the finest level's voxels
    (which box averaging leaves, aliased), the objective is smooth at the scale of the
    tolerance.  The blur is set in millimetres, so that images with different voxels (1.5 mm
    against 1.2 x 1.0 x 2.5 mm, oblique) are blurred alike.

    With a mask, the blur averages over the mask only (normalised convolution: what the mask
    leaves out does not bleed in); near its edge that average is one-sided, which the share
    tells.  The field of view is extended by its edge values, so a brain cropped a few voxels
    from the edge of its image is blurred as if the background went on.  Sums of shifted
    slices: plain float32 arithmetic, the same on every device (a GPU convolution may run at
    reduced precision).
    """
    weight = torch.ones_like(image) if mask is None else mask
    both = torch.cat([image * weight, weight], 1)
    for axis, step in enumerate(spacing, start=2):
        sigma = SMOOTHING_MM / step
        radius = int(np.ceil(2 * sigma))
        taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
        taps = taps / taps.sum()
        pad = [0] * 6
        pad[2 * (4 - axis):2 * (4 - axis) + 2] = [radius, radius]
        padded = F.pad(both, pad, mode="replicate")
        n = both.shape[axis]
        both = padded.narrow(axis, 0, n) * float(taps[0])
        for shift in range(1, 2 * radius + 1):
            both = both.add(padded.narrow(axis, shift, n), alpha=float(taps[shift]))
    total, weight = both.split(1, dim=1)
    return torch.where(weight > 1e-6, total / weight.clamp(min=1e-6), 0.0), weight


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


# ---- similarity on the device ---------------------------------------------------------------
# The cubic B-spline weights of the four moving bins a value touches (its bin - 1 .. + 2), and
# their derivatives, as polynomials in the value's fraction t of a bin: row n multiplies t**n.
_SPLINE = np.array([[1, 4, 1, 0, -3, 0, 3, 0],
                    [-3, 0, 3, 0, 6, -12, 6, 0],
                    [3, -6, 3, 0, -3, 9, -9, 3],
                    [-1, 3, -3, 1, 0, 0, 0, 0]]) / 6.0
_CELLS = BINS * (BINS + 1)  # joint histogram: fixed bins x moving bins (one spare, always empty)
_TINY = 1e-30               # empty cells: log(0) -> log(_TINY), weighted by 0


class _MutualInformation:
    """``-MI`` between the fixed points and the moving level, and its gradient with respect to
    the 3x4 matrices that map the (centred) fixed points to the moving level.

    Mattes MI: hard bins on the fixed side, cubic B-spline Parzen window on the moving side.
    Everything is float64 (the work is small, and no GPU setting can lower the precision of a
    float64 matrix product, as TF32 would for float32 by 0.1 mm).  The joint histogram is
    summed without atomics, so a device gives the same sum at every run and reordering the
    points changes it by rounding only: on the CPU a sequential
    index-add, on a GPU (where that would be atomics) the matrix product of the fixed bins'
    one-hot with the moving spline weights.  The gradient is written out (chain rule through
    the histogram, then one sampler backward for the point positions), so an evaluation is a
    few dozen device ops and one small copy each way, for any number of matrices at once.

    The moving level is read as two channels, intensity x weight and weight (0 outside the
    mask, less near its edge, see :func:`_smoothed`; 0 beyond the field of view), both
    trilinear: a point's weight in the histogram is its interpolated weight and its intensity
    the weighted average of its neighbours.  A point leaving the moving image (or mask) thus
    fades out instead of reading background, and the objective stays continuous.
    """

    def __init__(self, points: torch.Tensor, values: torch.Tensor, centre: np.ndarray,
                 moving: _Level):
        device = values.device
        centred = points.double() - torch.as_tensor(centre, device=device)
        self.points = torch.cat([centred, torch.ones_like(centred[:, :1])], 1)  # float64
        self.points_t = self.points.T.contiguous()
        bins = _fixed_bins(values)
        # histogram cells of each point's moving bins -1 .. 2 (added to the value's bin)
        self.first_cells = (bins[:, None] * (BINS + 1)
                            + torch.arange(-1, 3, device=device)).double()
        self.cells = {}  # ... for K matrices at once: (P * K, 4), matrix k's histogram k-th
        self.fixed_one_hot_t = (None if device.type == "cpu"
                                else F.one_hot(bins, BINS).T.double().contiguous())
        scaled = 1.0 + moving.image * (BINS - 3)     # in [1, BINS - 2]: all four bins exist
        # a point counts as the square of its smoothing window's share inside the moving mask
        # (a one-sided average's error grows with the missing share)
        weight = moving.weight ** 2
        self.volume = torch.cat([scaled * weight, weight], 1).double()
        self.to_grid = normalized_coordinates(moving.grid.shape) @ moving.grid.inverse
        self.powers = torch.arange(4, device=device, dtype=torch.float64)
        self.spline = torch.as_tensor(_SPLINE, device=device)

    def __call__(self, matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``matrices`` (K, 3, 4): centred fixed point -> moving ``grid_sample`` coordinates.
        Returns the losses (K,) and their gradients (K, 3, 4), float64."""
        k, p = len(matrices), len(self.points)
        stacked = np.ascontiguousarray(matrices.transpose(2, 0, 1).reshape(4, 3 * k))
        grid = self.points.mm(torch.from_numpy(stacked).to(self.volume.device))
        grid = grid.view(1, 1, 1, p * k, 3)                          # point-major, then matrix
        sampled = torch.grid_sampler_3d(self.volume, grid, 0, 0, True).view(2, p * k, 1)
        weighted, weight = sampled.unbind(0)                         # (P * K, 1) each
        u = (weighted / weight.clamp(min=1e-6)).clamp(1.0, BINS - 2.0)
        base = u.floor()
        spline, slope = (u - base).pow(self.powers).mm(self.spline).split(4, 1)
        if k not in self.cells:
            offsets = torch.arange(0, k * _CELLS, _CELLS, device=u.device, dtype=torch.float64)
            self.cells[k] = (self.first_cells[:, None] + offsets[:, None]).view(-1, 4)
        index = (base + self.cells[k]).long()                        # (P * K, 4) cells
        joint = self._histogram(index, spline * weight, k)
        total = joint.sum((1, 2), keepdim=True)
        joint = joint / total
        log_ratio = (joint.clamp(min=_TINY).log()
                     - joint.sum(2, keepdim=True).clamp(min=_TINY).log()
                     - joint.sum(1, keepdim=True).clamp(min=_TINY).log())
        information = (joint * log_ratio).sum((1, 2))
        # d(-MI)/d(histogram cell), read at each point's four cells
        d_cells = ((information.view(k, 1, 1) - log_ratio) / total).take(index)
        d_u = (d_cells * slope).sum(1, keepdim=True)    # (d loss / d u) / weight
        d_sampled = torch.stack([d_u, (d_cells * spline).sum(1, keepdim=True) - d_u * u])
        d_grid = torch.ops.aten.grid_sampler_3d_backward(
            d_sampled.view(1, 2, 1, 1, p * k), self.volume, grid, 0, 0, True, [False, True])[1]
        d_matrix = self.points_t.mm(d_grid.view(p, 3 * k))           # (4, 3K)
        out = torch.cat([information.neg(), d_matrix.view(-1)]).cpu().numpy()
        return out[:k], out[k:].reshape(4, k, 3).transpose(1, 2, 0)

    def _histogram(self, index: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
        """(K, BINS, BINS + 1) sums of ``weights`` in their cells ``index``, deterministic."""
        if self.fixed_one_hot_t is None:  # the CPU adds in order
            flat = torch.zeros(k * _CELLS, dtype=weights.dtype, device=weights.device)
            return flat.index_add_(0, index.view(-1), weights.view(-1)).view(k, BINS, BINS + 1)
        dense = torch.zeros(len(weights), BINS + 1, dtype=weights.dtype, device=weights.device)
        dense.scatter_(1, index % _CELLS % (BINS + 1), weights)  # 4 distinct bins a row
        joint = self.fixed_one_hot_t.mm(dense.view(-1, k * (BINS + 1)))  # (BINS, K * (BINS + 1))
        return joint.view(BINS, k, BINS + 1).transpose(0, 1)


def _fixed_bins(values: torch.Tensor) -> torch.Tensor:
    """Hard histogram bin of each fixed intensity (Mattes: the fixed side needs no smoothing)."""
    return (values * BINS).long().clamp(0, BINS - 1)


# ---- the pose and its parameters, on the CPU in float64 -----------------------------------------
_SIMILARITY_BASIS = np.array([  # columns: rotation about R, A, S; isotropic scale
    [0, 0, 0, 1], [0, 0, -1, 0], [0, 1, 0, 0],
    [0, 0, 1, 0], [0, 0, 0, 1], [-1, 0, 0, 0],
    [0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


class _Pose:
    """``A(q) = A0 @ D(q)`` with ``D(x) = c + expm(M / r)(x - c) + t``: ``t = q[:3]``, ``M`` from
    ``q[3:]`` (all 9 entries, or rotation and isotropic scale only).

    ``c`` is the fixed image's centre of mass and ``r`` its radius of gyration, so every
    parameter is "millimetres of motion at the edge of the head" and one step length suits
    them all; the exponential makes a rotation a rotation all the way (no stretching on the way
    to 45 degrees).  ``similarity`` keeps shear from standing in for a rotation at the coarsest
    level (an ellipse turned by 30 degrees is also an ellipse sheared), a wrong local optimum.
    """

    def __init__(self, a0: np.ndarray, centre: np.ndarray, radius: float, similarity: bool):
        self.a0, self.centre, self.radius = a0, centre, radius
        self.basis = _SIMILARITY_BASIS if similarity else np.eye(9)
        self.size = 3 + self.basis.shape[1]
        self.shift = np.eye(4)  # centred point -> point
        self.shift[:3, 3] = centre

    def _exponent(self, q: np.ndarray) -> np.ndarray:
        return (self.basis @ q[3:]).reshape(3, 3) / self.radius

    def matrix(self, q: np.ndarray) -> np.ndarray:
        d = np.eye(4)
        d[:3, :3] = _expm(self._exponent(q))
        d[:3, 3] = self.centre + q[:3] - d[:3, :3] @ self.centre
        return self.a0 @ d

    def sampling_matrix(self, q: np.ndarray, to_grid: np.ndarray) -> np.ndarray:
        """3x4: centred fixed point -> moving ``grid_sample`` coordinates."""
        return (to_grid @ self.matrix(q) @ self.shift)[:3]

    def gradient(self, q: np.ndarray, to_grid: np.ndarray, d_sampling: np.ndarray) -> np.ndarray:
        """Chain rule from d loss / d (sampling matrix) to d loss / d q."""
        d_a = to_grid[:3].T @ d_sampling @ self.shift.T
        d_d = self.a0.T @ d_a
        d_linear = d_d[:3, :3] - np.outer(d_d[:3, 3], self.centre)
        d_exponent = _expm_adjoint(self._exponent(q), d_linear) / self.radius
        return np.concatenate([d_d[:3, 3], self.basis.T @ d_exponent.reshape(9)])


def _expm(x: np.ndarray) -> np.ndarray:
    """Matrix exponential of a small matrix: Taylor series of ``x / 2^s`` (norm <= 1/2, 18
    terms: exact to rounding), squared ``s`` times."""
    norm = np.abs(x).sum(0).max()
    s = max(0, int(np.ceil(np.log2(norm))) + 1) if norm > 0 else 0
    y = x / 2.0 ** s
    term = out = np.eye(len(x))
    for k in range(1, 19):
        term = term @ y / k
        out = out + term
    for _ in range(s):
        out = out @ out
    return out


def _expm_adjoint(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Gradient of ``<g, expm(x)>`` with respect to ``x``: the Frechet derivative of expm at
    ``x.T`` in the direction ``g``, the upper right block of expm([[x.T, g], [0, x.T]])."""
    scale = np.abs(g).max()
    if scale == 0:
        return np.zeros_like(g)
    n = len(x)
    block = np.zeros((2 * n, 2 * n))
    block[:n, :n] = block[n:, n:] = x.T
    block[:n, n:] = g / scale
    return _expm(block)[:n, n:] * scale


# ---- the search, on the CPU ------------------------------------------------------------------
class _Search:
    """BFGS with a backtracking line search on one start's parameters; it stops when a step
    (taken, or the smallest worth trying) moves no corner of the fixed image by ``tolerance``
    mm or more.  ``trial`` is the next point to evaluate, None once stopped."""

    def __init__(self, pose: _Pose, corners: np.ndarray, first_step: float, max_step: float,
                 tolerance: float, max_evaluations: int):
        self.pose, self.corners = pose, corners
        self.first_step, self.max_step, self.tolerance = first_step, max_step, tolerance
        self.max_evaluations = max_evaluations
        self.q = np.zeros(pose.size)
        self.trial = self.q
        self.loss = self.grad = self.inverse_hessian = None
        self.evaluations, self.converged = 0, False

    def tell(self, loss: float, grad: np.ndarray) -> None:
        """The loss and gradient at ``trial``."""
        self.evaluations += 1
        if self.loss is None:
            self.loss, self.grad = loss, grad
            return self._next_step()
        step = self.trial - self.q
        slope = self.grad @ step
        if loss <= self.loss + SUFFICIENT_DECREASE * slope:
            change = grad - self.grad
            gradient_step = self.inverse_hessian is None
            if step @ change > 1e-8 * np.linalg.norm(step) * np.linalg.norm(change):
                self._update(step, change)
            moved = self._moves(step)
            self.q, self.loss, self.grad = self.trial, loss, grad
            return self._converged(gradient_step) if moved < self.tolerance else self._next_step()
        # no sufficient decrease: a shorter step in the same direction (safeguarded quadratic fit)
        step = step * np.clip(-slope / (2 * (loss - self.loss - slope)), 0.1, 0.5)
        if self._moves(step) < self.tolerance:  # nothing better at least a tolerance away
            return self._converged(self.inverse_hessian is None)
        if self.evaluations >= self.max_evaluations:
            return self._stop(False)
        self.trial = self.q + step

    def _converged(self, gradient_step: bool) -> None:
        """Stop after a short gradient step; after a short quasi-Newton step, first try a
        gradient step: the curvature BFGS learnt near a kink of the objective (trilinear
        interpolation has them at every voxel face) can make its steps short far from the
        optimum."""
        if gradient_step:
            return self._stop(True)
        self.inverse_hessian = None
        self._next_step()

    def _next_step(self) -> None:
        if self.evaluations >= self.max_evaluations:
            return self._stop(False)
        direction = None if self.inverse_hessian is None else -self.inverse_hessian @ self.grad
        if direction is None or direction @ self.grad >= 0:  # (re)start with a gradient step
            self.inverse_hessian, direction, limit = None, -self.grad, self.first_step
        else:
            limit = self.max_step
        largest = np.abs(direction).max()  # parameters are mm at the edge of the head, and
        if largest == 0:                   # the corners lie farther out: the pose of a longer
            return self._stop(True)        # step is not worth computing (nor its overflow)
        if largest > limit:
            direction = direction * (limit / largest)
        moves = self._moves(direction)
        if self.inverse_hessian is None or moves > limit:
            direction = direction * (limit / moves)
        self.trial = self.q + direction

    def _update(self, step: np.ndarray, change: np.ndarray) -> None:
        """BFGS update of the inverse Hessian (the first one scaled to the measured curvature)."""
        rho = 1.0 / (step @ change)
        if self.inverse_hessian is None:
            self.inverse_hessian = np.eye(len(step)) / (rho * (change @ change))
        v = np.eye(len(step)) - rho * np.outer(step, change)
        self.inverse_hessian = v @ self.inverse_hessian @ v.T + rho * np.outer(step, step)

    def _moves(self, step: np.ndarray) -> float:
        """Farthest distance (mm) a corner of the fixed image moves between q and q + step."""
        diff = self.pose.matrix(self.q + step) - self.pose.matrix(self.q)
        return float(np.linalg.norm(self.corners @ diff[:3].T, axis=1).max())

    def _stop(self, converged: bool) -> None:
        self.trial, self.converged = None, converged

    def resume(self, max_evaluations: int) -> None:
        """Go on, to convergence or ``max_evaluations`` in all, if stopped before converging."""
        self.max_evaluations = max_evaluations
        if not self.converged:
            self._next_step()


def _run(similarity: _MutualInformation, searches: list[_Search], cancel) -> int:
    """Run the searches to their ends together: one device evaluation per round for all those
    still moving (the start candidates share the coarsest level's evaluations).  Returns the
    number of rounds."""
    rounds = 0
    while active := [s for s in searches if s.trial is not None]:
        check(cancel)
        matrices = np.stack([s.pose.sampling_matrix(s.trial, similarity.to_grid) for s in active])
        losses, grads = similarity(matrices)
        for search, loss, grad in zip(active, losses, grads):
            search.tell(float(loss), search.pose.gradient(search.trial, similarity.to_grid, grad))
        rounds += 1
    return rounds


def _chosen(searches: list[_Search]) -> _Search:
    """The first start (the least rotation) unless a later one is better by ``CHOICE_MARGIN``:
    near-ties always go the same way, so rounding noise cannot flip the choice."""
    best = min(s.loss for s in searches)
    return next(s for s in searches if s.loss <= best + CHOICE_MARGIN)


def _corners(points: torch.Tensor) -> np.ndarray:
    """The 8 corners (homogeneous, (8, 4)) of the box around the fixed points."""
    p = points.double()
    low, high = p.min(0).values.cpu().numpy(), p.max(0).values.cpu().numpy()
    corners = np.array(list(itertools.product(*zip(low, high))))
    return np.c_[corners, np.ones(8)]
