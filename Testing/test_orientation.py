"""The order in which a file stores its voxels (RAS, LIP, PSL...) does not change the result:
the same image stored otherwise gives the same affine and the same deformation."""
from __future__ import annotations

import numpy as np
import pytest

from LiquidRegLib import io, register
from LiquidRegLib.affine import affine_register

from conftest import stored_as


def _stored(volume, code):
    array, grid = stored_as(volume.array, volume.grid, code)
    return io.Volume(array, grid, volume.name)


def _corner_error(grid, a, b) -> float:
    """Largest distance (mm) between where two affines send the corners of ``grid``."""
    corners = grid.corners_ras()
    diff = a - b
    return float(np.linalg.norm(corners @ diff[:3, :3].T + diff[:3, 3], axis=1).max())


@pytest.mark.parametrize("code", ["LIP", "PSL"])
def test_affine_is_the_same_whatever_the_voxel_order(small_brain_pair, code):
    fixed, _, moving, _ = small_brain_pair
    reference = affine_register(fixed, moving)
    assert _corner_error(fixed.grid, reference, np.eye(4)) > 2.0  # a real alignment
    for f, m in ((_stored(fixed, code), moving), (fixed, _stored(moving, code)),
                 (_stored(fixed, code), _stored(moving, code))):
        assert _corner_error(fixed.grid, affine_register(f, m), reference) < 1e-3


def test_registration_is_the_same_whatever_the_voxel_order(small_brain_pair):
    """Affine, network and the full-resolution outputs: the fixed image stored LIP gives the
    same displacement at every world point, and the same warped image and Jacobian."""
    fixed, _, moving, _ = small_brain_pair
    options = dict(device="cpu")
    reference = register.register(fixed, moving, **options)
    lip = register.register(_stored(fixed, "LIP"), _stored(moving, "PSL"), **options)
    for name in ("displacement", "warped", "jacobian"):
        expected, _ = stored_as(getattr(reference, name), fixed.grid, "LIP")
        difference = np.abs(getattr(lip, name) - expected).max()
        scale = np.abs(expected).max()
        assert difference < 1e-3 * scale, (name, difference, scale)
    assert np.abs(reference.displacement).max() > 2.0
