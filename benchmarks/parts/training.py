"""Part 2, training throughput (samples/s, non-padding tokens/s) over `--steps` steps after `--warmup` steps:
`scripts/sft.py`'s path (cheap lengths, `too_long` up front, length-grouped sampler, `VisionChatCollator`) against a
stock TRL `SFTTrainer` given `images` + `messages` and no collator (TRL's default VLM path), and ours with the random
sampler (the equal-settings comparison). Same tiny Qwen2-VL, shapes demo data, batch size and steps. The three runs of
a repeat take turns step by step, each in a thread of this process with only one running at a time (`take_turns`), so
a change in the machine's load hits them alike; each run's time is the sum of its own steps.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
from functools import partial
from pathlib import Path
from typing import Any

from ..harness import StepRecorder, record_steps, take_turns
from ..settings import Settings
from ..stats import median, paired_ratios
from ..workspace import Workspace


def _shared_overrides(settings: Settings) -> dict[str, Any]:
    return {
        "max_steps": settings.warmup + settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "use_cpu": True,
    }


def _train_ours(workspace: Workspace, settings: Settings, sampling: str, hand_over=None) -> dict[str, float]:
    """`scripts/sft.py`'s own `main`, run in this process on the shapes demo recipe: whatever its path does (cheap
    lengths, `too_long` up front, length-grouped sampler, `VisionChatCollator`, its trainer class) is what is timed.
    The step recorder attaches to the trainer it builds through `main`'s `on_trainer` hook."""
    overrides = _shared_overrides(settings)
    overrides["output_dir"] = workspace.root / "outputs" / f"training-ours-{sampling}"
    if sampling != "default":
        overrides["train_sampling_strategy"] = sampling
    from vlm_recipes.sft import main

    recorders: list[StepRecorder] = []
    main(
        *workspace.recipe_args("shapes_qwen2vl", overrides),
        on_trainer=partial(record_steps, recorders, hand_over=hand_over),
    )
    if len(recorders) != 1:
        raise RuntimeError(f"Expected scripts/sft.py to build one trainer, saw {len(recorders)}.")
    return {**recorders[0].rates(settings.warmup), **_loading(recorders[0].args)}


def _train_stock_trl(workspace: Workspace, settings: Settings, hand_over=None) -> dict[str, float]:
    """A stock TRL `SFTTrainer`: a dataset of `images` + `messages`, no collator, TRL's defaults otherwise."""
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from vlm_recipes.collator import normalize_messages
    from vlm_recipes.data.rows import BadRowReport
    from vlm_recipes.tasks import task_from_args
    from vlm_recipes.trainer import apply_data_loading_defaults

    overrides = _shared_overrides(settings) | {"output_dir": workspace.root / "outputs" / "training-trl"}
    script_args, training_args, model_args = workspace.recipe_args("shapes_qwen2vl", overrides)
    # Equal settings: the data loading (workers, pinned memory) that scripts/sft.py's path gets on this machine; the
    # sampler stays TRL's own.
    apply_data_loading_defaults(training_args, script_args.keys_set)
    data_dir = Path(script_args.dataset_path)
    rows = task_from_args(script_args).load_rows(data_dir, script_args.dataset_train_split, data_dir, BadRowReport())
    records = [{"images": row["images"], "messages": normalize_messages(row["messages"])} for row in rows]
    dataset = datasets.Dataset.from_list(records).cast_column("images", datasets.List(datasets.Image()))
    stock_args = SFTConfig(
        output_dir=training_args.output_dir,
        max_steps=training_args.max_steps,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=training_args.learning_rate,
        lr_scheduler_type=training_args.lr_scheduler_type,
        max_length=training_args.max_length,
        gradient_checkpointing=training_args.gradient_checkpointing,
        bf16=training_args.bf16,
        dataloader_num_workers=training_args.dataloader_num_workers,
        dataloader_pin_memory=training_args.dataloader_pin_memory,
        dataloader_persistent_workers=training_args.dataloader_persistent_workers,
        use_cpu=True,
        seed=training_args.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
    )
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
    trainer = SFTTrainer(model=model, args=stock_args, train_dataset=dataset, processing_class=processor)
    recorder = StepRecorder(trainer, hand_over=hand_over)
    trainer.train()
    return {**recorder.rates(settings.warmup), **_loading(trainer.args)}


def _loading(args) -> dict[str, Any]:
    """How a timed trainer drew its batches: sampler and data-loading workers."""
    strategy = getattr(args, "train_sampling_strategy", "random")
    return {
        "train_sampling_strategy": str(getattr(strategy, "value", strategy)),
        "dataloader_num_workers": args.dataloader_num_workers,
    }


def benchmark_training(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    paths = {
        "ours": partial(_train_ours, workspace, settings, "default"),
        "trl": partial(_train_stock_trl, workspace, settings),
        "ours_random_sampler": partial(_train_ours, workspace, settings, "random"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    names = list(paths)
    orders = list(itertools.permutations(names))
    for repeat in range(settings.repeats):
        # The three runs of a repeat take turns step by step (`take_turns`), so the machine's load changes hit them
        # alike. The order goes through all six in turn, so that whatever going first, or right after a given path,
        # does falls on every path alike.
        order = orders[repeat % len(orders)]
        with contextlib.redirect_stdout(io.StringIO()):  # once for all threads: sys.stdout is the process's
            results = take_turns({name: paths[name] for name in order})
        for name in names:
            steps = settings.warmup + settings.steps
            if results[name]["hand_overs"] != steps:  # a run that kept the turn would run alone, in other load
                raise RuntimeError(f"Part 2: run {name!r} handed over {results[name]['hand_overs']} of {steps} turns.")
            runs[name].append(results[name])
        gc.collect()

    def rates(results: list[dict[str, float]]) -> list[float]:
        return [run["samples_per_second"] for run in results]

    summary = {
        name: {
            key: median([run[key] for run in results])
            for key in ("samples_per_second", "tokens_per_second", "padding_fraction")
        }
        | {key: results[0][key] for key in ("train_sampling_strategy", "dataloader_num_workers")}
        for name, results in runs.items()
    }
    return {
        "model": "tiny Qwen2-VL (vlm_recipes.tiny, own tokenizer), full fine-tuning as the shapes demo recipe",
        "data": "shapes demo data (recipes/demo/shapes_qwen2vl.yaml), train split",
        "batch_size": settings.batch_size,
        "warmup_steps": settings.warmup,
        "timed_steps": settings.steps,
        "repeats": settings.repeats,
        **summary,
        "ratio_samples_per_second": summary["ours"]["samples_per_second"] / summary["trl"]["samples_per_second"],
        "ratio_tokens_per_second": summary["ours"]["tokens_per_second"] / summary["trl"]["tokens_per_second"],
        "ratio_samples_per_second_random_sampler": summary["ours_random_sampler"]["samples_per_second"]
        / summary["trl"]["samples_per_second"],
        "paired_ratio_samples_per_second": paired_ratios(*(rates(runs[name]) for name in ("ours", "trl"))),
        "paired_ratio_samples_per_second_random_sampler": paired_ratios(
            *(rates(runs[name]) for name in ("ours_random_sampler", "trl"))
        ),
        # Each path's fastest repeat against the other's (informational; the target is the paired median). On a shared
        # machine single runs fall into a fast and a slow mode (1.5 against 2.3 s for the same run), whatever their
        # order; the fastest run is the one least slowed by other load, as `timeit` reasons for its minimum.
        "ratio_best_samples_per_second": max(rates(runs["ours"])) / max(rates(runs["trl"])),
        "ratio_best_samples_per_second_random_sampler": max(rates(runs["ours_random_sampler"]))
        / max(rates(runs["trl"])),
        "runs": runs,
        "note": "tokens are non-padding tokens (image tokens included); the stock TRL path computes the loss on every "
        "token, ours on assistant turns only (same model compute).",
    }
