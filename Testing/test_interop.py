"""The warp we write means the same thing to SimpleITK, ANTs and us.

A known smooth deformation on an oblique, anisotropic fixed grid is exported with
``write_displacement``; a label map on a *different* grid (other orientation, spacing and field
of view) is resampled through it by SimpleITK, by ANTs and by ``liquidreg apply``.  All must agree
with the ground truth (``grid.resample`` with the analytic field) on >= 99.9 % of voxels, and
SimpleITK must map points exactly where ``x + u(x)`` says.  A sign, axis-order or RAS/LPS mistake
anywhere moves labels by millimetres and fails this test.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LiquidRegLib import io
from LiquidRegLib.grid import LPS_FLIP, Grid, resample

from conftest import ORIENTATIONS, build_grid, rotation, world_labels

AGREEMENT = 0.999
BALL_CENTRE = (2.0, -3.0, 4.0)


def analytic_displacement(ras: np.ndarray) -> np.ndarray:
    """u(x) in RAS mm: a few mm, smooth, different along every axis (a diffeomorphism)."""
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    return np.stack([3.0 * np.sin(2 * np.pi * y / 60 + 0.4),
                     -2.5 * np.sin(2 * np.pi * z / 55 + 1.0),
                     2.0 * np.cos(2 * np.pi * x / 65) + 0.8], axis=-1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interop")
    fixed_grid = build_grid((44, 40, 34), (1.4, 1.7, 2.0), rotation(12, -20, 25), (1.0, -2.0, 3.0))
    moving_grid = build_grid((52, 46, 60), (1.1, 1.5, 0.9),
                             ORIENTATIONS["LIP"] @ rotation(0, 8, 0), (4.0, -6.0, 1.0))
    ras = fixed_grid.voxel_to_ras(np.indices(fixed_grid.shape).reshape(3, -1).T)
    field = analytic_displacement(ras).reshape(*fixed_grid.shape, 3).astype(np.float32)
    labels = world_labels(moving_grid, BALL_CENTRE, 24.0)
    fixed_image = np.ones(fixed_grid.shape, np.float32)
    paths = {"fixed": folder / "fixed.nii.gz", "moving": folder / "moving_labels.nii.gz",
             "warp": folder / "warp.nii.gz"}
    io.write_volume(paths["fixed"], fixed_image, fixed_grid)
    io.write_volume(paths["moving"], labels, moving_grid)
    io.write_displacement(paths["warp"], field, fixed_grid)
    truth = resample(labels, moving_grid, fixed_grid,
                     displacement=torch.from_numpy(field.astype(np.float64)), order="nearest")
    return dict(fixed_grid=fixed_grid, moving_grid=moving_grid, field=field, labels=labels,
                truth=truth, paths=paths, folder=folder)


def _agreement(a, b) -> float:
    assert a.shape == b.shape
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def test_ground_truth_is_a_real_test(case):
    """The deformation matters: ignoring it, or flipping its sign, disagrees a lot."""
    truth = case["truth"]
    assert len(np.unique(truth)) == 9  # all 8 octants + background are visible
    identity = resample(case["labels"], case["moving_grid"], case["fixed_grid"], order="nearest")
    flipped = resample(case["labels"], case["moving_grid"], case["fixed_grid"], order="nearest",
                       displacement=-torch.from_numpy(case["field"].astype(np.float64)))
    assert _agreement(identity, truth) < 0.95
    assert _agreement(flipped, truth) < 0.95


def _sitk_transform(path) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))


def test_simpleitk_resamples_like_ground_truth(case):
    paths = case["paths"]
    moving = sitk.ReadImage(str(paths["moving"]))
    fixed = sitk.ReadImage(str(paths["fixed"]))
    out = sitk.Resample(moving, fixed, _sitk_transform(paths["warp"]), sitk.sitkNearestNeighbor,
                        0, moving.GetPixelID())
    result = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    assert _agreement(result, case["truth"]) >= AGREEMENT


def test_simpleitk_maps_points_to_x_plus_u(case):
    grid: Grid = case["fixed_grid"]
    transform = _sitk_transform(case["paths"]["warp"])
    rng = np.random.default_rng(7)
    # Voxel centres (field known exactly there) and points between them (trilinear in ITK:
    # the field is smooth enough that interpolation error stays far below the tolerance).
    centres = rng.integers(0, np.array(grid.shape), size=(150, 3)).astype(float)
    between = rng.uniform(1, np.array(grid.shape) - 2, size=(150, 3))
    flip = LPS_FLIP[:3, :3]
    for ijk, tolerance in ((centres, 1e-3), (between, 0.05)):
        x = grid.voxel_to_ras(ijk)
        expected = x + analytic_displacement(x)
        mapped = np.array([transform.TransformPoint((flip @ p).tolist()) for p in x]) @ flip.T
        assert np.abs(mapped - expected).max() < tolerance


def test_ants_resamples_like_ground_truth(case):
    ants = pytest.importorskip("ants")
    paths = case["paths"]
    fixed = ants.image_read(str(paths["fixed"]))
    moving = ants.image_read(str(paths["moving"]))
    out = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(paths["warp"])],
                                interpolator="nearestNeighbor")
    result = np.rint(out.numpy()).astype(np.int16)  # ANTsPy arrays are [i, j, k]
    assert _agreement(result, case["truth"]) >= AGREEMENT


def test_liquidreg_apply_resamples_like_ground_truth(case, run_cli):
    paths = case["paths"]
    out = case["folder"] / "applied.nii.gz"
    code, _, err = run_cli("apply", "--reference", paths["fixed"], "--transform", paths["warp"],
                           paths["moving"], "-o", out, "--interpolation", "nearest", "--quiet")
    assert code == 0, err
    result = io.read_volume(out, dtype=None)
    assert result.grid == case["fixed_grid"]
    assert result.array.dtype == np.int16
    assert _agreement(result.array, case["truth"]) >= AGREEMENT


def test_apply_with_a_reference_grid_other_than_the_warp_grid(case, run_cli):
    """The warp is read at the reference's points (trilinear), exactly as ITK does."""
    paths = case["paths"]
    reference_grid = build_grid((30, 26, 28), (1.2, 1.2, 1.3), rotation(0, 10, 5), (2.0, -4.0, 3.0))
    assert reference_grid != case["fixed_grid"]
    inside = case["fixed_grid"].ras_to_voxel(reference_grid.corners_ras())
    assert np.all(inside > 0) and np.all(inside < np.array(case["fixed_grid"].shape) - 1)
    reference = case["folder"] / "reference.nrrd"
    io.write_volume(reference, np.ones(reference_grid.shape, np.float32), reference_grid)
    out = case["folder"] / "applied_on_reference.nrrd"
    code, _, err = run_cli("apply", "--reference", reference, "--transform", paths["warp"],
                           paths["moving"], "-o", out, "--interpolation", "nearest", "--quiet")
    assert code == 0, err
    moving = sitk.ReadImage(str(paths["moving"]))
    expected = sitk.Resample(moving, sitk.ReadImage(str(reference)), _sitk_transform(paths["warp"]),
                             sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    expected = sitk.GetArrayFromImage(expected).transpose(2, 1, 0)
    result = io.read_volume(out, dtype=None)
    assert result.grid == reference_grid
    assert len(np.unique(expected)) == 9
    assert _agreement(result.array, expected) >= AGREEMENT
