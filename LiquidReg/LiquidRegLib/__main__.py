"""``python -m LiquidRegLib`` runs the ``liquidreg`` command."""
from .cli import entry_point

entry_point()
