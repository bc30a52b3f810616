"""Similarity and regularisation terms.  All computed in fp32 (or fp64 sums) outside autocast.

Two kinds of image similarity: LNCC, for images of one contrast (training pairs that share a
contrast), and MIND-SSC descriptors compared by their squared difference, which do not depend
on the contrast (instance optimisation of any pair: T1 to T2, FLAIR, PD, ...).  NGF, another
contrast-free measure, is kept as the measured alternative (see ``train.instance_optimise``).
"""
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
    return 1.0 - _masked_mean(local_ncc(fixed, warped, window), mask, per_item)


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


# ---- contrast-free similarity ---------------------------------------------------------------
#: The six face neighbours of a voxel.  MIND-SSC (Heinrich et al., MICCAI 2013) compares the 12
#: pairs of them that lie sqrt(2) apart, so no comparison involves the centre voxel itself, whose
#: noise would otherwise enter every channel.
_FACES = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))
SSC_PAIRS = tuple((a, b) for n, a in enumerate(_FACES) for b in _FACES[n + 1:]
                  if sum((x - y) ** 2 for x, y in zip(a, b)) == 2)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2,
             noise_floor: float = 1e-2) -> torch.Tensor:
    """MIND-SSC descriptors of an (N, 1, I, J, K) image: (N, 12, I, J, K) in (0, 1].

    Channel c is exp(-D_c / V): D_c the patch distance (mean squared difference over a
    (2 radius + 1)^3 patch) between the two neighbours of pair c, ``dilation`` voxels from the
    centre, less the smallest D of the voxel; V the mean of the voxel's D plus ``noise_floor``
    times the image's mean V.  The descriptor describes local *structure* (where edges are,
    relative to each other), not intensities: an affine change of intensities (any sign) leaves it
    unchanged exactly, a monotone one nearly (it is locally affine).  Patch distances are averages
    of squares and the smallest is subtracted, so every D and V is >= 0 without any clamp; the
    floor keeps flat regions (V -> 0) at descriptor 1 instead of 0/0, and it scales with the
    image, so the invariance holds.
    """
    with torch.autocast(device_type=image.device.type, enabled=False):
        x = image.float()
        d, size = dilation, x.shape[2:]
        padded = F.pad(x, [d] * 6, mode="replicate")

        def neighbour(offset):
            i, j, k = (d + o * d for o in offset)
            return padded[:, :, i:i + size[0], j:j + size[1], k:k + size[2]]

        near = {offset: neighbour(offset) for offset in _FACES}
        squared = torch.cat([(near[a] - near[b]).pow(2) for a, b in SSC_PAIRS], dim=1)
        distance = F.avg_pool3d(squared, 2 * radius + 1, stride=1, padding=radius,
                                count_include_pad=False)
        distance = distance - distance.amin(1, keepdim=True)
        variance = distance.mean(1, keepdim=True)
        floor = noise_floor * variance.mean((1, 2, 3, 4), keepdim=True)
        return torch.exp(-distance / (variance + floor + torch.finfo(x.dtype).tiny))


def _masked_mean(values: torch.Tensor, mask, per_item: bool) -> torch.Tensor:
    """Mean of an (N, 1, ...) map over ``mask`` (all voxels if None); (N,) if ``per_item``."""
    w = torch.ones_like(values) if mask is None else mask.float().expand_as(values)
    dims = tuple(range(1, values.dim())) if per_item else tuple(range(values.dim()))
    return (values * w).sum(dims) / w.sum(dims).clamp(min=1.0)


def descriptor_loss(fixed_descriptors: torch.Tensor, warped_descriptors: torch.Tensor,
                    mask: torch.Tensor | None = None, per_item: bool = False) -> torch.Tensor:
    """Mean squared difference of two descriptor maps (e.g. :func:`mind_ssc`), averaged over
    channels and over ``mask``; 0 for identical descriptors."""
    with torch.autocast(device_type=fixed_descriptors.device.type, enabled=False):
        squared = (fixed_descriptors.float() - warped_descriptors.float()).pow(2)
        return _masked_mean(squared.mean(1, keepdim=True), mask, per_item)


def _normalised_gradient(image: torch.Tensor, edge: float) -> torch.Tensor:
    """Central-difference gradient (N, 3, ...) divided by sqrt(|g|^2 + eps^2), eps^2 being
    ``edge`` times the image's mean |g|^2 (so the result does not depend on intensity scale)."""
    g = torch.cat(torch.gradient(image.float(), dim=(2, 3, 4)), dim=1)
    norm2 = g.pow(2).sum(1, keepdim=True)
    eps2 = edge * norm2.mean((1, 2, 3, 4), keepdim=True) + torch.finfo(g.dtype).tiny
    return g * torch.rsqrt(norm2 + eps2)


def ngf_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None,
             edge: float = 0.1, per_item: bool = False) -> torch.Tensor:
    """1 - mean squared cosine of the normalised gradient fields (Haber and Modersitzki), in
    [0, 1]: edges that line up count whatever their contrast or its sign."""
    with torch.autocast(device_type=fixed.device.type, enabled=False):
        cosine = (_normalised_gradient(fixed, edge) * _normalised_gradient(warped, edge)).sum(
            1, keepdim=True)
        return 1.0 - _masked_mean(cosine.pow(2), mask, per_item)
