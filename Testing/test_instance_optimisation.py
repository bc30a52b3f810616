"""Instance optimisation (register --iterations N) recovers a known smooth deformation of a real brain."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LiquidRegLib import checkpoint, diffeo, io, register
from LiquidRegLib.grid import Grid, resample
from LiquidRegLib.model import LiquidReg

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample"


def mean_dice(a, b):
    scores = []
    for label in np.intersect1d(np.unique(a[a > 0]), np.unique(b[b > 0])):
        x, y = a == label, b == label
        scores.append(2 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def deformed_brain(tmp_path_factory):
    """The sample's fixed brain at 2 mm and a copy warped by a known smooth diffeomorphism."""
    t1 = io.read_volume(SAMPLE / "fixed_t1.nii.gz")
    labels = io.read_volume(SAMPLE / "fixed_labels.nii.gz")
    grid2 = Grid(tuple(int(np.ceil(s / 2)) for s in t1.grid.shape),
                 t1.grid.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    image = resample(t1.array, t1.grid, grid2)
    lab = resample(labels.array, labels.grid, grid2, order="nearest")
    g = torch.Generator().manual_seed(5)
    v = F.interpolate(torch.randn(1, 3, 4, 5, 4, generator=g) * 1.5, size=grid2.shape,
                      mode="trilinear", align_corners=True)
    disp = diffeo.voxel_to_ras_vectors(diffeo.integrate_velocity(v), grid2)[0]
    assert disp.norm(dim=-1).max() > 3.0  # several mm
    moving = io.Volume(resample(image, grid2, grid2, displacement=disp), grid2)
    moving_labels = resample(lab, grid2, grid2, displacement=disp, order="nearest")
    weights = tmp_path_factory.mktemp("w") / "identity.pt"
    checkpoint.save_weights(weights, LiquidReg())  # zero velocity heads: the network is identity
    return io.Volume(image, grid2), lab, moving, moving_labels, weights


def test_instance_optimisation_improves_dice_and_stays_diffeomorphic(deformed_brain):
    fixed, fixed_labels, moving, moving_labels, weights = deformed_brain
    before = mean_dice(fixed_labels, moving_labels)
    events = []
    result = register.register(fixed, moving, iterations=40, affine=False, weights=weights,
                               device="cpu", progress=events.append)
    warped_labels = resample(moving_labels, moving.grid, fixed.grid,
                             displacement=torch.from_numpy(result.displacement), order="nearest")
    after = mean_dice(fixed_labels, warped_labels)
    assert after > before + 0.05, (before, after)
    assert result.jacobian.min() > 0
    assert result.summary["pct_folding"] == 0.0
    assert result.summary["instance_optimisation"]["steps"] == 40
    assert any(e.stage == "instance" for e in events)
    assert result.summary["similarity"]["after"] > result.summary["similarity"]["after_affine"]
