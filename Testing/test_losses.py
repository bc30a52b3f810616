"""LNCC in fp32: bounded by construction, equal to a brute-force reference, robust to bad images."""
import numpy as np
import torch

from LiquidRegLib import losses


def brute_force_lncc(a, b, window, eps=1e-6):
    """Direct windowed NCC over in-image voxels (independent of the cumulative-sum code)."""
    a = (a - a.mean()) / a.std(ddof=1)
    b = (b - b.mean()) / b.std(ddof=1)
    r = window // 2
    out = np.zeros_like(a)
    for i, j, k in np.ndindex(a.shape):
        sl = tuple(slice(max(c - r, 0), c + r + 1) for c in (i, j, k))
        wa, wb = a[sl].ravel(), b[sl].ravel()
        cov = (wa * wb).mean() - wa.mean() * wb.mean()
        va = max((wa * wa).mean() - wa.mean() ** 2, 0.0)
        vb = max((wb * wb).mean() - wb.mean() ** 2, 0.0)
        out[i, j, k] = cov / np.sqrt(va * vb + eps)
    return out


def test_lncc_matches_brute_force():
    rng = np.random.default_rng(0)
    a = rng.random((9, 10, 11))
    b = 0.5 * a + rng.random((9, 10, 11))
    ours = losses.local_ncc(torch.tensor(a)[None, None].float(), torch.tensor(b)[None, None].float(), 5)
    np.testing.assert_allclose(ours[0, 0].numpy(), brute_force_lncc(a, b, 5), atol=2e-4)


def test_lncc_bounded_and_finite_on_adversarial_images():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 1, 24, 24, 24, generator=g)
    spike = base.clone()
    spike[0, 0, 12, 12, 12] = 1e6
    cases = [(base, base), (base, -base), (base, torch.zeros_like(base)),
             (torch.ones_like(base), torch.ones_like(base)), (spike, base), (base * 1e4, base * 1e-4)]
    for a, b in cases:
        cc = losses.local_ncc(a, b, 9)
        assert torch.isfinite(cc).all()
        assert cc.min() >= -1.0 and cc.max() <= 1.0
    assert losses.local_ncc(base, base, 9).min() > 0.99
    assert losses.local_ncc(base, -base, 9).max() < -0.99


def test_lncc_is_computed_in_fp32_under_autocast():
    a = torch.rand(1, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cc = losses.local_ncc(a, a.bfloat16(), 5)
    assert cc.dtype == torch.float32


def test_dice_and_folding_losses():
    labels = torch.zeros(1, 2, 8, 8, 8)
    labels[:, 0, :4] = 1
    labels[:, 1, 4:] = 1
    assert losses.dice_loss(labels, labels) < 1e-6
    assert losses.dice_loss(labels, labels.flip(1)) > 0.99
    assert losses.folding_loss(torch.ones(1, 1, 4, 4, 4)) == 0
    assert losses.folding_loss(-torch.ones(1, 1, 4, 4, 4)) > 0
