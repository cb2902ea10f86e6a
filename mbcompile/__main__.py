"""``python -m mbcompile``: the ``mbcompile`` command (mbcompile.cli)."""
import sys

from .cli import main

sys.exit(main())
