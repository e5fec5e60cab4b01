"""Throughput, padding and memory of vlm-recipes' training path, measured side by side with stock TRL.

Usage (from anywhere; `python -m benchmarks` from the repository root is the same):
    python scripts/benchmark.py [--output benchmark.json] [--quick] [--parts 1,2,3,4] [--steps N] [--repeats R]
    python scripts/benchmark.py --gpu [--output benchmark_gpu.json]      # adds parts 5 and 7; needs a CUDA GPU

The benchmark is the `benchmarks/` package; its README has what each part measures and how.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, which holds `benchmarks/`
    from benchmarks.cli import run

    run(program="python scripts/benchmark.py")
