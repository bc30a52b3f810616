"""Random label maps: anatomy that no real subject has (SynthMorph's idea, our own code).

With only a handful of real brains, a network can memorise where their structures are instead
of learning to *match* images.  Label maps of random blobs, registered to a randomly deformed
copy of themselves, force it to follow image evidence.  A map is the argmax of smoothed noise,
one channel per label, inside a random smooth "head" shape so that the maps also have a
background and an outline to align, as brains do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .synth import device_generator


@dataclass(frozen=True)
class ShapeConfig:
    labels: tuple = (12, 26)        # number of labels, uniform in [low, high]
    blob_scale: tuple = (6, 14)     # voxels between noise control points (blob size)
    outline_scale: int = 24         # voxels between control points of the outline's noise
    outline_fill: float = 0.75      # fraction of the box inside the outline, about


def _smooth_noise(shape, channels: int, scale: float, generator, device) -> torch.Tensor:
    """Noise on a control grid every ``scale`` voxels, upsampled smoothly: (1, C, *shape)."""
    coarse = tuple(max(2, int(math.ceil(n / scale)) + 1) for n in shape)
    noise = torch.randn((1, channels) + coarse, generator=device_generator(generator, device),
                        device=device)
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def random_label_map(shape, generator: torch.Generator, config: ShapeConfig = ShapeConfig(),
                     device=None) -> tuple[torch.Tensor, int]:
    """(1, 1, I, J, K) int64 labels in 0..n (0 = background outside the outline) and ``n``;
    ``generator`` is a host generator (decisions on the host, noise drawn on ``device``)."""
    device = device or generator.device
    low, high = config.labels
    n = int(torch.randint(low, high + 1, (1,), generator=generator))
    u = float(torch.rand(1, generator=generator))
    scale = config.blob_scale[0] + u * (config.blob_scale[1] - config.blob_scale[0])
    labels = _smooth_noise(shape, n, scale, generator, device).argmax(1, keepdim=True) + 1
    # Outline: an ellipsoid whose radius is perturbed by smooth noise.
    axes = [torch.linspace(-1, 1, s, device=device) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    radius = (grid ** 2).sum(0).sqrt()[None, None]
    wobble = 0.15 * _smooth_noise(shape, 1, config.outline_scale, generator, device)
    inside = radius < config.outline_fill + wobble
    return torch.where(inside, labels, torch.zeros_like(labels)), n
