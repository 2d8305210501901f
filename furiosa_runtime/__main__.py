"""``python -m furiosa_runtime``: the runtime command line (see ``entrypoints/cli.py``)."""

import sys

from furiosa_runtime.entrypoints.cli import main

sys.exit(main())
