#!/usr/bin/env python
"""Measure how far CUDA and CPU registrations of the same pair differ (the tolerance that
Testing/test_devices.py asserts), on the test suite's small real brain pair.

    python scripts/cuda_agreement.py [--weights W]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))
from conftest import small_brain  # noqa: E402

from LiquidRegLib import register  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights")
    args = parser.parse_args(argv)
    fixed, _ = small_brain("fixed")
    moving, _ = small_brain("moving")
    results = {d: register.register(fixed, moving, device=d, weights=args.weights)
               for d in ("cpu", "cuda")}
    cpu, gpu = results["cpu"], results["cuda"]
    span = float(np.ptp(cpu.warped))
    report = {
        "device": gpu.summary["device"],
        "max_abs_displacement_difference_mm": float(np.abs(cpu.displacement - gpu.displacement).max()),
        "mean_abs_displacement_difference_mm": float(np.abs(cpu.displacement - gpu.displacement).mean()),
        "affine_max_abs_difference": float(np.abs(cpu.affine - gpu.affine).max()),
        "mean_abs_warped_difference_fraction_of_range":
            float(np.abs(cpu.warped - gpu.warped).mean() / span),
        "timings_cpu_s": cpu.summary["timings_s"], "timings_cuda_s": gpu.summary["timings_s"],
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
