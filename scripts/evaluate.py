"""Evaluate a trained model (full or LoRA adapter) on a task's held-out split by generation.

Usage:
    python scripts/evaluate.py --model_path DIR --recipe RECIPE.yaml [--split test] [--max_samples N]
        [--batch_size B] [--base_model NAME_OR_DIR] [--base_precision as_trained|unquantised] [--baseline]
        --output_dir OUT

Writes `predictions.csv` (id, target, prediction, per-example scores) and `metrics.json` into OUT and prints a table.
With `--baseline`, the un-tuned base model (an adapter's base, `--base_model`, or else the recipe's
`model_name_or_path`) is evaluated the same way into OUT/baseline/, and the table shows both side by side.
Generation settings (`max_new_tokens`, `temperature`, `do_sample`) and the data come from the recipe.
An adapter is evaluated on its base loaded as the recipe trained it (`--base_precision as_trained`: 4-bit for a QLoRA
recipe), as `eval_after_train` evaluates it, or with `--base_precision unquantised` on the full-precision base, as
`scripts/merge_adapter.py` merges it; the output says which.
"""

import argparse
import sys

from vlm_recipes.configs import RecipeError, parse_recipe
from vlm_recipes.data.splits import load_generation_rows
from vlm_recipes.evaluation import evaluate_baseline, evaluate_task, format_metrics_table
from vlm_recipes.generation import adapter_base, base_precision, load_for_generation
from vlm_recipes.tasks import task_from_args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="Model or LoRA adapter directory.")
    parser.add_argument(
        "--recipe", required=True, help="The recipe the model was trained with (task, data, generation)."
    )
    parser.add_argument("--split", default=None, help="Split to evaluate; defaults to the recipe's generation_split.")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--base_model", default=None, help="Base model of an adapter (default: adapter_config.json).")
    parser.add_argument(
        "--base_precision",
        choices=("as_trained", "unquantised"),
        default="as_trained",
        help="An adapter's base: loaded as the recipe trained it (default; 4-bit for QLoRA), or unquantised.",
    )
    parser.add_argument("--baseline", action="store_true", help="Also evaluate the un-tuned base model.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()

    script_args, training_args, model_args = parse_recipe([args.recipe])
    split = args.split or script_args.generation_split
    dataset = load_generation_rows(script_args, split, args.max_samples)
    task = task_from_args(script_args)
    generation = {
        "batch_size": args.batch_size,
        "max_new_tokens": script_args.max_new_tokens,
        "temperature": script_args.temperature,
        "do_sample": script_args.do_sample,
    }
    as_trained = args.base_precision == "as_trained"
    model, processor = load_for_generation(
        args.model_path,
        args.base_model,
        training_args.trust_remote_code,
        quantized_as=(model_args, training_args) if as_trained else None,
    )
    metrics = evaluate_task(model, processor, task, dataset, args.output_dir, **generation)
    precision = base_precision(model_args) if as_trained else "unquantised"
    where = f", on its {precision} base" if adapter_base(args.model_path) else ""
    print(f"{script_args.task} on {split!r} ({len(dataset)} samples), model {args.model_path}{where}:")
    if not args.baseline:
        print(format_metrics_table(metrics))
        return
    base = args.base_model or adapter_base(args.model_path) or model_args.model_name_or_path
    del model
    baseline = evaluate_baseline(base, task, dataset, args.output_dir, training_args.trust_remote_code, **generation)
    print(format_metrics_table(metrics, baseline, names=("tuned", f"baseline ({base})")))


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
