#!/usr/bin/env python
"""Choose instance optimisation's similarity (Accurate mode) on the validation split.

    python scripts/instance_similarity.py --bundle data/bundle.npz --out similarity_out
    python scripts/instance_similarity.py ... --settings lncc:1 mind:1 ngf:1 --steps 10

For every validation pair (``data.validation``: the held-back anatomy in T1 and in a T2-like
rendering against the training anatomies in T1, and random-contrast shapes; never a benchmark
subject), the network's velocity is computed once; then each setting ``similarity:regularisation``
runs ``train.instance_optimise`` from it for ``--steps`` steps, exactly as Accurate mode does, and
the pair is scored by hard Dice over every shared label, with the network alone (Fast) and the
identity beside it.  Reported per group (same contrast, cross contrast, shapes): mean Dice, how
often Accurate fell below Fast, how often the safety kept the network's answer, and the time per
optimisation step (wall and process CPU time, which a shared machine disturbs less).

Writes ``OUT/instance_similarity.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from LiquidRegLib import checkpoint, train
from liquidreg_tools.data import bundle as B
from liquidreg_tools.data import validation
from liquidreg_tools.measure import machine, machine_line, write_report


def measure(model, pairs, similarity: str, regularisation: float, steps: int,
            level: int = train.INSTANCE_DESCRIPTOR_LEVEL) -> list[dict]:
    """Accurate mode from the network's velocity on every pair: Dice, outcome, time per step."""
    rows = []
    for pair, velocity in pairs:
        working = types.SimpleNamespace(fixed=pair["fixed"], moving=pair["moving"], fixed_mask=None)
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = train.instance_optimise(velocity, working, steps, squarings=model.squarings,
                                          regularisation=regularisation, similarity=similarity,
                                          descriptor_level=level)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append({"dice": validation.pair_dice(pair, outcome.velocity, model.squarings),
                     "kept": outcome.kept, "reason": outcome.reason,
                     "wall_s_per_step": wall / steps, "cpu_s_per_step": cpu / steps})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="data/bundle.npz")
    parser.add_argument("--out", default="similarity_out")
    parser.add_argument("--weights", help="network weights (default: the shipped ones)")
    parser.add_argument("--pairs", type=int, default=16, help="validation pairs (as train.py)")
    parser.add_argument("--steps", type=int, default=10,
                        help="instance-optimisation steps (Accurate mode's own count)")
    parser.add_argument("--settings", nargs="+", default=["lncc:1", "mind:1", "ngf:1"],
                        help="similarity:regularisation[:descriptor level] settings to compare")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = checkpoint.load_model(args.weights, "cpu")
    bundle = B.load(args.bundle)
    pairs = []
    with torch.no_grad():
        for pair in validation.make_pairs(bundle, args.pairs):
            pairs.append((pair, model(pair["fixed"], pair["moving"])))
    groups = [p["group"] for p, _ in pairs]
    agreement = [train.contrast_agreement(p["fixed"], p["moving"], v, model.squarings)
                 for p, v in pairs]
    baseline = {"identity": [validation.pair_dice(p, None, model.squarings) for p, _ in pairs],
                "fast": [validation.pair_dice(p, v, model.squarings) for p, v in pairs]}
    report = {"machine": machine(), "weights": checkpoint.model_summary(info),
              "steps": args.steps,
              "pairs": [{"group": p["group"], "names": list(p["names"]),
                         "contrasts": list(p["contrasts"]), "identity": i, "fast": f,
                         "contrast_agreement": a}
                        for (p, _), i, f, a in zip(pairs, baseline["identity"], baseline["fast"],
                                                   agreement)],
              "identity": validation.summarise(groups, baseline["identity"]),
              "fast": validation.summarise(groups, baseline["fast"]), "settings": {}}
    print("identity", report["identity"], "\nfast", report["fast"], flush=True)
    for setting in args.settings:
        similarity, regularisation, *level = setting.split(":")
        rows = measure(model, pairs, similarity, float(regularisation), args.steps,
                       *[int(v) for v in level])
        report["settings"][setting] = summary(report, rows)
        print(setting, {k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in report["settings"][setting].items() if k != "rows"}, flush=True)
    add_auto(report, train.SAME_CONTRAST_AGREEMENT)
    write_report(Path(args.out), "instance_similarity", report, markdown(report))
    return 0


def summary(report: dict, rows: list[dict]) -> dict:
    """One setting's rows (in ``report["pairs"]`` order) summarised per group, against Fast."""
    groups = [p["group"] for p in report["pairs"]]
    dice = [r["dice"] for r in rows]
    return {**validation.summarise(groups, dice),
            "below_fast": sum(d < p["fast"] - 1e-9 for d, p in zip(dice, report["pairs"])),
            "kept_network": sum(r["kept"] == "network" for r in rows),
            "wall_s_per_step": float(np.median([r["wall_s_per_step"] for r in rows])),
            "cpu_s_per_step": float(np.median([r["cpu_s_per_step"] for r in rows])),
            "rows": rows}


def add_auto(report: dict, threshold: float) -> None:
    """What ``similarity="auto"`` gives: per pair, the LNCC setting's result where the contrast
    agreement reaches ``threshold``, else the MIND-SSC one (auto runs exactly one of them)."""
    settings = report["settings"]
    lncc = next((k for k in settings if k.startswith("lncc:")), None)
    mind = next((k for k in settings if k.startswith("mind:")), None)
    if lncc and mind:
        rows = [settings[lncc if p["contrast_agreement"] >= threshold else mind]["rows"][n]
                for n, p in enumerate(report["pairs"])]
        settings[f"auto ({lncc} if agreement >= {threshold}, else {mind})"] = summary(report, rows)


def markdown(report: dict) -> str:
    groups = [k.split("_", 1)[1] for k in report["fast"] if k.startswith("dice_")]
    m = report["machine"]
    lines = ["# Instance optimisation's similarity, measured on the validation pairs", "",
             machine_line(m) + f"  {report['steps']} steps from the network's answer ({report['weights']['name']} "
             f"v{report['weights']['version']}); hard Dice over every shared label; MIND-SSC "
             f"compared on pyramid level {train.INSTANCE_DESCRIPTOR_LEVEL} unless a setting "
             "names its own (similarity:regularisation:level); "
             f"{len(report['pairs'])} pairs ("
             + ", ".join(f"{g}: {sum(p['group'] == g for p in report['pairs'])}" for g in groups)
             + ").", "",
             "| method | Dice (all) | " + " | ".join(groups) + " | pairs below Fast | "
             "kept the network | s/step wall | s/step CPU |",
             "|---|---:|" + "---:|" * len(groups) + "---:|---:|---:|---:|"]
    for name in ("identity", "fast"):
        row = report[name]
        lines.append(f"| {name} | {row['dice']:.3f} | "
                     + " | ".join(f"{row['dice_' + g]:.3f}" for g in groups) + " | | | | |")
    for setting, row in report["settings"].items():
        lines.append(f"| accurate, {setting} | {row['dice']:.3f} | "
                     + " | ".join(f"{row['dice_' + g]:.3f}" for g in groups)
                     + f" | {row['below_fast']} | {row['kept_network']} | "
                       f"{row['wall_s_per_step']:.2f} | {row['cpu_s_per_step']:.2f} |")
    agreement = {g: [round(p["contrast_agreement"], 3) for p in report["pairs"] if p["group"] == g]
                 for g in groups}
    lines += ["", "Settings are similarity:regularisation[:descriptor level].  Contrast agreement "
              "(`train.contrast_agreement`: the correlation of the fixed image and the "
              "network's warped moving image over the fixed image's brighter tissue) per "
              "group: " + "; ".join(f"{g} {v}" for g, v in agreement.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
