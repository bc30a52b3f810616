#!/usr/bin/env python
"""Measure how far two devices' registrations of the same pair differ (the tolerance that
Testing/test_devices.py asserts), on the bundled 1 mm sample pair.

    python scripts/cuda_agreement.py [--weights W]            # CPU against CUDA
    python scripts/cuda_agreement.py --devices cpu cpu        # run to run, where there is no GPU

Distances are over the fixed brain (its labels): the displacement fields, and the affine stage
alone (where the two affines send the brain's voxels).
"""
import argparse
import json
import sys

import numpy as np

from LiquidRegLib import io, register
from LiquidRegLib.resources import sample_paths


def brain_agreement(fixed_labels, first, second) -> dict:
    """Mean and largest distances (mm) between two results over the fixed brain."""
    brain = fixed_labels.array > 0
    field = np.linalg.norm(first.displacement[brain] - second.displacement[brain], axis=-1)
    points = fixed_labels.grid.voxel_to_ras(np.argwhere(brain))
    diff = first.affine - second.affine
    affine = np.linalg.norm(points @ diff[:3, :3].T + diff[:3, 3], axis=1)
    span = float(np.ptp(first.warped))
    return {"mean_displacement_difference_mm": float(field.mean()),
            "max_displacement_difference_mm": float(field.max()),
            "mean_affine_difference_mm": float(affine.mean()),
            "max_affine_difference_mm": float(affine.max()),
            "mean_abs_warped_difference_fraction_of_range":
                float(np.abs(first.warped - second.warped).mean() / span)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights")
    parser.add_argument("--devices", nargs=2, default=["cpu", "cuda"], metavar=("A", "B"))
    args = parser.parse_args(argv)
    paths = sample_paths()
    fixed, moving = io.read_volume(paths["fixed_t1"]), io.read_volume(paths["moving_t1"])
    labels = io.read_volume(paths["fixed_labels"], dtype=None)
    first, second = (register.register(fixed, moving, device=d, weights=args.weights)
                     for d in args.devices)
    report = {"devices": [first.summary["device"], second.summary["device"]],
              **brain_agreement(labels, first, second),
              "timings_s": [first.summary["timings_s"], second.summary["timings_s"]]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
