"""``python -m consumer`` is the ``popscore`` command."""

import sys

from consumer.cli import main

sys.exit(main())
