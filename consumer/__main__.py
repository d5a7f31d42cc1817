"""``python -m consumer``: the old name of ``python -m popscore``, kept for compatibility."""

import sys

from popscore.cli.main import main

sys.exit(main())
