"""``python -m em3`` is the ``em3`` command."""
import sys

from em3.app.cli import main

sys.exit(main())
