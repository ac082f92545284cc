"""`python -m experiments.specbench`: see experiments.specbench."""

import sys

from .cli import main

sys.exit(main())
