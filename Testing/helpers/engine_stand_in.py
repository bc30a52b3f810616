"""``python engine_stand_in.py -m LiquidRegLib.cli ARGS`` (or ``-m LiquidRegLib.worker``): the real
``liquidreg`` command or warm worker (option parsing, file reading, cancel hook, progress, result
files, exit codes, the line protocol) with a stand-in registration, so job and panel tests need
neither torch nor the network.

``STAND_IN_ENGINE`` says how the stand-in behaves:

* ``slow`` (default): reports progress for a minute, checking the cancel hook at every step as
  the real engine does;
* ``stuck``: the same without checking it (a worker inside one long computation);
* ``instant``: returns at once a uniform displacement of ``1 + steps / 100`` mm along R (so each
  run is recognisable) and records the options it received as JSON in ``STAND_IN_RECORD``;
* ``crash``: the process dies at once (as if killed for memory).

``STAND_IN_ENGINE_FILE``, when that file exists, holds the behaviour instead, read at every
registration, so one warm worker can be told to behave differently from run to run.

The worker's network loads are recorded in ``STAND_IN_RECORD`` too (``{"loaded": weights,
"device": device}``), and each registration records whether it was given a loaded network.
"""
import json
import os
import sys
import time
import types

import numpy as np

import LiquidRegLib
from LiquidRegLib.progress import check, report



def _behaviour() -> str:
    path = os.environ.get("STAND_IN_ENGINE_FILE")
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    return os.environ.get("STAND_IN_ENGINE", "slow")


def _record(content: dict) -> None:
    if "STAND_IN_RECORD" in os.environ:
        with open(os.environ["STAND_IN_RECORD"], "a") as f:
            f.write(json.dumps(content) + "\n")


def register(fixed, moving, options=None, *, fixed_mask=None, moving_mask=None, progress=None,
             cancel=None, inverse=True, model=None, **settings):
    from LiquidRegLib.options import RegistrationOptions

    options = RegistrationOptions.of(options, **settings)
    behaviour = _behaviour()
    if behaviour == "crash":
        os._exit(137)
    if behaviour == "instant":
        _record({"steps": options.steps, "mode": options.mode, "device": options.device,
                 "affine": options.affine, "weights": options.weights and str(options.weights),
                 "inverse": inverse, "warm": model is not None, "pid": os.getpid(),
                 "initial_affine": None if options.initial_affine is None
                 else options.initial_affine.tolist()})
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
        if behaviour != "stuck":
            check(cancel)
        time.sleep(0.05)
    raise AssertionError("the stand-in registration was never cancelled")


def load_network(weights, device):
    _record({"loaded": weights and str(weights), "device": device, "pid": os.getpid()})
    return ("network", weights, device)


module = types.ModuleType("LiquidRegLib.register")
module.register = register
sys.modules["LiquidRegLib.register"] = LiquidRegLib.register = module

assert sys.argv[1] == "-m" and sys.argv[2] in ("LiquidRegLib.cli", "LiquidRegLib.worker"), sys.argv
if sys.argv[2] == "LiquidRegLib.worker":
    from LiquidRegLib import worker  # noqa: E402

    worker.load_network = load_network
    worker.pay_first_use_costs = lambda: None  # no torch here
    worker.main()
else:
    from LiquidRegLib.cli import main  # noqa: E402

    sys.exit(main(sys.argv[3:]))
