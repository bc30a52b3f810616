"""The network: shapes, identity at initialisation, and the oneDNN convolution path."""
import torch

from LiquidRegLib import model as M


def test_untrained_network_is_identity_and_shapes_follow_the_svf_level():
    net = M.LiquidReg()
    fixed, moving = torch.rand(1, 1, 32, 40, 32), torch.rand(1, 1, 32, 40, 32)
    v = net(fixed, moving)
    assert v.shape == (1, 3, 16, 20, 16)  # SVF at half the working resolution
    assert torch.count_nonzero(v) == 0    # zero-initialised velocity heads


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
