"""Supervised fine-tuning of a vision-language model from a recipe.

Usage:
    python scripts/sft.py recipes/demo/shapes_qwen2vl.yaml [--key value ...]
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml scripts/sft.py recipes/chess_qwen2vl.yaml
    python scripts/sft.py --config RECIPE.yaml [--key value ...]
    python scripts/sft.py --help

Command-line keys override the recipe file. Keys are fields of `vlm_recipes.configs.VLMScriptArguments`,
`trl.SFTConfig` and `vlm_recipes.configs.VLMModelConfig` (TRL's `ModelConfig` plus the VLM parts).
The run itself is `vlm_recipes.sft.main`.
"""

import sys

# Light imports only until the command line has been checked: `--help`, a missing recipe file, a YAML error or a
# misspelt key answer in about a second instead of after TRL, transformers and torch have loaded.
from vlm_recipes.recipe_keys import RecipeError, check_command_line, format_help


def fail(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)  # one line, no traceback: the message names the fix
    sys.exit(2)


if __name__ == "__main__":
    try:
        if check_command_line(sys.argv[1:]):
            print(format_help())
            sys.exit(0)
    except RecipeError as error:
        fail(error)

    from vlm_recipes.configs import parse_recipe
    from vlm_recipes.sft import USER_ERRORS, main

    try:
        main(*parse_recipe())
    except USER_ERRORS as error:
        fail(error)
