"""The peer adapters (ANTs, elastix) hand back their mapping in LiquidReg's convention: an RAS mm
displacement on the fixed grid, fixed point x -> moving point x + u(x).

The benchmark scores every method from that one field, so the geometry is checked three ways on
small images with awkward (oblique, anisotropic, LPS) grids: transforms with known parameters
must give the exact expected field, each peer's own resampling of the moving image must agree
with resampling through our field, and registering a known translation must recover it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_grid, rotation
from LiquidRegLib import io
from liquidreg_tools import peers
from LiquidRegLib.grid import LPS_FLIP, Grid, resample

#: Fixed point x sits at moving point x + SHIFT_RAS in the "translated" pair.
SHIFT_RAS = np.array([3.0, -2.0, 1.5])
FIXED_CENTRE = np.array([5.0, -10.0, 8.0])


def blobs(grid: Grid, centre) -> np.ndarray:
    """Three anisotropic Gaussians of different sizes and brightness around ``centre`` (RAS):
    smooth, asymmetric and without repeats, so registration has a single optimum."""
    x = grid.ras_coordinates().numpy().astype(np.float64) - np.asarray(centre, float)
    image = np.zeros(grid.shape)
    for offset, widths, amplitude in (((0, 0, 0), (14, 10, 12), 100.0),
                                      ((12, 8, -6), (6, 5, 7), 60.0),
                                      ((-10, 6, 9), (5, 8, 4), 40.0)):
        d = (x - np.asarray(offset, float)) / np.asarray(widths, float)
        image += amplitude * np.exp(-0.5 * (d ** 2).sum(-1))
    return image.astype(np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A fixed image on an oblique anisotropic grid and a moving image (LPS grid, other field of
    view) showing the same content shifted by SHIFT_RAS."""
    folder = tmp_path_factory.mktemp("peers")
    fixed_grid = build_grid((26, 24, 20), (2.0, 2.4, 2.8), rotation(10, -8, 15), FIXED_CENTRE)
    moving_grid = build_grid((30, 28, 26), (2.0, 2.0, 2.0), np.diag([-1.0, -1.0, 1.0]),
                             FIXED_CENTRE + [2.0, 3.0, -1.0])
    moving = blobs(moving_grid, FIXED_CENTRE + SHIFT_RAS)
    fixed_path, moving_path = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    io.write_volume(fixed_path, blobs(fixed_grid, FIXED_CENTRE), fixed_grid)
    io.write_volume(moving_path, moving, moving_grid)
    return {"folder": folder, "fixed_grid": fixed_grid, "moving_grid": moving_grid,
            "moving": moving, "fixed_path": fixed_path, "moving_path": moving_path}


def fixed_points(pair) -> np.ndarray:
    return pair["fixed_grid"].ras_coordinates().numpy().astype(np.float64)


def inside_moving(pair, field) -> np.ndarray:
    """Fixed voxels whose mapped point is at least a voxel inside the moving image (edges are
    handled differently by each library)."""
    voxel = pair["moving_grid"].ras_to_voxel(fixed_points(pair) + field)
    inside = np.all((voxel >= 1) & (voxel <= np.array(pair["moving_grid"].shape) - 2), axis=-1)
    assert inside.mean() > 0.5
    return inside


def agrees_with_own_resampling(pair, field, peer_warped, tolerance=1e-3):
    """Resampling the moving image through ``field`` reproduces the peer's own resampling."""
    ours = resample(pair["moving"], pair["moving_grid"], pair["fixed_grid"],
                    displacement=torch.as_tensor(field))
    error = np.abs(ours - peer_warped)[inside_moving(pair, field)].max()
    assert error < tolerance * np.ptp(pair["moving"]), f"resampling differs by {error}"


def test_translation_recovered_by_field(pair):
    """The pair itself is right: resampling through the true shift aligns the images."""
    field = np.broadcast_to(SHIFT_RAS, (*pair["fixed_grid"].shape, 3)).astype(np.float32)
    aligned = resample(pair["moving"], pair["moving_grid"], pair["fixed_grid"],
                       displacement=torch.as_tensor(field))
    fixed = io.read_volume(pair["fixed_path"]).array
    identity = resample(pair["moving"], pair["moving_grid"], pair["fixed_grid"])
    inside = inside_moving(pair, field)
    # linear interpolation of the narrow blobs leaves a little error, misalignment a lot
    assert np.abs(aligned - fixed)[inside].mean() < 0.05 * np.abs(identity - fixed)[inside].mean()


# ---- ANTs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ants():
    return pytest.importorskip("ants")


def test_ants_composite_of_known_warp_and_affine(pair, ants):
    """fwdtransforms order [warp, affine.mat] maps x -> A(x + w(x)); ANTs' LPS matrix and vectors
    arrive in RAS, and ANTs resamples the moving image exactly as our field does."""
    folder = pair["folder"]
    matrix_lps = rotation(5, 0, -7) @ np.diag([1.3, 1.0, 0.9])
    translation_lps, centre_lps = np.array([2.0, -3.0, 1.0]), np.array([1.0, 2.0, 3.0])
    affine = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                        matrix=matrix_lps, translation=translation_lps,
                                        center=centre_lps)
    ants.write_transform(affine, str(folder / "known_affine.mat"))
    lps = np.eye(4)
    lps[:3, :3] = matrix_lps
    lps[:3, 3] = centre_lps + translation_lps - matrix_lps @ centre_lps
    ras = LPS_FLIP @ lps @ LPS_FLIP
    x = fixed_points(pair)
    warp = np.stack([4.0 + 0 * x[..., 0], 2.0 * np.sin(x[..., 1] / 15.0), 1.0 + x[..., 2] / 40.0],
                    axis=-1).astype(np.float32)
    io.write_displacement(folder / "known_warp.nii.gz", warp, pair["fixed_grid"])
    transforms = [folder / "known_warp.nii.gz", folder / "known_affine.mat"]

    field, grid = peers.ants_displacement(pair["fixed_path"], transforms, folder)

    assert grid == pair["fixed_grid"] and field.shape == (*grid.shape, 3)
    expected = (x + warp) @ ras[:3, :3].T + ras[:3, 3] - x
    assert np.abs(field - expected).max() < 1e-3
    agrees_with_own_resampling(pair, field, peers.ants_apply(pair["fixed_path"], pair["moving_path"],
                                                              transforms))


def test_ants_registration_recovers_known_translation(pair, ants):
    # ANTs samples the metric randomly: a fixed seed makes its answer (and this test) repeatable
    transforms = peers.ants_register(pair["fixed_path"], pair["moving_path"], pair["folder"],
                                     type_of_transform="Translation", random_seed=1)
    field, _ = peers.ants_displacement(pair["fixed_path"], transforms, pair["folder"])
    error = np.abs(field - SHIFT_RAS).max()
    assert error < 0.25 * pair["fixed_grid"].spacing.min(), f"off by {error:.2f} mm"


# ---- elastix -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def elastix_translation(pair):
    """Register the translated pair with elastix's default translation map (fewer iterations)."""
    pytest.importorskip("itk")
    parameters = peers.elastix_parameters(("translation",), {"MaximumNumberOfIterations": 100})
    return peers.elastix_register(pair["fixed_path"], pair["moving_path"], pair["folder"],
                                  parameters=parameters, threads=2)


def test_elastix_registration_recovers_known_translation(pair, elastix_translation):
    field, grid = peers.elastix_displacement(pair["fixed_path"], elastix_translation, pair["folder"])
    assert grid == pair["fixed_grid"]
    error = np.abs(field - SHIFT_RAS).max()
    assert error < 0.25 * pair["fixed_grid"].spacing.min(), f"off by {error:.2f} mm"


def test_elastix_known_parameters_give_exact_field(pair, elastix_translation):
    """elastix parameters are LPS: a translation of (1.5, -2.5, 4) is (-1.5, 2.5, 4) in RAS."""
    known = elastix_translation.GetParameterMap(0)
    known["TransformParameters"] = ["1.5", "-2.5", "4"]
    parameters = pytest.importorskip("itk").ParameterObject.New()
    parameters.AddParameterMap(known)
    field, _ = peers.elastix_displacement(pair["fixed_path"], parameters, pair["folder"])
    assert np.abs(field - np.array([-1.5, 2.5, 4.0])).max() < 1e-4


def test_elastix_affine_bspline_field_matches_transformix_resampling(pair):
    """The composed affine + B-spline result (the benchmark's elastix method) as a field resamples
    the moving image as transformix does (linear interpolation on both sides).  Few samples and
    iterations: the check is the geometry of whatever elastix found, not its accuracy."""
    itk = pytest.importorskip("itk")
    parameters = peers.elastix_parameters(peers.ELASTIX_MAPS, {
        "MaximumNumberOfIterations": 30, "NumberOfSpatialSamples": 500,
        "ResampleInterpolator": "FinalLinearInterpolator"})
    result = peers.elastix_register(pair["fixed_path"], pair["moving_path"], pair["folder"],
                                    parameters=parameters, threads=2)
    assert result.GetNumberOfParameterMaps() == 2
    field, _ = peers.elastix_displacement(pair["fixed_path"], result, pair["folder"])
    # a moved, non-uniform mapping, so agreeing with transformix is not agreeing on identity
    assert np.abs(field).mean() > 1.0 and field.std(axis=(0, 1, 2)).max() > 0.05
    warped = itk.transformix_filter(itk.imread(str(pair["moving_path"]), itk.F), result)
    agrees_with_own_resampling(pair, field, itk.array_from_image(warped).transpose(2, 1, 0))
