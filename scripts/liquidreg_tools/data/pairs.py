"""Training pairs from the bundle (:mod:`.bundle`), made on whatever device trains.

The main case is inter-subject: two *different* anatomies, each randomly deformed, with images
synthesised from their labels (random contrast, a T1-like rendering, or the real T1, augmented).
Random label maps (:mod:`.shapes`) add anatomy no subject has; a few pairs are one anatomy
twice, and a few the very same image twice, whose answer is the identity.  Every image goes
through the network's one intensity policy (:func:`preprocess.percentile_normalise`).

A batch is a pure function of the ``torch.Generator`` passed to :meth:`PairSampler.sample`
(resumed training repeats an uninterrupted run); the generator's device is where it is made.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from LiquidRegLib.diffeo import warp
from LiquidRegLib.preprocess import percentile_normalise
from . import bundle as B
from . import labels as L
from .deform import DeformConfig, random_deformation
from .shapes import ShapeConfig, random_label_map
from .synth import (SynthConfig, augment_image, random_label_means, render_t1_like,
                    synthesize, t1_like_table)


@dataclass(frozen=True)
class PairConfig:
    shapes_prob: float = 0.2          # random label maps instead of real anatomy
    same_subject_prob: float = 0.15   # one anatomy, two deformations
    identical_prob: float = 0.05      # one image twice (target: the identity)
    real_image_prob: float = 0.4      # the real T1 (augmented), where the subject has one
    t1_like_prob: float = 0.3         # a T1-like rendering (augmented) instead of a random contrast
    same_contrast_prob: float = 0.5   # both random-contrast images share one contrast


#: Registration follows the affine stage: subjects are affinely aligned in the bundle, and each
#: side gets only an affine residual on top of its smooth random deformation.
RESIDUAL_AFFINE = DeformConfig(rotation_deg=4.0, translation_mm=4.0, scale_range=(0.95, 1.05),
                               shear_max=0.02)


def _coin(generator, p: float) -> bool:
    return bool(torch.rand(1, generator=generator, device=generator.device)[0] < p)


def _pick(generator, n: int) -> int:
    return int(torch.randint(0, n, (1,), generator=generator, device=generator.device)[0])


class PairSampler:
    """Random pairs whose fixed anatomy comes from one split of a bundle and whose moving anatomy
    comes from ``partners`` (default: the same split), e.g. validation subjects against the
    training ones."""

    def __init__(self, bundle: B.Bundle, split: str = "train", *, partners: str | None = None,
                 batch_size: int = 1,
                 config: PairConfig = PairConfig(), synth: SynthConfig = SynthConfig(),
                 deform: DeformConfig = RESIDUAL_AFFINE, shapes: ShapeConfig = ShapeConfig(),
                 device="cpu"):
        self.names = B.split_names(bundle, split)
        self.partners = B.split_names(bundle, partners or split)
        if not self.names or not self.partners:
            raise ValueError(f"the bundle has no {split!r} or {partners!r} subjects")
        self.bundle, self.split, self.batch_size = bundle, split, int(batch_size)
        self.config, self.synth, self.deform, self.shapes = config, synth, deform, shapes
        self.device = torch.device(device)
        self.grid = bundle.grid
        index = {n: i for i, n in enumerate(bundle.names)}
        used = dict.fromkeys(self.names + self.partners)
        self.labels = {n: torch.as_tensor(bundle.labels[index[n]].astype(np.int64),
                                          device=self.device)[None, None] for n in used}
        self.t1 = {n: torch.as_tensor(bundle.t1[n], device=self.device)[None, None]
                   for n in used if n in bundle.t1}
        self.t1_table = t1_like_table(self.device)
        #: Images are rendered from coarse structures: real scans never show parcel boundaries.
        self.coarse = torch.as_tensor(L.to_level(np.arange(L.MAX_ID + 1), "coarse").astype(np.int64),
                                      device=self.device)

    def describe(self) -> dict:
        return {"split": self.split, "subjects": self.names, "partners": self.partners,
                "shape": list(self.grid.shape),
                "spacing": float(self.grid.spacing[0]), "batch_size": self.batch_size,
                "pairs": asdict(self.config), "synth": asdict(self.synth),
                "deform": asdict(self.deform), "shapes": asdict(self.shapes)}

    # ---- one side of a pair ----------------------------------------------------------------
    def _image(self, labels, real, generator, means, allow_t1_like=True):
        """An image of ``labels`` (deformed) and whether its contrast is T1 (real or rendered)."""
        if real is not None:
            return augment_image(real, generator, self.synth), True
        if allow_t1_like and _coin(generator, self.config.t1_like_prob):
            return augment_image(render_t1_like(labels, self.t1_table), generator, self.synth), True
        return synthesize(self.coarse[labels], generator, self.synth, means), False

    def _deformed(self, labels, image, generator):
        disp = random_deformation(self.grid, generator, self.deform, self.device)
        moved = warp(labels.float(), disp, mode="nearest").round().long()
        return moved, (None if image is None else warp(image, disp))

    # ---- pairs -----------------------------------------------------------------------------
    def _anatomy_pair(self, generator) -> dict:
        a = self.names[_pick(generator, len(self.names))]
        others = [n for n in self.partners if n != a]
        b = a
        if others and (a not in self.partners or not _coin(generator, self.config.same_subject_prob)):
            b = others[_pick(generator, len(others))]
        level, ids = B.shared(self.bundle, a, b)
        table = torch.as_tensor(L.compact_table(ids, level), device=self.device)
        return self._render(a, b, self.labels[a], self.labels[b], table, len(ids) + 1, generator)

    def _shapes_pair(self, generator) -> dict:
        labels, n = random_label_map(self.grid.shape, generator, self.shapes, self.device)
        table = torch.arange(n + 1, device=self.device)
        return self._render("shapes", "shapes", labels, labels, table, n + 1, generator)

    def _render(self, a, b, labels_a, labels_b, table, num_labels, generator) -> dict:
        identical = _coin(generator, self.config.identical_prob)
        means = None
        if _coin(generator, self.config.same_contrast_prob):
            means = random_label_means(generator, max(L.MAX_ID, int(labels_a.max())), self.synth)
        use_real = [name in self.t1 and _coin(generator, self.config.real_image_prob)
                    for name in (a, b)]
        fl, fi = self._deformed(labels_a, self.t1[a] if use_real[0] else None, generator)
        if identical:
            ml, mi = fl, fi
        else:
            ml, mi = self._deformed(labels_b, self.t1[b] if use_real[1] else None, generator)
        shapes = a == "shapes"
        fixed, fixed_t1 = self._image(fl, fi, generator, means, not shapes)
        moving, moving_t1 = ((fixed, fixed_t1) if identical
                             else self._image(ml, mi, generator, means, not shapes))
        # Intensity similarity (LNCC) is fair only where both images share a contrast.
        same_contrast = identical or (fixed_t1 and moving_t1) or (
            not fixed_t1 and not moving_t1 and means is not None)
        return {"fixed": percentile_normalise(fixed), "moving": percentile_normalise(moving),
                "fixed_labels": table[fl], "moving_labels": table[ml],
                "num_labels": num_labels, "names": (a, b), "same_contrast": same_contrast}

    def sample_pair(self, generator: torch.Generator) -> dict:
        if _coin(generator, self.config.shapes_prob):
            return self._shapes_pair(generator)
        return self._anatomy_pair(generator)

    def sample(self, generator: torch.Generator) -> dict:
        """A batch: fixed/moving (N, 1, I, J, K) float32 in [0, 1]; fixed_labels/moving_labels
        (N, 1, I, J, K) int64 in 0..num_labels-1 (0 = background or not shared); ``pairs``, the
        subject names of each item; ``same_contrast`` (N,) bool: where LNCC is meaningful."""
        items = [self.sample_pair(generator) for _ in range(self.batch_size)]
        batch = {k: torch.cat([it[k] for it in items])
                 for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
        batch["num_labels"] = max(it["num_labels"] for it in items)
        batch["pairs"] = [it["names"] for it in items]
        batch["same_contrast"] = torch.tensor([it["same_contrast"] for it in items],
                                              device=self.device)
        return batch
