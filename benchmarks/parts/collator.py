"""Part 1, collator throughput (examples/s): `VisionChatCollator` against TRL's `DataCollatorForVisionLanguageModeling`
on the same decoded demo examples (shapes, chess, UI screenshots), with the real Qwen2-VL processor at the Qwen2-VL
recipes' pixel budget when `../shared/processors` (or `VLM_REAL_PROCESSORS`) holds it, else the tiny model's own
processor. One torch thread, as in a dataloader worker. The collators take turns batch by batch, in rotating order.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from ..harness import torch_threads
from ..qwen2_vl import qwen2_vl_processor, qwen_pixel_budget
from ..settings import Settings
from ..stats import median, paired_ratios
from ..workspace import Workspace


def benchmark_collators(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlm_recipes.chat_templates import trl_chat_template
    from vlm_recipes.collator import VisionChatCollator
    from vlm_recipes.data.splits import load_splits

    budget = qwen_pixel_budget()
    processor, processor_name = qwen2_vl_processor(workspace, **budget)
    processor_name += f", {budget}"

    examples = []
    for name in ("shapes_qwen2vl", "chess", "ui_actions"):
        script_args, _, _ = workspace.recipe_args(name)
        (dataset,), _ = load_splits(script_args, ["train"], limits=[settings.collator_examples_per_task])
        examples += [dataset[index] for index in range(len(dataset))]  # images decoded here, outside the timing
    size = settings.collator_batch_size
    batches = [examples[start : start + size] for start in range(0, len(examples), size)]

    def new_collators() -> dict[str, Any]:
        return {
            "ours": VisionChatCollator(processor),
            "trl": DataCollatorForVisionLanguageModeling(processor=processor, max_length=None),
            # TRL doing the same work as ours (loss on assistant turns only) needs a template with generation markers.
            "trl_assistant_only": DataCollatorForVisionLanguageModeling(
                processor=processor,
                max_length=None,
                assistant_only_loss=True,
                chat_template=trl_chat_template("qwen2_5_vl_training"),  # Qwen2-VL's format, with the markers
            ),
        }

    collators = new_collators()

    def fresh(batch):  # TRL fills the image placeholders of the messages it is given; each call gets its own copy
        return [{"images": example["images"], "messages": copy.deepcopy(example["messages"])} for example in batch]

    runs: dict[str, list[float]] = {name: [] for name in collators}
    names = list(collators)
    with torch_threads(1):
        for collator in collators.values():  # warm-up: template compilation, first-call caches
            collator(fresh(batches[0]))
        for repeat in range(settings.collator_repeats):
            # New collators for each pass over the data, as in a first epoch: ours keeps the prompts it has rendered
            # (`VisionChatCollator._cached_prompt`), and a second pass would find all of them there.
            collators = new_collators()
            seconds = dict.fromkeys(names, 0.0)
            # Batch by batch, in rotating order, so that a change in the machine's load hits every collator alike.
            for index, batch in enumerate(batches):
                shift = (repeat + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    inputs = fresh(batch)
                    start = time.perf_counter()
                    collators[name](inputs)
                    seconds[name] += time.perf_counter() - start
            for name in names:
                runs[name].append(len(examples) / seconds[name])
    rates = {name: median(values) for name, values in runs.items()}
    return {
        "processor": processor_name,
        "examples": len(examples),
        "batch_size": size,
        "repeats": settings.collator_repeats,
        "torch_threads": 1,
        "ours_examples_per_second": rates["ours"],
        "trl_examples_per_second": rates["trl"],
        "trl_assistant_only_examples_per_second": rates["trl_assistant_only"],
        "ratio_ours_to_trl": rates["ours"] / rates["trl"],
        "ratio_ours_to_trl_assistant_only": rates["ours"] / rates["trl_assistant_only"],
        "paired_ratio_ours_to_trl": paired_ratios(runs["ours"], runs["trl"]),
        "paired_ratio_ours_to_trl_assistant_only": paired_ratios(runs["ours"], runs["trl_assistant_only"]),
        "runs_examples_per_second": runs,
        "note": "trl: TRL's default VLM collator, loss on every token, no checks. trl_assistant_only: the same with "
        "assistant_only_loss=True and TRL's qwen2_5_vl_training template, the work ours does (ours also checks rows "
        "and lengths and needs no template markers).",
    }
