"""The validation signal that chooses the shipped weights: a fixed set of pairs, never the benchmark.

Three groups, each made once from fixed seeds by the training generator, so every evaluation
scores the same pairs:

* ``same``: the held-back training anatomy (:data:`bundle.VALIDATION_SUBJECTS`) in T1 (a T1-like
  rendering) against the training anatomies in T1 (fsaverage's real T1 or a rendering);
* ``cross``: the held-back anatomy in a T2-like rendering against the training anatomies in T1;
* ``shapes``: random label maps, each image in its own random contrast.

The score is hard Dice (labels warped by nearest neighbour) over every label the two sides
share; weights are chosen on the mean over every pair (the mixed set), and each group is reported
apart.
"""
from __future__ import annotations

import numpy as np
import torch

from LiquidRegLib import diffeo
from .bundle import Bundle
from .pairs import PairConfig, PairSampler

_ANATOMY = dict(shapes_prob=0.0, same_subject_prob=0.0, identical_prob=0.0)
#: Each group's pairs: no same-subject or identical pairs.
GROUPS = {
    "same": PairConfig(**_ANATOMY, fixed_contrast="t1", moving_contrast="t1"),
    "cross": PairConfig(**_ANATOMY, fixed_contrast="t2", moving_contrast="t1"),
    "shapes": PairConfig(shapes_prob=1.0, identical_prob=0.0, cross_contrast_prob=1.0),
}


def group_sizes(count: int) -> dict:
    """How ``count`` pairs divide among the groups: 3/8 same, 3/8 cross, the rest shapes."""
    same = cross = (3 * count) // 8
    return {"same": same, "cross": cross, "shapes": count - same - cross}


def make_pairs(bundle: Bundle, count: int = 16, seed: int = 12345, device="cpu",
               split: str = "validation", partners: str = "train") -> list[dict]:
    """``count`` fixed pairs (each a batch of one, with its ``group``), a pure function of ``seed``."""
    pairs, index = [], 0
    for group, size in group_sizes(count).items():
        sampler = PairSampler(bundle, split, partners=partners, config=GROUPS[group],
                              device=device)
        for _ in range(size):
            pair = sampler.sample_pair(torch.Generator().manual_seed(seed + index))
            pair["same_contrast"] = torch.full((1,), bool(pair["same_contrast"]),
                                               device=sampler.device)
            pair["group"] = group
            pairs.append(pair)
            index += 1
    return pairs


def hard_dice(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, disp: torch.Tensor,
              num_labels: int) -> float:
    """Mean Dice over labels 1..num_labels-1 present in either map, moving warped by ``disp``."""
    warped = diffeo.warp(moving_labels.float(), disp, mode="nearest").round().long()
    f = torch.nn.functional.one_hot(fixed_labels.flatten(), num_labels)[:, 1:].float()
    w = torch.nn.functional.one_hot(warped.flatten(), num_labels)[:, 1:].float()
    total = f.sum(0) + w.sum(0)
    present = total > 0
    return float((2 * (f * w).sum(0)[present] / total[present]).mean())


def pair_dice(pair: dict, velocity: torch.Tensor | None, squarings: int) -> float:
    """Hard Dice of one validation pair under ``velocity`` (None: the identity)."""
    labels = (pair["fixed_labels"], pair["moving_labels"])
    if velocity is None:
        disp = torch.zeros(1, 3, *labels[0].shape[2:], device=labels[0].device)
    else:
        disp = diffeo.integrate_velocity(velocity.float(), squarings)
    return hard_dice(*labels, disp, pair["num_labels"])


def summarise(groups: list[str], scores: list[float], prefix: str = "dice") -> dict:
    """Mean of ``scores`` over every pair (``prefix``) and per group (``prefix_<group>``)."""
    out = {prefix: float(np.mean(scores))}
    for group in dict.fromkeys(groups):
        out[f"{prefix}_{group}"] = float(np.mean([s for g, s in zip(groups, scores) if g == group]))
    return out


@torch.no_grad()
def evaluate(model, pairs: list[dict], steps=None) -> dict:
    """Mean hard Dice of ``model`` on ``pairs``, over all and per group, and of the identity."""
    was_training = model.training
    model.eval()
    groups = [pair.get("group", "all") for pair in pairs]
    scores = [pair_dice(pair, model(pair["fixed"], pair["moving"], steps=steps), model.squarings)
              for pair in pairs]
    identity = [pair_dice(pair, None, model.squarings) for pair in pairs]
    model.train(was_training)
    return {**summarise(groups, scores), **summarise(groups, identity, "identity")}
