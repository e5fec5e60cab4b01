"""Merge a LoRA adapter into its base model and save a standalone model with its processor.

Usage:
    python scripts/merge_adapter.py --adapter DIR --output DIR [--dtype float32|bfloat16|float16|auto]
        [--base_model NAME_OR_DIR] [--overwrite] [--trust_remote_code]

The base model (from the adapter's `adapter_config.json`, or `--base_model`) is reloaded unquantised, so an adapter
trained with QLoRA (`load_in_4bit`) merges into the full-precision weights. `--dtype` defaults to the dtype of the
training run (the `dtype` the base was loaded in, from the run's `recipe.yaml` or `run_info.json`), else float32. The
output holds the merged weights, the processor files (from the adapter directory, else the base), the generation
config and `merge_info.json` (adapter, base model, dtype); it is written beside OUTPUT and renamed into place when
complete, with the file modes of your umask.
"""

import argparse
import logging
import sys

from vlm_recipes.checkpoints.merge import MERGE_DTYPES, merge_adapter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="LoRA adapter directory (with adapter_config.json).")
    parser.add_argument("--output", required=True, help="Directory to write the merged model to.")
    parser.add_argument("--dtype", choices=MERGE_DTYPES, default=None, help="Default: the training run's dtype.")
    parser.add_argument("--base_model", default=None, help="Base model, instead of adapter_config.json's.")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        output = merge_adapter(
            args.adapter, args.output, args.dtype, args.base_model, args.overwrite, args.trust_remote_code
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
