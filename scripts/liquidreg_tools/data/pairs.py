"""Training pairs: two randomly deformed brains (one subject twice, or two subjects) with images
synthesised from their labels (or a real T1, augmented), and labels in a compact index space
over the structures both share.

Subjects are loaded once and resampled to the working grid, so a sample costs only the random
deformations and the synthesis.  A batch is a pure function of the ``torch.Generator`` passed
to :meth:`PairSampler.sample` (training resumes rely on it).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from LiquidRegLib.diffeo import warp
from LiquidRegLib.errors import InputError
from LiquidRegLib.grid import Grid, resample
from LiquidRegLib.preprocess import normalise_intensity
from . import labels as L
from .deform import DeformConfig, random_deformation
from .fetch import MANIFEST, load_subject
from .synth import SynthConfig, augment_image, random_label_means, synthesize


@dataclass
class _Loaded:
    """A subject on its working grid (centred on its brain), ready to be deformed."""
    name: str
    info: dict                       # {"levels", "reliable_labels"} as in the manifest
    grid: Grid
    labels: torch.Tensor             # (1, 1, I, J, K) int16, shared scheme
    image: Optional[torch.Tensor]    # (1, 1, I, J, K) float32 in [0, 1], brain only, or None


def brain_working_grid(grid: Grid, brainmask: np.ndarray, shape, spacing: float) -> Grid:
    """RAS grid of ``shape`` and ``spacing`` centred on the brain mask's centroid."""
    centre = grid.voxel_to_ras(np.argwhere(brainmask > 0).mean(0))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (np.asarray(shape, float) - 1) / 2
    return Grid(tuple(shape), affine)


@dataclass(frozen=True)
class PairConfig:
    same_subject_prob: float = 0.3   # both images from one subject (two deformations)
    real_image_prob: float = 0.5     # use the real T1 (augmented) when the subject has one
    same_contrast_prob: float = 0.5  # both synthetic images share one contrast (LNCC is fair)


class PairSampler:
    """Random training pairs from the subjects of one split of a data folder."""

    def __init__(self, data_dir=None, split: str = "train", *, working_spacing: float = 2.0,
                 divisor: int = 8, shape: Sequence[int] = (96, 112, 96), batch_size: int = 1,
                 config: PairConfig = PairConfig(), synth: SynthConfig = SynthConfig(),
                 deform: DeformConfig = DeformConfig(), subjects=None, device="cpu"):
        shape = tuple(int(s) for s in shape)
        if any(s % divisor for s in shape):
            raise InputError(f"working shape {shape} must be a multiple of {divisor}; "
                             "pass a shape such as (96, 112, 96)")
        self.shape, self.spacing, self.batch_size = shape, float(working_spacing), int(batch_size)
        self.split, self.config, self.synth, self.deform = split, config, synth, deform
        self.device = torch.device(device)
        if subjects is None:
            subjects = self._read_split(data_dir, split)
        if not subjects:
            raise InputError(f"no {split!r} subjects found; run scripts/fetch_data.py --out DATA")
        self.subjects = [self._load(s) for s in subjects]

    # ---- loading -------------------------------------------------------------------------
    @staticmethod
    def _read_split(data_dir, split):
        path = Path(data_dir) / MANIFEST
        if not path.exists():
            raise InputError(f"{path} not found; run scripts/fetch_data.py --out {data_dir} first")
        entries = json.loads(path.read_text())["subjects"].values()
        return [load_subject(data_dir, e) for e in entries if e["split"] == split]

    def _load(self, subject) -> _Loaded:
        grid = brain_working_grid(subject.grid, subject.brainmask, self.shape, self.spacing)
        labels = resample(np.asarray(subject.labels, np.int16), subject.grid, grid, order="nearest")
        image = None
        if subject.t1 is not None:
            brain = np.where(subject.brainmask > 0, subject.t1, 0).astype(np.float32)
            brain = normalise_intensity(brain, subject.brainmask)
            image = torch.as_tensor(resample(brain, subject.grid, grid))[None, None].to(self.device)
        info = {"levels": L.subject_levels(subject.reliable_labels),
                "reliable_labels": list(subject.reliable_labels)}
        labels = torch.as_tensor(labels)[None, None].to(self.device)
        return _Loaded(subject.name, info, grid, labels, image)

    def describe(self) -> dict:
        return {"split": self.split, "subjects": [s.name for s in self.subjects],
                "shape": list(self.shape), "spacing": self.spacing,
                "batch_size": self.batch_size, "pairs": asdict(self.config),
                "synth": asdict(self.synth), "deform": asdict(self.deform)}

    # ---- sampling ------------------------------------------------------------------------
    def _pick(self, generator) -> tuple[int, int]:
        n = len(self.subjects)
        a = int(torch.randint(0, n, (1,), generator=generator)[0])
        if n == 1 or float(torch.rand(1, generator=generator)[0]) < self.config.same_subject_prob:
            return a, a
        b = int(torch.randint(0, n - 1, (1,), generator=generator)[0])
        return a, b + (b >= a)

    def _side(self, subject: _Loaded, generator, means) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One randomly deformed subject: image and shared-scheme labels, both (1, 1, I, J, K),
        and whether the image is the real T1."""
        disp = random_deformation(subject.grid, generator, self.deform, self.device)
        labels = warp(subject.labels.float(), disp, mode="nearest").round().long()
        use_real = (subject.image is not None and
                    float(torch.rand(1, generator=generator)[0]) < self.config.real_image_prob)
        if use_real:
            image = augment_image(warp(subject.image, disp), generator, self.synth)
        else:
            image = synthesize(labels, generator, self.synth, means)
        return image, labels, use_real

    def sample_pair(self, generator: torch.Generator) -> dict:
        ia, ib = self._pick(generator)
        a, b = self.subjects[ia], self.subjects[ib]
        means = None
        if float(torch.rand(1, generator=generator)[0]) < self.config.same_contrast_prob:
            means = random_label_means(generator, L.MAX_ID, self.synth)
        fixed, fixed_labels, fixed_real = self._side(a, generator, means)
        moving, moving_labels, moving_real = self._side(b, generator, means)
        # Intensity similarity (LNCC) is fair when both images share a contrast: one synthetic
        # contrast, or two real T1s (the real T1s are all T1-weighted).
        same_contrast = (fixed_real and moving_real) or (
            not fixed_real and not moving_real and means is not None)
        level, ids = L.shared_labels(a.info, b.info)
        table = torch.as_tensor(L.compact_table(ids, level), device=self.device)
        return {"fixed": fixed, "moving": moving,
                "fixed_labels": table[fixed_labels], "moving_labels": table[moving_labels],
                "fixed_mask": (fixed_labels > 0).float(),
                "moving_mask": (moving_labels > 0).float(),
                "num_labels": len(ids) + 1, "names": (a.name, b.name), "level": level,
                "label_ids": ids, "same_contrast": same_contrast}

    def sample(self, generator: torch.Generator) -> dict:
        """A batch: fixed/moving (N, 1, I, J, K) float32 in [0, 1]; fixed_labels/moving_labels
        (N, 1, I, J, K) int64 in 0..num_labels-1 (0 = background or not shared); masks;
        ``pairs`` lists each item's (fixed, moving) subject names, ``label_ids`` each item's
        shared-scheme id per compact index (index n -> label_ids[n - 1]); ``same_contrast``
        (N,) bool says where an intensity similarity between fixed and moving is meaningful."""
        items = [self.sample_pair(generator) for _ in range(self.batch_size)]
        batch = {k: torch.cat([it[k] for it in items]) for k in
                 ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")}
        batch["num_labels"] = max(it["num_labels"] for it in items)
        batch["pairs"] = [it["names"] for it in items]
        batch["label_ids"] = [it["label_ids"] for it in items]
        batch["same_contrast"] = torch.tensor([it["same_contrast"] for it in items],
                                              device=self.device)
        return batch
