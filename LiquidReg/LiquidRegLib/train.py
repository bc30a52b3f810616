"""The one stabilised optimisation loop, for its three users:

* training the shipped network (``scripts/train.py``),
* fine-tuning the network on a user's cohort or pair (``liquidreg finetune``, Slicer Fine-tune),
* instance optimisation of one pair's velocity field (``register --iterations N``).

The faults of the original training are fixed at the root, not clamped:

* AMP is ``torch.amp`` (autocast + ``GradScaler("cuda")``) on CUDA, plain fp32 on CPU (bf16 on
  request); gradients are unscaled before clipping.
* Losses are computed in fp32 outside autocast; LNCC clamps *variances*, never its result.
* Warps pad at the border / with zeros and never clamp sampling grids.
* Gradient clipping at 1.0 is a logged safety net, not a crutch (lr 1e-4, velocity scale 1.0,
  zero-initialised velocity heads).
* A step whose loss or gradient is non-finite is skipped and counted, never applied; K in a row
  stop the run with :class:`TrainingDiverged` and the last good weights kept.
* Checkpoints (config, step, model, optimiser, scaler and RNG state) are written atomically;
  batches are a pure function of (seed, step), so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import ast
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint, diffeo, losses, validate
from .errors import Cancelled, InputError, TrainingDiverged, WeightsError
from .model import upsample_field
from .progress import CancelFn, ProgressFn, check, report


# ---- configuration -------------------------------------------------------------------------
@dataclass
class LossWeights:
    similarity: float = 1.0    # the image similarity term (TrainConfig.similarity)
    dice: float = 1.0          # soft Dice of warped one-hot labels, when labels exist
    smoothness: float = 1.0    # diffusion regulariser on the velocity field (voxels^2)
    folding: float = 10.0      # hinge on J <= 0 of the displacement
    levels: float = 0.0        # Dice of each coarser level's estimate (deep supervision)


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 0            # linear learning-rate warm-up (Adam's first steps are large)
    clip_norm: float = 1.0
    amp: bool = True                 # autocast on CUDA (amp_dtype); ignored on CPU
    amp_dtype: str = "float16"       # "float16" (with a GradScaler) or "bfloat16" (needs none)
    cpu_bf16: bool = False           # optional bf16 autocast on CPU
    max_consecutive_skips: int = 10
    checkpoint_every: int = 50
    log_every: int = 1               # steps per read-back of losses (the loop's one host wait)
    lncc_window: int = 9
    #: "lncc" (training: counts only where both images share a contrast), or a contrast-free
    #: measure for any pair: "mind" (MIND-SSC descriptors, squared difference) or "ngf".
    similarity: str = "lncc"
    seed: int = 0
    weights: LossWeights = field(default_factory=LossWeights)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["weights"] = LossWeights(**d.get("weights", {}))
        return cls(**d)


# ---- objective -----------------------------------------------------------------------------
def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, 1, ...) int labels in 0..classes-1 -> (N, classes-1, ...) float, background dropped."""
    return F.one_hot(labels[:, 0].long(), classes).permute(0, 4, 1, 2, 3)[:, 1:].float()


SIMILARITIES = ("lncc", "mind", "ngf")  # instance optimisation also takes "auto"


def similarity_loss(name: str, batch: dict, disp: torch.Tensor, lncc_window: int = 9
                    ) -> torch.Tensor:
    """Per-item (N,) dissimilarity of ``batch``'s fixed image and its moving image warped by
    ``disp``, within ``fixed_mask`` if the batch has one.

    "mind" warps the moving image's MIND-SSC descriptors (``batch["descriptors"]``, the fixed
    and moving ones, when the caller computed them once; else they are computed here), with
    border padding as for fields: descriptors describe structure, and outside the image there is
    none to invent.  ``batch["descriptor_level"]`` L > 0 compares them on pyramid level L
    (descriptors averaged by :func:`pool_to_level`, the field read at voxels 2^L i), 8^L times
    fewer voxels to warp.
    """
    fixed, moving, mask = batch["fixed"], batch["moving"], batch.get("fixed_mask")
    if name == "lncc":
        return losses.lncc_loss(fixed, diffeo.warp(moving, disp), lncc_window, mask,
                                per_item=True)
    if name == "ngf":
        return losses.ngf_loss(fixed, diffeo.warp(moving, disp), mask, per_item=True)
    if name == "mind":
        level = batch.get("descriptor_level", 0)
        fixed_d, moving_d = batch.get("descriptors") or (
            pool_to_level(losses.mind_ssc(fixed), level), pool_to_level(losses.mind_ssc(moving), level))
        step = 2 ** level
        disp = disp[:, :, ::step, ::step, ::step] / step
        mask = None if mask is None else mask[:, :, ::step, ::step, ::step]
        return losses.descriptor_loss(fixed_d, diffeo.warp(moving_d, disp, padding_mode="border"),
                                      mask, per_item=True)
    raise ValueError(f"unknown similarity {name!r}; use one of {', '.join(SIMILARITIES)}")


def registration_loss(velocity: torch.Tensor, batch: dict, weights: LossWeights,
                      squarings: int = diffeo.MIN_SQUARINGS, lncc_window: int = 9,
                      estimates=(), similarity: str = "lncc") -> tuple[torch.Tensor, dict]:
    """Total loss and its terms for a velocity field (fp32, outside autocast).

    ``batch`` holds ``fixed``/``moving`` (N, 1, I, J, K) and optionally ``fixed_labels``/
    ``moving_labels`` (int, 0 = background, with ``num_labels``), ``fixed_mask`` and
    ``same_contrast`` ((N,) bool: the similarity counts only for those items; LNCC means
    nothing between different contrasts).  ``similarity`` names the measure
    (:func:`similarity_loss`); its term is reported under that name.  Folding is penalised on the
    displacement at the velocity's resolution, where it arises.  ``estimates``: the network's
    (level, velocity) after each level (``model(..., every_level=True)``), each scored by Dice at
    its own level (``weights.levels``).
    """
    with torch.autocast(device_type=velocity.device.type, enabled=False):
        velocity = velocity.float()
        fixed = batch["fixed"]
        coarse = diffeo.integrate_velocity(velocity, squarings)
        disp = diffeo.resize_field(coarse, fixed.shape[2:])
        terms = {}
        total = velocity.new_zeros(())
        same = batch.get("same_contrast")
        use = (torch.ones(fixed.shape[0], device=fixed.device) if same is None
               else torch.as_tensor(same).to(fixed.device, non_blocking=True).float().view(-1))
        # LNCC is left out only when the host knows that no item shares a contrast: asking the
        # GPU would stall it, and ``use`` zeroes the items that do not anyway
        shared = (same is None or (torch.is_tensor(same) and same.device.type != "cpu")
                  or bool(torch.as_tensor(same).any()))
        if weights.similarity and shared:
            per_item = similarity_loss(similarity, batch, disp, lncc_window)
            terms[similarity] = (per_item * use).sum() / use.sum()
            total = total + weights.similarity * (per_item * use).mean()
        if batch.get("fixed_labels") is not None and (weights.dice or weights.levels):
            k = int(batch["num_labels"])
            fixed_labels, moving_labels = (one_hot(batch["fixed_labels"], k),
                                           one_hot(batch["moving_labels"], k))
            if weights.dice:
                terms["dice"] = losses.dice_loss(fixed_labels, diffeo.warp(moving_labels, disp))
                total = total + weights.dice * terms["dice"]
            coarser = [(level, v) for level, v in estimates if level > 0]
            if weights.levels and coarser:
                terms["levels"] = torch.stack([
                    losses.dice_loss(pool_to_level(fixed_labels, level), diffeo.warp(
                        pool_to_level(moving_labels, level),
                        diffeo.integrate_velocity(v.float(), squarings)))
                    for level, v in coarser]).mean()
                total = total + weights.levels * terms["levels"]
        if weights.smoothness:
            terms["smooth"] = losses.diffusion_loss(velocity)
            total = total + weights.smoothness * terms["smooth"]
        if weights.folding:
            terms["fold"] = losses.folding_loss(diffeo.jacobian_determinant(coarse))
            total = total + weights.folding * terms["fold"]
        return total, terms


def pool_to_level(volume: torch.Tensor, level: int) -> torch.Tensor:
    """Average ``volume`` onto the grid of pyramid level ``level`` (voxel i at 2^level i): a
    centred box of 2^(level+1) - 1 voxels per output, so no half-voxel shift."""
    if level == 0:
        return volume
    s = 2 ** level
    return F.avg_pool3d(volume, 2 * s - 1, stride=s, padding=s - 1, count_include_pad=False)


class InstanceVelocity(nn.Module):
    """One pair's velocity field as the trainable: the network's prediction plus a correction
    that lives at half its resolution (4 mm on the working grid).

    The network's fine detail is kept as it is, while the optimiser moves a smoother, 8x smaller
    field: per-voxel freedom at 2 mm lets LNCC fold the map (measured: J < 0 after 30 steps on
    the test brain), a 4 mm correction does not.
    """

    def __init__(self, velocity: torch.Tensor, squarings: int = diffeo.MIN_SQUARINGS):
        super().__init__()
        self.register_buffer("base", velocity.detach().clone().float(), persistent=False)
        half = [n // 2 for n in velocity.shape[2:]]
        self.correction = nn.Parameter(self.base.new_zeros(velocity.shape[0], 3, *half))
        self.squarings = squarings

    def forward(self, fixed=None, moving=None):
        return self.base + upsample_field(self.correction, self.base.shape[2:])


# ---- distributed -----------------------------------------------------------------------------
def distributed_setup() -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun (NCCL on GPU, gloo on CPU)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _agree_on_skipping(bad: torch.Tensor) -> torch.Tensor:
    """Skip on every replica if any replica must skip (on the device: no host wait)."""
    if dist.is_initialized():
        bad = bad.float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = bad > 0
    return bad


# ---- the loop ------------------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0
    skipped: int = 0
    clipped: int = 0
    history: list = field(default_factory=list)  # (step, loss, grad_norm) of applied steps


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": {"version": version, "state": list(internal), "gauss": gauss}}


def _set_rng_state(state: dict) -> None:
    """Restore the RNGs from checkpoint data: numbers only, never evaluated as code."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"]))
    python = state["python"]
    if isinstance(python, str):  # checkpoints written before 0.1.1 kept repr(random.getstate())
        try:
            python = ast.literal_eval(python)
        except (ValueError, SyntaxError):
            raise WeightsError("the checkpoint's random state is not a Python RNG state; "
                               "start the run afresh") from None
        python = {"version": python[0], "state": python[1], "gauss": python[2]}
    internal = python["state"]
    if not (isinstance(python["version"], int) and all(isinstance(v, int) for v in internal)
            and (python["gauss"] is None or isinstance(python["gauss"], float))):
        raise WeightsError("the checkpoint's random state is not a Python RNG state; start the "
                           "run afresh")
    random.setstate((python["version"], tuple(internal), python["gauss"]))


def run(trainable: nn.Module, batch_for_step: Callable[[int], dict], config: TrainConfig, *,
        device="cpu", checkpoint_path=None, resume: bool = False,
        progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
        stage: str = "train", trainable_meta: Optional[dict] = None) -> RunState:
    """Optimise ``trainable`` (a module with ``forward(fixed, moving) -> velocity`` and a
    ``squarings`` attribute) for ``config.steps`` steps.

    ``batch_for_step(step)`` must be deterministic in ``step`` (resume relies on it).  On return
    (or on :class:`TrainingDiverged` / ``Cancelled``) the trainable holds the last good weights.

    The host never waits for the device inside a step.  Whether a step is applied is decided on
    the device: the fused optimiser step is skipped (weights and moments untouched) when the
    loss or the gradient norm is not finite, and after ``max_consecutive_skips`` skips in a row
    every further step is skipped too.  Every ``config.log_every`` steps (and before a
    checkpoint, at the end, on cancel) the losses of those steps are read back at once; then
    skipped and clipped steps are counted, progress is reported (one event per step, as if each
    had been read at once) and the run stops with :class:`TrainingDiverged` at the step that
    made too many skips in a row, whose weights are the last good ones: no per-step copy of
    the weights is needed.  Applied steps take clipped, finite gradients, so they cannot make a
    weight non-finite; that is still checked at each read-back, against a copy of the weights
    made at the previous one.
    """
    device = torch.device(device)
    trainable.to(device).train()
    core = trainable
    if dist.is_initialized():
        trainable = nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, fused=True)
    use_amp = config.amp and device.type == "cuda"
    use_fp16 = use_amp and config.amp_dtype == "float16"
    use_bf16 = (use_amp and config.amp_dtype == "bfloat16") or (config.cpu_bf16
                                                                 and device.type == "cpu")
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)  # bf16 and fp32 need no scaling
    state = RunState()
    if resume and checkpoint_path and Path(checkpoint_path).exists():
        content, _ = checkpoint.load(checkpoint_path, kind="checkpoint")
        core.load_state_dict(content["model"])
        optimizer.load_state_dict(content["optimizer"])
        for group in optimizer.param_groups:  # the caller's config decides the learning rate
            group["lr"] = config.lr            # (e.g. a lower one to finish a long run)
            group.update(fused=True, foreach=None)  # steps are skipped inside the fused kernel
        if content["scaler"]:
            scaler.load_state_dict(content["scaler"])
        _set_rng_state(content["rng"])
        state = RunState(**content["state"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    checked = [p.detach().clone() for p in params]  # weights at the last read-back
    consecutive = 0
    too_many_skips = torch.zeros((), dtype=torch.bool, device=device)
    skips_in_a_row = torch.zeros((), device=device)
    pending = []  # (step, loss, grad_norm, skipped, terms) on the device, not yet read back
    started, first_step = time.time(), state.step

    def save_checkpoint():
        if checkpoint_path and rank == 0:
            checkpoint.save(checkpoint_path, {
                "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(), "state": asdict(state),
                "train_config": config.to_dict(), "meta": dict(trainable_meta or {}),
                "model_config": getattr(getattr(core, "config", None), "to_dict", dict)()},
                kind="checkpoint")

    def read_back():
        """The pending steps' numbers in one host wait; counts, progress, divergence."""
        nonlocal consecutive
        if not pending:
            return
        with torch.no_grad():
            weights_norm = nn.utils.get_total_norm(params)
        values = torch.stack([value.float() for _, loss, norm, skipped, terms in pending
                              for value in (loss, norm, skipped, *terms.values())]
                             + [weights_norm]).tolist()
        finite_weights = math.isfinite(values.pop())
        rows, start = [], 0
        for step, *_, terms in pending:
            rows.append((step, values[start:start + 3], dict(zip(terms, values[start + 3:]))))
            start += 3 + len(terms)
        pending.clear()
        with torch.no_grad():
            if not finite_weights:  # cannot happen with clipped finite gradients; never keep it
                torch._foreach_copy_(params, checked)
                raise TrainingDiverged(f"the weights became non-finite by step {rows[-1][0]}; "
                                       "those of the previous read-back are kept. Lower the "
                                       "learning rate")
            torch._foreach_copy_(checked, params)
        for step, (loss, grad_norm, skipped), terms in rows:
            if skipped:
                consecutive += 1
                state.skipped += 1
                if consecutive >= config.max_consecutive_skips:
                    state.step = step
                    raise TrainingDiverged(
                        f"{consecutive} consecutive steps had non-finite loss or gradients (step "
                        f"{step}); stopped with the last good weights kept. Check the inputs for "
                        "extreme intensities or lower the learning rate")
            else:
                consecutive = 0
                state.clipped += grad_norm > config.clip_norm
                state.history.append((step, loss, grad_norm))
            eta = (time.time() - started) / (step - first_step) * (config.steps - step)
            report(progress, stage, step, config.steps, loss=loss, grad_norm=grad_norm,
                   skipped=state.skipped, clipped=state.clipped, eta_s=eta, **terms)

    while state.step < config.steps:
        try:
            check(cancel)
        except Cancelled:
            read_back()
            raise
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                 for k, v in batch_for_step(state.step).items()}
        optimizer.zero_grad(set_to_none=True)
        if config.warmup_steps:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (state.step + 1) / config.warmup_steps)
        autocast = torch.autocast(device.type, dtype=torch.float16 if use_fp16 else torch.bfloat16,
                                  enabled=use_fp16 or use_bf16)
        deep = bool(config.weights.levels) and batch.get("fixed_labels") is not None
        with autocast:
            velocity = trainable(batch["fixed"], batch["moving"], **batch.get("model_kwargs", {}),
                                 **({"every_level": True} if deep else {}))
        velocity, estimates = velocity if deep else (velocity, ())
        loss, terms = registration_loss(velocity, batch, config.weights, core.squarings,
                                        config.lncc_window, estimates, config.similarity)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(params, config.clip_norm)
        skipped = _agree_on_skipping(
            ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)) | too_many_skips)
        optimizer.found_inf = skipped.float()  # the fused step leaves everything as it was
        optimizer.step()
        scaler.update()
        skips_in_a_row = (skips_in_a_row + 1) * skipped
        too_many_skips = too_many_skips | (skips_in_a_row >= config.max_consecutive_skips)
        state.step += 1
        pending.append((state.step, loss.detach(), grad_norm.detach(), skipped,
                        {k: v.detach() for k, v in terms.items()}))
        del velocity, estimates, loss, terms, batch
        checkpoint_due = config.checkpoint_every and state.step % config.checkpoint_every == 0
        if len(pending) >= config.log_every or checkpoint_due or state.step == config.steps:
            read_back()
        if checkpoint_due:
            save_checkpoint()
    save_checkpoint()
    core.eval()
    return state


# ---- labels ----------------------------------------------------------------------------------
def keep_random_labels(batch: dict, k: int, generator: torch.Generator) -> dict:
    """Keep ``k`` random labels (relabelled 1..k, the rest background): an unbiased, cheap
    estimate of the mean Dice over all shared labels, whose one-hot maps would not fit a CPU."""
    n = int(batch.get("num_labels", 0)) - 1
    if batch.get("fixed_labels") is None or n <= k:
        return batch
    keep = torch.randperm(n, generator=generator)[:k] + 1
    table = torch.zeros(n + 1, dtype=torch.long, device=batch["fixed_labels"].device)
    table[keep.to(table.device)] = torch.arange(1, k + 1, device=table.device)
    return dict(batch, fixed_labels=table[batch["fixed_labels"]],
                moving_labels=table[batch["moving_labels"]], num_labels=k + 1)


def compact_labels(fixed_labels: np.ndarray, moving_labels: np.ndarray):
    """Relabel two label maps to 0..K over the labels they share (others become background)."""
    shared = np.intersect1d(np.unique(fixed_labels[fixed_labels > 0]),
                            np.unique(moving_labels[moving_labels > 0]))
    if shared.size == 0:
        raise InputError("the fixed and moving label maps share no label; pass label maps that use "
                         "the same label numbers, or leave them out")

    def relabel(a):
        out = np.zeros(a.shape, dtype=np.int64)
        out[np.isin(a, shared)] = np.searchsorted(shared, a[np.isin(a, shared)]) + 1
        return out
    return relabel(fixed_labels), relabel(moving_labels), int(shared.size) + 1


# ---- fine-tuning (liquidreg finetune, Slicer Fine-tune) -------------------------------------
FINETUNE_LABELS_PER_STEP = 12


def _prepare_pair(spec, model, device) -> dict:
    """Read, affinely align and bring one PairSpec onto the network's working grid."""
    from .affine import affine_register
    from .grid import resample
    from .io import read_volume
    from .preprocess import to_working, working_grid

    fixed_path, moving_path, fixed_labels_path, moving_labels_path = (list(spec) + [None] * 4)[:4]
    fixed, moving = read_volume(fixed_path), read_volume(moving_path)
    validate.check_image(fixed, "fixed")
    validate.check_image(moving, "moving")
    world_map = affine_register(fixed, moving, device=device)
    grid = working_grid(fixed.grid, model.config.working_spacing, model.config.divisor)
    pair = to_working(fixed, moving, world_map, grid, device=device)
    batch = {"fixed": pair.fixed, "moving": pair.moving}
    if fixed_labels_path and moving_labels_path:
        fl = read_volume(fixed_labels_path, dtype=None)
        ml = read_volume(moving_labels_path, dtype=None)
        f = resample(fl.array, fl.grid, grid, order="nearest")
        m = resample(ml.array, ml.grid, grid, world_map=world_map, order="nearest")
        f, m, k = compact_labels(f, m)
        batch.update(fixed_labels=torch.as_tensor(f, device=device)[None, None],
                     moving_labels=torch.as_tensor(m, device=device)[None, None], num_labels=k)
    return batch


def finetune(pairs: Sequence, output, *, steps: int = 200, weights=None, device="auto",
             lr: float = 1e-4, overwrite: bool = False, progress=None, cancel=None) -> dict:
    """Fine-tune the network on a user's pairs and save new weights to ``output``.

    Each pair is ``(fixed, moving[, fixed_labels, moving_labels])`` (paths).  The loss is LNCC
    (same-contrast pairs), plus Dice where labels are given.  ``output`` follows
    :func:`resources.check_new_weights_path` (never the shipped weights; an existing file only
    with ``overwrite``); cancelling writes nothing.
    """
    from .devices import resolve_device
    from .resources import check_new_weights_path

    output = check_new_weights_path(output, overwrite=overwrite)
    if not pairs:
        raise InputError("no pairs to fine-tune on; give at least one pair of images")
    if steps < 1:
        raise InputError(f"steps must be at least 1, not {steps}")
    dev = resolve_device(device)
    model, info = checkpoint.load_model(weights, dev)
    batches = []
    for index, spec in enumerate(pairs):
        check(cancel)
        report(progress, "prepare", index, len(pairs), f"aligning pair {index + 1}/{len(pairs)}")
        batches.append(_prepare_pair(spec, model, dev))
    report(progress, "prepare", len(pairs), len(pairs))

    def batch_for_step(step):
        generator = torch.Generator().manual_seed(step)
        return keep_random_labels(batches[step % len(batches)], FINETUNE_LABELS_PER_STEP, generator)

    config = TrainConfig(steps=steps, lr=lr, checkpoint_every=0)
    state = run(model, batch_for_step, config, device=dev, progress=progress, cancel=cancel,
                stage="finetune")
    meta = {"finetuned_from": {k: info[k] for k in ("name", "version", "sha256")},
            "pairs": [[str(p) if p else None for p in spec] for spec in pairs],
            "train_config": config.to_dict(), "skipped_steps": state.skipped}
    digest = checkpoint.save_weights(output, model, meta, name=f"{info['name']}-finetuned",
                                     version=info["version"], replace=overwrite)
    return {"output": str(output), "sha256": digest, "steps": state.step,
            "skipped": state.skipped, "clipped": state.clipped,
            "final_loss": state.history[-1][1] if state.history else None}


# ---- instance optimisation (register --iterations N) ---------------------------------------
#: Instance optimisation moves a velocity field in voxels, not network weights: its own lr.
INSTANCE_LR = 0.05
#: Its similarity: "auto" chooses per pair between LNCC (one contrast) and MIND-SSC descriptors
#: compared by their squared difference (different contrasts: LNCC pulls structures the wrong
#: way there).  Chosen by measurement on the validation pairs, same- and cross-contrast
#: (``scripts/instance_similarity.py``; README, "Accurate mode").
INSTANCE_SIMILARITY = "auto"
#: The pyramid level on which its descriptors are compared: 0, the 2 mm working grid, like LNCC
#: (a step then costs about what an LNCC step does; ``scripts/instance_similarity.py --settings
#: mind:1:1`` measures level 1, the 4 mm correction's own resolution).
INSTANCE_DESCRIPTOR_LEVEL = 0
#: LNCC's window in instance optimisation.
INSTANCE_LNCC_WINDOW = 7
#: ``similarity="auto"``: LNCC where the pair shares a contrast, recognised by the correlation of
#: the two images' intensities over the fixed image's brighter tissue after the network
#: (:func:`contrast_agreement`) reaching this value; MIND-SSC otherwise.  Measured on the
#: validation pairs: one contrast 0.39-0.75, a T2-like scan onto a T1 -0.29 to -0.13, random
#: contrasts -0.06 to 0.30 (LNCC lowered the one at 0.30 below Fast); on the test suite's real
#: pair a T1 0.78, its T2-like rendering 0.23.  The middle of the gap (README, "Accurate mode").
SAME_CONTRAST_AGREEMENT = 0.35
#: Image values (normalised to [0, 1]) above which a voxel of the moving image shows anything.
FOREGROUND = 0.02


@dataclass
class InstanceOutcome:
    """What instance optimisation returns: the velocity to use and what happened.

    ``kept`` is "optimised", or "network" when the optimisation made its own similarity worse
    or folded the map where the network had not: then ``velocity`` is the network's own and
    ``reason`` says why, so Accurate never ends below Fast by its own measure.
    """
    velocity: torch.Tensor
    state: RunState
    similarity: str              # the measure optimised ("lncc" or "mind")
    before: float                # dissimilarity of the network's answer (lower is better)
    after: float                 # of the optimised answer
    folded_voxels: tuple         # voxels with J <= 0: (network, optimised)
    kept: str
    reason: Optional[str] = None
    contrast_agreement: Optional[float] = None   # what "auto" chose by, if it chose

    def summary(self) -> dict:
        """summary.json's ``instance_optimisation`` record."""
        chosen = None if self.contrast_agreement is None else {
            "rule": "auto: lncc if the contrast agreement reaches the threshold, else mind",
            "contrast_agreement": round(self.contrast_agreement, 4),
            "threshold": SAME_CONTRAST_AGREEMENT}
        return {"steps": self.state.step, "skipped": self.state.skipped,
                "clipped": self.state.clipped, "similarity": self.similarity,
                "similarity_choice": chosen,
                "dissimilarity_before": round(self.before, 6),
                "dissimilarity_after": round(self.after, 6),
                "folded_voxels": {"network": self.folded_voxels[0],
                                  "optimised": self.folded_voxels[1]},
                "kept": self.kept, "reason": self.reason}


def tissue_threshold(image: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of an image normalised to [0, 1]: it splits off the brighter tissue from
    background, fluid and, in synthetic or unstripped images, a background that is not black."""
    counts = torch.histc(image.detach().float(), bins, 0.0, 1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64, device=counts.device) + 0.5) / bins
    below, mass_below = counts.cumsum(0), (counts * centres).cumsum(0)
    above, mass_above = counts.sum() - below, mass_below[-1] - mass_below
    between = below * above * (mass_below / below.clamp_min(1) - mass_above / above.clamp_min(1)) ** 2
    best = between >= between.max() * (1 - 1e-9)  # a gap between classes: its middle
    return float(centres[best].mean())


def contrast_agreement(fixed: torch.Tensor, moving: torch.Tensor, velocity: torch.Tensor,
                       squarings: int = diffeo.MIN_SQUARINGS, mask=None) -> float:
    """Correlation of ``fixed`` and ``moving`` warped by ``velocity`` over the fixed image's
    brighter tissue (:func:`tissue_threshold`, within ``mask``) where the moving image shows
    something: clearly positive when they share a contrast, near zero or negative otherwise (a
    T2 orders grey and white matter the other way).  Neither the brain's outline nor the
    background may count: every contrast shares them (local NCC over the whole image scored a
    T2-like scan 0.41 against a T1, a global correlation with the background 0.64-0.85)."""
    with torch.no_grad():
        warped = diffeo.warp(moving, diffeo.exp_velocity(velocity.float(), fixed.shape[2:],
                                                         squarings))
        inside = (fixed > tissue_threshold(fixed)) & (warped > FOREGROUND)
        if mask is not None:
            inside &= mask > 0.5
        if int(inside.sum()) < 2:
            return 0.0
        pair = torch.stack([fixed[inside], warped[inside]]).double()
        return float(torch.corrcoef(pair)[0, 1].nan_to_num(0.0))


def _judge(velocity: torch.Tensor, batch: dict, similarity: str, squarings: int):
    """(dissimilarity, voxels with J <= 0) of a velocity on the pair, as the loop measures them."""
    coarse = diffeo.integrate_velocity(velocity.float(), squarings)
    disp = diffeo.resize_field(coarse, batch["fixed"].shape[2:])
    return (float(similarity_loss(similarity, batch, disp, INSTANCE_LNCC_WINDOW).mean()),
            int((diffeo.jacobian_determinant(coarse) <= 0).sum()))


def instance_optimise(velocity: torch.Tensor, pair, iterations: int, *,
                      squarings: int = diffeo.MIN_SQUARINGS, regularisation: float = 1.0,
                      lr: float = INSTANCE_LR, similarity: str = INSTANCE_SIMILARITY,
                      descriptor_level: int = INSTANCE_DESCRIPTOR_LEVEL, device="cpu",
                      progress=None, cancel=None) -> InstanceOutcome:
    """Refine one pair's velocity field for ``iterations`` steps of the stabilised loop;
    ``regularisation`` weighs the diffusion (smoothness) term; ``similarity`` "auto" chooses per
    pair (:data:`SAME_CONTRAST_AGREEMENT`).  The network's answer is kept (and the outcome says
    why) if the result is less similar or folds more (:class:`InstanceOutcome`)."""
    agreement = None
    if similarity == "auto":
        agreement = contrast_agreement(pair.fixed, pair.moving, velocity, squarings,
                                       pair.fixed_mask)
        similarity = "lncc" if agreement >= SAME_CONTRAST_AGREEMENT else "mind"
    trainable = InstanceVelocity(velocity, squarings)
    batch = {"fixed": pair.fixed, "moving": pair.moving, "fixed_mask": pair.fixed_mask}
    if similarity == "mind":  # the descriptors do not change: make them once
        with torch.no_grad():
            batch["descriptors"] = tuple(pool_to_level(losses.mind_ssc(image), descriptor_level)
                                         for image in (pair.fixed, pair.moving))
        batch["descriptor_level"] = descriptor_level
    config = TrainConfig(steps=iterations, lr=lr, checkpoint_every=0,
                         amp=False,  # float32 work: no autocast, no GradScaler
                         lncc_window=INSTANCE_LNCC_WINDOW,
                         similarity=similarity,
                         weights=LossWeights(similarity=1.0, dice=0.0, smoothness=regularisation,
                                             folding=10.0))
    state = run(trainable, lambda step: batch, config, device=device, progress=progress,
                cancel=cancel, stage="instance")
    with torch.no_grad():
        refined = trainable().detach()
        before, network_folds = _judge(trainable.base, batch, similarity, squarings)
        after, refined_folds = _judge(refined, batch, similarity, squarings)
    reason = None
    if refined_folds > network_folds:
        reason = (f"the optimisation folded the map ({refined_folds} voxels with J <= 0, the "
                  f"network's {network_folds})")
    elif after > before:
        reason = (f"the optimisation made the {similarity} dissimilarity worse ({after:.4f}, "
                  f"the network's {before:.4f})")
    return InstanceOutcome(refined if reason is None else trainable.base.detach().clone(), state,
                           similarity, before, after, (network_folds, refined_folds),
                           "optimised" if reason is None else "network", reason, agreement)
