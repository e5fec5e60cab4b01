"""The benchmark of vlm-recipes' training path against stock TRL: collator and training throughput, padding,
memory, data loading at scale, and the GPU parts (README.md here has the method; RESULTS.md the dated results).

Run it as `python -m benchmarks` from the repository root, or `python scripts/benchmark.py` from anywhere. It is not
part of the installed library: it runs from the checkout, beside `tests/`.
"""

from .cli import main, parse_args, run
from .parts import PARTS
from .settings import Settings
from .workspace import Workspace

__all__ = ["PARTS", "Settings", "Workspace", "main", "parse_args", "run"]
