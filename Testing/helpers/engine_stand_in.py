"""``python engine_stand_in.py -m LiquidRegLib.cli ARGS``: the real ``liquidreg`` command (option
parsing, file reading, cancel hook, progress, result files, exit codes) with a stand-in
registration, so job and panel tests need neither torch nor the network.

``STAND_IN_ENGINE`` says how the stand-in behaves:

* ``slow`` (default): reports progress for a minute, checking the cancel hook at every step as
  the real engine does;
* ``stuck``: the same without checking it (a worker inside one long computation);
* ``instant``: returns at once a uniform displacement of ``1 + steps / 100`` mm along R (so each
  run is recognisable) and records the options it received as JSON in ``STAND_IN_RECORD``.
"""
import json
import os
import sys
import time
import types

import numpy as np

import LiquidRegLib
from LiquidRegLib.progress import check, report

BEHAVIOUR = os.environ.get("STAND_IN_ENGINE", "slow")


def register(fixed, moving, options=None, *, fixed_mask=None, moving_mask=None, progress=None,
             cancel=None, inverse=True, **settings):
    from LiquidRegLib.options import RegistrationOptions

    options = RegistrationOptions.of(options, **settings)
    if BEHAVIOUR == "instant":
        record = {"steps": options.steps, "mode": options.mode, "device": options.device,
                  "affine": options.affine, "weights": options.weights and str(options.weights),
                  "inverse": inverse,
                  "initial_affine": None if options.initial_affine is None
                  else options.initial_affine.tolist()}
        with open(os.environ["STAND_IN_RECORD"], "a") as f:
            f.write(json.dumps(record) + "\n")
        report(progress, "network", 1, 1)
        shift = np.zeros((*fixed.grid.shape, 3), np.float32)
        shift[..., 0] = 1.0 + options.steps / 100
        return types.SimpleNamespace(
            fixed_grid=fixed.grid, moving_grid=moving.grid, displacement=shift,
            inverse_displacement=np.zeros((*moving.grid.shape, 3), np.float32) if inverse else None,
            jacobian=np.ones(fixed.grid.shape, np.float32),
            warped=np.zeros(fixed.grid.shape, np.float32), affine=np.eye(4),
            summary={"device": "cpu", "pct_folding": 0.0, "steps": options.steps})
    for step in range(1200):
        report(progress, "network", step, 1200, "pretending")
        if BEHAVIOUR != "stuck":
            check(cancel)
        time.sleep(0.05)
    raise AssertionError("the stand-in registration was never cancelled")


module = types.ModuleType("LiquidRegLib.register")
module.register = register
sys.modules["LiquidRegLib.register"] = LiquidRegLib.register = module

from LiquidRegLib.cli import main  # noqa: E402

assert sys.argv[1:3] == ["-m", "LiquidRegLib.cli"], sys.argv
sys.exit(main(sys.argv[3:]))
