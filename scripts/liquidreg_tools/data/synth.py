"""Contrast-agnostic image synthesis from label maps (SynthSeg / SynthMorph style), in torch.

Training on images whose contrast, noise, bias and resolution are random makes the network
learn anatomy rather than one scanner's intensities, which is what lets a model trained on a
handful of label maps register real T1 (or T2, or anything) scans.  Every random draw goes
through the ``torch.Generator`` passed in, so a seed fixes the output.  Subjects that do have a
real T1 get the same intensity augmentations through :func:`augment_image`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SynthConfig:
    mean_range: tuple = (0.0, 1.0)       # per-label mean intensity, uniform
    label_std_max: float = 0.08          # per-label Gaussian texture, std uniform in [0, max]
    background_zero_prob: float = 0.5    # background (label 0) black, as in skull-stripped scans
    blur_sigma_max: float = 1.0          # voxels, uniform; mimics partial voluming
    bias_std: float = 0.3                # log-amplitude of the smooth multiplicative bias field
    bias_grid: int = 4                   # control points per axis of the bias field
    gamma_std: float = 0.25              # log-gamma
    resolution_loss_prob: float = 0.5    # thick slices along one random axis
    resolution_factor_max: float = 4.0   # down-sampling factor, uniform in [1.5, max]
    noise_std_max: float = 0.05          # Gaussian / Rician noise std after normalisation
    rician_prob: float = 0.5


def _uniform(generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _coin(generator, p: float) -> bool:
    return bool(_uniform(generator, 0.0, 1.0)[0] < p)


def _randn(generator, shape, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def gaussian_blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (sigma in voxels) of an (N, C, I, J, K) volume, edges replicated."""
    if sigma <= 0.05:
        return volume
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c = volume.shape[:2]
    out = volume.reshape(n * c, 1, *volume.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out.reshape(volume.shape)


def normalise(volume: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] per sample (a constant sample becomes 0)."""
    flat = volume.flatten(1)
    lo = flat.min(1).values.view(-1, *[1] * (volume.dim() - 1))
    hi = flat.max(1).values.view(-1, *[1] * (volume.dim() - 1))
    return ((volume - lo) / (hi - lo).clamp_min(1e-8)).clamp(0.0, 1.0)


def bias_field(shape, generator, config: SynthConfig, device) -> torch.Tensor:
    """Smooth positive multiplicative field, (1, 1, I, J, K), from a coarse random grid."""
    coarse = _randn(generator, (1, 1) + (config.bias_grid,) * 3, device) * config.bias_std
    return torch.exp(F.interpolate(coarse, size=tuple(shape), mode="trilinear",
                                   align_corners=True))


def lose_resolution(volume: torch.Tensor, generator, config: SynthConfig) -> torch.Tensor:
    """Average into thick slices along one random axis, then interpolate back (thick-slice
    acquisitions: each slice integrates its whole thickness, so average rather than subsample)."""
    if not _coin(generator, config.resolution_loss_prob):
        return volume
    axis = int(torch.randint(0, 3, (1,), generator=generator, device=generator.device)[0])
    factor = float(_uniform(generator, 1.5, config.resolution_factor_max)[0])
    size = list(volume.shape[2:])
    low = list(size)
    low[axis] = max(2, int(round(size[axis] / factor)))
    small = F.adaptive_avg_pool3d(volume, tuple(low))
    # align_corners=False puts each thick slice at the centre of the voxels it averaged, so the
    # image does not shift against its labels.
    return F.interpolate(small, size=tuple(size), mode="trilinear", align_corners=False)


def add_noise(volume: torch.Tensor, generator, config: SynthConfig) -> torch.Tensor:
    std = float(_uniform(generator, 0.0, config.noise_std_max)[0])
    noise = _randn(generator, volume.shape, volume.device) * std
    if _coin(generator, config.rician_prob):
        imaginary = _randn(generator, volume.shape, volume.device) * std
        return torch.sqrt((volume + noise) ** 2 + imaginary ** 2)
    return volume + noise


def _corrupt(image: torch.Tensor, generator, config: SynthConfig) -> torch.Tensor:
    """The acquisition-like part shared by synthesis and real-image augmentation; (1, 1, ...)."""
    image = gaussian_blur(image, float(_uniform(generator, 0.0, config.blur_sigma_max)[0]))
    image = image * bias_field(image.shape[2:], generator, config, image.device)
    gamma = math.exp(float(_randn(generator, (1,), "cpu")[0]) * config.gamma_std)
    image = normalise(image) ** gamma
    image = lose_resolution(image, generator, config)
    image = add_noise(image, generator, config)
    return normalise(image)


def _dense_ids(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Present ids (sorted) and each voxel's rank among them; O(N), unlike torch.unique."""
    present = torch.bincount(labels.flatten().long()) > 0
    rank = torch.cumsum(present.long(), 0) - 1
    return present.nonzero().flatten(), rank[labels.long()]


def random_label_means(generator: torch.Generator, max_id: int,
                       config: SynthConfig = SynthConfig()) -> torch.Tensor:
    """One contrast: a mean intensity per label id 0..max_id, to share between two images."""
    return _uniform(generator, *config.mean_range, max_id + 1)


def synthesize(labels: torch.Tensor, generator: torch.Generator,
               config: SynthConfig = SynthConfig(),
               label_means: torch.Tensor | None = None) -> torch.Tensor:
    """A random-contrast image (N, 1, I, J, K), float32 in [0, 1], from integer labels (same shape).

    Each label (background included) gets its own random mean and texture, per sample; pass
    ``label_means`` (from :func:`random_label_means`) to give two images the same contrast.
    """
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (N, 1, I, J, K), got {tuple(labels.shape)}")
    if labels.min() < 0:
        raise ValueError("labels must be non-negative integers")
    out = []
    for sample in labels:
        ids, index = _dense_ids(sample)
        n = ids.numel()
        if label_means is None:
            means = _uniform(generator, *config.mean_range, n).to(labels.device)
        else:
            means = label_means.to(labels.device)[ids].clone()
        stds = _uniform(generator, 0.0, config.label_std_max, n).to(labels.device)
        if ids[0] == 0 and _coin(generator, config.background_zero_prob):
            means[0], stds[0] = 0.0, 0.0
        image = means[index] + stds[index] * _randn(generator, index.shape, labels.device)
        out.append(_corrupt(image[None].float(), generator, config))
    return torch.cat(out).float()


def augment_image(image: torch.Tensor, generator: torch.Generator,
                  config: SynthConfig = SynthConfig()) -> torch.Tensor:
    """Real-image path: random blur, bias, gamma, resolution loss and noise; output in [0, 1]."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"image must be (N, 1, I, J, K), got {tuple(image.shape)}")
    return torch.cat([_corrupt(normalise(s[None].float()), generator, config) for s in image])


#: Typical T1-weighted intensity of each coarse structure (white matter brightest, fluid darkest).
T1_LIKE = {2: 0.85, 41: 0.85, 7: 0.8, 46: 0.8, 3: 0.5, 42: 0.5, 8: 0.55, 47: 0.55,
           10: 0.7, 49: 0.7, 11: 0.6, 50: 0.6, 12: 0.65, 51: 0.65, 13: 0.75, 52: 0.75,
           17: 0.5, 53: 0.5, 18: 0.5, 54: 0.5, 26: 0.6, 58: 0.6, 28: 0.75, 60: 0.75, 16: 0.75,
           4: 0.1, 43: 0.1, 14: 0.1, 15: 0.1, 24: 0.1}


def t1_like_table(device=None) -> torch.Tensor:
    """Intensity of every shared-scheme id (DK parcels take their cortex's): a lookup table."""
    from .labels import MAX_ID, to_level

    values = np.zeros(MAX_ID + 1, np.float32)
    for label, value in T1_LIKE.items():
        values[label] = value
    return torch.as_tensor(values[to_level(np.arange(MAX_ID + 1), "coarse")], device=device)


def render_t1_like(labels: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """A noise-free T1-like image (N, 1, I, J, K) of shared-scheme labels, blurred by one voxel so
    edges look acquired rather than painted.  Training renders its pairs this way too, so the
    network meets this contrast (that of real T1 scans) and not only random ones."""
    table = t1_like_table(labels.device) if table is None else table
    return gaussian_blur(table[labels.long()], 1.0)


def t1_like(labels) -> np.ndarray:
    """:func:`render_t1_like` of a numpy label map (float32): deterministic, so every method of a
    benchmark registers the same picture of a label-only subject (the donors)."""
    image = render_t1_like(torch.as_tensor(np.asarray(labels).astype(np.int64))[None, None])
    return image[0, 0].numpy().astype(np.float32)
