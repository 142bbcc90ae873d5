"""`python -m pretrain ...` is `proseco ...` (for environments without the console script)."""

import sys

from pretrain.cli import main

sys.exit(main())
