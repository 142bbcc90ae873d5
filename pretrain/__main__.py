"""`python -m pretrain ...` is `proseco ...` (for environments without the console script)."""

from pretrain.cli import run

run()
