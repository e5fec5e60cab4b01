"""`python -m benchmarks`, from the repository root."""

from .cli import run

run()
