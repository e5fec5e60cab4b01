"""Turn a folder of chess board images with their FENs into the chess task's native format.

Usage:
    python scripts/create_vlm_dataset.py --pairs DIR --output DIR [--max_samples N] [--split_ratios 0.8 0.1 0.1]
        [--seed S]

DIR holds `<name>.png` (or .jpg/.jpeg) files, each with a `<name>.fen` beside it (first non-empty line: the FEN).
"""

import argparse
import sys

from vlm_recipes.tasks.chess.pairs import create_vlm_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="Folder of board images with .fen files beside them.")
    parser.add_argument("--output", required=True, help="Directory for train.json, val.json, test.json and images.")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument(
        "--split_ratios", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = create_vlm_dataset(args.pairs, args.output, args.max_samples, tuple(args.split_ratios), args.seed)
    print("wrote " + ", ".join(f"{split}: {count}" for split, count in counts.items()) + f" to {args.output}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
