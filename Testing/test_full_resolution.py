"""The registration result at the input grids, checked against SimpleITK's own transforms.

``register`` turns a working-grid deformation and an affine into full-resolution outputs by
folding matrices together (see ``register._full_resolution``).  Here SimpleITK builds the same
mapping from a DisplacementFieldTransform on the working grid and an AffineTransform, in LPS,
independently of our geometry code, for grids with awkward orientations and spacings.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ORIENTATIONS, build_grid, rotation, world_image

from LiquidRegLib import diffeo, register
from LiquidRegLib.grid import LPS_FLIP
from LiquidRegLib.io import Volume
from LiquidRegLib.preprocess import working_grid

FLIP3 = LPS_FLIP[:3, :3]


def _image(array_ijk, grid, vector=False) -> sitk.Image:
    geometry = grid.to_itk()
    order = (2, 1, 0, 3) if vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk, order),
                                                        dtype=np.float64), isVector=vector)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def _field_transform(displacement_vox: torch.Tensor, grid) -> sitk.Transform:
    """A (1, 3, I, J, K) voxel-unit field on ``grid`` as an ITK (LPS) displacement transform."""
    ras = diffeo.voxel_to_ras_vectors(displacement_vox.double(), grid)[0].numpy()
    return sitk.DisplacementFieldTransform(_image(ras @ FLIP3, grid, vector=True))


def _affine_transform(ras_map: np.ndarray) -> sitk.Transform:
    lps = LPS_FLIP @ ras_map @ LPS_FLIP
    return sitk.AffineTransform(lps[:3, :3].ravel().tolist(), lps[:3, 3].tolist())


def _ras_displacement_on(transform: sitk.Transform, grid) -> np.ndarray:
    """T(p) - p at every voxel of ``grid``, RAS mm, [i, j, k]."""
    geometry = grid.to_itk()
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, geometry["size"],
                                              geometry["origin"], geometry["spacing"],
                                              geometry["direction"])
    return sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3) @ FLIP3


def _interior(grid, wgrid, margin: float = 1.5) -> np.ndarray:
    """Voxels of ``grid`` that lie inside ``wgrid`` by ``margin`` working voxels: ITK's field is
    zero outside its grid, ours is border-padded, so only the interior can be compared."""
    ijk = np.indices(grid.shape).reshape(3, -1).T
    w = wgrid.ras_to_voxel(grid.voxel_to_ras(ijk))
    inside = np.all((w >= margin) & (w <= np.array(wgrid.shape) - 1 - margin), axis=1)
    return inside.reshape(grid.shape)


def _forward(case) -> sitk.Transform:
    composite = sitk.CompositeTransform(_affine_transform(case["world_map"]))
    composite.AddTransform(_field_transform(case["forward"], case["wgrid"]))  # applied first
    return composite


@pytest.fixture(scope="module", params=["one slab", "slab per row"])
def case(request):
    """Also computed one row of slices at a time, as large images are (SLAB_VOXELS)."""
    fixed_grid = build_grid((34, 30, 26), (1.5, 1.2, 2.0), ORIENTATIONS["oblique"], (2.0, -5.0, 8.0))
    moving_grid = build_grid((30, 36, 28), (1.3, 1.6, 1.1), ORIENTATIONS["LIP"], (-3.0, 4.0, 6.0))
    fixed = Volume(world_image(fixed_grid), fixed_grid, "fixed")
    moving = Volume(world_image(moving_grid), moving_grid, "moving")
    wgrid = working_grid(fixed_grid, 2.0, 8)
    generator = torch.Generator().manual_seed(3)
    coarse = torch.randn((1, 3, 5, 5, 5), generator=generator, dtype=torch.float64)
    velocity = diffeo.resize_field(coarse, wgrid.shape) * 0.3  # smooth, J within ~[0.5, 2]
    forward = diffeo.integrate_velocity(velocity).float()
    inverse = diffeo.integrate_velocity(-velocity).float()
    world_map = np.eye(4)
    world_map[:3, :3] = rotation(4.0, -3.0, 6.0) * 1.05
    world_map[:3, 3] = (2.0, -3.0, 1.5)
    default = register.SLAB_VOXELS
    slab_voxels = default if request.param == "one slab" else 1
    register.SLAB_VOXELS = slab_voxels
    try:
        with torch.no_grad():
            ours = register._full_resolution(forward, inverse, wgrid, world_map, fixed, moving,
                                             "cpu")
        slabs = len(register._slabs(fixed_grid.transposed().shape))
    finally:
        register.SLAB_VOXELS = default
    assert (slabs == 1) == (request.param == "one slab")
    return dict(fixed=fixed, moving=moving, wgrid=wgrid, forward=forward, inverse=inverse,
                world_map=world_map, ours=ours, slab_voxels=slab_voxels)


def test_forward_displacement_matches_simpleitk(case):
    truth = _ras_displacement_on(_forward(case), case["fixed"].grid)
    inside = _interior(case["fixed"].grid, case["wgrid"])
    assert inside.mean() > 0.5
    error = np.linalg.norm(case["ours"]["displacement"] - truth, axis=-1)[inside]
    assert np.abs(truth).max() > 3.0  # a real deformation plus the affine
    assert error.max() < 1e-3


def test_inverse_displacement_matches_simpleitk(case):
    composite = sitk.CompositeTransform(_field_transform(case["inverse"], case["wgrid"]))
    composite.AddTransform(_affine_transform(np.linalg.inv(case["world_map"])))  # applied first
    truth = _ras_displacement_on(composite, case["moving"].grid)
    # moving voxels whose A^-1 image is inside the working grid
    pulled = build_grid(case["moving"].grid.shape, (1, 1, 1), np.eye(3))
    pulled = type(pulled)(pulled.shape, np.linalg.inv(case["world_map"]) @ case["moving"].grid.affine)
    inside = _interior(pulled, case["wgrid"])
    assert inside.mean() > 0.3
    error = np.linalg.norm(case["ours"]["inverse_displacement"] - truth, axis=-1)[inside]
    assert error.max() < 1e-3


def test_warped_image_matches_simpleitk_resampling(case):
    fixed, moving = case["fixed"], case["moving"]
    truth = sitk.GetArrayFromImage(sitk.Resample(_image(moving.array, moving.grid),
                                                 _image(fixed.array, fixed.grid), _forward(case),
                                                 sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    # Compare where the mapped point has all 8 neighbours in the moving image: at the edge of its
    # field of view ITK and grid_sample pad differently.
    mapped = _ras_displacement_on(_forward(case), fixed.grid) + fixed.grid.ras_coordinates().numpy()
    ijk = moving.grid.ras_to_voxel(mapped.reshape(-1, 3)).reshape(mapped.shape)
    within = np.all((ijk >= 0) & (ijk <= np.array(moving.grid.shape) - 1), axis=-1)
    inside = _interior(fixed.grid, case["wgrid"]) & within
    assert inside.mean() > 0.3
    error = np.abs(case["ours"]["warped"] - truth)[inside]
    assert error.max() < 1e-4 * np.abs(truth).max()


def test_jacobian_matches_finite_differences_of_the_mapping(case):
    """d phi / dx by central differences of SimpleITK's mapping (h = 0.1 mm along R, A, S)."""
    grid, h = case["fixed"].grid, 0.1
    columns = []
    for axis in range(3):
        shifted = []
        for sign in (1, -1):
            moved = grid.affine.copy()
            moved[axis, 3] += sign * h
            shifted.append(_ras_displacement_on(_forward(case), type(grid)(grid.shape, moved)))
        columns.append(np.eye(3)[axis] + (shifted[0] - shifted[1]) / (2 * h))
    truth = np.linalg.det(np.stack(columns, axis=-1))  # [..., component, axis]
    inside = _interior(grid, case["wgrid"], margin=3)
    ours = case["ours"]["jacobian"]
    assert np.ptp(truth[inside]) > 0.3  # the deformation really varies the volume
    # Ours is det(A) det(I + Du) on the working grid, interpolated; the truth differentiates the
    # trilinearly interpolated field: equal up to the discretisation of the working grid.
    assert np.median(np.abs(ours - truth)[inside]) < 0.02
    assert np.corrcoef(ours[inside], truth[inside])[0, 1] > 0.98


def test_without_the_inverse_the_rest_is_unchanged(case, monkeypatch):
    """``register(inverse=False)`` (the Slicer panel) skips only the inverse."""
    monkeypatch.setattr(register, "SLAB_VOXELS", case["slab_voxels"])
    with torch.no_grad():
        out = register._full_resolution(case["forward"], None, case["wgrid"], case["world_map"],
                                        case["fixed"], case["moving"], "cpu")
    assert out["inverse_displacement"] is None
    for key in ("displacement", "jacobian", "warped"):
        assert np.array_equal(out[key], case["ours"][key]), key
