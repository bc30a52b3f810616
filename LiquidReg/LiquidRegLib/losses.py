"""Similarity and regularisation terms.  All computed in fp32 (or fp64 sums) outside autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a centred ``window``^3 box (zero outside) by cumulative sums: O(1) per voxel."""
    r = window // 2
    for dim in (2, 3, 4):
        pad = [0] * 6
        pad[2 * (4 - dim)] = r + 1  # one extra leading zero so that c[i + window] - c[i] is the box
        pad[2 * (4 - dim) + 1] = r
        c = F.pad(x, pad).cumsum(dim)
        n = x.shape[dim]
        x = c.narrow(dim, window, n) - c.narrow(dim, 0, n)
    return x


def _box_count(shape, window: int, device) -> torch.Tensor:
    """Number of in-image voxels in each box: a product of 1-D counts, shape (1, 1, I, J, K)."""
    r = window // 2
    counts = []
    for axis, n in enumerate(shape):
        i = torch.arange(n, device=device, dtype=torch.float32)
        c = (i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = n
        counts.append(c.view(view))
    return counts[0] * counts[1] * counts[2]


def _standardise(x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(2, x.dim()))
    return (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True).clamp(min=1e-6)


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9,
              eps: float = 1e-6) -> torch.Tensor:
    """Signed local normalised cross-correlation map, in [-1, 1] by construction.

    Computed outside autocast.  Both images are standardised first, which keeps the cumulative
    box sums small for fp32 and makes ``eps`` (on the product of per-voxel variances) independent
    of the intensity scale.  Statistics use the number of voxels actually inside the image.
    Rounding can leave the estimates inconsistent, so before dividing (in float64) they are made
    consistent: variances are clamped at zero and the variance product is kept at least cov^2
    (Cauchy-Schwarz).  An fp32 covariance squares exactly in float64, so ``|cc| <= 1`` holds
    exactly; ``eps`` sends flat windows to 0.  The result itself is never clamped.
    """
    with torch.autocast(device_type=fixed.device.type, enabled=False):
        i = _standardise(fixed.float())
        j = _standardise(warped.float())
        count = _box_count(i.shape[2:], window, i.device)
        stats = _box_sum(torch.cat([i, j, i * i, j * j, i * j], dim=1), window) / count
        mi, mj, mii, mjj, mij = stats.split(fixed.shape[1], dim=1)
        var_i = (mii - mi * mi).clamp(min=0).double()
        var_j = (mjj - mj * mj).clamp(min=0).double()
        cross = (mij - mi * mj).double()
        variance = torch.maximum(var_i * var_j, cross * cross)
        return (cross / torch.sqrt(variance + eps)).float()


def lncc_loss(fixed, warped, window: int = 9, mask: torch.Tensor | None = None,
              per_item: bool = False) -> torch.Tensor:
    """1 - mean local NCC (within ``mask`` if given); in [0, 2].  ``per_item``: one value per
    batch item (N,), so a batch can weigh its items differently."""
    cc = local_ncc(fixed, warped, window)
    w = torch.ones_like(cc) if mask is None else mask.float().expand_as(cc)
    dims = tuple(range(1, cc.dim())) if per_item else tuple(range(cc.dim()))
    return 1.0 - (cc * w).sum(dims) / w.sum(dims).clamp(min=1.0)


def dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor,
              eps: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over label channels present in either map (0 if none is).

    Computed without asking which channels are present (on a GPU that question would make the
    host wait): absent channels get weight 0."""
    dims = (2, 3, 4)
    inter = (fixed_onehot * warped_onehot).sum(dims)
    total = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    present = (total > eps).to(total.dtype)
    dice = (2 * inter + eps) / (total + eps)
    return ((1.0 - dice) * present).sum() / present.sum().clamp(min=1.0)


def diffusion_loss(field: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of an (N, 3, I, J, K) field (first-order smoothness)."""
    dx = field[:, :, 1:] - field[:, :, :-1]
    dy = field[:, :, :, 1:] - field[:, :, :, :-1]
    dz = field[:, :, :, :, 1:] - field[:, :, :, :, :-1]
    return (dx.pow(2).mean() + dy.pow(2).mean() + dz.pow(2).mean()) / 3


def folding_loss(jacobian_det: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean hinge on J <= margin: zero for a diffeomorphism, grows with the amount of folding."""
    return F.relu(margin - jacobian_det).mean()
