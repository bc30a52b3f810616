"""Contrast-agnostic image synthesis from label maps (SynthSeg / SynthMorph style), in torch.

Training on images whose contrast, noise, bias and resolution are random makes the network
learn anatomy rather than one scanner's intensities, which is what lets a model trained on a
handful of label maps register real T1, T2, FLAIR or PD scans, and one onto another.  Two kinds
of image come from labels here:

* a random contrast: every label its own random mean and texture (a Gaussian mixture), so any
  ordering of tissues occurs (:func:`synthesize`);
* a rendering of one MRI contrast (:data:`CONTRASTS`: T1, T2, PD, FLAIR), with each structure's
  typical intensity jittered per image (:func:`paint` with :func:`contrast_table`).

Both then go through the same acquisition-like corruption (blur, bias field, gamma, thick slices,
noise), as do real T1 scans (:func:`augment_image`).

Randomness has two streams, so that making images never waits for the device: decisions and
scalar parameters come from the *host* ``torch.Generator`` passed in (a CPU generator: reading
it costs no device synchronisation), and voxel-sized noise is drawn on the images' device by a
generator seeded from it (:func:`device_generator`).  A seed therefore fixes the output on any
one device.
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
    render_jitter: float = 0.08          # a rendered contrast's per-structure jitter, uniform +-
    background_zero_prob: float = 0.5    # background (label 0) black, as in skull-stripped scans
    blur_sigma_max: float = 1.0          # voxels, uniform; mimics partial voluming
    bias_std: float = 0.3                # log-amplitude of the smooth multiplicative bias field
    bias_grid: int = 4                   # control points per axis of the bias field
    gamma_std: float = 0.25              # log-gamma
    resolution_loss_prob: float = 0.5    # thick slices along one random axis
    resolution_factor_max: float = 4.0   # down-sampling factor, uniform in [1.5, max]
    noise_std_max: float = 0.05          # Gaussian / Rician noise std after normalisation
    rician_prob: float = 0.5


# ---- the two random streams ---------------------------------------------------------------
def _check_host(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator: decisions are drawn on the host, voxel "
                         "noise on the images' device (see synth.device_generator)")


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One host draw, uniform in [low, high)."""
    return low + (high - low) * float(torch.rand(1, generator=generator)[0])


def coin(generator: torch.Generator, p: float) -> bool:
    return uniform(generator, 0.0, 1.0) < p


def pick(generator: torch.Generator, n: int) -> int:
    """A host draw in 0..n-1."""
    return int(torch.randint(0, n, (1,), generator=generator)[0])


def device_generator(generator: torch.Generator, device) -> torch.Generator:
    """A generator on ``device`` seeded by a host draw of ``generator``: voxel noise is drawn
    where it is used, with no host-to-device copy and no synchronisation."""
    _check_host(generator)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator)[0])
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def _randn(generator, shape, device) -> torch.Tensor:
    return torch.randn(shape, generator=device_generator(generator, device), device=device)


def _rand(generator, shape, device) -> torch.Tensor:
    return torch.rand(shape, generator=device_generator(generator, device), device=device)


# ---- acquisition-like corruption -------------------------------------------------------------
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
    if not coin(generator, config.resolution_loss_prob):
        return volume
    axis = pick(generator, 3)
    factor = uniform(generator, 1.5, config.resolution_factor_max)
    size = list(volume.shape[2:])
    low = list(size)
    low[axis] = max(2, int(round(size[axis] / factor)))
    small = F.adaptive_avg_pool3d(volume, tuple(low))
    # align_corners=False puts each thick slice at the centre of the voxels it averaged, so the
    # image does not shift against its labels.
    return F.interpolate(small, size=tuple(size), mode="trilinear", align_corners=False)


def add_noise(volume: torch.Tensor, generator, config: SynthConfig) -> torch.Tensor:
    std = uniform(generator, 0.0, config.noise_std_max)
    rician = coin(generator, config.rician_prob)
    noise = _randn(generator, (2 if rician else 1, *volume.shape), volume.device) * std
    if rician:
        return torch.sqrt((volume + noise[0]) ** 2 + noise[1] ** 2)
    return volume + noise[0]


def _corrupt(image: torch.Tensor, generator, config: SynthConfig) -> torch.Tensor:
    """The acquisition-like part shared by synthesis and real-image augmentation; (1, 1, ...)."""
    image = gaussian_blur(image, uniform(generator, 0.0, config.blur_sigma_max))
    image = image * bias_field(image.shape[2:], generator, config, image.device)
    gamma = math.exp(float(torch.randn(1, generator=generator)[0]) * config.gamma_std)
    image = normalise(image) ** gamma
    image = lose_resolution(image, generator, config)
    image = add_noise(image, generator, config)
    return normalise(image)


# ---- images from labels ------------------------------------------------------------------------
def random_label_means(generator: torch.Generator, num_ids: int,
                       config: SynthConfig = SynthConfig(), device="cpu") -> torch.Tensor:
    """One random contrast: a mean intensity for each label id 0..num_ids-1 (on ``device``); pass
    the same table to two images to give them the same contrast."""
    low, high = config.mean_range
    return low + (high - low) * _rand(generator, num_ids, device)


def paint(labels: torch.Tensor, means: torch.Tensor, generator: torch.Generator,
          config: SynthConfig = SynthConfig()) -> torch.Tensor:
    """One corrupted image (1, 1, I, J, K) in [0, 1] of integer ``labels`` (1, 1, I, J, K) whose
    label ``l`` has mean ``means[l]``: each label gets its own random texture, background
    (label 0) is black with probability ``background_zero_prob``."""
    stds = _rand(generator, means.numel(), labels.device) * config.label_std_max
    means = means.to(labels.device).clone()
    if coin(generator, config.background_zero_prob):
        means[0], stds[0] = 0.0, 0.0
    image = means[labels] + stds[labels] * _randn(generator, labels.shape, labels.device)
    return _corrupt(image.float(), generator, config)


def synthesize(labels: torch.Tensor, generator: torch.Generator,
               config: SynthConfig = SynthConfig(), label_means: torch.Tensor | None = None,
               num_ids: int | None = None) -> torch.Tensor:
    """A random-contrast image (N, 1, I, J, K), float32 in [0, 1], from integer labels (same shape).

    Each label (background included) gets its own random mean and texture, per sample; pass
    ``label_means`` (from :func:`random_label_means`) to give two images the same contrast.
    ``num_ids`` (labels lie in 0..num_ids-1) spares reading the labels' range back from the device.
    """
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (N, 1, I, J, K), got {tuple(labels.shape)}")
    _check_host(generator)
    if num_ids is None and label_means is None:
        low, high = (int(v) for v in labels.aminmax())
        if low < 0:
            raise ValueError("labels must be non-negative integers")
        num_ids = high + 1
    out = []
    for sample in labels:
        means = (random_label_means(generator, num_ids, config, labels.device)
                 if label_means is None else label_means)
        out.append(paint(sample[None].long(), means, generator, config))
    return torch.cat(out).float()


def augment_image(image: torch.Tensor, generator: torch.Generator,
                  config: SynthConfig = SynthConfig()) -> torch.Tensor:
    """Real-image path: random blur, bias, gamma, resolution loss and noise; output in [0, 1]."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"image must be (N, 1, I, J, K), got {tuple(image.shape)}")
    _check_host(generator)
    return torch.cat([_corrupt(normalise(s[None].float()), generator, config) for s in image])


# ---- MRI contrasts -----------------------------------------------------------------------------
#: Coarse structures (shared-scheme ids, left and right) grouped by how they look.
_STRUCTURES = {"white matter": (2, 41), "cerebellar white matter": (7, 46), "cortex": (3, 42),
               "cerebellar cortex": (8, 47), "thalamus": (10, 49), "caudate": (11, 50),
               "putamen": (12, 51), "pallidum": (13, 52), "hippocampus": (17, 53),
               "amygdala": (18, 54), "accumbens": (26, 58), "ventral DC": (28, 60),
               "brainstem": (16,), "fluid": (4, 43, 14, 15, 24)}
#: Typical intensity of each, relative to the brightest tissue, in T1, T2, PD and FLAIR scans.
#: T1: white matter brightest, fluid darkest.  T2: fluid brightest, grey over white matter,
#: the iron-rich pallidum dark.  PD: low contrast, grey over white matter, fluid bright.
#: FLAIR: a T2 whose fluid is suppressed (dark).
_INTENSITIES = {                 # T1    T2    PD    FLAIR
    "white matter":             (0.85, 0.30, 0.62, 0.45),
    "cerebellar white matter":  (0.80, 0.30, 0.62, 0.45),
    "cortex":                   (0.50, 0.55, 0.78, 0.70),
    "cerebellar cortex":        (0.55, 0.55, 0.78, 0.68),
    "thalamus":                 (0.70, 0.42, 0.72, 0.58),
    "caudate":                  (0.60, 0.55, 0.78, 0.68),
    "putamen":                  (0.65, 0.48, 0.75, 0.62),
    "pallidum":                 (0.75, 0.30, 0.66, 0.48),
    "hippocampus":              (0.50, 0.60, 0.80, 0.75),
    "amygdala":                 (0.50, 0.58, 0.80, 0.72),
    "accumbens":                (0.60, 0.52, 0.76, 0.66),
    "ventral DC":               (0.75, 0.35, 0.66, 0.50),
    "brainstem":                (0.75, 0.35, 0.66, 0.50),
    "fluid":                    (0.10, 1.00, 0.95, 0.08),
}
#: Each MRI contrast as {shared-scheme id: typical intensity}.
CONTRASTS = {contrast: {label: values[column] for name, values in _INTENSITIES.items()
                        for label in _STRUCTURES[name]}
             for column, contrast in enumerate(("t1", "t2", "pd", "flair"))}


def contrast_table(contrast: str = "t1", device=None) -> torch.Tensor:
    """Intensity of every shared-scheme id in ``contrast`` (DK parcels take their cortex's): a
    lookup table of length ``labels.MAX_ID + 1``."""
    from .labels import MAX_ID, to_level

    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; use one of {', '.join(CONTRASTS)}")
    values = np.zeros(MAX_ID + 1, np.float32)
    for label, value in CONTRASTS[contrast].items():
        values[label] = value
    return torch.as_tensor(values[to_level(np.arange(MAX_ID + 1), "coarse")], device=device)


def render(labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A noise-free image (N, 1, I, J, K) of shared-scheme labels in one contrast (``table``,
    from :func:`contrast_table`), blurred by one voxel so edges look acquired, not painted."""
    return gaussian_blur(table[labels.long()], 1.0)


def rendering(labels, contrast: str = "t1") -> np.ndarray:
    """:func:`render` of a numpy label map (float32): deterministic, so every method of a
    benchmark registers the same picture of a label-only subject (the donors)."""
    image = render(torch.as_tensor(np.asarray(labels).astype(np.int64))[None, None],
                   contrast_table(contrast))
    return image[0, 0].numpy().astype(np.float32)
