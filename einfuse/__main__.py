"""``python -m einfuse`` is the ``einfuse`` command."""
import sys

from .cli import main

sys.exit(main())
