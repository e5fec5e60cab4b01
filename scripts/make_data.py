"""Generate a task's demo data in its native format, deterministically for a seed.

Usage:
    python scripts/make_data.py shapes --output data/demo/shapes [--num 80] [--seed 0]
"""

import argparse
from pathlib import Path

from vlm_recipes.tasks import TASKS, get_task


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--output", required=True)
    parser.add_argument("--num", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    get_task(args.task).make_data(Path(args.output), args.num, args.seed)
    print(f"wrote {args.num} {args.task} samples to {args.output}")


if __name__ == "__main__":
    main()
