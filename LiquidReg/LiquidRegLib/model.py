"""The LiquidReg network: a pyramid of image features, refined coarse to fine by a liquid
time-constant (LTC) recurrent cell whose parameters a hypernetwork modulates for each pair.

At every level the cell looks at the fixed features next to the moving features *warped by the
current estimate* and takes a few LTC steps

    dh/dt = -h / tau(h, u) + f(h, u),      tau = tau_min + softplus(W_tau [h, u] + b_tau(pair))

integrated with the fused semi-implicit Euler step ``h <- (h + dt f) / (1 + dt / tau)``, which is
stable for any ``dt`` because tau > 0.  A zero-initialised head turns the state into a velocity
increment, so the velocity field follows local image evidence at every scale; the hypernetwork
only modulates *how* the cell responds (FiLM gain/shift of f and the time-constant bias), from a
code pooled over both images.  The stationary velocity field (SVF) is integrated by scaling and
squaring into a diffeomorphism.

All fields are in voxel units of the network's working grid (see :mod:`diffeo`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import diffeo


@dataclass
class ModelConfig:
    channels: tuple = (8, 16, 32, 48)   # feature channels at working-grid scales 1, 1/2, 1/4, 1/8
    hidden: tuple = (8, 16, 24, 32)     # LTC state channels per level
    ltc_steps: tuple = (1, 2, 2, 3)     # LTC steps (each re-warps the moving features) per level
    finest_level: int = 1               # finest level that refines the field (0 = working grid)
    svf_level: int = 1                  # level the SVF lives and is integrated at
    hyper_hidden: int = 64
    dt: float = 1.0
    tau_min: float = 0.5
    velocity_scale: float = 1.0         # head output (voxels of its level) -> velocity
    squarings: int = 7
    working_spacing: float = 2.0        # mm; the grid the network sees (see preprocess)

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


class FeaturePyramid(nn.Module):
    """Shared (siamese) encoder: one feature map per scale for each image."""

    def __init__(self, channels):
        super().__init__()
        blocks, cin = [], 1
        for level, c in enumerate(channels):
            layers = [_conv(cin, c, stride=1 if level == 0 else 2), nn.LeakyReLU(0.2)]
            if level > 0:  # one conv at full working resolution keeps the cost of fine detail low
                layers += [_conv(c, c), nn.LeakyReLU(0.2)]
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
    """(fixed, moving) on the same working grid -> stationary velocity field (N, 3, ...)."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        ch, hid = config.channels, config.hidden
        self.features = FeaturePyramid(ch)
        self.hyper = HyperNetwork(ch[-1], hid, config.hyper_hidden)
        self.levels = range(len(ch) - 1, config.finest_level - 1, -1)  # coarse -> fine
        self.cells = nn.ModuleDict({str(l): LiquidCell(2 * ch[l] + 3, hid[l], config.tau_min)
                                    for l in self.levels})
        self.heads = nn.ModuleDict({str(l): _conv(hid[l], 3) for l in self.levels})
        for head in self.heads.values():  # zero-initialised velocity head: start at identity
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, fixed, moving):
        cfg = self.config
        ff, fm = self.features(fixed), self.features(moving)
        modulation = self.hyper(ff[-1], fm[-1])
        v = None
        for level in self.levels:
            shape = ff[level].shape[2:]
            v = (torch.zeros(fixed.shape[0], 3, *shape, device=fixed.device, dtype=ff[level].dtype)
                 if v is None else diffeo.resize_field(v, shape))
            h = torch.zeros(fixed.shape[0], cfg.hidden[level], *shape,
                            device=fixed.device, dtype=ff[level].dtype)
            cell, head = self.cells[str(level)], self.heads[str(level)]
            for _ in range(cfg.ltc_steps[level]):
                disp = diffeo.integrate_velocity(v, cfg.squarings)
                warped = diffeo.warp(fm[level], disp, padding_mode="border")
                h = cell(torch.cat([ff[level], warped, v], dim=1), h, modulation[level], cfg.dt)
                v = v + cfg.velocity_scale * head(h)
        svf_shape = ff[cfg.svf_level].shape[2:]
        return diffeo.resize_field(v, svf_shape)

    @property
    def squarings(self) -> int:
        return self.config.squarings
