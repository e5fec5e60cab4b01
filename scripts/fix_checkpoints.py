"""Find checkpoints whose processor does not load alone, and repair them from the base model.

Usage:
    python scripts/fix_checkpoints.py --list-broken [ROOT]      # report only; changes nothing
    python scripts/fix_checkpoints.py --auto-fix [ROOT]         # repair every checkpoint under ROOT
    python scripts/fix_checkpoints.py --checkpoint DIR          # repair one directory
    ... [--base_model NAME_OR_DIR] [--trust_remote_code]

ROOT defaults to `outputs`. A checkpoint is a `checkpoint-*` directory or any directory holding model or adapter
weights that training or `merge_adapter.py` wrote. Base models under ROOT (the demos' tiny models in
`outputs/tiny-models/`, a downloaded model: not a `checkpoint-*`, and no `trainer_state.json`, `training_args.bin`,
`recipe.yaml`, `run_info.json`, `adapter_config.json` or `merge_info.json` in the directory or its parent) are listed
as `BASE (skipped)` and not judged: our saves add files for other tools that a base model need not have, and a base
model has no base to repair it from. `--checkpoint DIR` judges DIR whatever it is.

A checkpoint is broken when `AutoProcessor.from_pretrained(DIR)` alone fails, or loads wrong (no tokenizer files, no
image processor, no chat template); incomplete when it lacks `preprocessor_config.json` or `generation_config.json`.
Missing processor files are copied from the base model, found offline (local directory or HF cache) from
`adapter_config.json` (`base_model_name_or_path`), `merge_info.json` (`base_model`), `config.json` (`_name_or_path`,
transformers 4) or the run's recipe (`recipe.yaml` or `run_info.json`: `model_name_or_path`), unless `--base_model`
names it. Files the checkpoint already
has are kept; the run's `min_pixels`/`max_pixels` are re-applied to a copied image-processor config.

Saves that were interrupted are listed first (`UNFINISHED`): a `checkpoint-*` directory that lacks what resuming needs
(trainer state, whole weights, non-empty files), a `.tmp-checkpoint-*` staging directory, or a final output with
`.tmp-final/` beside it. Resuming skips them; nothing here can repair them: delete them, or resume from an earlier
checkpoint.

Prints one line per checkpoint with what was found and done, then a summary. Exits 1 when a checkpoint is left
broken or incomplete, or a save is unfinished (with `--list-broken`: when any is found).
"""

import argparse
import sys

from transformers.utils import logging as transformers_logging

from vlm_recipes.checkpoints.repair import find_checkpoints, is_base_model, repair_checkpoint
from vlm_recipes.resume import unfinished_saves


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list-broken", nargs="?", const="outputs", metavar="ROOT", help="List; change nothing.")
    mode.add_argument("--auto-fix", nargs="?", const="outputs", metavar="ROOT", help="Repair all under ROOT.")
    mode.add_argument("--checkpoint", metavar="DIR", help="Repair this one directory.")
    parser.add_argument("--base_model", default=None, help="Base model to copy from, instead of the recorded one.")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()

    root = args.list_broken or args.auto_fix
    try:
        directories = [args.checkpoint] if args.checkpoint else find_checkpoints(root)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = {}
    unfinished = unfinished_saves(root) if root else []
    directories = [directory for directory in directories if directory not in {path for path, _ in unfinished}]
    base_models = [directory for directory in directories if is_base_model(directory)] if root else []
    directories = [directory for directory in directories if directory not in base_models]
    for directory in base_models:
        print(f"{'BASE (skipped)':<16} {directory}")
        print(f"{'':<16}   found: a base model, not written by training or merge_adapter.py (see --help)")
    for directory, reason in unfinished:
        counts["unfinished"] = counts.get("unfinished", 0) + 1
        print(f"{'UNFINISHED':<16} {directory}")
        print(f"{'':<16}   found: {reason}; resuming skips it")
    skipped = f" ({len(base_models)} base model(s) skipped)" if base_models else ""
    if not directories and not counts:
        print(f"no checkpoints under {root}{skipped}")
        return 0

    for directory in directories:
        report = repair_checkpoint(directory, args.base_model, args.trust_remote_code, dry_run=bool(args.list_broken))
        counts[report.status] = counts.get(report.status, 0) + 1
        print(f"{report.status.upper():<16} {directory}")
        if not report.before.ok:
            print(f"{'':<16}   found: {report.before.describe()}")
        for action in report.actions:
            print(f"{'':<16}   {action}")
        if not report.before.ok and args.list_broken and report.base is not None:
            print(f"{'':<16}   base: {report.base.path} ({report.base.source})")
        if report.base_error and not report.ok:
            print(f"{'':<16}   base: {report.base_error}")
        if report.attempted and not report.ok:
            print(f"{'':<16}   left: {report.after.describe()}")
        elif report.attempted:
            print(f"{'':<16}   verified: AutoProcessor.from_pretrained loads {type(report.after.processor).__name__}")
    summary = ", ".join(f"{count} {status}" for status, count in counts.items())
    print(f"{len(directories)} checkpoint(s): {summary}{skipped}")
    return 0 if set(counts) <= {"ok", "fixed"} else 1


if __name__ == "__main__":
    sys.exit(main())
