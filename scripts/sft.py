"""Supervised fine-tuning of a vision-language model from a recipe.

Usage:
    python scripts/sft.py recipes/demo/shapes_qwen2vl.yaml [--key value ...]
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml scripts/sft.py recipes/chess_qwen2vl.yaml
    python scripts/sft.py --config RECIPE.yaml [--key value ...]

Command-line keys override the recipe file. Keys are fields of `vlm_recipes.configs.VLMScriptArguments`,
`trl.SFTConfig` and `vlm_recipes.configs.VLMModelConfig` (TRL's `ModelConfig` plus the VLM parts).
The run itself is `vlm_recipes.sft.main`.
"""

import sys

from vlm_recipes.configs import RecipeError, parse_recipe
from vlm_recipes.data.errors import DataError
from vlm_recipes.models.loading import ModelNotAvailableError
from vlm_recipes.resume import CheckpointError
from vlm_recipes.sft import main

if __name__ == "__main__":
    try:
        main(*parse_recipe())
    except (RecipeError, DataError, CheckpointError, ModelNotAvailableError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)  # one line, no traceback: the message names the fix
        sys.exit(2)
