"""Registration quality numbers: label overlap (Dice), surface distance (HD95) and Jacobian health.

Used by ``liquidreg evaluate``, ``summary.json`` and the benchmark, so all three report the same
definitions.  Distances are in millimetres using the grid's voxel spacing (anisotropy aware).
"""
from __future__ import annotations

import numpy as np

from .grid import Grid


def shared_labels(fixed_labels: np.ndarray, warped_labels: np.ndarray) -> list[int]:
    """Non-zero labels present in both maps (a label missing from one side is not scored)."""
    both = np.intersect1d(np.unique(fixed_labels), np.unique(warped_labels))
    return [int(v) for v in both if v != 0]


def dice_per_label(fixed_labels: np.ndarray, warped_labels: np.ndarray,
                   labels=None) -> dict[int, float]:
    """Dice 2|A∩B|/(|A|+|B|) for each label (default: the labels present in both maps)."""
    a = np.asarray(fixed_labels)
    b = np.asarray(warped_labels)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    labels = shared_labels(a, b) if labels is None else [int(v) for v in labels]
    if not labels:
        return {}
    # One pass over the volume: count each (a, b) label pair via a joint histogram.
    lut = np.zeros(max(int(a.max()), int(b.max()), max(labels)) + 1, dtype=np.int64)
    lut[labels] = np.arange(1, len(labels) + 1)
    ia = lut[np.clip(a, 0, lut.size - 1).astype(np.int64)] * (a >= 0)
    ib = lut[np.clip(b, 0, lut.size - 1).astype(np.int64)] * (b >= 0)
    n = len(labels) + 1
    joint = np.bincount((ia * n + ib).ravel(), minlength=n * n).reshape(n, n)
    size_a = joint.sum(axis=1)
    size_b = joint.sum(axis=0)
    scores = {}
    for index, label in enumerate(labels, 1):
        total = size_a[index] + size_b[index]
        scores[label] = float(2.0 * joint[index, index] / total) if total else float("nan")
    return scores


def mean_dice(scores: dict) -> float:
    values = [v for v in scores.values() if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask (voxels with a 6-neighbour outside the mask)."""
    mask = np.asarray(mask, dtype=bool)
    from scipy import ndimage  # here, not at import: registration never needs it
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(mask_a: np.ndarray, mask_b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from every surface voxel of A to B's surface and from B's to A's, pooled."""
    both = np.asarray(mask_a, bool) | np.asarray(mask_b, bool)
    if not both.any():
        return np.zeros(0)
    # Crop to the union's bounding box plus a margin: distance transforms are the cost here.
    lo = np.maximum(np.argwhere(both).min(0) - 1, 0)
    hi = np.argwhere(both).max(0) + 2
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    surf_a, surf_b = surface(mask_a[crop]), surface(mask_b[crop])
    if not surf_a.any() or not surf_b.any():
        return np.array([np.inf])
    from scipy import ndimage
    to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surf_a, sampling=spacing)
    return np.concatenate([to_b[surf_a], to_a[surf_b]])


def hd95_per_label(fixed_labels: np.ndarray, warped_labels: np.ndarray, grid: Grid,
                   labels=None) -> dict[int, float]:
    """95th percentile of the pooled symmetric surface distances (mm), per label."""
    a = np.asarray(fixed_labels)
    b = np.asarray(warped_labels)
    labels = shared_labels(a, b) if labels is None else [int(v) for v in labels]
    spacing = grid.spacing
    result = {}
    for label in labels:
        d = surface_distances(a == label, b == label, spacing)
        result[label] = float(np.percentile(d, 95)) if d.size else float("nan")
    return result


def jacobian_stats(jacobian: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Folding (% of voxels with J <= 0), smoothness (std of log J over J > 0) and the range."""
    j = np.asarray(jacobian, dtype=np.float32).ravel()
    if mask is not None:
        j = j[np.asarray(mask, bool).ravel()]
    if not np.all(np.isfinite(j)):
        j = j[np.isfinite(j)]
    if j.size == 0:
        return {"pct_folding": float("nan"), "std_log_jac": float("nan"),
                "min": float("nan"), "max": float("nan"), "mean": float("nan")}
    positive = j[j > 0]
    return {"pct_folding": float(100.0 * (j.size - positive.size) / j.size),
            "std_log_jac": float(np.log(positive).std(dtype=np.float64)) if positive.size
            else float("nan"),
            "min": float(j.min()), "max": float(j.max()), "mean": float(j.mean(dtype=np.float64))}
