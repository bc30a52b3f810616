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

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import diffeo
from .grid import constant, sample_at


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
        return self.convolve(x, self.weight, self.bias)

    def convolve(self, x, weight, bias):
        """This layer's convolution with other weights (e.g. a slice of its own)."""
        if x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32:
            return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias,
                                            self.padding, self.stride, self.dilation, self.groups)
        return self._conv_forward(x, weight, bias)

    def of_concatenation(self, parts) -> torch.Tensor:
        """``self(torch.cat(parts, dim=1))`` without making the concatenation: one convolution
        per part with its slice of the weights, summed (the bias once).  A part given as an int
        is that many all-zero channels (e.g. a zero state) and costs nothing.

        On the working grid the concatenated input of the liquid cell is the largest tensor of a
        step; never making it saves its memory and the copies into it."""
        out, start = None, 0
        for part in parts:
            count = part if isinstance(part, int) else part.shape[1]
            if not isinstance(part, int):
                term = self.convolve(part, self.weight[:, start:start + count], None)
                out = term if out is None else out + term
            start += count
        return out + self.bias.view(1, -1, 1, 1, 1)


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
    return _CostVolume.apply(fixed_unit, unit_vectors(moving), radius)


class _CostVolume(torch.autograd.Function):
    """The cost volume as a few batched operations, forward and backward.

    Forward: one fused multiply-add per feature channel over a strided view that holds every
    offset at once (no per-offset slices, no temporaries; ~5x faster than slicing on the CPU).
    Backward: the two gradients as one in-place multiply-add per offset each, instead of the
    slice, zero-fill and copy that autograd would record for every offset.  Sums are
    accumulated in at least float32 whatever the input precision.
    """

    @staticmethod
    def forward(ctx, fixed_unit, moving_unit, radius: int):
        padded = F.pad(moving_unit, [radius] * 6)
        ctx.save_for_backward(fixed_unit, padded)
        ctx.radius = radius
        side = 2 * radius + 1
        n, channels, *size = fixed_unit.shape
        # (N, C, a, b, c, I, J, K): moving vector at offset (a - r, b - r, c - r), a view
        window = (padded.unfold(2, side, 1).unfold(3, side, 1).unfold(4, side, 1)
                  .permute(0, 1, 5, 6, 7, 2, 3, 4))
        fixed = fixed_unit.reshape(n, channels, 1, 1, 1, *size)
        cost = fixed_unit.new_zeros((n, side, side, side, *size), dtype=_accumulator(fixed_unit))
        for moving_c, fixed_c in zip(window.unbind(1), fixed.unbind(1)):
            cost.addcmul_(moving_c, fixed_c)
        return cost.view(n, side ** 3, *size).to(fixed_unit.dtype)

    @staticmethod
    def backward(ctx, grad):
        fixed_unit, padded = ctx.saved_tensors
        radius, size = ctx.radius, tuple(fixed_unit.shape)
        grad = grad.to(_accumulator(grad)).contiguous()
        grad_fixed = (torch.zeros_like(fixed_unit, dtype=grad.dtype)
                      if ctx.needs_input_grad[0] else None)
        grad_padded = (torch.zeros(padded.shape, dtype=grad.dtype, device=grad.device)
                       if ctx.needs_input_grad[1] else None)
        # The vectors at one offset are a strided view of a padded volume: one view and one
        # in-place multiply-add per offset and gradient (no chains of slices).
        def at(volume, a, b, c):
            st = volume.stride()
            return volume.as_strided(size, st, volume.storage_offset() + a * st[2] + b * st[3]
                                     + c * st[4])
        one_offset = (size[0], 1, *size[2:])
        for d, (a, b, c) in enumerate(itertools.product(range(2 * radius + 1), repeat=3)):
            weight = grad.as_strided(one_offset, grad.stride(),
                                     grad.storage_offset() + d * grad.stride(1))
            if grad_fixed is not None:
                grad_fixed.addcmul_(at(padded, a, b, c), weight)
            if grad_padded is not None:
                at(grad_padded, a, b, c).addcmul_(fixed_unit, weight)
        if grad_fixed is not None:
            grad_fixed = grad_fixed.to(fixed_unit.dtype)
        if grad_padded is not None:
            inside = (slice(None), slice(None)) + tuple(slice(radius, radius + n) for n in size[2:])
            grad_padded = grad_padded[inside].to(padded.dtype)
        return grad_fixed, grad_padded, None


def _accumulator(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def expected_offset(cost: torch.Tensor, radius: int, sharpness: torch.Tensor) -> torch.Tensor:
    """Soft-argmax of a cost volume: the similarity-weighted mean offset (N, 3, I, J, K), in
    voxels.  It hands the cell a direct vector towards where the moving image matches best.

    One (3 x offsets) matrix product with the softmax weights: no per-axis passes or copies.
    """
    weights = torch.softmax(cost * sharpness, dim=1)
    offsets = _offsets(radius, cost.device, weights.dtype)
    n, count = weights.shape[:2]
    return (offsets @ weights.view(n, count, -1)).view(n, 3, *weights.shape[2:])


def _offsets(radius: int, device, dtype) -> torch.Tensor:
    """(3, (2r + 1)^3): the offset (a - r, b - r, c - r) of every cost-volume channel."""
    steps = range(-radius, radius + 1)
    columns = list(itertools.product(steps, repeat=3))
    return constant(tuple(tuple(float(o[axis]) for o in columns) for axis in range(3)),
                    device, dtype)


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
        """One step from state ``h`` given the input ``u``: a tensor, or the input's channel
        groups in order (never concatenated, see :meth:`Conv3d.of_concatenation`).  ``h`` None
        is the zero state a level starts from: its recurrent terms are only biases."""
        gain, shift, tau_bias = modulation
        x = self.inp.of_concatenation(u if isinstance(u, (list, tuple)) else [u])
        if h is None:
            recurrent = self.rec.bias.view(1, -1, 1, 1, 1)
            tau = self.tau.of_concatenation([x.shape[1], x])
        else:
            recurrent = self.rec(h)
            tau = self.tau.of_concatenation([h, x])
        f = torch.tanh((x + recurrent) * (1 + gain) + shift)
        tau = self.tau_min + F.softplus(tau + tau_bias)
        return (dt * f if h is None else h + dt * f) / (1 + dt / tau)


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
        n = fixed.shape[0]
        pyramid = self.features(torch.cat([fixed, moving]))  # siamese: both images in one batch
        if not self.config.symmetric:
            v, estimates = self._refine(pyramid, n, steps)
            return (v, estimates) if every_level else v
        v, estimates = self._refine(pyramid, 2 * n, steps)

        def half_difference(both):
            return (both[:n] - both[n:]) / 2
        if every_level:
            return half_difference(v), [(level, half_difference(e)) for level, e in estimates]
        return half_difference(v)

    def _refine(self, pyramid, rows: int, steps):
        """Coarse to fine LTC refinement of ``rows`` registrations.  ``pyramid`` holds the
        features of the fixed images (rows 0..n-1) and then the moving ones; refinement row ``i``
        registers pyramid row ``i`` (its fixed image) to row ``(i + n) mod 2n`` (its moving one),
        so rows n..2n-1, when there, are the reverse directions of a symmetric model.

        Returns the velocity of every row and its estimate after each level, coarse to fine."""
        cfg = self.config
        n = pyramid[0].shape[0] // 2
        modulation = self.hyper(*_sides(pyramid[-1], n, 0, rows))
        v, estimates = None, []
        for level in reversed(range(len(cfg.channels))):
            features = pyramid[level]
            shape = features.shape[2:]
            v = (features.new_zeros(rows, 3, *shape, dtype=torch.float32)
                 if v is None else upsample_field(v, shape))
            pieces = []
            for start, stop in self._batches(level, features, rows):
                pieces.append(self._refine_level(
                    level, *_sides(features, n, start, stop), v[start:stop],
                    [m[start:stop] for m in modulation[level]], int(steps[level])))
            v = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            estimates.append((level, v))
        return v, estimates

    def _refine_level(self, level: int, fixed, moving, v, modulation, steps: int):
        """``steps`` LTC steps of one level from the velocity ``v``; the refined velocity."""
        cfg = self.config
        cell, head, radius = self.cells[level], self.heads[level], cfg.radius[level]
        fixed_unit = unit_vectors(fixed)  # once per level, not per step
        moving = moving.float()
        # The zero state.  At inference its recurrent terms are only biases (skipped); in
        # training the recurrent weights stay in the graph (DDP needs every weight to take part).
        h = (fixed.new_zeros(fixed.shape[0], cfg.hidden[level], *fixed.shape[2:])
             if torch.is_grad_enabled() else None)
        for _ in range(steps):
            with torch.autocast(v.device.type, enabled=False):  # geometry stays in fp32
                warped = sample_at(moving, diffeo.exp_grid(v, cfg.squarings),
                                   padding_mode="border").to(fixed.dtype)
            cost = cost_volume(fixed_unit, warped, radius)
            estimate = torch.cat([expected_offset(cost, radius, self.sharpness[level]),
                                  v.to(fixed.dtype)], dim=1)
            h = cell([fixed, warped, cost, estimate], h, modulation, cfg.dt)
            del warped, cost, estimate  # large on the working grid: free before the head runs
            v = v + cfg.velocity_scale * head(h).float()
        return v

    def _batches(self, level: int, features, rows: int):
        """(start, stop) row ranges refined together at ``level``: all rows at once (one batch:
        fewer, larger operations, both directions of a symmetric model together) unless, at
        inference, the level's working set would exceed :func:`batch_budget`; then as few
        pieces as fit (on a 1 mm brain on the CPU, the 2 mm level runs direction by direction)."""
        if torch.is_grad_enabled() or rows == 1:
            return [(0, rows)]
        cfg = self.config
        side = 2 * cfg.radius[level] + 1
        per_row = features[0, 0].numel() * 4 * (
            5 * cfg.channels[level] + 3 * side ** 3 + 7 * cfg.hidden[level] + 20)
        per_batch = max(1, min(rows, batch_budget(features.device) // per_row))
        return [(start, min(start + per_batch, rows)) for start in range(0, rows, per_batch)]

    @property
    def squarings(self) -> int:
        return self.config.squarings


def _sides(features, n: int, start: int, stop: int):
    """Fixed-side and moving-side features of refinement rows ``start..stop-1`` (see
    :meth:`LiquidReg._refine`): views where the rows allow, else one copy."""
    total = features.shape[0]
    lo, hi = start + n, stop + n
    if hi <= total:
        moving = features[lo:hi]
    elif lo >= total:
        moving = features[lo - total:hi - total]
    else:
        moving = torch.cat([features[lo:], features[:hi - total]])
    return features[start:stop], moving


#: Bytes a level may hold at inference when it refines its rows as one batch, on the CPU.
CPU_BATCH_BYTES = 1 << 30


def batch_budget(device: torch.device) -> int:
    """Working memory one inference batch of a level may use: a quarter of the GPU's memory, or
    :data:`CPU_BATCH_BYTES`.  It depends on the device only (never on what happens to be free),
    so a pair gives the same result, to the bit, every time it runs on the same machine."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return CPU_BATCH_BYTES
