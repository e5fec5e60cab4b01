"""Compare training runs: a table of the config keys that differ and the final metrics, and a PNG of their curves.

Usage:
    python scripts/compare_runs.py --runs outputs/run_a outputs/run_b [--output compare_runs.png]
    python scripts/compare_runs.py --project vlm-recipes [--group G] [--entity E] [--output compare_runs.png]

`--runs` reads output directories of `scripts/sft.py` (run_info.json or recipe.yaml, trainer_state.json,
metrics.json, compute_report.json); `--project` reads runs from Weights & Biases through `wandb.Api` (needs a login
and the network). The table shows each run's effective value of every config key that differs: a resolved recipe
leaves out the keys at their default, which are filled in (`vlm_recipes.comparison.effective_config`); `null` is a
value, `-` a key the run does not have (not a recipe key, or another task's option). The PNG holds the loss (and
token-accuracy, learning-rate) curves and a bar chart of the final task metrics that lie in [0, 1].
"""

import argparse
import sys

from vlm_recipes.comparison import format_comparison, load_local_run, plot_comparison, wandb_runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", nargs="+", metavar="DIR", help="Output directories of scripts/sft.py.")
    source.add_argument("--project", help="W&B project whose runs to compare.")
    parser.add_argument("--group", default=None, help="Only the runs of this W&B group (with --project).")
    parser.add_argument("--entity", default=None, help="W&B entity (user or team) of the project (with --project).")
    parser.add_argument("--output", default="compare_runs.png", help="Where to write the PNG of curves.")
    args = parser.parse_args(argv)
    if args.runs is not None and (args.group or args.entity):
        parser.error("--group and --entity go with --project, not --runs.")

    records = (
        [load_local_run(path) for path in args.runs]
        if args.runs
        else wandb_runs(args.project, entity=args.entity, group=args.group)
    )
    print(format_comparison(records))
    path = plot_comparison(records, args.output)
    print(f"curves: {path}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
