"""Training on several processes (DDP, DeepSpeed ZeRO, FSDP; one machine or several): what `scripts/sft.py` needs
beyond what accelerate and the Trainer already do.

- `check_launch`: stop a launch that would silently not be what was asked for. Two traps of accelerate 1.15 seen
  here: on a machine without CUDA, `accelerate launch` with a multi-GPU or DeepSpeed config starts N processes that
  each train alone (world size 1) unless the recipe says how they talk (`use_cpu: true` for DDP, `ddp_backend: gloo`
  for DeepSpeed); and `use_cpu: true` under a DeepSpeed or FSDP config turns the engine off without a word.
- `launch_summary`: one line naming the engine and the process count, printed by the script.
- `close_process_group`: every process closes its process group together once the run has saved.
- `ImageInEveryBatch`: a collator wrapper that gives a text-only batch one masked dummy image, so that every process
  runs the vision tower in every step (see its docstring for why multi-process runs need it).
- `parameters_are_sharded`, `without_zero3_sharding`, `model_for_generation`: reloading and evaluating the saved
  model on the main process after a ZeRO-3 or FSDP run, whose in-memory parameters are shards.
- `keep_checkpoint_key_names`: a model loaded under ZeRO-3 saves under the checkpoint's own key names (a
  transformers 5.23 bug otherwise renames them).
- `global_batch`: the global batch of a recipe over N processes (used by `scripts/slurm/train.slurm`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._compat import hf_deepspeed_config_unset, loading_weight_conversions, set_loading_weight_conversions
from .constants import IGNORE_INDEX
from .families import model_class_for

logger = logging.getLogger(__name__)

__all__ = [
    "ImageInEveryBatch",
    "append_masked_dummy_image",
    "check_launch",
    "close_process_group",
    "describe_global_batch",
    "global_batch",
    "keep_checkpoint_key_names",
    "launch_summary",
    "model_for_generation",
    "parameters_are_sharded",
    "with_image_in_every_batch",
    "without_zero3_sharding",
]


# --------------------------------------------------------------------------------------------------------------------
# Launch checks
# --------------------------------------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _requested_engine() -> str | None:
    """The engine that `accelerate launch` was asked for, from the environment it gives its processes."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def check_launch(training_args) -> None:
    """Raise `RecipeError` when the processes that were launched would not train together as asked.

    Runs after the recipe is parsed (the `TrainingArguments` have set up the distributed state) and before anything
    is loaded. Does nothing for a single process.
    """
    from accelerate.utils import DistributedType

    from .configs import RecipeError

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    engine = _requested_engine()
    distributed_type = training_args.distributed_state.distributed_type
    has_cuda = torch.cuda.is_available()
    use_cpu = bool(getattr(training_args, "use_cpu", False)) or _env_flag("ACCELERATE_USE_CPU")
    if engine == "DeepSpeed" and distributed_type != DistributedType.DEEPSPEED:
        cause = "`use_cpu: true` turns it off" if use_cpu else f"accelerate set up {distributed_type} instead"
        raise RecipeError(
            f"The accelerate config asks for DeepSpeed, but {cause} (the run would go on without DeepSpeed): set "
            "`--use_cpu false`" + ("." if has_cuda else " and, on a machine without GPUs, `--ddp_backend gloo`.")
        )
    if engine == "FSDP" and distributed_type != DistributedType.FSDP:
        raise RecipeError(
            "The accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only"
            + (": set `--use_cpu false`." if has_cuda else " and this machine has none: use DDP or DeepSpeed here.")
        )
    if launched > 1 and training_args.world_size != launched:
        if engine == "DeepSpeed":
            fix = "Set `--ddp_backend gloo` (no GPUs here, so accelerate picks no backend for DeepSpeed by itself)"
        elif engine == "FSDP":
            fix = "FSDP needs GPUs; use DDP or DeepSpeed on this machine"
        elif not has_cuda:
            fix = "Set `--use_cpu true` for data parallel over CPU processes (gloo)"
        else:
            fix = "Check the accelerate config's `distributed_type`"
        raise RecipeError(
            f"`accelerate launch` started {launched} processes, but each sees a world of "
            f"{training_args.world_size}: they would each train alone and overwrite one another's output. {fix}."
        )


def launch_summary(trainer) -> str:
    """E.g. `DeepSpeed ZeRO-3, 4 processes on 2 machines`, or `single process` (for the run's log)."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    processes = state.num_processes
    if processes <= 1 and state.distributed_type == DistributedType.NO:
        return f"single process on {state.device}"
    engine = {
        DistributedType.DEEPSPEED: "DeepSpeed",
        DistributedType.FSDP: "FSDP",
        DistributedType.MULTI_CPU: "DDP (CPU, gloo)",
        DistributedType.MULTI_GPU: "DDP",
    }.get(state.distributed_type, str(state.distributed_type))
    if state.distributed_type == DistributedType.DEEPSPEED:
        engine += f" ZeRO-{state.deepspeed_plugin.zero_stage}"
        offload = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offloaded = [
            part
            for part, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
            if offload.get(key, {}).get("device", "none") not in (None, "none")
        ]
        if offloaded:
            engine += f" (offload: {', '.join(offloaded)})"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes) or processes)
    machines = max(1, processes // max(1, local))
    return f"{engine}, {processes} processes on {machines} machine{'s' if machines > 1 else ''}"


def close_process_group(trainer) -> bool:
    """After the run's last collective (saving): every process waits for the others, then destroys its process group.

    Why not leave it to the interpreter's exit, as the Trainer does: a process that exits with its group alive tears
    the backend's threads down in C++ static destruction, and there gloo sometimes aborts the process ("terminate
    called without an active exception", seen on a rank that had finished training and saving); NCCL's destroy is
    collective and may hang when the ranks do not call it together (pytorch/pytorch#122358 documents calling it on
    every rank at the end of `main`). Here all ranks call it at one point, right after saving; what follows on the
    main process alone (reloading the output, evaluation by generation) needs no group, and no process tears a live
    group down at exit while the main process is still working.
    Returns whether a group was closed; a single-process run has none.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    state = trainer.accelerator.state
    trainer.accelerator.wait_for_everyone()
    state.destroy_process_group()  # accelerate's: does nothing in a `notebook_launcher` run, which owns the group
    closed = not dist.is_initialized()
    if closed:
        logger.info("Process %d of %d: process group closed.", state.process_index, state.num_processes)
    return closed


# --------------------------------------------------------------------------------------------------------------------
# Every process runs the vision tower in every step
# --------------------------------------------------------------------------------------------------------------------
def _dummy_image():
    from PIL import Image

    # Not mid-grey: Idefics-style models drop images whose normalised pixels are all zero (their padding images).
    return Image.new("RGB", (32, 32), (200, 40, 40))


class ImageInEveryBatch:
    """Wrap a collator so that a batch without images gets one dummy image that the loss cannot see.

    Why: with several processes, each process's batch is its own; when one holds no image, that process skips the
    vision tower while the others run it. Under DeepSpeed ZeRO-3 (and FSDP) every module's forward gathers its
    sharded weights with a collective that all processes must join, so the processes' collectives stop matching;
    under ZeRO-2, ZeRO-3 and DDP without `find_unused_parameters` the vision tower's gradients are reduced on some
    processes and not others. Seen here with a tiny Qwen2-VL on 2 CPU processes (gloo), one text-only and one image
    batch per step: ZeRO-2 and ZeRO-3 die with a collective mismatch (NCCL would hang instead), DDP with
    `ddp_find_unused_parameters: false` hangs. (DDP with the Trainer's default, `find_unused_parameters` on, copes,
    at the cost of a graph traversal per step.) Running the tower on every process in every step removes the cause
    for every engine.

    How: the chat template renders a user turn holding one image, the processor encodes it with a small image, and
    its tokens are appended after the first row's last column, with `attention_mask` 0 and labels -100 (the other
    rows get padding there). The model then runs the vision tower the ordinary way, in its ordinary place in the
    forward pass, and puts the image's features at those positions; no real token attends to them (they are masked,
    and they come after every real token), and they carry no loss, so the loss and the gradients of the real tokens
    are those of the batch without the dummy, and the vision tower gets an all-zero gradient. Masked tokens do not
    count in token metrics (`num_tokens`), and positions computed from the attention mask (Qwen's 3D RoPE) skip them.
    The cost is the dummy's tokens (one minimum-size image plus the template's turn) in text-only batches only.

    Used for every multi-process run (`with_image_in_every_batch`); a single process needs none of it.

    Args:
        collator: the wrapped collator (`VisionChatCollator`); its attributes stay reachable through the wrapper.
        processor: the model's processor; defaults to `collator.processor`.
    """

    def __init__(self, collator, processor=None):
        self.collator = collator
        self.processor = processor if processor is not None else collator.processor
        self.num_dummy_images = 0
        self._dummy = None
        self._image_keys: list[str] = []

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes the wrapper lacks: `num_dropped`, `max_length`, ... of the wrapped collator.
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def dummy_encoding(self) -> dict[str, torch.Tensor]:
        """The processor's encoding of one user turn holding one small image (computed once)."""
        if self._dummy is None:
            from .collator import special_tokens_kwargs

            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}]}], tokenize=False
            )
            tokenizer = self.processor.tokenizer
            encoded = self.processor(
                text=[text],
                images=[[_dummy_image()]],
                return_tensors="pt",
                padding=False,
                **special_tokens_kwargs(tokenizer, [text]),
            )
            dummy = {key: value for key, value in encoded.items() if torch.is_tensor(value)}
            length = dummy["input_ids"].shape[1]
            # Everything not laid out per token is the image's: pixel_values, image_grid_thw, pixel_attention_mask...
            self._image_keys = [key for key, value in dummy.items() if tuple(value.shape) != (1, length)]
            if not self._image_keys:
                raise ValueError(
                    f"{type(self.processor).__name__} returned no image tensors for a one-image turn, so a text-only "
                    "batch cannot be given a dummy image."
                )
            self._dummy = dummy
        return self._dummy

    def __call__(self, examples):
        batch = self.collator(examples)
        dummy = self.dummy_encoding()
        if any(key in batch for key in self._image_keys):
            return batch
        if self.num_dummy_images == 0:
            logger.info(
                "A batch without images got a masked dummy image so that every process runs the vision tower "
                "(multi-process training); the loss does not see it."
            )
        self.num_dummy_images += 1
        return append_masked_dummy_image(batch, dummy, self.processor.tokenizer.pad_token_id)


def append_masked_dummy_image(
    batch: dict[str, Any], dummy: dict[str, torch.Tensor], pad_token_id: int
) -> dict[str, Any]:
    """`batch` with `dummy`'s tokens appended to its first row, masked (attention 0, labels -100), and its image
    tensors added. The other rows are padded to the new length. See `ImageInEveryBatch`."""
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    dummy_length = dummy["input_ids"].shape[1]
    # Token-aligned keys: those the processor returns per token (input_ids, attention_mask, mm_token_type_ids,
    # token_type_ids, ...), and `labels` where they align with input_ids (not an encoder-decoder's decoder labels).
    token_keys = [key for key, value in dummy.items() if tuple(value.shape) == (1, dummy_length)]
    if "labels" in batch and "decoder_input_ids" not in batch and tuple(batch["labels"].shape) == (rows, length):
        token_keys.append("labels")
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    merged = dict(batch)
    for key in token_keys:
        current = batch.get(key)
        if current is None:  # e.g. `mm_token_type_ids`, which some processors return only with images
            current = torch.zeros((rows, length), dtype=dummy[key].dtype)
        tail = torch.full((rows, dummy_length), fill.get(key, 0), dtype=current.dtype)
        if key == "input_ids" or (key not in ("attention_mask", "labels") and key in dummy):
            tail[0] = dummy[key][0].to(current.dtype)
        merged[key] = torch.cat([current, tail], dim=1)
    for key, value in dummy.items():
        if key not in token_keys:
            merged[key] = value.clone()
    return merged


def with_image_in_every_batch(collator, training_args):
    """`ImageInEveryBatch(collator)` when more than one process trains, else `collator` itself (also when it is
    wrapped already: `VLMSFTTrainer` wraps the collator it is given)."""
    if training_args.world_size <= 1 or isinstance(collator, ImageInEveryBatch):
        return collator
    return ImageInEveryBatch(collator)


# --------------------------------------------------------------------------------------------------------------------
# Sharded parameters: reload and evaluate on one process
# --------------------------------------------------------------------------------------------------------------------
def parameters_are_sharded(trainer) -> bool:
    """True when no process holds the whole model during training: DeepSpeed ZeRO-3 or FSDP."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    return state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin.zero_stage == 3


@contextmanager
def without_zero3_sharding():
    """Inside, `from_pretrained` builds whole models and `generate` does not wait for the other processes, even in a
    DeepSpeed ZeRO-3 run. For work on one process after training: reloading the saved output, generating with it.

    transformers decides both from one module-level weak reference to the run's DeepSpeed config
    (`is_deepspeed_zero3_enabled`); it is unset here and restored on exit (`_compat.hf_deepspeed_config_unset`).
    """
    with hf_deepspeed_config_unset():
        yield


def keep_checkpoint_key_names(model, model_args, trust_remote_code: bool = False) -> None:
    """Make a model loaded under ZeRO-3 save its weights under the checkpoint's key names, as any other load does.

    transformers (5.23) renames checkpoint keys when loading (Qwen2-VL's `model.embed_tokens` becomes
    `model.language_model.embed_tokens`) and undoes the renamings that it used when saving. Its ZeRO-3 loading path
    (`_load_state_dict_into_zero3_model`, from huggingface/transformers#43303) records every rule of the family
    instead of the ones used, and saving then undoes rules that never applied: the weights come out as
    `model.model.embed_tokens...`, which transformers reloads but other readers of the format (vLLM, TGI) do not.
    Here the rules a plain load records are taken from a weightless (`meta` device) load of the same checkpoint.
    Does nothing outside ZeRO-3.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or loading_weight_conversions(model) is None:
        return
    with without_zero3_sharding():
        reference = model_class_for(model_args.model_name_or_path).from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=trust_remote_code,
            device_map="meta",
        )
    set_loading_weight_conversions(model, loading_weight_conversions(reference))


def model_for_generation(trainer, output_dir: str | Path, trust_remote_code: bool = False):
    """The trained model, whole, on the main process, for evaluation by generation after training.

    Where parameters are whole (one process, DDP, ZeRO-1/2) that is the trained model in memory. Under ZeRO-3 or FSDP
    each process holds shards only, and generating on the main process alone would wait forever for the others; the
    saved output (gathered whole when saving) is reloaded instead, onto the main process's device. Call it, and
    generate, inside `without_zero3_sharding()`.
    """
    if not parameters_are_sharded(trainer):
        return trainer.accelerator.unwrap_model(trainer.model)
    from .generation import load_for_generation

    logger.info("Parameters are sharded (ZeRO-3/FSDP): reloading %s on the main process to evaluate.", output_dir)
    model, _ = load_for_generation(output_dir, trust_remote_code=trust_remote_code)
    return model.to(trainer.accelerator.device)


# --------------------------------------------------------------------------------------------------------------------
# Global batch of a recipe (scripts/slurm/train.slurm)
# --------------------------------------------------------------------------------------------------------------------
def _override(arguments: list[str], key: str) -> str | None:
    value = None
    for index, argument in enumerate(arguments):
        if argument == f"--{key}" and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif argument.startswith(f"--{key}="):
            value = argument.split("=", 1)[1]
    return value


def global_batch(recipe_path: str | Path, num_processes: int, overrides: list[str] | None = None) -> dict[str, int]:
    """`per_device_train_batch_size` x `gradient_accumulation_steps` x `num_processes` for a recipe file and its
    command-line overrides (`--key value`); unset keys take `SFTConfig`'s defaults."""
    import dataclasses

    from trl import SFTConfig

    from .configs import read_recipe_file

    recipe = read_recipe_file(recipe_path)
    defaults = {field.name: field.default for field in dataclasses.fields(SFTConfig)}
    values = {}
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        override = _override(list(overrides or []), key)
        values[key] = int(override if override is not None else recipe.get(key, defaults[key]))
    values["num_processes"] = int(num_processes)
    values["global_batch_size"] = (
        values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] * values["num_processes"]
    )
    return values


def describe_global_batch(recipe_path: str | Path, num_processes: int, overrides: list[str] | None = None) -> str:
    values = global_batch(recipe_path, num_processes, overrides)
    return (
        f"global batch {values['global_batch_size']} = per_device_train_batch_size "
        f"{values['per_device_train_batch_size']} x gradient_accumulation_steps "
        f"{values['gradient_accumulation_steps']} x {values['num_processes']} processes"
    )
