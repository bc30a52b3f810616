"""Errors users see.  Each message names the problem and the fix, on one line."""


class LiquidRegError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero; Slicer shows it."""

    exit_code = 2


class InputError(LiquidRegError):
    """An input image, mask or transform cannot be used as given."""


class OutputError(LiquidRegError):
    """A result cannot be written (the disk is full, the location is not writable)."""


class WeightsError(LiquidRegError):
    """A weights or checkpoint file is missing, corrupt or of an unknown format."""


class Cancelled(LiquidRegError):
    """The user cancelled a long run; nothing was written."""

    exit_code = 130


class TrainingDiverged(LiquidRegError):
    """Too many consecutive non-finite steps; the last good weights were kept."""

    exit_code = 3


class BatchIncomplete(LiquidRegError):
    """A batch finished but some of its pairs failed; each one's error is in the batch table."""

    exit_code = 4
