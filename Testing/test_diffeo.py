"""Scaling and squaring, composition and Jacobians, checked against analytic maps and SimpleITK."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LiquidRegLib import diffeo
from LiquidRegLib.grid import Grid


def smooth_velocity(shape, amplitude, seed=0, control=(5, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, *control, generator=g) * amplitude
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def oblique_grid(shape=(24, 26, 22)):
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-1.0, 1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([1.2, 0.9, 2.0])
    m[:3, 3] = (10.0, -20.0, 5.0)
    return Grid(shape, m)


def test_exp_v_composed_with_exp_minus_v_is_identity():
    """Inverse consistency of scaling and squaring for a deformation of several voxels.

    Trilinear interpolation (in the squarings and in this check's own composition) bounds the
    accuracy: 99% of interior voxels must be within 0.1 voxel, none further than 0.25.
    """
    v = smooth_velocity((40, 44, 40), amplitude=1.0)
    forward = diffeo.integrate_velocity(v)
    backward = diffeo.integrate_velocity(-v)
    assert forward.abs().max() > 3.0  # a real deformation, not a trivial one
    for roundtrip in (diffeo.compose(backward, forward), diffeo.compose(forward, backward)):
        error = roundtrip[:, :, 6:-6, 6:-6, 6:-6].norm(dim=1).flatten()
        assert torch.quantile(error, 0.99) < 0.1
        assert error.max() < 0.25


def test_jacobian_positive_for_large_smooth_velocity():
    v = smooth_velocity((40, 44, 40), amplitude=6.0, seed=3)
    disp = diffeo.integrate_velocity(v)
    assert disp.abs().max() > 8.0
    assert diffeo.jacobian_determinant(disp).min() > 0


def test_too_few_squarings_rejected():
    with pytest.raises(ValueError):
        diffeo.integrate_velocity(torch.zeros(1, 3, 8, 8, 8), steps=4)


def test_constant_velocity_is_a_translation():
    v = torch.zeros(1, 3, 20, 20, 20)
    v[:, 0] = 1.5
    v[:, 2] = -0.5
    disp = diffeo.integrate_velocity(v)
    assert torch.allclose(disp[:, :, 3:-3, 3:-3, 3:-3], v[:, :, 3:-3, 3:-3, 3:-3], atol=1e-4)


def test_resize_field_keeps_physical_displacement():
    v = torch.zeros(1, 3, 10, 12, 14)
    v[:, 1] = 2.0  # 2 coarse voxels along j = 2 * (23/11) fine voxels
    up = diffeo.resize_field(v, (20, 24, 28))
    assert torch.allclose(up[:, 1], torch.full_like(up[:, 1], 2.0 * 23 / 11))


def test_jacobian_ras_matches_affine_determinant_on_oblique_grid():
    grid = oblique_grid()
    x = grid.ras_coordinates(dtype=torch.float64)
    a = torch.tensor([[1.1, 0.05, 0.0], [0.0, 0.9, 0.02], [0.01, 0.0, 1.2]], dtype=torch.float64)
    u = x @ a.T - x
    jac = diffeo.jacobian_determinant_ras(u, grid)
    assert torch.allclose(jac, torch.det(a).expand_as(jac), atol=1e-8)


def test_jacobian_ras_matches_simpleitk():
    """SimpleITK's filter ignores direction cosines, so compare on an LPS-stored grid (identity
    ITK direction, flipped x/y in RAS) with anisotropic spacing; the oblique case is covered by
    the analytic test above."""
    sitk = pytest.importorskip("SimpleITK")
    grid = Grid((24, 26, 22), np.diag([-1.2, -0.9, 2.0, 1.0]) + np.array(
        [[0, 0, 0, 30.0], [0, 0, 0, 12.0], [0, 0, 0, -40.0], [0, 0, 0, 0]]))
    v = smooth_velocity(grid.shape, amplitude=1.5, seed=7)
    disp_vox = diffeo.integrate_velocity(v)
    u = diffeo.voxel_to_ras_vectors(disp_vox, grid)[0].double()
    ours = diffeo.jacobian_determinant_ras(u, grid).numpy()
    # SimpleITK: LPS vectors on an LPS grid, array order [k, j, i]
    lps = u.numpy() * np.array([-1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(np.ascontiguousarray(lps.transpose(2, 1, 0, 3)), isVector=True)
    itk = grid.to_itk()
    image.SetSpacing(itk["spacing"])
    image.SetOrigin(itk["origin"])
    image.SetDirection(itk["direction"])
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image)).transpose(2, 1, 0)
    inner = (slice(1, -1),) * 3  # both use central differences inside
    np.testing.assert_allclose(ours[inner], theirs[inner], atol=1e-5)


def test_pooled_grid_places_block_centres_in_the_world():
    """A block-averaged array's grid puts each coarse voxel at the centre of its block."""
    grid = oblique_grid((10, 9, 7))
    coarse = grid.pooled((2, 3, 2))
    assert coarse.shape == (5, 3, 4)
    block_centre = grid.voxel_to_ras(np.array([2 * 1 + 0.5, 3 * 2 + 1.0, 2 * 0 + 0.5]))
    np.testing.assert_allclose(coarse.voxel_to_ras([1, 2, 0]), block_centre, atol=1e-9)


def test_transposed_grid_places_kji_arrays_in_the_same_world():
    grid = oblique_grid((6, 5, 4))
    flipped = grid.transposed()
    assert flipped.shape == (4, 5, 6)
    np.testing.assert_allclose(flipped.voxel_to_ras([3, 1, 5]), grid.voxel_to_ras([5, 1, 3]))


def test_sampling_grid_folds_the_normalisation_into_the_point_map():
    from LiquidRegLib.grid import mapped_voxels, sampling_grid, voxel_to_normalized
    voxel_map = oblique_grid().affine @ np.diag([0.3, 0.2, 0.25, 1.0])
    expected = voxel_to_normalized(mapped_voxels((7, 8, 9), voxel_map), (30, 20, 25))
    torch.testing.assert_close(sampling_grid((7, 8, 9), voxel_map, (30, 20, 25)), expected)


@pytest.mark.parametrize("depth", [13, 12])  # uneven and even slabs
@pytest.mark.parametrize("channels, mode, padding", [(4, "bilinear", "border"),
                                                     (1, "bilinear", "zeros"),
                                                     (2, "nearest", "zeros")])
def test_slab_sampling_equals_one_call_with_gradients(monkeypatch, depth, channels, mode, padding):
    """Large CPU grids are sampled as a batch of slabs: same values, same gradients."""
    from LiquidRegLib import grid as G
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(1, channels, 9, 10, 11, generator=generator, requires_grad=True)
    points = (torch.rand(1, depth, 7, 5, 3, generator=generator) * 2.4 - 1.2).requires_grad_()
    results = []
    for threshold in (10 ** 9, 10):  # one call, then slabs
        monkeypatch.setattr(G, "_PARALLEL_POINTS", threshold)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
        out = G.sample_at(volume, points, mode=mode, padding_mode=padding)
        (out * torch.linspace(-1, 2, out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), volume.grad.clone(), points.grad.clone()))
        volume.grad, points.grad = None, None
    (whole, grad_volume, grad_points), (slabs, slab_grad_volume, slab_grad_points) = results
    assert slabs.shape == whole.shape
    torch.testing.assert_close(slabs, whole, rtol=0, atol=0)
    torch.testing.assert_close(slab_grad_points, grad_points, rtol=0, atol=0)
    torch.testing.assert_close(slab_grad_volume, grad_volume, rtol=1e-6, atol=1e-6)  # sum order

