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
        if not d.size:
            result[label] = float("nan")
        elif not np.all(np.isfinite(d)):  # the label is missing from one map
            result[label] = float("inf")
        else:
            result[label] = float(np.percentile(d, 95))
    return result


#: Voxels summarised at once by :func:`jacobian_stats` (bounded memory on any image size).
_STATS_CHUNK = 1 << 22


def jacobian_stats(jacobian: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Folding (% of voxels with J <= 0), smoothness (std of log J over J > 0) and the range.

    Non-finite values are left out.  Computed in chunks (the variance of log J merged across them
    in float64, Chan et al.), so a 400^3 map needs megabytes, not gigabytes, of scratch memory;
    an [i, j, k] view of [k, j, i] memory is read as it lies (the order does not matter here).
    """
    jacobian = np.asarray(jacobian)
    transpose = not jacobian.flags.c_contiguous and jacobian.T.flags.c_contiguous
    values = jacobian.T if transpose else jacobian
    values = values.reshape(len(values), -1) if values.ndim > 1 else values.reshape(1, -1)
    inside = None
    if mask is not None:
        inside = np.asarray(mask, bool)
        inside = np.ascontiguousarray(inside.T if transpose else inside).reshape(values.shape)
    step = max(1, _STATS_CHUNK // max(1, values.shape[1]))
    count = folded = n_log = 0
    total, low, high, mean_log, m2_log = 0.0, np.inf, -np.inf, 0.0, 0.0
    for first in range(0, len(values), step):
        j = values[first:first + step].astype(np.float32, copy=False).ravel()
        if inside is not None:
            j = j[inside[first:first + step].ravel()]
        j = j[np.isfinite(j)]
        if not j.size:
            continue
        count += j.size
        total += float(j.sum(dtype=np.float64))
        low, high = min(low, float(j.min())), max(high, float(j.max()))
        logs = np.log(j[j > 0], dtype=np.float64)
        folded += j.size - logs.size
        if logs.size:
            chunk_mean = float(logs.mean())
            chunk_m2 = float(((logs - chunk_mean) ** 2).sum())
            delta, merged = chunk_mean - mean_log, n_log + logs.size
            mean_log += delta * logs.size / merged
            m2_log += chunk_m2 + delta ** 2 * n_log * logs.size / merged
            n_log = merged
    if count == 0:
        return {"pct_folding": float("nan"), "std_log_jac": float("nan"),
                "min": float("nan"), "max": float("nan"), "mean": float("nan")}
    return {"pct_folding": 100.0 * folded / count,
            "std_log_jac": float(np.sqrt(m2_log / n_log)) if n_log else float("nan"),
            "min": low, "max": high, "mean": total / count}