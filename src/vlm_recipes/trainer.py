"""`VLMSFTTrainer`: TRL's `SFTTrainer` and every way our training differs from it, in one place.

- per-part learning rates (optimizer parameter groups for the vision tower, projector and language model);
- gradient checkpointing that trains every part (reentrant under ZeRO-3 with frozen weights), and a frozen vision
  tower run without autograd;
- length-grouped sampling from the precomputed `length` column, seeded per epoch, so that resumes are exact, and the
  data-loading defaults (`apply_data_loading_defaults`, set on the arguments before the trainer is built);
- checkpoints and the final output written whole or not at all, with the processor files that let them load alone;
- resumes that load every weight (full weights renamed as `from_pretrained` does; adapters in their trained dtype).

Loading the model and choosing its parts is `vlm_recipes.models`; what a checkpoint must hold is `vlm_recipes.resume`.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import TrainerCallback
from trl import ModelConfig, SFTTrainer

from ._compat import length_grouped_indices, rotate_checkpoints, trainer_checkpoint_folder
from .checkpoints.processor_files import save_processor_files
from .distributed import with_image_in_every_batch
from .families import UnknownFamilyError, family_of_model
from .lengths import sampling_strategy
from .models.checks import deepspeed_zero_stage
from .models.parts import PART_LR_KEYS, PART_NAMES, PARTS, parameter_count, part_learning_rates, parts_to_freeze
from .resume import (
    FINAL_STAGING_NAME,
    TRAINER_STATE_NAME,
    check_adapter_loaded,
    has_full_weights,
    load_full_weights,
    publish_directory,
    replace_directory,
    resolve_resume_checkpoint,
    staging_name,
    withdraw_completion_files,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SeededLengthGroupedSampler",
    "VLMSFTTrainer",
    "apply_data_loading_defaults",
    "default_dataloader_num_workers",
    "detach_frozen_vision_inputs",
    "part_has_trainable",
    "part_parameter_groups",
    "precomputed_lengths",
    "use_reentrant_checkpointing",
]


# --------------------------------------------------------------------------------------------------------------------
# Optimizer parameter groups per part
# --------------------------------------------------------------------------------------------------------------------
def part_parameter_groups(
    model,
    model_args: ModelConfig,
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: Iterable[str],
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: one per (part, decay or not), each with its part's lr.

    Weight decay follows the Trainer's split (`decay_parameter_names`, from `Trainer.get_decay_parameter_names`: no
    decay for biases and norms). Parameters outside the three parts use `learning_rate`. Empty groups are left out.
    """
    family = family_of_model(model)
    rates = part_learning_rates(model_args)
    decay = set(decay_parameter_names)
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((family.part_of(name) or "other", name in decay), []).append(parameter)
    parameter_groups = []
    for part in (*PARTS, "other"):
        lr = rates.get(part)
        for with_decay in (True, False):
            parameters = groups.get((part, with_decay))
            if parameters:
                parameter_groups.append(
                    {
                        "params": parameters,
                        "weight_decay": weight_decay if with_decay else 0.0,
                        "lr": learning_rate if lr is None else lr,
                    }
                )
    return parameter_groups


def _trainable_summary(model, model_args: ModelConfig, learning_rate: float) -> str:
    try:
        family = family_of_model(model)
    except UnknownFamilyError:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"{trainable:,} trainable parameters (lr {learning_rate:g})"
    trainable, total = {}, {}
    for name, parameter in model.named_parameters():
        part = family.part_of(name) or "other"
        total[part] = total.get(part, 0) + parameter_count(parameter)
        if parameter.requires_grad:
            trainable[part] = trainable.get(part, 0) + parameter_count(parameter)
    rates = part_learning_rates(model_args)
    pieces = []
    for part in (*PARTS, "other"):
        if part not in total:
            continue
        rate = rates.get(part)
        detail = f"lr {learning_rate if rate is None else rate:g}" if trainable.get(part) else "frozen"
        pieces.append(f"{PART_NAMES.get(part, part)} {trainable.get(part, 0):,}/{total[part]:,} ({detail})")
    return "trainable parameters: " + ", ".join(pieces)


# --------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------------------------------
def use_reentrant_checkpointing(model_args: ModelConfig, training_args) -> bool:
    """Reentrant checkpointing under DeepSpeed ZeRO-3 when some weights are frozen (LoRA, frozen parts); otherwise
    non-reentrant, PyTorch's recommendation, which needs no input that requires grad.

    ZeRO-3 has frozen weights partitioned again when the non-reentrant recompute reads them, which fails its
    metadata check (huggingface/transformers#47254, deepspeedai/DeepSpeed#4332; TRL's SFTTrainer forces reentrant
    for PEFT + ZeRO-3 for this reason; DeepSpeed 0.19's attribution of frozen parameters to the recompute,
    deepspeedai/DeepSpeed#8148, may make it unnecessary, untested here). Reentrant checkpointing only computes
    gradients for a block whose input requires grad; `VLMSFTTrainer` sees to that.
    """
    frozen = model_args.use_peft or bool(parts_to_freeze(model_args))
    return deepspeed_zero_stage(training_args) == 3 and frozen


def _configure_gradient_checkpointing(model_args: ModelConfig, training_args) -> None:
    """Set `use_reentrant` explicitly unless the recipe did, in one dict shared by `activation_checkpointing_kwargs`
    and its deprecated alias `gradient_checkpointing_kwargs`.

    Why both: transformers 5 reads `activation_checkpointing_kwargs`, while TRL's SFTTrainer writes its ZeRO-3
    setting into `gradient_checkpointing_kwargs`; a fresh dict there would not reach the Trainer.
    """
    if not training_args.gradient_checkpointing:
        return
    kwargs = (
        getattr(training_args, "activation_checkpointing_kwargs", None) or training_args.gradient_checkpointing_kwargs
    )
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    kwargs.setdefault("use_reentrant", use_reentrant_checkpointing(model_args, training_args))
    training_args.gradient_checkpointing_kwargs = kwargs
    if hasattr(training_args, "activation_checkpointing_kwargs"):
        training_args.activation_checkpointing_kwargs = kwargs


def _make_checkpointed_inputs_require_grad(model) -> int:
    """Under reentrant checkpointing, a checkpointed block gets parameter gradients only if one of its inputs
    requires grad. The language model's input embeddings are hooked by `enable_input_require_grads` (TRL does it for
    PEFT); the vision tower's blocks are fed from pixel values, so every checkpointed block that holds trainable
    parameters gets its hidden-state input marked here. The hook runs outside the checkpoint: transformers'
    `GradientCheckpointingLayer` checkpoints `forward`, not `__call__`. Returns the number of blocks hooked."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def mark_input(module, args, kwargs):
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and not args[0].requires_grad:
            args = (args[0].detach().requires_grad_(True), *args[1:])
        elif not args and torch.is_tensor(kwargs.get("hidden_states")) and not kwargs["hidden_states"].requires_grad:
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    hooked = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and any(p.requires_grad for p in module.parameters()):
            module.register_forward_pre_hook(mark_input, with_kwargs=True)
            hooked += 1
    return hooked


def _frozen_vision_embeddings(model) -> list[torch.nn.Module]:
    """The input-embedding modules of `model`'s vision sub-models when no vision-tower parameter trains; else [].

    Why: transformers' `enable_input_require_grads`, which TRL calls for PEFT and the Trainer calls again when it turns
    on checkpointing, hooks the input embeddings of every sub-model, the vision tower's patch embedding included. The
    patch embeddings then require grad, so autograd records the whole frozen vision tower: its checkpointed blocks
    keep their inputs (per image patch, per layer) and are recomputed and back-propagated through on every step, for
    gradients that reach no trainable parameter. A trainable projector still gets its gradients without them.
    """
    from transformers import PreTrainedModel

    try:
        family = family_of_model(model)
    except UnknownFamilyError:
        return []
    if part_has_trainable(model, "vision"):
        return []
    language_embeddings = model.get_input_embeddings()
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PreTrainedModel) or family.part_of(name) != "vision":
            continue
        try:
            embeddings = module.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embeddings, torch.nn.Module) and embeddings is not language_embeddings:
            found[id(embeddings)] = embeddings
    return list(found.values())


def _detach_output(module, args, output):
    return output.detach() if torch.is_tensor(output) else output


def detach_frozen_vision_inputs(model, handles: list | None = None) -> list:
    """Detach the output of a frozen vision tower's input embeddings (see `_frozen_vision_embeddings`), so that the
    tower runs without autograd. Returns the hook handles; pass the previous ones to replace them.

    Forward hooks run in registration order, so this must come after the last `enable_input_require_grads` (which
    the Trainer calls in `train`): `VLMSFTTrainer` registers it at the start of training. Under FSDP the model's
    module names carry FSDP's wrapper prefixes, no part matches and nothing is detached (untested without GPUs).
    """
    for handle in handles or []:
        handle.remove()
    return [module.register_forward_hook(_detach_output) for module in _frozen_vision_embeddings(model)]


# --------------------------------------------------------------------------------------------------------------------
# Sampling: length-grouped batches from the precomputed `length` column, seeded per epoch
# --------------------------------------------------------------------------------------------------------------------
def precomputed_lengths(dataset, column: str) -> list[int] | None:
    """The dataset's length column as a list, read as plain Arrow data (None when it has no such column).

    Why: the Trainer reads `dataset[length_column_name]`, which on a dataset with a custom transform (ours parse the
    JSON messages and decode the images) is a `datasets.Column` that formats the WHOLE row, images decoded, on every
    `lengths[i]` the sampler makes: the dataset's images would be decoded once more per epoch just to sort it.
    """
    if isinstance(dataset, datasets.Dataset) and column in dataset.column_names:
        return dataset.with_format("arrow").select_columns([column])[column].to_pylist()
    return None


class SeededLengthGroupedSampler:
    """transformers' length-grouped order, drawn from its own generator seeded by `seed` and the epoch.

    Why ours: transformers' `LengthGroupedSampler` (5.24), as the Trainer builds it, draws its order from torch's global
    RNG when the epoch starts. A run resumed from a checkpoint restores that RNG as it was at the checkpoint, not at
    the epoch's start, so it drew another order for the rest of the epoch (losses 0.4-0.6% off an uninterrupted run).
    Here epoch `e` always draws from `seed + e`; accelerate's data loader calls `set_epoch` each epoch, and the Trainer
    skips the batches already trained in the resumed epoch.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, list(lengths), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(length_grouped_indices(self.lengths, self.batch_size, generator))


# --------------------------------------------------------------------------------------------------------------------
# Data-loading defaults
# --------------------------------------------------------------------------------------------------------------------
def default_dataloader_num_workers(cpu_count: int | None = None) -> int:
    """Data-loading worker processes per training process when the recipe does not say.

    Image decoding and the processor run in the workers, beside the training step. One core is left to the training
    process; at most 4 workers, which keep even a fast GPU fed at the batch sizes of our recipes. On a machine with
    2 cores or fewer, workers only compete with training for the cores, so there are none.
    """
    cpu_count = _usable_cpus() if cpu_count is None else cpu_count
    return 0 if cpu_count <= 2 else min(4, cpu_count - 1)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def apply_data_loading_defaults(training_args, keys_set: set[str] | None) -> dict[str, Any]:
    """Set the data-loading keys the user did not set (`keys_set`); return what was set, for the log.

    - `train_sampling_strategy`: `group_by_length`, so that batches carry little padding (the lengths are measured
      cheaply up front by `vlm_recipes.lengths.prepare_lengths`); set `random` to turn it off;
    - `dataloader_num_workers`: `default_dataloader_num_workers()`, over the training processes of this machine;
    - `dataloader_pin_memory`: on only where the run uses CUDA (pinned host memory speeds up copies to a GPU only);
    - `dataloader_persistent_workers`: on when there are workers, so that they are not restarted every epoch.
    """
    keys_set = set(keys_set or ())
    changed: dict[str, Any] = {}
    if "train_sampling_strategy" not in keys_set:
        changed["train_sampling_strategy"] = "group_by_length"
    if "dataloader_num_workers" not in keys_set:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        changed["dataloader_num_workers"] = default_dataloader_num_workers(max(1, _usable_cpus() // local_processes))
    if "dataloader_pin_memory" not in keys_set:
        changed["dataloader_pin_memory"] = torch.cuda.is_available() and not training_args.use_cpu
    workers = changed.get("dataloader_num_workers", training_args.dataloader_num_workers)
    if "dataloader_persistent_workers" not in keys_set:
        changed["dataloader_persistent_workers"] = workers > 0
    for key, value in changed.items():
        setattr(training_args, key, value)
    if changed:
        logger.info("Data loading defaults: %s", ", ".join(f"{key}={value}" for key, value in changed.items()))
    return changed


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------
class VLMSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` with per-part learning rates, gradient checkpointing that trains every part, saves that are
    whole or absent, and exact resumes.

    Args:
        model_args (`VLMModelConfig`): the recipe's model keys (`vision_tower_lr`, `projector_lr`,
            `language_model_lr`, `use_peft`, `freeze_*`). Every other argument is `SFTTrainer`'s.

    The optimizer is the Trainer's (`optim`, its betas and eps), given parameter groups per part and per weight-decay
    split. Under DeepSpeed it is used as DeepSpeed's client optimizer, which needs a DeepSpeed config without an
    `optimizer` section (checked by `check_training_setup`).

    Saving and resuming (`vlm_recipes.resume`): each `checkpoint-<step>/` is written into `.tmp-checkpoint-<step>/`,
    with the processor files and generation config that let it load alone, and renamed into place when whole; the
    final output likewise (`save_output`). Resuming loads full weights with the family's key renamings and stops on
    any weight or adapter tensor that did not load. The length-grouped sampler reads the precomputed `length` column
    and draws each epoch's order from `seed + epoch` (`data_seed` when set), so a resumed run sees the same batches.
    """

    def __init__(self, *args, model_args: ModelConfig, **kwargs):
        self.model_args = model_args
        self._staging_run_dir: str | None = None
        training_args = kwargs.get("args")
        if training_args is not None:
            _configure_gradient_checkpointing(model_args, training_args)
            if kwargs.get("data_collator") is not None:
                # Several processes: a text-only batch gets a masked dummy image, so that no process skips the
                # vision tower and the others wait for its gradients.
                kwargs["data_collator"] = with_image_in_every_batch(kwargs["data_collator"], training_args)
        super().__init__(*args, **kwargs)
        self.add_callback(_FrozenVisionWithoutGrad(self))
        if self.train_dataset is not None and not hasattr(self.train_dataset, "__len__"):
            self.add_callback(_StreamTooShort())
        checkpointing_kwargs = self.args.activation_checkpointing_kwargs or {}
        if self.args.gradient_checkpointing and checkpointing_kwargs.get("use_reentrant"):
            hooked = _make_checkpointed_inputs_require_grad(self.model)
            logger.info(
                "Reentrant gradient checkpointing: %d trainable block(s) get inputs that require grad.", hooked
            )

    # Samplers ---------------------------------------------------------------------------------------------------
    def _sampler_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = sampling_strategy(self.args)
        if strategy == "batch_rebalance" and isinstance(dataset, datasets.Dataset):
            # The Trainer builds this sampler itself; from the unformatted view its column reads skip the transform.
            return super()._get_train_sampler(dataset.with_format(None))
        lengths = precomputed_lengths(dataset, self.args.length_column_name) if strategy == "group_by_length" else None
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(batch_size, lengths, seed=self._sampler_seed())

    def _get_eval_sampler(self, eval_dataset):
        if sampling_strategy(self.args) != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        lengths = precomputed_lengths(eval_dataset, self.args.length_column_name)
        if lengths is None:
            return super()._get_eval_sampler(eval_dataset)
        return SeededLengthGroupedSampler(self.args.eval_batch_size, lengths, seed=self._sampler_seed())

    # Saving: whole or absent -------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        # While `_save_checkpoint` runs, the Trainer's checkpoint goes into the staging directory.
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        folder = trainer_checkpoint_folder(self.state.global_step)
        run_dir = Path(self._get_output_dir(trial))
        staging_root = run_dir / staging_name(folder)
        if self.accelerator.is_local_main_process:  # what an interrupted save of this step left
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        staged, final = staging_root / folder, run_dir / folder
        # Every process recorded the staging path when this step is the best: each points it at the final one (all
        # of them read it in `_load_best_model`); the saving process also rewrites the checkpoint's state.
        best = self.state.best_model_checkpoint
        best_was_staged = bool(best) and Path(best) == staged
        if best_was_staged:
            self.state.best_model_checkpoint = str(final)
        if self.args.should_save and staged.is_dir():
            self._add_processor_files(staged)
            if best_was_staged:
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its part (DeepSpeed shards)
        # Moved into place by the process(es) that save (the main one; each node's with `save_on_each_node`): two
        # renamers of one directory on a shared file system would race, and the loser could delete the winner's.
        if self.args.should_save and staged.is_dir():
            replace_directory(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:  # the Trainer rotated inside the staging directory: rotate the real ones
            rotate_checkpoints(
                str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )

    def _add_processor_files(self, directory: Path) -> None:
        """The files the Trainer's checkpoint lacks to load alone: `preprocessor_config.json` (folded into
        processor_config.json since transformers 5) and, for a PEFT model, `generation_config.json`."""
        if self.processing_class is None or not hasattr(self.processing_class, "image_processor"):
            return
        generation_config = getattr(self.model, "generation_config", None)
        save_processor_files(directory, self.processing_class, generation_config, only_missing=True)

    def save_output(self, output_dir: str | Path, write_extra_files=None) -> None:
        """Save the final model (or adapter), `trainer_state.json`, the processor files, the generation config and
        whatever `write_extra_files(directory)` writes into `output_dir`, whole or not at all.

        Everything is written into `<output_dir>/.tmp-final/` and then moved into `output_dir` file by file, with
        `config.json` / `adapter_config.json` last; a previous run's are removed first. A kill at any moment leaves a
        directory that `from_pretrained` does not take for a model. Every process calls it (ZeRO-3 gathers).
        """
        output_dir = Path(output_dir)
        staging = output_dir / FINAL_STAGING_NAME
        if self.accelerator.is_local_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            withdraw_completion_files(output_dir)
        self.accelerator.wait_for_everyone()
        self.save_model(str(staging))
        if self.args.should_save:
            self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
            self._add_processor_files(staging)
            if write_extra_files is not None:
                write_extra_files(staging)
        self.accelerator.wait_for_everyone()
        if self.args.should_save and staging.is_dir():  # one mover per file system, as for checkpoints
            publish_directory(staging, output_dir)
        self.accelerator.wait_for_everyone()

    # Resuming: every weight loaded, or stop -------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        target = self.model if model is None else model
        if has_full_weights(resume_from_checkpoint) and not self.is_fsdp_enabled and not _is_peft(self.model):
            load_full_weights(self.accelerator.unwrap_model(target), resume_from_checkpoint)
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        trainable_dtypes = {name: p.dtype for name, p in unwrapped.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if _is_peft(self.model):
            _restore_dtypes(unwrapped, trainable_dtypes)
            check_adapter_loaded(unwrapped, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # The Trainer's own (transformers 5.24) loads full weights with `load_state_dict(strict=False)`, as its resume
        # does: none of Qwen2-VL's keys match, and the run would end on its last weights instead of the best ones.
        best = self.state.best_model_checkpoint
        if best and has_full_weights(best) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            if not _is_peft(self.model):
                logger.info("Loading the best model from %s (score: %s).", best, self.state.best_metric)
                load_full_weights(self.accelerator.unwrap_model(self.model), best)
                return
        unwrapped = self.accelerator.unwrap_model(self.model)
        trainable_dtypes = {name: p.dtype for name, p in unwrapped.named_parameters() if p.requires_grad}
        super()._load_best_model()
        if _is_peft(self.model) and best:
            _restore_dtypes(unwrapped, trainable_dtypes)
            check_adapter_loaded(unwrapped, best)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # `resume_from_checkpoint: true` from a recipe or the command line arrives as the string "true", which the
        # Trainer takes for a path ("Can't find a valid checkpoint at true"); a given path is checked complete.
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # Optimizer ----------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        has_part_rates = any(rate is not None for rate in part_learning_rates(self.model_args).values())
        if self.optimizer is None:
            logger.info("%s", _trainable_summary(opt_model, self.model_args, self.args.learning_rate))
        if self.optimizer is not None or not has_part_rates:
            return super().create_optimizer(model)
        for part, rate in part_learning_rates(self.model_args).items():
            if rate is not None and not part_has_trainable(opt_model, part):
                logger.warning(
                    "`%s: %g` is set but the %s has no trainable parameters.",
                    PART_LR_KEYS[part],
                    rate,
                    PART_NAMES[part],
                )
        groups = part_parameter_groups(
            opt_model,
            self.model_args,
            self.args.learning_rate,
            self.args.weight_decay,
            self.get_decay_parameter_names(opt_model),
        )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if special or not isinstance(optimizer_cls, type):
            raise ValueError(
                f"`optim: {self.args.optim}` builds its own parameter groups, so per-part learning rates cannot be "
                "applied: use an AdamW-type `optim` or drop `vision_tower_lr` / `projector_lr` / `language_model_lr`."
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class _FrozenVisionWithoutGrad(TrainerCallback):
    """At the start of training, after the Trainer's own `enable_input_require_grads`: `detach_frozen_vision_inputs`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.handles: list = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.handles = detach_frozen_vision_inputs(self.trainer.model, self.handles)
        if not self.handles:
            return
        logger.info("Frozen vision tower: it runs without autograd (no activations kept, no backward through it).")
        if (args.activation_checkpointing_kwargs or {}).get("use_reentrant"):
            # Reentrant checkpointing warns for every checkpointed block whose inputs need no grad: here the frozen
            # tower's, on purpose. Trainable blocks get inputs that require grad (`_make_checkpointed_inputs_require_grad`).
            warnings.filterwarnings(
                "ignore", message="None of the inputs have requires_grad=True", module="torch.utils.checkpoint"
            )


class _StreamTooShort(TrainerCallback):
    """A stream that ends before one optimizer step stops the run, naming why.

    Why: with a stream (no length), the Trainer reads it again each epoch until `max_steps`; a stream with fewer rows
    than one optimizer step takes (per-device batch x accumulation steps x processes) never completes a step, and
    the run would loop over it forever (transformers 5.24).
    """

    def __init__(self):
        self.step_at_epoch_start = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.step_at_epoch_start = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.global_step == self.step_at_epoch_start and state.global_step < state.max_steps:
            from .data.errors import DataError

            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            raise DataError(
                f"The streamed training split ended before one optimizer step ({per_step} rows: "
                f"per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps} x {args.world_size} process(es)): give more rows, or a smaller "
                "batch or fewer accumulation steps."
            )


def _restore_dtypes(model, dtypes: dict) -> None:
    """Cast trainable parameters back to the dtypes they trained in.

    PEFT's `load_adapter` (0.18, `autocast_adapter_dtype=True`) upcasts the adapter to float32, where TRL had cast a
    QLoRA adapter to bfloat16: a resumed run would compute in another dtype than the run it continues. The
    checkpoint holds the bfloat16 values, so casting back restores them exactly.
    """
    for name, parameter in model.named_parameters():
        if name in dtypes and parameter.dtype != dtypes[name]:
            parameter.data = parameter.data.to(dtypes[name])


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def part_has_trainable(model, part: str) -> bool:
    """Whether any parameter of `part` (`vision`, `projector`, `language`; the family registry's parts) trains."""
    family = family_of_model(model)
    return any(p.requires_grad and family.part_of(name) == part for name, p in model.named_parameters())
