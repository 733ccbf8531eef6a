"""`python -m mlmetal ...` is the `mlmetal` command."""

import sys

from .cli import main

sys.exit(main())
