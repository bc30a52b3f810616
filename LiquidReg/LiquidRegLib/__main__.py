"""``python -m LiquidRegLib`` runs the ``liquidreg`` command."""
import sys

from .cli import main

sys.exit(main())
