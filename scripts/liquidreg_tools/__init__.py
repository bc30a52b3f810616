"""Tooling around LiquidReg that is not part of the runtime users install (the wheel, the
Slicer extension): training material, the peer methods and measurement helpers of the
benchmarks.  Importable when ``scripts/`` is on the path, as it is for ``python scripts/X.py``
and for the test suite (pyproject.toml)."""
