"""Instance optimisation (register --iterations N) recovers a known smooth deformation of a real
brain, and keeps the network's answer (saying why) when an optimisation ends worse or folds."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LiquidRegLib import checkpoint, diffeo, io, register, train
from LiquidRegLib.grid import resample
from LiquidRegLib.model import LiquidReg
from conftest import mean_dice


@pytest.fixture(scope="module")
def deformed_brain(tmp_path_factory, small_brain_pair):
    """The sample's fixed brain (2 mm, cropped) and a copy warped by a known diffeomorphism."""
    t1, labels = small_brain_pair[:2]
    grid2, image, lab = t1.grid, t1.array, labels.array
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
    result = register.register(fixed, moving, iterations=30, affine=False, weights=weights,
                               device="cpu", progress=events.append)
    warped_labels = resample(moving_labels, moving.grid, fixed.grid,
                             displacement=torch.from_numpy(result.displacement), order="nearest")
    after = mean_dice(fixed_labels, warped_labels)
    assert after > before + 0.05, (before, after)
    assert result.jacobian.min() > 0
    assert result.summary["pct_folding"] == 0.0
    record = result.summary["instance_optimisation"]
    assert record["steps"] == 30  # one contrast (the same image deformed): auto takes LNCC
    assert record["similarity"] == "lncc", record
    assert record["similarity_choice"]["contrast_agreement"] >= train.SAME_CONTRAST_AGREEMENT
    assert record["kept"] == "optimised" and record["reason"] is None
    assert record["dissimilarity_after"] < record["dissimilarity_before"]
    assert any(e.stage == "instance" for e in events)
    assert result.summary["similarity"]["after"] > result.summary["similarity"]["after_affine"]


def ended_badly(monkeypatch, correction):
    """Make every instance optimisation end with ``correction(shape)`` as its 4 mm correction:
    an optimiser that went wrong, which the safety must catch."""
    from LiquidRegLib import train

    real_run = train.run

    def run(trainable, *args, **kwargs):
        state = real_run(trainable, *args, **kwargs)
        if isinstance(trainable, train.InstanceVelocity):
            with torch.no_grad():
                trainable.correction.copy_(correction(trainable.correction.shape))
        return state
    monkeypatch.setattr(train, "run", run)


def registered(fixed, moving, weights, iterations):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = register.register(fixed, moving, iterations=iterations, affine=False,
                                   weights=weights, device="cpu")
    return result, [str(w.message) for w in caught]


def test_accurate_keeps_the_network_answer_when_the_optimisation_makes_the_match_worse(
        deformed_brain, monkeypatch):
    fixed, _, _, _, weights = deformed_brain
    fast, _ = registered(fixed, fixed, weights, 0)  # identity network: already the answer

    def shift(shape):  # a translation by 1.5 voxels at 4 mm: no folding, but misaligned
        field = torch.zeros(shape)
        field[:, 0] = 1.5
        return field
    ended_badly(monkeypatch, shift)
    result, messages = registered(fixed, fixed, weights, 3)
    record = result.summary["instance_optimisation"]
    assert record["kept"] == "network" and "worse" in record["reason"], record
    assert record["dissimilarity_after"] > record["dissimilarity_before"]
    assert record["folded_voxels"] == {"network": 0, "optimised": 0}
    assert np.array_equal(result.displacement, fast.displacement)  # exactly Fast's answer
    assert any("kept the network's answer" in m for m in messages), messages


def test_accurate_keeps_the_network_answer_when_the_optimisation_folds_the_map(
        deformed_brain, monkeypatch):
    fixed, _, moving, _, weights = deformed_brain
    fast, _ = registered(fixed, moving, weights, 0)

    def fold(shape):  # neighbouring 4 mm voxels move 24 voxels apart, opposite ways: even
        field = torch.zeros(shape)  # scaling and squaring cannot keep that map from folding
        field[:, 0, 0::2] = 12.0
        field[:, 0, 1::2] = -12.0
        return field
    ended_badly(monkeypatch, fold)
    result, messages = registered(fixed, moving, weights, 3)
    record = result.summary["instance_optimisation"]
    assert record["kept"] == "network" and "folded" in record["reason"], record
    assert record["folded_voxels"]["optimised"] > record["folded_voxels"]["network"] == 0
    assert np.array_equal(result.displacement, fast.displacement)
    assert result.summary["pct_folding"] == 0.0
    assert any("folded" in m for m in messages), messages
