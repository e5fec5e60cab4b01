"""`main` of `scripts/sft.py`: one training run from a parsed recipe, in the order that matters.

Logging, data, model and processor, collator and lengths, training, a save that is whole or absent, the report, and
evaluation by generation on the held-out split. `scripts/sft.py` parses the recipe and calls `main`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import transformers

from .collator import VisionChatCollator
from .configs import resolved_recipe
from .data.errors import DataError
from .data.splits import eval_split_name, load_generation_rows, load_splits
from .demo_inputs import ensure_demo_inputs
from .distributed import (
    check_launch,
    close_process_group,
    keep_checkpoint_key_names,
    launch_summary,
    model_for_generation,
    without_zero3_sharding,
)
from .evaluation import evaluate_baseline, evaluate_task, format_metrics_table
from .generation import base_precision
from .lengths import prepare_lengths
from .models.loading import ModelNotAvailableError, check_model_available, load_model, load_processor
from .models.lora import peft_config_for
from .quiet import configure_logging
from .recipe_files import save_resolved_recipe
from .recipe_keys import RecipeError
from .reporting import start_run_tracking
from .resume import CheckpointError, resolve_resume_checkpoint
from .tasks import task_from_args
from .trainer import VLMSFTTrainer, apply_data_loading_defaults

logger = logging.getLogger(__name__)

# Errors in what the user gave (recipe, data, checkpoint, model id): their messages name the fix, so the scripts print
# them as one line without a traceback.
USER_ERRORS = (RecipeError, DataError, CheckpointError, ModelNotAvailableError, FileNotFoundError)


def main(script_args, training_args, model_args, on_trainer: Callable | None = None):
    """Train, save and evaluate one run of parsed recipe arguments (`configs.parse_recipe`).

    `on_trainer(trainer)` is called once the trainer is built, before training (the benchmark attaches its
    step recorder there).
    """
    ################
    # Logging
    ################
    configure_logging()  # each library's lines once; the known noise of our libraries silenced (vlm_recipes.quiet)
    transformers.utils.logging.set_verbosity_warning()
    check_launch(training_args)  # N launched processes that would not train together stop here, with the fix
    # Our collator needs the raw `images` and `messages` columns; it does its own (untruncated) tokenization.
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    keys_set = set(script_args.keys_set)
    if script_args.dataset_streaming:
        keys_set |= use_stream_defaults(training_args, keys_set)
    apply_data_loading_defaults(training_args, keys_set)
    # `true` -> the newest complete checkpoint; a path is checked complete. Before anything loads, so it fails fast.
    training_args.resume_from_checkpoint = resolve_resume_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    # Run name default and W&B settings from the recipe (the environment wins); metadata and compute report below.
    tracking = start_run_tracking(script_args, training_args, model_args)

    ################
    # Data
    ################
    if not script_args.tiny_model_family:  # a demo builds its tiny model below
        # An unknown model id or an unreachable hub stops here in seconds, naming the model and the fix.
        check_model_available(model_args.model_name_or_path, model_args.model_revision)
    ensure_demo_inputs(script_args, model_args.model_name_or_path)
    eval_split = eval_split_name(script_args) if training_args.eval_strategy != "no" else None
    # Rank 0 of each node converts the rows first (into the `datasets` cache); the others then read its cache.
    with training_args.main_process_first(desc="loading the dataset"):
        (train_dataset, eval_dataset), bad_rows = load_splits(
            script_args, [script_args.dataset_train_split, eval_split], num_proc=training_args.dataset_num_proc
        )

    ################
    # Model and processor
    ################
    processor = load_processor(
        model_args, script_args.min_pixels, script_args.max_pixels, training_args.trust_remote_code
    )
    model = load_model(model_args, training_args)  # checks, dtype, 4/8-bit, frozen parts
    keep_checkpoint_key_names(model, model_args, training_args.trust_remote_code)  # ZeRO-3 saves renamed keys
    peft_config = peft_config_for(model, model_args)

    ################
    # Collator; sample lengths measured up front (no pixels decoded): `too_long` is applied before training (an
    # over-long sample stops the run, or is dropped and counted) and length grouping gets its `length` column
    ################
    collator = VisionChatCollator(
        processor,
        max_length=training_args.max_length,
        too_long=script_args.too_long,
        on_bad_row=script_args.on_bad_row,  # an image that fails to decode in training: stop, or skip and list it
    )
    with training_args.main_process_first(desc="measuring sample lengths"):  # cached with the dataset, as above
        train_dataset, eval_dataset, dropped = prepare_lengths(
            script_args, training_args, collator, train_dataset, eval_dataset
        )
    for split, names in dropped.items():
        if names:
            logger.warning("Dropped %d %s sample(s) over max_length=%s.", len(names), split, collator.max_length)

    ################
    # Training
    ################
    # SFTTrainer + per-part learning rates, checkpointing that trains every part, seeded length-grouped sampling,
    # checkpoints that are whole or absent and load alone (processor files), resumes that load every weight
    trainer = VLMSFTTrainer(
        model_args=model_args,
        model=model,
        args=training_args,
        data_collator=collator,  # wrapped by the trainer so that no process skips the vision tower
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    if on_trainer is not None:
        on_trainer(trainer)
    tracking.attach(trainer, processor)  # run_info.json + W&B config at the start, compute_report.json at the end
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    ################
    # Save, whole or not at all: weights or adapter, trainer_state.json, processor files, generation config, recipe
    ################
    try:
        trainer.save_output(
            training_args.output_dir,
            lambda directory: save_resolved_recipe(resolved_recipe(script_args, training_args, model_args), directory),
        )
    finally:
        # The last collective was saving: all processes close their process group together, even when the main
        # process failed to write the files above (see the docstring); what follows runs on the main process alone.
        close_process_group(trainer)

    ################
    # Report
    ################
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final_loss = losses[-1] if losses else train_result.training_loss
    if not math.isfinite(final_loss):
        raise RuntimeError(f"Training diverged: final loss {final_loss}.")
    total_dropped = sum(len(names) for names in dropped.values()) + collator.num_dropped
    if trainer.accelerator.is_main_process:
        print(f"final loss: {final_loss:.4f} (steps: {trainer.state.global_step})")
        print(f"processes: {launch_summary(trainer)}")
        print(f"too-long samples dropped: {total_dropped} (max_length={training_args.max_length})")
        print(f"malformed rows skipped: {len(bad_rows.skipped)}")
        if bad_rows.skipped:
            print(bad_rows.summary())
        print(collator.skipped_summary())  # from every process and data-loading worker (compute_report.json too)
        print(f"saved to: {training_args.output_dir}")
        if script_args.verify_saved_model:
            with without_zero3_sharding():  # a whole model on this process alone, even after ZeRO-3
                verify_saved_model(training_args.output_dir, bool(peft_config))

    ################
    # Evaluate by generation on the held-out split
    ################
    if script_args.eval_after_train and trainer.accelerator.is_main_process:
        test_dataset = load_generation_rows(
            script_args, script_args.generation_split, script_args.generation_max_samples
        )
        generation = {
            "batch_size": training_args.per_device_eval_batch_size,
            "max_new_tokens": script_args.max_new_tokens,
            "temperature": script_args.temperature,
            "do_sample": script_args.do_sample,
        }
        task = task_from_args(script_args)
        with without_zero3_sharding():  # ZeRO-3/FSDP: the saved model, reloaded whole; generation on this process
            metrics = evaluate_task(
                model_for_generation(trainer, training_args.output_dir, training_args.trust_remote_code),
                processor,
                task,
                test_dataset,
                training_args.output_dir,
                **generation,
            )
        on_base = f", the adapter on its {base_precision(model_args)} base as trained" if peft_config else ""
        print(f"evaluation on {script_args.generation_split!r} by generation{on_base}:")
        if script_args.tiny_model_family:
            # A demo: its untrained tiny model is small and still on disk, so evaluating it too costs seconds and shows
            # what training changed, the way `scripts/evaluate.py --baseline` does (into output_dir/baseline/).
            with without_zero3_sharding():  # a whole model on this process, even after ZeRO-3
                baseline = evaluate_baseline(
                    model_args.model_name_or_path,
                    task,
                    test_dataset,
                    training_args.output_dir,
                    training_args.trust_remote_code,
                    **generation,
                )
            print(format_metrics_table(metrics, baseline, names=("trained", "untrained")))
        else:
            print(format_metrics_table(metrics))
    tracking.finish()  # closes the W&B run, if any, with the evaluation in it


def use_stream_defaults(training_args, keys_set: set[str]) -> set[str]:
    """Data-loading settings for a stream (`dataset_streaming: true`) where the recipe does not set them; returns the
    keys it has decided.

    - `train_sampling_strategy: random`: a stream has no sampler (its order is the stream's);
    - accelerate's `dispatch_batches: false`: each process reads its own shard of the stream (whole shards where the
      stream has as many as there are processes, else its part of every batch), rather than rank 0 reading every
      batch and sending each process its part.
    """
    changed = []
    if "train_sampling_strategy" not in keys_set:
        training_args.train_sampling_strategy = "random"
        changed.append("train_sampling_strategy=random")
    config = training_args.accelerator_config
    if isinstance(config, dict):
        if "dispatch_batches" not in config:
            config["dispatch_batches"] = False
            changed.append("dispatch_batches=False")
    elif getattr(config, "dispatch_batches", None) is None:
        config.dispatch_batches = False
        changed.append("dispatch_batches=False")
    if changed:
        logger.info("Streaming defaults: %s", ", ".join(changed))
    return {"train_sampling_strategy"}  # set here: the general data-loading defaults leave it


def verify_saved_model(output_dir, is_adapter):
    """Reload the output directory the way a user would, as a check that it is complete."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoProcessor.from_pretrained(output_dir)
    if is_adapter:
        from peft import PeftConfig

        base = PeftConfig.from_pretrained(output_dir).base_model_name_or_path
        model = AutoModelForImageTextToText.from_pretrained(base)
        model.load_adapter(output_dir)
    else:
        model = AutoModelForImageTextToText.from_pretrained(output_dir)
    print(f"reloaded: {type(model).__name__} with {sum(p.numel() for p in model.parameters())} parameters")
