"""``python -m popscore`` is the ``popscore`` command."""

import sys

from popscore.cli.main import main

sys.exit(main())
