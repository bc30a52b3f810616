"""How to register: one :class:`RegistrationOptions` from every caller (the ``liquidreg`` command,
Slicer, Python scripts) into :func:`register.register`.

The options are checked once, here, when they are made, and keep their names all the way down:
nothing downstream re-parses, renames or re-validates them.  The images and their masks are not
options: they are the data the options act on, read and checked by the caller's own boundary.

Importable without torch (the Slicer panel builds its command line from these names).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from .errors import InputError

MODES = ("fast", "accurate")
#: Instance-optimisation steps of Accurate mode, used by ``liquidreg register --mode accurate``
#: and the Slicer panel: a speed/accuracy setting (not weights), read off the benchmark pairs
#: (README, "Benchmark") when Accurate optimised LNCC: 5 steps gave mean Dice 0.452, 10 steps
#: 0.461, 20 steps 0.462, at about 1 s a step on 2 cores.
ACCURATE_ITERATIONS = 10
#: Smoothness weight of instance optimisation (higher: smoother warps).
DEFAULT_REGULARISATION = 1.0
DEVICES = ("auto", "cpu", "cuda")


def _check_device(device: str) -> str:
    name = str(device)
    if name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")


@dataclass(frozen=True, eq=False)
class RegistrationOptions:
    """What a registration does, apart from the images.

    ``mode`` "fast" is the network alone; "accurate" adds :data:`ACCURATE_ITERATIONS` steps of
    instance optimisation on the pair.  ``iterations``, when given, sets that step count itself
    (0: network only) whatever the mode: an expert override.
    """

    mode: str = "fast"
    iterations: int | None = None
    refinement_steps: int | None = None        # LTC steps per level; None: the network's own
    regularisation: float = DEFAULT_REGULARISATION
    affine: bool = True
    initial_affine: np.ndarray | None = None   # 4x4 RAS, fixed point -> moving point
    weights: Path | None = None                # None: the shipped weights
    device: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; use 'fast' (network only) or "
                             "'accurate' (network + optimisation on the pair)")
        if self.iterations is not None:
            if (isinstance(self.iterations, bool) or not isinstance(self.iterations, numbers.Integral)
                    or self.iterations < 0):
                raise InputError(f"iterations must be a whole number, 0 (network only) or more, "
                                 f"not {self.iterations!r}")
            object.__setattr__(self, "iterations", int(self.iterations))
        if self.refinement_steps is not None:
            if (isinstance(self.refinement_steps, bool)
                    or not isinstance(self.refinement_steps, numbers.Integral)
                    or self.refinement_steps < 1):
                raise InputError(f"refinement_steps must be a whole number of at least 1 (the "
                                 f"network's steps at every level), not {self.refinement_steps!r}")
            object.__setattr__(self, "refinement_steps", int(self.refinement_steps))
        regularisation = self.regularisation
        if (isinstance(regularisation, bool) or not isinstance(regularisation, numbers.Real)
                or not (math.isfinite(regularisation) and regularisation >= 0)):
            raise InputError(f"regularisation must be a number >= 0, not {self.regularisation}; "
                             "e.g. 2 for a smoother warp")
        object.__setattr__(self, "regularisation", float(regularisation))
        object.__setattr__(self, "affine", bool(self.affine))
        if self.initial_affine is not None:
            matrix = np.array(self.initial_affine, dtype=np.float64)
            if (matrix.shape != (4, 4) or not np.all(np.isfinite(matrix))
                    or not np.allclose(matrix[3], (0, 0, 0, 1))
                    or abs(np.linalg.det(matrix[:3, :3])) < 1e-6):
                raise InputError("the initial affine must be a finite, invertible 4x4 RAS matrix "
                                 "(fixed point -> moving point); pass such a matrix or none")
            matrix.setflags(write=False)
            object.__setattr__(self, "initial_affine", matrix)
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights).expanduser())
        object.__setattr__(self, "device", _check_device(self.device))

    @property
    def steps(self) -> int:
        """Instance-optimisation steps this registration runs (0: network only)."""
        if self.iterations is not None:
            return self.iterations
        return ACCURATE_ITERATIONS if self.mode == "accurate" else 0

    def __eq__(self, other) -> bool:
        if not isinstance(other, RegistrationOptions):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = (a is None and b is None) if a is None or b is None else (
                np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b)
            if not same:
                return False
        return True

    __hash__ = None

    @classmethod
    def of(cls, options: "RegistrationOptions | None" = None, **settings) -> "RegistrationOptions":
        """``options`` (default: the defaults) with some fields set by name, for short calls such
        as ``register(fixed, moving, mode="accurate")``; an unknown name is a TypeError."""
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise TypeError(f"options must be RegistrationOptions, not {type(base).__name__}")
        return replace(base, **settings) if settings else base

    def summary(self) -> dict:
        """The options as summary.json records them (the device used is recorded apart)."""
        return {"mode": self.mode, "iterations": self.steps,
                "refinement_steps": self.refinement_steps, "regularisation": self.regularisation,
                "affine": self.affine, "initial_affine": None if self.initial_affine is None
                else self.initial_affine.tolist()}
