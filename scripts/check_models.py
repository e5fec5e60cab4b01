"""Load every model and have it answer one fixed prompt about one fixed image: a smoke test of all models at once.

Usage:
    python scripts/check_models.py [PATHS ...] [--include_checkpoints] [--include_base_models] [--max_new_tokens 32]
        [--prompt TEXT] [--device cpu|cuda] [--trust_remote_code]

PATHS (default: `outputs`, where `scripts/sft.py` and the demos write) are model directories or folders searched for
them: any directory with `config.json` (a full model) or `adapter_config.json` (a LoRA adapter, loaded on its base).
A model directory named in PATHS is always checked. Found by searching, `checkpoint-*` directories are skipped unless
`--include_checkpoints`, and base models unless `--include_base_models`: directories that neither training nor
`merge_adapter.py` wrote, such as the demos' tiny random-weight models in `outputs/tiny-models/` (see
`vlm_recipes.checkpoints.repair.is_base_model`), so that the check covers the models you trained.

Each model is loaded, answers greedily about a generated picture (no file needed), and is freed before the next.
Prints a table of path, family (from `vlm_recipes.families`), load time, generation time and output; a model that
fails gets its error in the last column and the others still run. Exits 1 if any model failed.
"""

import argparse
import sys

from transformers.utils import logging as transformers_logging

from vlm_recipes.checkpoints.smoke_test import CHECK_PROMPT, check_model, discover_model_dirs, format_model_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["outputs"], help="Model directories or folders to search.")
    parser.add_argument("--include_checkpoints", action="store_true", help="Also check checkpoint-* directories.")
    parser.add_argument("--include_base_models", action="store_true", help="Also check base models found.")
    parser.add_argument("--prompt", default=CHECK_PROMPT)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # one bar for the whole check, not one per weight load

    try:
        directories = discover_model_dirs(args.paths, args.include_checkpoints, args.include_base_models)
    except FileNotFoundError as error:
        print(
            f"error: {error} Train a model first (scripts/sft.py), or pass model directories as PATHS.",
            file=sys.stderr,
        )
        return 2
    if not directories:
        skipped = len(discover_model_dirs(args.paths, args.include_checkpoints, include_base_models=True))
        hint = f"; {skipped} base model(s) skipped (--include_base_models checks them)" if skipped else ""
        print(f"error: no trained model (config.json or adapter_config.json) in {args.paths}{hint}", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    results = [
        check_model(path, args.prompt, args.max_new_tokens, args.device, args.trust_remote_code)
        for path in tqdm(directories, desc="Checking models")
    ]
    print(f"prompt: {args.prompt!r} + a 224x224 picture; greedy, max_new_tokens={args.max_new_tokens}")
    print(format_model_table(results))
    failed = [result for result in results if result.error]
    print(f"{len(results)} model(s): {len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
