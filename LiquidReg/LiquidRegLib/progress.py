"""Progress and cancellation: how long work talks to whoever drives it (CLI bar, Slicer, tests).

Long-running functions take ``progress`` (a callable receiving :class:`ProgressEvent`) and
``cancel`` (a callable returning True when the user asked to stop).  They call :func:`check` at
every step, so cancelling never leaves half-applied state behind.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import Cancelled


@dataclass
class ProgressEvent:
    stage: str                    # e.g. "affine", "network", "instance", "write", "train"
    step: int                     # steps done in this stage
    total: Optional[int] = None   # steps in this stage, if known
    message: str = ""
    metrics: dict = field(default_factory=dict)  # losses, grad norm, skipped steps, eta_s, ...

    def as_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "total": self.total,
                "message": self.message, "metrics": self.metrics}


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


def report(progress: Optional[ProgressFn], stage: str, step: int, total: Optional[int] = None,
           message: str = "", **metrics) -> None:
    if progress is not None:
        progress(ProgressEvent(stage, step, total, message, metrics))


def check(cancel: Optional[CancelFn]) -> None:
    """Raise :class:`Cancelled` if the user asked to stop."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user; nothing was written")
