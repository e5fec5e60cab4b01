"""Print one example of a recipe's data token by token with its label: supervised, or masked and why.

Usage:
    python scripts/inspect_batch.py RECIPE.yaml [--index 0] [--split train] [--key value ...]

Use it when a run learns nothing or too much: every assistant token and the end-of-turn token should read
"supervised"; image, system and user tokens "masked". A system prompt that the chat template adds on its own
(Qwen2-VL's "You are a helpful assistant." when the data has none) reads "masked: system turn" too.
"""

import argparse
import sys
from collections import Counter

from vlm_recipes.collator import VisionChatCollator
from vlm_recipes.configs import RecipeError, parse_recipe
from vlm_recipes.data.splits import load_splits
from vlm_recipes.demo_inputs import ensure_demo_inputs
from vlm_recipes.models.loading import load_processor


def main(index, split, script_args, training_args, model_args):
    ensure_demo_inputs(script_args, model_args.model_name_or_path)
    (dataset,), _ = load_splits(script_args, [split], limits=[index + 1], streaming=False)
    processor = load_processor(model_args, script_args.min_pixels, script_args.max_pixels)
    collator = VisionChatCollator(processor, max_length=training_args.max_length, too_long=script_args.too_long)
    example = dataset[index]
    rows = collator.explain(example)
    print(f"example {index} of split {split!r} (id {example.get('id')!r}): {len(rows)} tokens")
    print(f"{'pos':>5} {'id':>7} {'label':>7}  {'token':<24} reason")
    previous = None
    for position, (token_id, token, label, reason) in enumerate(rows):
        if reason == previous and reason.startswith("masked: image"):
            continue  # one line per run of image tokens
        shown = "-100" if label == -100 else str(label)
        print(f"{position:>5} {token_id:>7} {shown:>7}  {token!r:<24} {reason}")
        previous = reason
    counts = Counter(reason for *_, reason in rows)
    print("summary: " + ", ".join(f"{count} {reason}" for reason, count in counts.most_common()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--split", default="train")
    known, rest = parser.parse_known_args()
    try:
        main(known.index, known.split, *parse_recipe(rest))
    except (RecipeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
