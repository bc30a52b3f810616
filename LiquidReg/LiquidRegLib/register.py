"""The registration pipeline: affine -> network -> optional instance optimisation -> Result.

The result is one representation: a displacement field in RAS mm on the fixed grid that maps each
fixed point to its moving point, affine included.  Writers (``io`` for ITK/ANTs files, ``logic``
for Slicer) convert it once, at their own boundary.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, diffeo, losses, memory, metrics, train, validate
from .devices import ieee_float32, resolve_device
from .options import RegistrationOptions
from .grid import (Grid, c_ordered, mapped_voxels, normalized_coordinates, sample_at,
                   sampling_grid, to_device)
from .preprocess import to_working, working_grid
from .progress import check, report


@dataclass
class RegistrationResult:
    fixed_grid: Grid
    moving_grid: Grid
    displacement: np.ndarray          # (I, J, K, 3) RAS mm on the fixed grid, fixed -> moving
    inverse_displacement: np.ndarray | None  # (I', J', K', 3) RAS mm on the moving grid,
    #                                          moving -> fixed; None unless asked for
    jacobian: np.ndarray              # (I, J, K) det of d(phi)/dx on the fixed grid
    warped: np.ndarray                # moving resampled on the fixed grid
    affine: np.ndarray                # 4x4 RAS, fixed point -> moving point
    summary: dict = field(default_factory=dict)


def _similarities(fixed, movings) -> list[float]:
    """Mean LNCC (5^3 window) of ``fixed`` with each of ``movings`` at half the working
    resolution: a report, so kept cheap (one batch, one read back)."""
    fixed = F.avg_pool3d(fixed, 2)
    movings = F.avg_pool3d(torch.cat(movings), 2)
    cc = losses.local_ncc(fixed.expand(len(movings), *fixed.shape[1:]), movings, 5)
    return cc.mean((1, 2, 3, 4)).tolist()


def _stage(name: str):
    """A named range for ``torch.profiler`` (``scripts/benchmark_speed.py`` counts what each
    stage dispatches); free when no profiler runs."""
    return torch.profiler.record_function(f"liquidreg.{name}")


def register(fixed, moving, options: RegistrationOptions | None = None, *, fixed_mask=None,
             moving_mask=None, progress=None, cancel=None, inverse: bool = True, model=None,
             **settings) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (``io.Volume``-like objects) and return the full mapping.

    ``options`` says how (:class:`RegistrationOptions`); ``settings`` set some of its fields by
    name for short calls, e.g. ``register(fixed, moving, mode="accurate", device="cpu")``.
    Masks may lie on their own grids: each is resampled onto its image's grid once, here.
    ``inverse=False`` skips the inverse mapping (an output, not a choice of how to register),
    for callers that never read it, such as the Slicer panel.
    ``model``: a (network, info) pair from ``checkpoint.load_model`` to use instead of loading
    ``options.weights``, so that a batch worker loads the network once for all its pairs.
    """
    options = RegistrationOptions.of(options, **settings)
    timings, started = {}, time.perf_counter()
    validate.check_image(fixed, "fixed")
    validate.check_image(moving, "moving")
    if fixed_mask is not None:
        fixed_mask = validate.check_mask(fixed_mask, fixed, "fixed mask")
    if moving_mask is not None:
        moving_mask = validate.check_mask(moving_mask, moving, "moving mask")
    dev = resolve_device(options.device)
    if model is None:
        model, info = checkpoint.load_model(options.weights, dev)
    else:
        model, info = model
        model.to(dev)  # a CUDA out-of-memory retry of an earlier pair may have left it on the CPU
    memory.check(fixed.grid, moving.grid,
                 working_grid(fixed.grid, model.config.working_spacing, model.config.divisor),
                 options.steps)
    timings["load"] = round(time.perf_counter() - started, 3)
    inputs = _Inputs(fixed, moving, fixed_mask, moving_mask)
    try:
        with ieee_float32():
            outcome = _register_on(dev, model, inputs, options, timings, progress, cancel, inverse)
    except torch.cuda.OutOfMemoryError:
        if dev.type != "cuda":
            raise
        warnings.warn("CUDA ran out of memory; falling back to the CPU (slower, same result)")
        torch.cuda.empty_cache()
        dev = torch.device("cpu")
        model.to(dev)
        outcome = _register_on(dev, model, inputs, options, timings, progress, cancel, inverse)
    world_map, wgrid, out, similarity, instance = outcome
    timings["total"] = round(time.perf_counter() - started, 3)
    stats = metrics.jacobian_stats(out["jacobian"])
    summary = {
        "device": str(dev),
        "model": checkpoint.model_summary(info),
        **options.summary(),
        "working_grid": {"shape": list(wgrid.shape), "spacing_mm": float(wgrid.spacing[0])},
        "timings_s": timings,
        "pct_folding": stats["pct_folding"],
        "std_log_jac": stats["std_log_jac"],
        "jacobian": stats,
        "similarity": similarity,
        "masks": {"fixed": getattr(fixed_mask, "name", None),
                  "moving": getattr(moving_mask, "name", None)},
        "overlap": {k: v for k, v in inputs.coverage.items() if k != "warning"},
        "warnings": [inputs.coverage["warning"]] if "warning" in inputs.coverage else [],
    }
    if instance is not None:
        summary["instance_optimisation"] = instance.summary()
    return RegistrationResult(fixed.grid, moving.grid, out["displacement"],
                              out["inverse_displacement"], out["jacobian"], out["warped"],
                              np.asarray(world_map, dtype=np.float64), summary)


@dataclass
class _Inputs:
    """The pair and its masks (already on their images' grids)."""
    fixed: object
    moving: object
    fixed_mask: object
    moving_mask: object
    coverage: dict = field(default_factory=dict)  # validate.check_coverage after the affine


def _register_on(dev, model, inputs: _Inputs, options: RegistrationOptions, timings, progress,
                 cancel, want_inverse=True):
    """Everything that runs on ``dev``: affine, network (+ instance optimisation), outputs at the
    input grids and the similarity report.  One unit, so a CUDA out-of-memory anywhere in it
    can be retried on the CPU."""
    fixed, moving = inputs.fixed, inputs.moving
    t = time.perf_counter()
    if options.affine:
        from .affine import affine_register
        with _stage("affine"):
            world_map = affine_register(fixed, moving, initial=options.initial_affine,
                                        fixed_mask=inputs.fixed_mask,
                                        moving_mask=inputs.moving_mask, device=dev,
                                        progress=progress, cancel=cancel)
    else:
        world_map = options.initial_affine if options.initial_affine is not None else np.eye(4)
    validate.check_overlap(fixed, moving, world_map)
    inputs.coverage = validate.check_coverage(fixed, moving, world_map, inputs.fixed_mask,
                                              inputs.moving_mask)
    timings["affine"] = round(time.perf_counter() - t, 3)
    velocity, pair, wgrid, instance = _deformable(model, inputs, world_map, dev, options,
                                                  progress, cancel, timings)
    t = time.perf_counter()
    check(cancel)
    report(progress, "resample", 0, 1, "bringing the mapping to full resolution")
    with torch.no_grad():
        with _stage("outputs"):
            # exp(v) and, for the inverse, exp(-v): one integration of a batch of two
            fields = diffeo.exp_velocity(torch.cat([velocity, -velocity]) if want_inverse
                                         else velocity, wgrid.shape, model.squarings)
            forward, inverse = fields[:1], (fields[1:] if want_inverse else None)
            out = _full_resolution(forward, inverse, wgrid, world_map, fixed, moving, dev)
        with _stage("reports"):
            before, after_affine, after = _similarities(pair.fixed, [
                pair.moving_unaligned, pair.moving, diffeo.warp(pair.moving, forward)])
        similarity = {"metric": "mean local NCC (5^3 window, half working resolution)",
                      "before": before, "after_affine": after_affine, "after": after}
    report(progress, "resample", 1, 1)
    timings["resample"] = round(time.perf_counter() - t, 3)
    return world_map, wgrid, out, similarity, instance


def _deformable(model, inputs: _Inputs, world_map, dev, options: RegistrationOptions, progress,
                cancel, timings):
    t = time.perf_counter()
    cfg = model.config
    wgrid = working_grid(inputs.fixed.grid, cfg.working_spacing, cfg.divisor)
    with _stage("network"):
        pair = to_working(inputs.fixed, inputs.moving, world_map, wgrid,
                          fixed_mask=inputs.fixed_mask, moving_mask=inputs.moving_mask,
                          device=dev, unaligned=True)
        check(cancel)
        report(progress, "network", 0, 1, "predicting the velocity field")
        with torch.no_grad():
            velocity = model(pair.fixed, pair.moving, steps=options.refinement_steps)
    report(progress, "network", 1, 1)
    timings["network"] = round(time.perf_counter() - t, 3)
    instance = None
    if options.steps:
        t = time.perf_counter()
        instance = train.instance_optimise(
            velocity, pair, options.steps, squarings=cfg.squarings,
            regularisation=options.regularisation, device=dev, progress=progress, cancel=cancel)
        velocity = instance.velocity
        if instance.reason:
            warnings.warn(f"kept the network's answer (Fast mode's): {instance.reason}")
        timings["instance_optimisation"] = round(time.perf_counter() - t, 3)
    return velocity, pair, wgrid, instance


def _mix(matrix: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the vectors of an (N, 3, I, J, K) field."""
    m = to_device(torch.tensor(np.asarray(matrix), dtype=field.dtype), field.device)
    return torch.einsum("rc,ncijk->nrijk", m, field)


#: Voxels of a full-resolution grid computed at once: bounds the output stage's working memory
#: (about 70 bytes per voxel of a slab, ~300 MB) whatever the size of the images.
SLAB_VOXELS = 1 << 22


def _slabs(shape):
    """(first, last) rows along the slowest axis of ``shape``, at most SLAB_VOXELS per slab."""
    rows = max(1, SLAB_VOXELS // (shape[1] * shape[2]))
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def _shifted(affine: np.ndarray, rows: int) -> np.ndarray:
    """``affine`` of a grid, for the sub-grid that starts ``rows`` along its first axis."""
    shift = np.eye(4)
    shift[0, 3] = rows
    return affine @ shift


def _full_resolution(forward_vox, inverse_vox, wgrid: Grid, world_map, fixed, moving, dev) -> dict:
    """Forward mapping, its Jacobian, the warped image and the inverse, at the input grids.

    ``forward_vox``/``inverse_vox`` are exp(v) and exp(-v) on the working grid (voxel units);
    ``inverse_vox`` None skips the inverse.
    Each full-resolution quantity is an affine function of the voxel index plus a linear function
    of the working-grid field, and trilinear interpolation commutes with linear maps.  So the
    vectors are mapped (to RAS mm, to the moving image's sampling coordinates) on the small working
    grid, and a full-resolution voxel costs one read of a 7-channel field plus a broadcast affine
    sum: no per-voxel matrix products.  Fields are read with border padding; the affine part is
    exact everywhere.  The Jacobian is det(A) det(I + Du), computed where the deformation is
    defined (the working grid) and interpolated like the field itself.

    The input grids are computed in slabs of at most :data:`SLAB_VOXELS` voxels, straight into
    the output arrays, so the stage needs little beyond its outputs.  Everything is computed on
    transposed ([k, j, i]) grids: the outputs come out in ITK/VTK memory order and are returned
    as [i, j, k] views, so writers copy nothing.
    """
    world_map = np.asarray(world_map, dtype=np.float64)
    eye = np.eye(4)
    target, source, work = fixed.grid.transposed(), moving.grid.transposed(), wgrid.transposed()

    def on_work(field):  # (N, C, I, J, K) on wgrid -> the same values laid out on ``work``
        return field.permute(0, 1, 4, 3, 2).contiguous()

    moving_array, moving_grid = c_ordered(moving.array, moving.grid)
    # fixed RAS -> sampling coordinates of the moving image (grid_sample convention)
    to_moving = normalized_coordinates(moving_grid.shape) @ moving_grid.inverse @ world_map
    forward = _mix(wgrid.affine[:3, :3], forward_vox)  # u: RAS mm on the working grid
    jacobian = np.linalg.det(world_map[:3, :3]) * diffeo.jacobian_determinant(forward_vox)
    channels = on_work(torch.cat([_mix(world_map[:3, :3], forward),
                                  _mix(to_moving[:3, :3], forward), jacobian], dim=1))
    del forward, jacobian
    moving_tensor = to_device(torch.as_tensor(np.asarray(moving_array, dtype=np.float32)),
                              dev)[None, None]
    # On CUDA the results go to pinned host memory, copied while the next slab is computed.
    pinned = torch.device(dev).type == "cuda"

    def host(shape):
        return torch.empty(shape, pin_memory=pinned)
    out = {"displacement": host((*target.shape, 3)), "warped": host(target.shape),
           "jacobian": host(target.shape),
           "inverse_displacement": None if inverse_vox is None else host((*source.shape, 3))}
    for first, last in _slabs(target.shape):
        rows = (last - first, *target.shape[1:])
        slab = _shifted(target.affine, first)
        at_fixed = sample_at(channels, sampling_grid(rows, work.inverse @ slab, work.shape,
                                                     dev)[None], padding_mode="border")[0]
        # phi(x) = A (x + u(x)):  displacement phi(x) - x = (A - I) x + A u(x)
        displacement = mapped_voxels(rows, (world_map - eye) @ slab, dev)
        displacement += at_fixed[:3].permute(1, 2, 3, 0)
        points = mapped_voxels(rows, to_moving @ slab, dev)
        points += at_fixed[3:6].permute(1, 2, 3, 0)
        out["displacement"][first:last].copy_(displacement, non_blocking=pinned)
        out["warped"][first:last].copy_(sample_at(moving_tensor, points[None])[0, 0],
                                        non_blocking=pinned)
        out["jacobian"][first:last].copy_(at_fixed[6], non_blocking=pinned)
        del at_fixed, displacement, points
    if inverse_vox is not None:
        # moving y -> z + u^-1(z), z = A^-1 y:  displacement (A^-1 - I) y + u^-1(z)
        unmap = np.linalg.inv(world_map)
        backward = on_work(_mix(wgrid.affine[:3, :3], inverse_vox))
        for first, last in _slabs(source.shape):
            rows = (last - first, *source.shape[1:])
            slab = _shifted(source.affine, first)
            at_moving = sample_at(backward, sampling_grid(rows, work.inverse @ unmap @ slab,
                                                          work.shape, dev)[None],
                                  padding_mode="border")[0]
            inverse = mapped_voxels(rows, (unmap - eye) @ slab, dev)
            inverse += at_moving.permute(1, 2, 3, 0)
            out["inverse_displacement"][first:last].copy_(inverse, non_blocking=pinned)
            del at_moving, inverse
    if pinned:
        torch.cuda.synchronize(dev)  # every copy has landed before the arrays are handed out

    def ijk(tensor):  # [k, j, i, ...] -> an [i, j, k, ...] view of the same memory
        array = tensor.numpy()
        return array.transpose(2, 1, 0, *range(3, array.ndim))

    return {name: None if tensor is None else ijk(tensor) for name, tensor in out.items()}
