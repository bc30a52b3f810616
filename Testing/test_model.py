"""The network: identity at initialisation, level geometry, the matching evidence the cell sees,
runtime step counts, and the oneDNN convolution path."""
import pytest
import torch

from LiquidRegLib import model as M


def test_untrained_network_is_identity_on_the_working_grid():
    net = M.LiquidReg()
    fixed, moving = torch.rand(1, 1, 32, 40, 32), torch.rand(1, 1, 32, 40, 32)
    v = net(fixed, moving)
    assert v.shape == (1, 3, 32, 40, 32)  # the SVF lives on the working grid
    assert torch.count_nonzero(v) == 0    # zero-initialised velocity heads


def test_upsampled_field_keeps_coarse_voxel_i_at_fine_voxel_2i():
    coarse = torch.randn(2, 3, 5, 6, 7)
    fine = M.upsample_field(coarse, (10, 12, 14))
    assert fine.shape == (2, 3, 10, 12, 14)
    assert torch.allclose(fine[:, :, ::2, ::2, ::2], 2 * coarse, atol=1e-6)
    # halfway between two coarse voxels, the mean of their (doubled) vectors
    assert torch.allclose(fine[:, :, 1:-1:2, ::2, ::2],
                          coarse[:, :, :-1] + coarse[:, :, 1:], atol=1e-5)


def test_stride_two_features_sit_where_the_level_geometry_says():
    """A stride-2 convolution's output voxel i is centred on input voxel 2i: the correspondence
    upsample_field assumes.  A delta at 2i must land at i, not between voxels."""
    conv = torch.nn.Conv3d(1, 1, 3, stride=2, padding=1, bias=False)
    torch.nn.init.zeros_(conv.weight)
    conv.weight.data[0, 0, 1, 1, 1] = 1.0  # the centre tap only
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 6, 10, 4] = 1.0
    out = conv(x)
    assert out[0, 0, 3, 5, 2] == 1.0 and out.sum() == 1.0


def test_cost_volume_matches_a_direct_computation():
    torch.manual_seed(0)
    f, m = torch.randn(1, 4, 6, 7, 5), torch.randn(1, 4, 6, 7, 5)
    r = 1
    fn, mn = torch.nn.functional.normalize(f, dim=1), torch.nn.functional.normalize(m, dim=1)
    assert torch.allclose(M.unit_vectors(f), fn, atol=1e-6)
    assert torch.equal(M.unit_vectors(torch.zeros(1, 4, 2, 2, 2)), torch.zeros(1, 4, 2, 2, 2))
    cost = M.cost_volume(fn, m, r)
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    for d, (a, b, c) in enumerate(offsets):
        for (i, j, k) in [(0, 0, 0), (3, 4, 2), (5, 6, 4), (2, 0, 4)]:
            ii, jj, kk = i + a, j + b, k + c
            inside = 0 <= ii < 6 and 0 <= jj < 7 and 0 <= kk < 5
            expected = float((fn[0, :, i, j, k] * mn[0, :, ii, jj, kk]).sum()) if inside else 0.0
            assert abs(float(cost[0, d, i, j, k]) - expected) < 1e-5


def direct_cost_volume(fixed_unit, moving, radius):
    """The cost volume as the v1/v2 networks first computed it: one shifted slice per offset."""
    m = torch.nn.functional.pad(M.unit_vectors(moving), [radius] * 6)
    size, span = fixed_unit.shape[2:], range(2 * radius + 1)
    return torch.cat([(fixed_unit * m[:, :, a:a + size[0], b:b + size[1], c:c + size[2]]).sum(1, keepdim=True)
                      for a in span for b in span for c in span], dim=1)


@pytest.mark.parametrize("radius", [1, 2])
def test_batched_cost_volume_equals_the_sliced_one_with_gradients(radius):
    """Values and both gradients of the batched cost volume against the per-offset slices that
    the shipped weights were trained with (float64: agreement to rounding), and a numerical
    gradient check of its hand-written backward."""
    torch.manual_seed(radius)
    f = M.unit_vectors(torch.randn(2, 5, 6, 7, 5, dtype=torch.float64)).requires_grad_(True)
    m = torch.randn(2, 5, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, (2 * radius + 1) ** 3, 6, 7, 5, dtype=torch.float64)
    ours, direct = M.cost_volume(f, m, radius), direct_cost_volume(f, m, radius)
    assert ours.shape == direct.shape
    assert torch.allclose(ours, direct, atol=1e-12)
    grads = torch.autograd.grad((ours * weights).sum(), [f, m])
    expected = torch.autograd.grad((direct * weights).sum(), [f, m])
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-12)
    small = (f.detach()[:1, :2, :3, :4, :3].requires_grad_(True),
             m.detach()[:1, :2, :3, :4, :3].requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: M.cost_volume(a, b, radius), small)


def test_cost_volume_keeps_the_precision_of_mixed_precision_training():
    """Under autocast the features are fp16/bf16; the channel sums are still made in float32."""
    torch.manual_seed(0)
    f, m = M.unit_vectors(torch.randn(1, 48, 6, 6, 6)), torch.randn(1, 48, 6, 6, 6)
    exact = direct_cost_volume(f.double(), m.double(), 2)
    half = M.cost_volume(f.bfloat16(), m.bfloat16(), 2)
    assert half.dtype == torch.bfloat16
    # one bf16 rounding of inputs and result (~0.003), not one per channel (~0.009)
    assert (half.double() - exact).abs().max() < 0.005


def test_expected_offset_points_to_where_the_moving_image_matches():
    """Moving = fixed shifted by +1 voxel along j: the best match of fixed voxel x is moving
    voxel x + (0, 1, 0), and the soft-argmax says so."""
    torch.manual_seed(1)
    f = torch.randn(1, 8, 10, 12, 10)
    m = torch.roll(f, 1, dims=3)
    cost = M.cost_volume(torch.nn.functional.normalize(f, dim=1), m, 2)
    offset = M.expected_offset(cost, 2, torch.tensor(50.0))
    inner = offset[0, :, 3:-3, 3:-3, 3:-3]
    assert torch.allclose(inner.mean((1, 2, 3)), torch.tensor([0.0, 1.0, 0.0]), atol=0.05)


def test_more_refinement_steps_are_a_runtime_setting():
    torch.manual_seed(0)
    net = M.LiquidReg()
    for head in net.heads:
        torch.nn.init.normal_(head.weight, std=0.01)
    fixed, moving = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        one, three = net(fixed, moving, steps=1), net(fixed, moving, steps=3)
        default, estimates = net(fixed, moving, every_level=True)
    assert not torch.allclose(one, three)
    assert [level for level, _ in estimates] == [3, 2, 1, 0]
    assert torch.equal(estimates[-1][1], default)
    assert estimates[0][1].shape[2:] == (4, 4, 4)
    with pytest.raises(ValueError, match="one entry per level"):
        M.LiquidReg(M.ModelConfig(steps=(1, 2)))


def test_onednn_conv_matches_standard_conv_forward_and_gradients():
    torch.manual_seed(0)
    conv = M.Conv3d(5, 7, 3, padding=1)
    x = torch.rand(1, 5, 12, 14, 10, requires_grad=True)
    ours = conv(x)
    grads = torch.autograd.grad(ours.square().sum(), [x, conv.weight, conv.bias])
    reference = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1)
    ref_grads = torch.autograd.grad(reference.square().sum(), [x, conv.weight, conv.bias])
    assert torch.allclose(ours, reference, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)


def test_liquid_cell_state_stays_bounded_for_any_step():
    """The fused semi-implicit step keeps |h| bounded by max|f| * tau for any dt."""
    cell = M.LiquidCell(4, 6, tau_min=0.5)
    u = torch.randn(1, 4, 8, 8, 8) * 100
    h = torch.zeros(1, 6, 8, 8, 8)
    zero = (torch.zeros(1, 6, 1, 1, 1),) * 3
    for dt in (0.1, 1.0, 100.0):
        for _ in range(20):
            h = cell(u, h, zero, dt)
        assert torch.isfinite(h).all() and h.abs().max() < 1e3


def test_inference_gives_the_same_field_in_one_batch_or_direction_by_direction(monkeypatch):
    """Inference refines both directions of the symmetric network as one batch when the level
    fits the memory budget, else one direction after the other: the same field either way."""
    torch.manual_seed(0)
    net = M.LiquidReg().eval()
    for head in net.heads:
        torch.nn.init.normal_(head.weight, std=0.01)
    torch.nn.init.normal_(net.hyper.mlp[-1].weight, std=0.01)
    fixed, moving = torch.rand(1, 1, 32, 40, 32), torch.rand(1, 1, 32, 40, 32)
    calls = []
    refine_level = net._refine_level

    def counting(level, fixed_side, *rest):
        calls.append((level, fixed_side.shape[0]))
        return refine_level(level, fixed_side, *rest)

    monkeypatch.setattr(net, "_refine_level", counting)
    with torch.no_grad():
        batched = net(fixed, moving)
        assert calls == [(level, 2) for level in (3, 2, 1, 0)]
        calls.clear()
        monkeypatch.setattr(M, "CPU_BATCH_BYTES", 1)  # nothing fits: one row at a time
        sequential = net(fixed, moving)
        assert calls == [(level, 1) for level in (3, 2, 1, 0) for _ in range(2)]
        with torch.enable_grad():  # training always batches
            calls.clear()
            trained = net(fixed, moving)
            assert calls == [(level, 2) for level in (3, 2, 1, 0)]
    assert torch.count_nonzero(batched) > 0
    assert torch.allclose(batched, sequential, atol=1e-5)
    assert torch.allclose(batched, trained, atol=1e-5)
    with torch.no_grad():  # still exactly antisymmetric: swapping the images negates the field
        assert torch.allclose(net(moving, fixed), -sequential, atol=1e-5)
