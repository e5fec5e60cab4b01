"""Build a tiny random-weight vision-language model (plus processor) for tests and CPU demos, offline.

Usage:
    python scripts/make_tiny_model.py --family qwen2_vl --output DIR [--processor PROC_DIR] [--training-template]

Families (`vlm_recipes.tiny.TINY_FAMILIES`): qwen2_vl, qwen2_5_vl, qwen3_vl, smolvlm, idefics2, llava (LLaVA-1.5),
paligemma, florence2. Without `--processor` the model gets its own small tokenizer and the family's real chat template
(ours in the model's own format where TRL ships none); with it, a real processor directory
(e.g. ../shared/processors/llava) is wrapped.
"""

import argparse
import logging

from vlm_recipes.tiny import TINY_FAMILIES, build_tiny_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(TINY_FAMILIES))
    parser.add_argument("--output", required=True, help="Directory to write the model and processor to.")
    parser.add_argument("--processor", default=None, help="A real processor directory to wrap.")
    parser.add_argument(
        "--training-template", action="store_true", help="Use the `_training` template with generation markers."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = build_tiny_model(args.family, args.output, args.processor, args.training_template, args.seed)

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(output)
    print(f"{args.family}: {sum(p.numel() for p in model.parameters()):,} parameters -> {output}")


if __name__ == "__main__":
    main()
