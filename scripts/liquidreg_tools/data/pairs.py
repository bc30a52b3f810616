"""Training pairs from the bundle (:mod:`.bundle`), made on whatever device trains.

The main case is inter-subject: two *different* anatomies, each randomly deformed.  Random label
maps (:mod:`.shapes`) add anatomy no subject has; a few pairs are one anatomy twice, and a few the
very same image twice, whose answer is the identity.

Each image of a pair gets its own contrast (:data:`CONTRAST_CHOICES`): T1 (the subject's real T1
where it has one, else a T1-like rendering), a T2-, PD- or FLAIR-like rendering, or a random
contrast (every label its own intensity, a Gaussian mixture, as in SynthMorph).  Most pairs cross
contrasts (``PairConfig.cross_contrast_prob``); the others share one (two random-contrast images
then share their label means).  A batch says which items share a contrast (``same_contrast``):
intensity similarity (LNCC) is fair only there, while Dice counts on every shared label of every
pair.  Every image goes through the network's one intensity policy
(:func:`preprocess.percentile_normalise`).

A batch is a pure function of the host ``torch.Generator`` passed to :meth:`PairSampler.sample`
(resumed training repeats an uninterrupted run).  Decisions are read on the host and voxel noise
is drawn on the device (:mod:`.synth`), and the per-pair label tables are made once, so making a
pair reads nothing back from the device and copies nothing to it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from LiquidRegLib.diffeo import warp
from LiquidRegLib.grid import Grid
from LiquidRegLib.preprocess import percentile_normalise
from . import bundle as B
from . import labels as L
from .deform import DeformConfig, random_deformation
from .shapes import ShapeConfig, random_label_map
from .synth import (CONTRASTS, SynthConfig, augment_image, coin, contrast_table, paint, pick,
                    random_label_means, uniform)

#: What an image of a pair can look like: the MRI contrasts of :data:`synth.CONTRASTS`, or
#: "random" (a random intensity per label).
CONTRAST_CHOICES = (*CONTRASTS, "random")


@dataclass(frozen=True)
class PairConfig:
    shapes_prob: float = 0.2          # random label maps instead of real anatomy
    same_subject_prob: float = 0.15   # one anatomy, two deformations
    identical_prob: float = 0.05      # one image twice (target: the identity)
    cross_contrast_prob: float = 0.6  # the two images of a pair get different contrasts
    #: relative frequency of each contrast (CONTRAST_CHOICES order: t1, t2, pd, flair, random);
    #: random label maps always take random contrasts
    contrast_weights: tuple = (0.35, 0.15, 0.1, 0.1, 0.3)
    real_image_prob: float = 0.5      # a T1 image is the subject's real T1 (augmented) if it has one
    fixed_contrast: str | None = None   # force the fixed image's contrast (validation pairs)
    moving_contrast: str | None = None  # force the moving image's contrast


#: Registration follows the affine stage: subjects are affinely aligned in the bundle, and each
#: side gets only an affine residual on top of its smooth random deformation.
RESIDUAL_AFFINE = DeformConfig(rotation_deg=4.0, translation_mm=4.0, scale_range=(0.95, 1.05),
                               shear_max=0.02)


def _weighted(generator, names, weights) -> str:
    u = uniform(generator, 0.0, float(sum(weights)))
    for name, weight in zip(names, weights):
        u -= weight
        if u < 0:
            return name
    return names[-1]


def _flags(values, device) -> torch.Tensor:
    """A bool tensor of ``values`` on ``device``, made there by fills (no host-to-device copy)."""
    out = torch.zeros(len(values), dtype=torch.bool, device=device)
    for index, value in enumerate(values):
        if value:
            out[index] = True
    return out


class PairSampler:
    """Random pairs whose fixed anatomy comes from one split of a bundle and whose moving anatomy
    comes from ``partners`` (default: the same split), e.g. validation subjects against the
    training ones.  ``crop``: draw each pair in a random window of this shape of the bundle's
    grid (cheaper steps, e.g. for training on a CPU)."""

    def __init__(self, bundle: B.Bundle, split: str = "train", *, partners: str | None = None,
                 batch_size: int = 1,
                 config: PairConfig = PairConfig(), synth: SynthConfig = SynthConfig(),
                 deform: DeformConfig = RESIDUAL_AFFINE, shapes: ShapeConfig = ShapeConfig(),
                 device="cpu", crop: tuple | None = None):
        self.names = B.split_names(bundle, split)
        self.partners = B.split_names(bundle, partners or split)
        if not self.names or not self.partners:
            raise ValueError(f"the bundle has no {split!r} or {partners!r} subjects")
        for side in (config.fixed_contrast, config.moving_contrast):
            if side is not None and side not in CONTRAST_CHOICES:
                raise ValueError(f"unknown contrast {side!r}; use one of {CONTRAST_CHOICES}")
        if len(config.contrast_weights) != len(CONTRAST_CHOICES):
            raise ValueError(f"contrast_weights needs one weight for each of {CONTRAST_CHOICES}")
        self.bundle, self.split, self.batch_size = bundle, split, int(batch_size)
        self.config, self.synth, self.deform, self.shapes = config, synth, deform, shapes
        self.device = torch.device(device)
        self.crop = None if crop is None else tuple(min(int(c), n) for c, n in
                                                    zip(crop, bundle.grid.shape))
        shape = self.crop or bundle.grid.shape
        self.grid = Grid(tuple(shape), bundle.grid.affine)  # deformations need shape + spacing
        index = {n: i for i, n in enumerate(bundle.names)}
        used = dict.fromkeys(self.names + self.partners)
        self.labels = {n: torch.as_tensor(bundle.labels[index[n]].astype(np.int64),
                                          device=self.device)[None, None] for n in used}
        self.t1 = {n: torch.as_tensor(bundle.t1[n], device=self.device)[None, None]
                   for n in used if n in bundle.t1}
        self.tables = {c: contrast_table(c, self.device) for c in CONTRASTS}
        #: Images are rendered from coarse structures: real scans never show parcel boundaries.
        self.coarse = torch.as_tensor(L.to_level(np.arange(L.MAX_ID + 1), "coarse").astype(np.int64),
                                      device=self.device)
        #: Dice relabelling of every pair of anatomies, made once (no per-pair copy to the device).
        self.compact = {}
        for a in self.names:
            for b in self.partners:
                level, ids = B.shared(bundle, a, b)
                self.compact[a, b] = (torch.as_tensor(L.compact_table(ids, level),
                                                      device=self.device), len(ids) + 1)
        self.shape_ids = torch.arange(shapes.labels[1] + 1, device=self.device)

    def describe(self) -> dict:
        return {"split": self.split, "subjects": self.names, "partners": self.partners,
                "shape": list(self.grid.shape), "crop": self.crop,
                "spacing": float(self.grid.spacing[0]), "batch_size": self.batch_size,
                "pairs": asdict(self.config), "contrasts": list(CONTRAST_CHOICES),
                "synth": asdict(self.synth), "deform": asdict(self.deform),
                "shapes": asdict(self.shapes)}

    # ---- contrasts -----------------------------------------------------------------------------
    def _contrasts(self, generator, shapes: bool) -> tuple[str, str, bool]:
        """(fixed contrast, moving contrast, whether they are one contrast)."""
        cfg = self.config
        cross = coin(generator, cfg.cross_contrast_prob)
        if shapes:  # random label ids: only random contrasts mean anything
            return "random", "random", not cross
        fixed = cfg.fixed_contrast or _weighted(generator, CONTRAST_CHOICES, cfg.contrast_weights)
        moving = cfg.moving_contrast
        if moving is None:
            others = [(c, w) for c, w in zip(CONTRAST_CHOICES, cfg.contrast_weights)
                      if c != fixed or c == "random"]  # two random contrasts are independent
            moving = (_weighted(generator, *zip(*others)) if cross else fixed)
        same = fixed == moving and (fixed != "random" or not cross)
        return fixed, moving, same

    def _image(self, labels, real, contrast, generator, means):
        """An image of the deformed (shared-scheme or shape) ``labels`` in ``contrast``; ``real``
        the deformed real T1, if one is to be used; ``means``, a random contrast to share."""
        if contrast == "t1" and real is not None:
            return augment_image(real, generator, self.synth)
        if contrast == "random":
            return paint(labels, means if means is not None else random_label_means(
                generator, self.tables["t1"].numel(), self.synth, self.device),
                generator, self.synth)
        jitter = self.synth.render_jitter * (2 * random_label_means(
            generator, self.tables[contrast].numel(), device=self.device) - 1)
        return paint(labels, self.tables[contrast] + jitter, generator, self.synth)

    # ---- one side of a pair ----------------------------------------------------------------
    def _window(self, generator):
        """Voxel slices of this pair's crop window (the whole grid without ``crop``)."""
        if self.crop is None:
            return (slice(None),) * 3
        starts = [pick(generator, n - c + 1) for n, c in zip(self.bundle.grid.shape, self.crop)]
        return tuple(slice(s, s + c) for s, c in zip(starts, self.crop))

    def _deformed(self, labels, image, generator):
        disp = random_deformation(self.grid, generator, self.deform, self.device)
        moved = warp(labels.float(), disp, mode="nearest").round().long()
        return moved, (None if image is None else warp(image, disp))

    # ---- pairs -----------------------------------------------------------------------------
    def _anatomy_pair(self, generator) -> dict:
        a = self.names[pick(generator, len(self.names))]
        others = [n for n in self.partners if n != a]
        b = a
        if others and (a not in self.partners or not coin(generator, self.config.same_subject_prob)):
            b = others[pick(generator, len(others))]
        table, num_labels = self.compact[a, b]
        window = (..., *self._window(generator))
        real = [self.t1[n][window] if n in self.t1 else None for n in (a, b)]
        return self._render(a, b, self.labels[a][window], self.labels[b][window], real, table,
                            num_labels, generator)

    def _shapes_pair(self, generator) -> dict:
        labels, n = random_label_map(self.grid.shape, generator, self.shapes, self.device)
        return self._render("shapes", "shapes", labels, labels, (None, None), self.shape_ids,
                            n + 1, generator)

    def _render(self, a, b, labels_a, labels_b, real, table, num_labels, generator) -> dict:
        shapes = a == "shapes"
        identical = coin(generator, self.config.identical_prob)
        fixed_contrast, moving_contrast, same = self._contrasts(generator, shapes)
        if identical:
            moving_contrast, same = fixed_contrast, True
        means = None
        if same and fixed_contrast == "random":
            means = random_label_means(generator, self.tables["t1"].numel(), self.synth,
                                       self.device)
        use_real = [r is not None and contrast == "t1" and coin(generator, self.config.real_image_prob)
                    for r, contrast in zip(real, (fixed_contrast, moving_contrast))]
        fl, fi = self._deformed(labels_a, real[0] if use_real[0] else None, generator)
        if identical:
            ml, mi = fl, fi
        else:
            ml, mi = self._deformed(labels_b, real[1] if use_real[1] else None, generator)
        paint_ids = (lambda lab: lab) if shapes else (lambda lab: self.coarse[lab])
        fixed = self._image(paint_ids(fl), fi, fixed_contrast, generator, means)
        moving = (fixed if identical
                  else self._image(paint_ids(ml), mi, moving_contrast, generator, means))
        return {"fixed": percentile_normalise(fixed), "moving": percentile_normalise(moving),
                "fixed_labels": table[fl], "moving_labels": table[ml],
                "num_labels": num_labels, "names": (a, b), "same_contrast": same,
                "contrasts": (fixed_contrast, moving_contrast)}

    def sample_pair(self, generator: torch.Generator) -> dict:
        if coin(generator, self.config.shapes_prob):
            return self._shapes_pair(generator)
        return self._anatomy_pair(generator)

    def sample(self, generator: torch.Generator) -> dict:
        """A batch: fixed/moving (N, 1, I, J, K) float32 in [0, 1]; fixed_labels/moving_labels
        (N, 1, I, J, K) int64 in 0..num_labels-1 (0 = background or not shared); ``pairs``, the
        subject names of each item; ``contrasts``, each item's (fixed, moving) contrast;
        ``same_contrast`` (N,) bool on the device: where LNCC is meaningful."""
        items = [self.sample_pair(generator) for _ in range(self.batch_size)]
        batch = {k: torch.cat([it[k] for it in items])
                 for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
        batch["num_labels"] = max(it["num_labels"] for it in items)
        batch["pairs"] = [it["names"] for it in items]
        batch["contrasts"] = [it["contrasts"] for it in items]
        batch["same_contrast"] = _flags([it["same_contrast"] for it in items], self.device)
        return batch
