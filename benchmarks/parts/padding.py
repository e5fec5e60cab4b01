"""Part 3, padding fraction and supervised-token fraction of the batches of one epoch of each demo recipe's data,
with the random sampler and with length grouping (`train_sampling_strategy: group_by_length`), from the real collated
batches; the cheap lengths are checked against them.
"""

from __future__ import annotations

from typing import Any

from ..settings import Settings
from ..workspace import Workspace


def benchmark_padding(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from vlm_recipes.collator import IGNORE_INDEX, VisionChatCollator
    from vlm_recipes.data.splits import load_splits
    from vlm_recipes.lengths import sample_lengths
    from vlm_recipes.models.loading import load_processor

    results: dict[str, Any] = {}
    for name in settings.padding_recipes:
        script_args, training_args, model_args = workspace.recipe_args(name)
        processor = load_processor(model_args, script_args.min_pixels, script_args.max_pixels)
        collator = VisionChatCollator(processor, max_length=training_args.max_length, too_long=script_args.too_long)
        (dataset,), _ = load_splits(script_args, [script_args.dataset_train_split])
        lengths, _ = sample_lengths(dataset, collator, progress=False)
        examples = [dataset[index] for index in range(len(dataset))]
        batch_size = training_args.per_device_train_batch_size
        group_size = batch_size * training_args.gradient_accumulation_steps  # what the Trainer's sampler groups by
        per_strategy: dict[str, Any] = {}
        lengths_exact = True
        for strategy in ("random", "group_by_length"):
            totals = {"positions": 0, "tokens": 0, "supervised": 0}
            batch_padding: list[float] = []
            for seed in range(settings.padding_seeds):
                generator = torch.Generator().manual_seed(seed)
                if strategy == "random":
                    order = torch.randperm(len(examples), generator=generator).tolist()
                else:  # exactly what transformers' LengthGroupedSampler yields
                    order = get_length_grouped_indices(lengths, group_size, generator=generator)
                for start in range(0, len(order), batch_size):
                    indices = order[start : start + batch_size]
                    batch = collator([examples[i] for i in indices])
                    mask = batch["attention_mask"]
                    tokens, positions = int(mask.sum()), mask.numel()
                    lengths_exact &= mask.sum(dim=1).tolist() == [lengths[i] for i in indices]
                    totals["positions"] += positions
                    totals["tokens"] += tokens
                    totals["supervised"] += int((batch["labels"] != IGNORE_INDEX).sum())
                    batch_padding.append(1 - tokens / positions)
            per_strategy[strategy] = {
                "padding_fraction": 1 - totals["tokens"] / totals["positions"],
                "max_batch_padding_fraction": max(batch_padding),
                "supervised_fraction_of_positions": totals["supervised"] / totals["positions"],
                "supervised_fraction_of_tokens": totals["supervised"] / totals["tokens"],
            }
        results[name] = {
            "task": script_args.task,
            "samples": len(examples),
            "batch_size": batch_size,
            "length_min": min(lengths),
            "length_max": max(lengths),
            "cheap_lengths_equal_collated": lengths_exact,
            **per_strategy,
        }
    return {
        "seeds": settings.padding_seeds,
        "definitions": {
            "padding_fraction": "padding positions / all positions of the epoch's batches",
            "supervised_fraction_of_positions": "positions with a label (assistant tokens) / all positions",
            "supervised_fraction_of_tokens": "positions with a label / non-padding tokens",
        },
        "recipes": results,
        "max_padding_fraction_grouped": max(r["group_by_length"]["padding_fraction"] for r in results.values()),
        "max_padding_fraction_random": max(r["random"]["padding_fraction"] for r in results.values()),
    }
