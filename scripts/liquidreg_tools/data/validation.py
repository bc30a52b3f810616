"""The validation signal that chooses the shipped weights: a fixed set of pairs, never the benchmark.

Pairs put the held-back training anatomy (:data:`bundle.VALIDATION_SUBJECTS`) against the
training anatomies (inter-subject, as in use), plus random-shape pairs, each made once from a
fixed seed by the training generator, so every evaluation scores the same pairs.  The score is
hard Dice (labels warped by nearest neighbour) over every label the two sides share.
"""
from __future__ import annotations

import numpy as np
import torch

from LiquidRegLib import diffeo
from .bundle import Bundle
from .pairs import PairConfig, PairSampler

#: Validation pairs: no same-subject or identical pairs; a quarter are random shapes.
VALIDATION_PAIRS = PairConfig(shapes_prob=0.25, same_subject_prob=0.0, identical_prob=0.0)


def make_pairs(bundle: Bundle, count: int = 16, seed: int = 12345, device="cpu",
               split: str = "validation", partners: str = "train") -> list[dict]:
    """``count`` fixed pairs (each a batch of one), a pure function of ``seed``."""
    sampler = PairSampler(bundle, split, partners=partners, config=VALIDATION_PAIRS,
                          device=device)
    pairs = []
    for index in range(count):
        generator = torch.Generator(device=sampler.device).manual_seed(seed + index)
        pair = sampler.sample_pair(generator)
        pair["same_contrast"] = torch.tensor([pair["same_contrast"]], device=sampler.device)
        pairs.append(pair)
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


@torch.no_grad()
def evaluate(model, pairs: list[dict], steps=None) -> dict:
    """Mean hard Dice of ``model`` on ``pairs`` (anatomy and shapes apart), and of the identity."""
    was_training = model.training
    model.eval()
    scores = {"anatomy": [], "shapes": []}
    identity = []
    for pair in pairs:
        velocity = model(pair["fixed"], pair["moving"], steps=steps)
        disp = diffeo.integrate_velocity(velocity.float(), model.squarings)
        kind = "shapes" if pair["names"][0] == "shapes" else "anatomy"
        args = (pair["fixed_labels"], pair["moving_labels"])
        scores[kind].append(hard_dice(*args, disp, pair["num_labels"]))
        identity.append(hard_dice(*args, torch.zeros_like(disp), pair["num_labels"]))
    model.train(was_training)
    every = scores["anatomy"] + scores["shapes"]
    return {"dice": float(np.mean(every)), "identity": float(np.mean(identity)),
            **{f"dice_{k}": float(np.mean(v)) for k, v in scores.items() if v}}
