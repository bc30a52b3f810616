"""Shared test material: grids with awkward geometry, synthetic images defined in world space
(``from conftest import build_grid, world_image, world_labels``), a CLI runner and stand-ins for
the engine.

Images are functions of RAS world coordinates (not of voxel indices), so the same anatomy appears
at the same place whatever a file's orientation, spacing or field of view: resampling between
grids can then be checked against the truth.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from LiquidRegLib.grid import Grid


def rotation(*degrees_xyz) -> np.ndarray:
    """Rotation about R, then A, then S by the given angles (degrees)."""
    m = np.eye(3)
    for axis, deg in enumerate(degrees_xyz):
        a = np.deg2rad(deg)
        c, s = np.cos(a), np.sin(a)
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        m = r @ m
    return m


def build_grid(shape, spacing, direction, center_ras=(0.0, 0.0, 0.0)) -> Grid:
    """A grid of ``shape`` with unit axis ``direction`` columns (RAS) centred on ``center_ras``."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=float) * np.asarray(spacing, dtype=float)
    m[:3, 3] = np.asarray(center_ras, float) - m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return Grid(tuple(shape), m)


#: Axis directions (columns, RAS) of named orientations: the letter each array axis points to.
ORIENTATIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "LIP": np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0]]),
    "oblique": rotation(20, -15, 30),
}


@pytest.fixture
def grids() -> dict:
    """Small grids with non-trivial geometry, keyed by a descriptive name."""
    return {
        "oblique_aniso": build_grid((24, 20, 16), (1.2, 0.9, 2.0), ORIENTATIONS["oblique"],
                                    (3.0, -7.5, 12.0)),
        "LPS": build_grid((20, 22, 18), (1.0, 1.0, 1.0), ORIENTATIONS["LPS"], (-4.0, 10.0, 2.0)),
        "LIP_aniso": build_grid((18, 16, 22), (0.8, 2.5, 1.1), ORIENTATIONS["LIP"],
                                (1.0, 2.0, -30.0)),
        "RAS_aniso": build_grid((16, 18, 20), (1.5, 1.0, 3.0), ORIENTATIONS["RAS"],
                                (60.0, -20.0, 5.0)),
    }


def world_image(grid: Grid, center_ras=None) -> np.ndarray:
    """A smooth, asymmetric float32 'anatomy' in world space (distinct along every axis).

    Centred on ``center_ras`` (default: the grid's centre, so any small grid shows all of it).
    """
    center = grid.center if center_ras is None else np.asarray(center_ras, float)
    x, y, z = np.moveaxis(grid.voxel_to_ras(np.indices(grid.shape).reshape(3, -1).T)
                          .reshape(*grid.shape, 3) - center, -1, 0)
    blob = np.exp(-(x ** 2 / 300 + y ** 2 / 200 + z ** 2 / 250))
    return (100 * blob + 20 * np.sin(x / 4.0) + 10 * np.cos(y / 5.0 + z / 7.0) + 40).astype(np.float32)


_AXIS_OF = {"R": (0, False), "L": (0, True), "A": (1, False), "P": (1, True), "S": (2, False),
            "I": (2, True)}


def stored_as(array: np.ndarray, grid: Grid, code: str):
    """The voxels of a RAS-ordered ``grid`` stored with the array axes pointing to ``code``
    (e.g. "LIP"): a permutation and flips of the array, no resampling, so every value stays at
    the same world position.  Returns (array, grid); vectors (a trailing axis) are kept."""
    assert grid.orientation == "RAS", grid
    axes = [_AXIS_OF[letter] for letter in code]
    out = np.asarray(array).transpose(*[axis for axis, _ in axes], *range(3, np.ndim(array)))
    out = out[tuple(slice(None, None, -1) if flip else slice(None) for _, flip in axes)]
    index = np.zeros((4, 4))  # new voxel index -> RAS-ordered voxel index
    index[3, 3] = 1.0
    for new, (axis, flip) in enumerate(axes):
        index[axis, new] = -1.0 if flip else 1.0
        index[axis, 3] = grid.shape[axis] - 1 if flip else 0.0
    new_grid = Grid(out.shape[:3], grid.affine @ index)
    assert new_grid.orientation == code
    return np.ascontiguousarray(out), new_grid


def smooth_field(grid: Grid) -> np.ndarray:
    """A smooth float32 displacement field (RAS mm, a few mm) defined in world space."""
    x, y, z = np.moveaxis(grid.voxel_to_ras(np.indices(grid.shape).reshape(3, -1).T)
                          .reshape(*grid.shape, 3), -1, 0)
    return np.stack([2 * np.sin(y / 9), -1.5 * np.cos(z / 7), 1.0 + 0 * x], -1).astype(np.float32)


def world_labels(grid: Grid, center_ras, radius: float) -> np.ndarray:
    """int16 labels 1..8: the octants (relative to ``center_ras``) of a ball, 0 outside.

    Octants differ left/right, front/back and up/down, so any flip or swap of axes is visible.
    """
    x, y, z = np.moveaxis(grid.voxel_to_ras(np.indices(grid.shape).reshape(3, -1).T)
                          .reshape(*grid.shape, 3) - np.asarray(center_ras), -1, 0)
    inside = x ** 2 + y ** 2 + z ** 2 <= radius ** 2
    octant = 1 + (x > 0) + 2 * (y > 0) + 4 * (z > 0)
    return np.where(inside, octant, 0).astype(np.int16)


@pytest.fixture
def run_cli(capsys):
    """Run ``liquidreg`` in-process: returns (exit code, stdout, stderr)."""
    from LiquidRegLib.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture
def fake_engine(monkeypatch):
    """Replace ``register.register`` / ``train.finetune`` with stand-ins recording their calls.

    The CLI's own work (reading, validation, writing, progress, errors) is then tested without
    running the network.  ``calls["register"]["options"]`` is the RegistrationOptions received.
    """
    from LiquidRegLib import register, train
    from LiquidRegLib.options import RegistrationOptions

    calls = {}

    def fake_register(fixed, moving, options=None, *, fixed_mask=None, moving_mask=None,
                      progress=None, cancel=None, inverse=True, model=None, **settings):
        from LiquidRegLib.grid import resample
        from LiquidRegLib.progress import report
        calls["register"] = dict(fixed=fixed, moving=moving, fixed_mask=fixed_mask,
                                 moving_mask=moving_mask, inverse=inverse, model=model,
                                 options=RegistrationOptions.of(options, **settings))
        behaviour = calls.get("register_behaviour")
        for step in range(3):
            report(progress, "network", step + 1, 3, "predicting", loss=0.5 - 0.1 * step)
        if behaviour is not None:
            behaviour()
        shift = np.zeros((*fixed.grid.shape, 3), np.float32)
        warped = resample(moving.array, moving.grid, fixed.grid)
        return types.SimpleNamespace(
            fixed_grid=fixed.grid, moving_grid=moving.grid, displacement=shift,
            inverse_displacement=np.zeros((*moving.grid.shape, 3), np.float32) if inverse else None,
            jacobian=np.ones(fixed.grid.shape, np.float32), warped=warped, affine=np.eye(4),
            summary={"device": "cpu", "pct_folding": 0.0})

    def fake_finetune(pairs, output, *, progress=None, **options):
        calls["finetune"] = dict(pairs=pairs, output=output, **options)
        return {"steps": options.get("steps")}

    monkeypatch.setattr(register, "register", fake_register)
    monkeypatch.setattr(train, "finetune", fake_finetune)
    return calls


def small_brain(kind: str, extent_mm=(112, 128, 112), spacing=2.0):
    """The bundled sample's ``kind`` ("fixed"/"moving") T1 and labels, cropped around the brain
    centre and resampled at ``spacing`` mm: a real brain small enough for fast engine tests."""
    from LiquidRegLib import io
    from LiquidRegLib.grid import resample
    from LiquidRegLib.resources import sample_paths

    t1 = io.read_volume(sample_paths()[f"{kind}_t1"])
    labels = io.read_volume(sample_paths()[f"{kind}_labels"], dtype=None)
    centre = t1.grid.voxel_to_ras(np.argwhere(labels.array > 0).mean(axis=0))
    shape = tuple(int(round(e / spacing)) for e in extent_mm)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.array(shape) - 1) / 2
    grid = Grid(shape, affine)
    return (io.Volume(resample(t1.array, t1.grid, grid), grid),
            io.Volume(resample(labels.array, labels.grid, grid, order="nearest"), grid))


@pytest.fixture(scope="session")
def small_brain_pair():
    """(fixed_t1, fixed_labels, moving_t1, moving_labels) as io.Volume, 2 mm, cropped."""
    return small_brain("fixed") + small_brain("moving")


def mean_dice(a, b) -> float:
    """Mean Dice over the labels (> 0) that both label arrays hold."""
    scores = []
    for label in np.intersect1d(np.unique(a[a > 0]), np.unique(b[b > 0])):
        x, y = a == label, b == label
        scores.append(2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))
