"""Every place where vlm-recipes relies on another library's internals, one small function each.

A private name, a module outside a library's public API, a flag read by a library's code, or a patched method: each
is here, with the versions it was checked against and why we need it. `tests/unit/test_compat.py` checks that each still
finds what it expects, so an upgrade that moves one fails there, by name, rather than somewhere in a training run.
No other module of `vlm_recipes` touches a third-party private name (`tests/unit/test_import_graph.py` checks).

Checked against: transformers 5.24.0, TRL 1.16.0, PEFT 0.21.2, accelerate 1.16.0, bitsandbytes 0.50.2, torch 2.14.1,
datasets 5.2.0.
Imports happen inside the functions, so that importing this module loads none of those libraries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "add_first_callback",
    "compiled_chat_template",
    "dataset_fingerprint",
    "forward_pre_hooks",
    "has_image_token_count",
    "hf_deepspeed_config_unset",
    "image_token_count",
    "length_grouped_indices",
    "loading_weight_conversions",
    "peft_target_matches",
    "rotate_checkpoints",
    "run_before_training_step",
    "set_loading_weight_conversions",
    "trainer_checkpoint_folder",
    "trl_chat_template_dir",
    "turn_off_4bit_cpu_repacking",
]


# --------------------------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------------------------
@functools.cache
def _chat_template_compiler() -> Callable | None:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template


def compiled_chat_template(template: str):
    """transformers' compiled jinja template for `template` (its sandboxed environment, cached per template text), or
    None where transformers no longer has the function; the caller then renders through `render_jinja_template`.

    transformers 5.24: `transformers.utils.chat_template_utils._compile_jinja_template`. Why: the collator renders
    every row at least twice, and calling the compiled template directly skips wrappers that were over a third of
    that time (`VisionChatCollator._render_uncached` says what they would add).
    """
    compiler = _chat_template_compiler()
    return None if compiler is None else compiler(template)


@contextmanager
def hf_deepspeed_config_unset():
    """Inside, transformers sees no DeepSpeed config (`is_deepspeed_zero3_enabled()` is False); restored on exit.

    transformers 5.24 keeps the run's config in one module-level weak reference,
    `transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref`; `unset_hf_deepspeed_config` clears it but
    nothing public sets it back. Why: reloading and generating on one process after a ZeRO-3 run
    (`vlm_recipes.distributed.without_zero3_sharding`); accelerate 1.16's `zero3_init_context_manager(enable=False)`
    sets the reference again rather than clearing it.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def loading_weight_conversions(model) -> Any:
    """The key renamings that loading recorded on `model` and saving undoes, or None where it recorded none.

    transformers 5.24: `PreTrainedModel._weight_conversions`, set while loading and read when saving
    (`transformers.core_model_loading`). Why: a model loaded under ZeRO-3 records the wrong ones
    (`vlm_recipes.distributed.keep_checkpoint_key_names`).
    """
    return getattr(model, "_weight_conversions", None)


def set_loading_weight_conversions(model, conversions) -> None:
    """Make saving `model` undo `conversions` (from `loading_weight_conversions` of another load of its checkpoint)."""
    model._weight_conversions = conversions


def has_image_token_count(processor) -> bool:
    """Whether `processor` can say how many tokens an image of a given size takes (`image_token_count`)."""
    return callable(getattr(processor, "_get_num_multimodal_tokens", None))


def image_token_count(processor, height: int, width: int) -> int:
    """How many tokens the processor expands one image placeholder into for an image of `height` x `width` pixels.

    transformers 5.24: `ProcessorMixin` subclasses' `_get_num_multimodal_tokens(image_sizes=...)`, the arithmetic
    vLLM sizes its placeholders with (transformers documents its `MultiModalData` result as meant for vLLM, open to
    change). Legacy processors (Idefics2) lack it. Raises what a changed method would (AttributeError, KeyError,
    TypeError, IndexError); `vlm_recipes.lengths.ImageTokenCounter` then measures with blank images instead. Why:
    sample lengths without decoding pixels.
    """
    data = processor._get_num_multimodal_tokens(image_sizes=[(int(height), int(width))])
    return int(data["num_image_tokens"][0])


def length_grouped_indices(lengths: list[int], batch_size: int, generator) -> list[int]:
    """transformers' length-grouped order of `lengths` for batches of `batch_size`, drawn from `generator`.

    transformers 5.24: `transformers.trainer_pt_utils.get_length_grouped_indices`, the order its
    `LengthGroupedSampler` gives (not exported by `transformers`). Why: our seeded sampler
    (`vlm_recipes.trainer.SeededLengthGroupedSampler`) keeps transformers' grouping and only changes where the
    randomness comes from.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(lengths, batch_size, generator=generator)


def trainer_checkpoint_folder(global_step: int) -> str:
    """The name the Trainer gives the checkpoint of `global_step` (`checkpoint-<step>`).

    transformers 5.24: `transformers.trainer_utils.PREFIX_CHECKPOINT_DIR`, which `Trainer._save_checkpoint` names its
    folder with. Why: `VLMSFTTrainer._save_checkpoint` lets the Trainer save into a staging directory and moves the
    folder it wrote into place.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return f"{PREFIX_CHECKPOINT_DIR}-{global_step}"


def rotate_checkpoints(
    output_dir: str, save_total_limit: int | None, best_model_checkpoint: str | None, use_mtime: bool
) -> None:
    """Delete the oldest `checkpoint-*` directories of `output_dir` beyond `save_total_limit`, keeping the best.

    transformers 5.24: `transformers.trainer_utils.rotate_checkpoints`, the helper `Trainer._save_checkpoint` calls
    (not exported by `transformers`). Why: `VLMSFTTrainer._save_checkpoint` lets the Trainer save (and rotate) inside
    a staging directory, so it rotates the real directory itself, the way the Trainer would.
    """
    from transformers.trainer_utils import rotate_checkpoints as rotate

    rotate(
        output_dir=output_dir,
        save_total_limit=save_total_limit,
        best_model_checkpoint=best_model_checkpoint,
        use_mtime=use_mtime,
    )


def add_first_callback(trainer, callback) -> None:
    """Put `callback` first in the trainer's callbacks, so that its events run before the others'.

    transformers 5.24: `Trainer.callback_handler.callbacks`, the list `CallbackHandler` calls in order; its
    `add_callback` only appends. Why: the compute report's clock starts before other callbacks' set-up (W&B's
    `init`), as the Trainer's own `train_runtime` clock does (`vlm_recipes.compute.track_compute`).
    """
    trainer.callback_handler.callbacks.insert(0, callback)


def run_before_training_step(trainer, before: Callable[[Any], None]) -> None:
    """Call `before(inputs)` with each micro-batch, before this trainer instance's `training_step` runs on it.

    A patch of the instance's bound method (transformers 5.24 `Trainer.training_step(model, inputs, ...)`), rather
    than an override, so that it works for any trainer class a script uses (the benchmark's TRL `SFTTrainer` too).
    Why: the compute report counts the tokens and images of every micro-batch on its training process.
    """
    original_training_step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        before(inputs)
        return original_training_step(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


# --------------------------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------------------------
def trl_chat_template_dir() -> Path:
    """The directory of the chat templates that TRL ships as files (`<name>.jinja`, `<name>_training.jinja`).

    TRL 1.16: `trl/chat_templates/`, package data with no API to list or read it. Why: families whose checkpoints
    ship no template, or one without generation markers, use TRL's (`vlm_recipes.chat_templates.trl_chat_template`).
    """
    import trl

    return Path(trl.__file__).parent / "chat_templates"


# --------------------------------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------------------------------
def peft_target_matches(config, module_name: str) -> bool:
    """Whether PEFT would put an adapter of `config` (a `LoraConfig`) on the module named `module_name`.

    PEFT 0.21: `peft.tuners.tuners_utils.check_target_module_exists` (not exported by `peft`), which returns True or a
    regex match for a target and a falsy marker for an excluded module. Why: `lora_target_modules` is matched the way
    PEFT matches it, then narrowed to the parts that get LoRA (`vlm_recipes.models.lora`).
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, module_name))


# --------------------------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------------------------
def forward_pre_hooks(module) -> list[Callable]:
    """The forward pre-hooks registered on `module`.

    torch 2.14: `nn.Module._forward_pre_hooks` (an ordered dict of handle id -> hook); torch has no public way to list
    them. Why: `keep_4bit_outputs_in_autocast_dtype` hooks each layer once, however often it is called.
    """
    return list(module._forward_pre_hooks.values())


# --------------------------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------------------------
def turn_off_4bit_cpu_repacking(layer) -> None:
    """Keep bitsandbytes from repacking the weight of one 4-bit linear layer for its CPU inference kernel.

    bitsandbytes 0.50.2: `Linear4bit.forward` on CPU, in eval mode, with an input that does not require grad
    (`Trainer.evaluate`, generation) rewrites its weight in place into the layout of its AVX512-BF16 kernel
    (`bitsandbytes.functional._convert_weight_packed_for_cpu`) when `Linear4bit.support_avx512bf16_for_cpu` is set;
    `__init__` sets it from `has_avx512bf16()`, true on Intel Xeon Cooper Lake, Sapphire Rapids and later and on
    AMD Zen 4 and later. Then:
    - a layer whose input width is not a multiple of the quantisation block (64 here) fails (`RuntimeError: shape
      '[96, 0]' is invalid for input of size 48`), one whose output width is not a multiple of 32 too
      (`AssertionError: N must be divisible by block_n`): every tiny model, at its first evaluation;
    - a layer that was repacked stays so: `train()` does not undo it, and the packed kernel (`gemv_4bit`, chosen by
      `matmul_4bit` from `quant_state.packing_format_for_cpu`) has no autograd, so training after an evaluation in
      the middle of training passes no gradient back through the frozen 4-bit layers (PyTorch only warns);
      `dequantize_4bit` (PEFT's merge) reads the packed layout as the plain one; saving unpacks it
      (`_convert_weight_packed_for_cpu_inverse`) with absmax rounded to bfloat16, so the saved weights change;
    - the repacked layer computes in bfloat16 with bfloat16 absmax, not in the compute dtype training used.
    `forward` reads the flag at every call, and nothing else does, so clearing it turns the repack off for that layer
    alone; GPU runs never take that path.
    """
    layer.support_avx512bf16_for_cpu = False


# --------------------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------------------
def dataset_fingerprint(dataset) -> str:
    """The fingerprint `datasets` keeps for a `Dataset`'s content and history (`Dataset._fingerprint`, datasets 5.2).

    Why: our `datasets.map` passes whose function holds a processor (sample lengths) pass `new_fingerprint`, built
    from this and the processor's settings, so that their cache is found again on the next run; `datasets` itself
    would hash the processor object, which does not hash the same from one process to the next.
    """
    return dataset._fingerprint
