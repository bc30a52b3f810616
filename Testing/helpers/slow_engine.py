"""``python slow_engine.py -m LiquidRegLib.cli ARGS``: the real ``liquidreg`` command (its option
parsing, file reading, cancel hook, progress and exit codes) with a registration that only
reports progress for a minute, so job tests need not wait for torch or the network.

It checks the engine's cancel hook at every step, as the real engine does, unless
``SLOW_ENGINE_IGNORES_CANCEL`` is set: then it behaves like a worker stuck in one long
computation.
"""
import os
import sys
import time
import types

import LiquidRegLib
from LiquidRegLib.progress import check, report


def register(fixed, moving, *, progress=None, cancel=None, **options):
    for step in range(1200):
        report(progress, "network", step, 1200, "pretending")
        if not os.environ.get("SLOW_ENGINE_IGNORES_CANCEL"):
            check(cancel)
        time.sleep(0.05)
    raise AssertionError("the stand-in registration was never cancelled")


module = types.ModuleType("LiquidRegLib.register")
module.register = register
sys.modules["LiquidRegLib.register"] = LiquidRegLib.register = module

from LiquidRegLib.cli import main  # noqa: E402

assert sys.argv[1:3] == ["-m", "LiquidRegLib.cli"], sys.argv
sys.exit(main(sys.argv[3:]))
