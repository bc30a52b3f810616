"""The LiquidReg network: a liquid time-constant (LTC) cell used as a learned iterative optimiser
of a stationary velocity field, coarse to fine, modulated for each pair by a hypernetwork.

A shared (siamese) encoder gives features of both images at 1, 1/2, 1/4 and 1/8 of the working
grid (2, 4, 8, 16 mm).  From the coarsest level to the working grid, the cell takes a few steps;
at every step it sees *where the moving image should go*:

* a local cost volume: the cosine similarity of each fixed feature vector with the warped
  moving feature vectors within a small search radius (``(2r + 1)^3`` channels),
* its soft-argmax, the similarity-weighted mean offset: a direct vector towards the best match,
* the fixed features, the moving features warped by the current estimate exp(v), and v itself,

and updates its state with the LTC dynamics

    dh/dt = -h / tau(h, u) + f(h, u),      tau = tau_min + softplus(W_tau [h, u] + b_tau(pair))

integrated by the fused semi-implicit Euler step ``h <- (h + dt f) / (1 + dt / tau)``, stable for
any ``dt`` because tau > 0.  A zero-initialised head turns the state into a velocity increment,
so an untrained network returns the identity.  Weights are shared across the steps of a level,
which makes the number of steps a runtime setting.  The hypernetwork maps statistics of both
images' coarsest features to a FiLM gain and shift of ``f`` and the bias of ``tau`` at every level
(zero-initialised: untrained, it leaves the cells unmodulated).

Level geometry: voxel ``i`` of level ``l`` sits at working voxel ``2^l i`` (the centre of a
stride-2 convolution), and fields move between levels with exactly that correspondence
(:func:`upsample_field`), so coarse estimates do not drift against the features.  The returned
velocity lives on the working grid, in its voxel units (see :mod:`diffeo`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import diffeo


@dataclass
class ModelConfig:
    channels: tuple = (8, 16, 32, 48)   # encoder channels at working-grid scales 1, 1/2, 1/4, 1/8
    hidden: tuple = (8, 16, 24, 32)     # LTC state channels per level
    steps: tuple = (1, 2, 2, 2)         # default LTC steps per level (a runtime setting)
    radius: tuple = (1, 1, 2, 2)        # cost-volume search radius per level (voxels)
    hyper_hidden: int = 64
    dt: float = 1.0
    tau_min: float = 0.5
    velocity_scale: float = 1.0         # head output (voxels of its level) -> velocity
    squarings: int = 7
    working_spacing: float = 2.0        # mm; the grid the network sees (see preprocess)
    symmetric: bool = True              # v = (v(f, m) - v(m, f)) / 2: inverse-consistent

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def divisor(self) -> int:
        """Working-grid sizes must be multiples of this (pyramid halvings)."""
        return 2 ** (len(self.channels) - 1)


class Conv3d(nn.Conv3d):
    """A Conv3d that runs on oneDNN for CPU float32.

    PyTorch's size heuristic sends small-channel 3-D convolutions to its THNN kernel, which is up
    to 5x slower here (e.g. the 1->8 channel layer on the working grid); oneDNN gives the same
    result and gradients.  Elsewhere (CUDA, bf16) the standard path is used.
    """

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding,
                                            self.stride, self.dilation, self.groups)
        return super().forward(x)


def _conv(cin, cout, k=3, stride=1):
    return Conv3d(cin, cout, k, stride=stride, padding=k // 2)


def upsample_field(field: torch.Tensor, shape) -> torch.Tensor:
    """A voxel-unit field of level ``l + 1`` on the grid of level ``l`` (``shape``, twice as large).

    Coarse voxel ``i`` is fine voxel ``2i``: trilinear interpolation onto ``2n - 1`` voxels with
    aligned corners is exactly that map; the last fine voxel (beyond the last coarse centre) is
    extended from its neighbour.  Vectors double with the voxel size.
    """
    shape = tuple(int(s) for s in shape)
    inner = tuple(2 * n - 1 for n in field.shape[2:])
    out = F.interpolate(2 * field, size=inner, mode="trilinear", align_corners=True)
    pad = []
    for n, target in zip(reversed(inner), reversed(shape)):
        pad += [0, target - n]
    return F.pad(out, pad, mode="replicate")


def unit_vectors(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each voxel's feature vector scaled to unit length (zero vectors stay zero): the values of
    ``F.normalize(x, dim=1, eps=eps)``, several times faster on the CPU, whose vector norm over the
    channel axis is slow."""
    return features * (features * features).sum(1, keepdim=True).clamp_min(eps * eps).rsqrt()


def cost_volume(fixed_unit: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Cosine similarity of each fixed feature vector (``fixed_unit``: already unit length) with
    the moving ones within ``radius``.

    (N, C, I, J, K) x 2 -> (N, (2r + 1)^3, I, J, K), channel ``(a * (2r + 1) + b) * (2r + 1) + c``
    for the offset ``(a - r, b - r, c - r)``; outside the volume the similarity is 0.
    Cosine similarity makes the evidence independent of feature scale (contrast).
    """
    f = fixed_unit
    m = F.pad(unit_vectors(moving), [radius] * 6)
    size = f.shape[2:]
    span = range(2 * radius + 1)
    return torch.cat([(f * m[:, :, a:a + size[0], b:b + size[1], c:c + size[2]]).sum(1, keepdim=True)
                      for a in span for b in span for c in span], dim=1)


def expected_offset(cost: torch.Tensor, radius: int, sharpness: torch.Tensor) -> torch.Tensor:
    """Soft-argmax of a cost volume: the similarity-weighted mean offset (N, 3, I, J, K), in
    voxels.  It hands the cell a direct vector towards where the moving image matches best.

    The offsets form a (2r + 1)^3 grid, so each component is a weighted sum over one axis of the
    weights summed over the other two: no (voxels x offsets) matrix product or copy.
    """
    weights = torch.softmax(cost * sharpness, dim=1)
    n, side = weights.shape[0], 2 * radius + 1
    grid = weights.view(n, side, side, side, *weights.shape[2:])
    steps = torch.arange(-radius, radius + 1, device=cost.device, dtype=weights.dtype)
    steps = steps.view(1, side, *[1] * (weights.dim() - 2))
    return torch.cat([(grid.sum(dim=others) * steps).sum(1, keepdim=True)
                      for others in ((2, 3), (1, 3), (1, 2))], dim=1)


class FeaturePyramid(nn.Module):
    """Shared (siamese) encoder: one feature map per scale for each image."""

    def __init__(self, channels):
        super().__init__()
        blocks, cin = [], 1
        for level, c in enumerate(channels):
            layers = [_conv(cin, c, stride=1 if level == 0 else 2), nn.LeakyReLU(0.2),
                      _conv(c, c), nn.LeakyReLU(0.2)]
            blocks.append(nn.Sequential(*layers))
            cin = c
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class HyperNetwork(nn.Module):
    """Pair code -> per-level modulation (gain, shift of f; bias of tau) of every LTC cell.

    The last layer starts at zero, so an untrained hypernetwork leaves the cells unmodulated.
    """

    def __init__(self, code_channels: int, hidden: tuple, width: int):
        super().__init__()
        self.sizes = [3 * h for h in hidden]
        self.mlp = nn.Sequential(nn.Linear(4 * code_channels, width), nn.LeakyReLU(0.2),
                                 nn.Linear(width, sum(self.sizes)))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, fixed_feat, moving_feat):
        def stats(f):
            return torch.cat([f.mean((2, 3, 4)), f.std((2, 3, 4))], dim=1)
        code = torch.cat([stats(fixed_feat), stats(moving_feat)], dim=1)
        out = self.mlp(code).split(self.sizes, dim=1)
        return [tuple(o.view(o.shape[0], 3, -1, 1, 1, 1).unbind(1)) for o in out]


class LiquidCell(nn.Module):
    """One LTC cell on a voxel grid: dh/dt = -h / tau(h, u) + f(h, u)."""

    def __init__(self, input_channels: int, hidden: int, tau_min: float):
        super().__init__()
        self.inp = _conv(input_channels, hidden)
        self.rec = _conv(hidden, hidden)
        self.tau = Conv3d(2 * hidden, hidden, 1)
        self.tau_min = tau_min

    def forward(self, u, h, modulation, dt: float):
        gain, shift, tau_bias = modulation
        x = self.inp(u)
        f = torch.tanh((x + self.rec(h)) * (1 + gain) + shift)
        tau = self.tau_min + F.softplus(self.tau(torch.cat([h, x], dim=1)) + tau_bias)
        return (h + dt * f) / (1 + dt / tau)


class LiquidReg(nn.Module):
    """(fixed, moving) on the same working grid -> stationary velocity field (N, 3, I, J, K) in
    voxels of that grid."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        ch, hid = config.channels, config.hidden
        levels = len(ch)
        if not (len(hid) == len(config.steps) == len(config.radius) == levels):
            raise ValueError("channels, hidden, steps and radius need one entry per level")
        self.features = FeaturePyramid(ch)
        self.hyper = HyperNetwork(ch[-1], hid, config.hyper_hidden)
        self.cells = nn.ModuleList(
            LiquidCell(2 * ch[l] + (2 * config.radius[l] + 1) ** 3 + 6, hid[l], config.tau_min)
            for l in range(levels))
        self.heads = nn.ModuleList(_conv(h, 3) for h in hid)
        for head in self.heads:  # zero-initialised velocity head: start at identity
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        #: Per-level sharpness of the soft-argmax (cosine similarities lie in [-1, 1]).
        self.sharpness = nn.Parameter(torch.full((levels,), 10.0))

    def forward(self, fixed, moving, steps=None, every_level: bool = False):
        """``steps``: LTC steps per level (coarse levels last), an int for every level, or None
        for the configured default; more steps refine further.  ``every_level``: also return the
        estimate after each level, coarse to fine, as (level, velocity in that level's voxels),
        so training can supervise every scale.

        Symmetric models run both directions and return half their difference:
        swapping the images gives exactly the inverse map (exp(-v)), and an image registered to
        itself gives exactly the identity.
        """
        if steps is None:
            steps = self.config.steps
        elif isinstance(steps, int):
            steps = (steps,) * len(self.config.channels)
        ff, fm = self.features(fixed), self.features(moving)  # siamese: each image once
        if not self.config.symmetric:
            return self._refine(ff, fm, steps, every_level)
        if every_level or torch.is_grad_enabled():  # training: both directions as one batch
            n = fixed.shape[0]
            both = self._refine([torch.cat([a, b]) for a, b in zip(ff, fm)],
                                [torch.cat([b, a]) for a, b in zip(ff, fm)], steps, every_level)
            if not every_level:
                return (both[:n] - both[n:]) / 2
            v, estimates = both
            return (v[:n] - v[n:]) / 2, [(level, (e[:n] - e[n:]) / 2) for level, e in estimates]
        # inference: one direction after the other, half the peak memory for the same result
        forward = self._refine(ff, fm, steps, False)
        return forward.sub_(self._refine(fm, ff, steps, False)).div_(2)

    def _refine(self, ff, fm, steps, every_level: bool):
        """Coarse to fine LTC refinement from the fixed (``ff``) and moving (``fm``) features."""
        cfg = self.config
        modulation = self.hyper(ff[-1], fm[-1])
        v, estimates = None, []
        for level in reversed(range(len(cfg.channels))):
            shape = ff[level].shape[2:]
            batch = ff[level].shape[0]
            v = (ff[level].new_zeros(batch, 3, *shape, dtype=torch.float32)
                 if v is None else upsample_field(v, shape))
            h = ff[level].new_zeros(batch, cfg.hidden[level], *shape)
            cell, head, radius = self.cells[level], self.heads[level], cfg.radius[level]
            fixed_unit = unit_vectors(ff[level])  # once per level, not per step
            for _ in range(int(steps[level])):
                with torch.autocast(v.device.type, enabled=False):  # geometry stays in fp32
                    disp = diffeo.integrate_velocity(v, cfg.squarings)
                    warped = diffeo.warp(fm[level].float(), disp, padding_mode="border")
                warped = warped.to(ff[level].dtype)
                cost = cost_volume(fixed_unit, warped, radius)
                u = torch.cat([ff[level], warped, cost,
                               expected_offset(cost, radius, self.sharpness[level]),
                               v.to(ff[level].dtype)], dim=1)
                del disp, warped, cost  # large on the working grid: free before the cell runs
                h = cell(u, h, modulation[level], cfg.dt)
                del u
                v = v + cfg.velocity_scale * head(h).float()
            estimates.append((level, v))
        return (v, estimates) if every_level else v

    @property
    def squarings(self) -> int:
        return self.config.squarings
