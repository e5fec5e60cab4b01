"""Early checks of the model keys and training arguments, each with the fix in its message, and the two facts they
read: the run's DeepSpeed ZeRO stage (`deepspeed_zero_stage`) and the dtype the forward pass computes in
(`training_dtype`).

`check_model_args` runs when the recipe is parsed (`VLMModelConfig.__post_init__`); `check_training_setup`, which
needs the training arguments too, runs in `load_model` before anything loads.
"""

from __future__ import annotations

import os

import torch
from trl import ModelConfig

from .parts import PART_LR_KEYS, part_learning_rates

__all__ = [
    "DTYPES",
    "check_model_args",
    "check_precision",
    "check_quantization_for_zero3",
    "check_training_setup",
    "deepspeed_zero_stage",
    "training_dtype",
]

# The recipe's `dtype` names, as torch dtypes.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_QUANT_STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")


def check_model_args(model_args: ModelConfig) -> None:
    """Reject contradictory model keys with a message that says what to set. Runs when the recipe is parsed.

    TRL's own check for 4-bit + 8-bit (in `ModelConfig.__post_init__`) does not say what to do; this runs first.
    """
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise ValueError(
            "`load_in_4bit` and `load_in_8bit` are both true; set only one: `load_in_4bit: true` for QLoRA "
            "(NF4, double quantisation) or `load_in_8bit: true`."
        )
    quantized_key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit" if model_args.load_in_8bit else None
    if quantized_key and not model_args.use_peft:
        raise ValueError(
            f"`{quantized_key}: true` quantises the base model, whose weights cannot then be fully fine-tuned: set "
            f"`use_peft: true` (QLoRA: `--use_peft true --{quantized_key} true`) or drop `{quantized_key}`."
        )
    storage = model_args.bnb_4bit_quant_storage
    if storage is not None and storage not in _QUANT_STORAGE_DTYPES:
        raise ValueError(f"`bnb_4bit_quant_storage: {storage}` is not one of {_QUANT_STORAGE_DTYPES}.")
    for key in PART_LR_KEYS.values():
        value = getattr(model_args, key, None)
        if value is not None and value < 0:
            raise ValueError(f"`{key}: {value}` is negative; set a learning rate >= 0 or leave it unset.")


def deepspeed_zero_stage(training_args) -> int | None:
    """The DeepSpeed ZeRO stage of this run, or None without DeepSpeed.

    `TrainingArguments` builds `deepspeed_plugin` from `--deepspeed CONFIG` or, under `accelerate launch` with a
    DeepSpeed accelerate config, from the environment (`ACCELERATE_USE_DEEPSPEED`, `ACCELERATE_DEEPSPEED_ZERO_STAGE`,
    `ACCELERATE_DEEPSPEED_CONFIG_FILE`); its `zero_stage` is the stage of the DeepSpeed config, or the environment's.
    The environment is read directly only for arguments without a plugin.
    """
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None:
        return int(plugin.zero_stage)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    return None


def _deepspeed_config(training_args) -> dict | None:
    hf_config = getattr(training_args, "hf_deepspeed_config", None)
    if hf_config is not None:
        return hf_config.config
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return getattr(plugin, "deepspeed_config", None) if plugin is not None else None


def training_dtype(model_args: ModelConfig, training_args=None) -> torch.dtype:
    """The dtype the forward pass computes in: the 4-bit compute dtype.

    An explicit half-precision `dtype` (the weights' dtype) wins; otherwise mixed precision decides (`bf16` / `fp16`
    of the training arguments, as TRL's `SFTConfig` defaults `bf16` to true); otherwise float32.
    """
    if model_args.dtype in ("bfloat16", "float16"):
        return DTYPES[model_args.dtype]
    if training_args is not None and getattr(training_args, "bf16", False):
        return torch.bfloat16
    if training_args is not None and getattr(training_args, "fp16", False):
        return torch.float16
    return torch.float32


def check_quantization_for_zero3(model_args: ModelConfig, training_args) -> None:
    """Stop a quantised run that DeepSpeed ZeRO-3 cannot shard, saying what to set.

    ZeRO-3 flattens and shards every parameter in one dtype, and casts the model to the training dtype; 4-bit
    weights survive that only when they are stored in the compute dtype (`bnb_4bit_quant_storage` = compute dtype;
    see the accelerate guide "DeepSpeed and FSDP with QLoRA"). An unset `bnb_4bit_quant_storage` is not an error:
    `quantization_config_for` then stores in the compute dtype. 8-bit weights (int8) cannot be stored that way.
    Does nothing without quantisation or below ZeRO-3.
    """
    if not (model_args.load_in_4bit or model_args.load_in_8bit) or deepspeed_zero_stage(training_args) != 3:
        return
    compute = str(training_dtype(model_args, training_args)).removeprefix("torch.")
    if model_args.load_in_8bit:
        raise ValueError(
            "`load_in_8bit: true` cannot be sharded by DeepSpeed ZeRO-3 (int8 weights); use `load_in_4bit: true` "
            f"with `bnb_4bit_quant_storage: {compute}`, or ZeRO-2 (deepspeed/zero2.json)."
        )
    storage = model_args.bnb_4bit_quant_storage
    if storage is not None and storage != compute:
        raise ValueError(
            f"DeepSpeed ZeRO-3 with `load_in_4bit: true` needs `bnb_4bit_quant_storage` equal to the compute dtype "
            f"({compute}, from `dtype`/`bf16`/`fp16`), got `{storage}`: set `bnb_4bit_quant_storage: {compute}` "
            "(or leave it unset), or train with ZeRO-2."
        )


def check_precision(model_args: ModelConfig, training_args) -> None:
    """Stop a half-precision `dtype` that contradicts the mixed-precision flag (TRL's `SFTConfig` turns `bf16` on by
    default): float16 weights under bf16 autocast (or the reverse) compute in neither as meant, and under DeepSpeed
    the 4-bit compute and storage dtype (from `dtype`) would differ from the dtype ZeRO casts to (from `bf16`)."""
    flags = [name for name in ("bf16", "fp16") if getattr(training_args, name, False)]
    wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(model_args.dtype)
    if wanted is not None and flags and flags != [wanted]:
        other = "bfloat16" if flags == ["bf16"] else "float16"
        raise ValueError(
            f"`dtype: {model_args.dtype}` with `{flags[0]}: true` mixes two half precisions: set `{wanted}: true` and "
            f"`{flags[0]}: false`, or `dtype: {other}`."
        )


def check_training_setup(model_args: ModelConfig, training_args) -> None:
    """Checks that need both the model keys and the training arguments; `load_model` runs them before loading."""
    check_model_args(model_args)
    check_precision(model_args, training_args)
    check_quantization_for_zero3(model_args, training_args)
    part_lrs = {key: value for key, value in part_learning_rates(model_args).items() if value is not None}
    ds_config = _deepspeed_config(training_args)
    if part_lrs and ds_config is not None and "optimizer" in ds_config:
        keys = ", ".join(f"`{PART_LR_KEYS[part]}`" for part in part_lrs)
        raise ValueError(
            f"{keys} need the Trainer's optimizer (parameter groups per part), but the DeepSpeed config "
            f"{getattr(training_args, 'deepspeed', None) or ''} has an `optimizer` section, which would replace it: "
            "remove that section (the Trainer's `optim` is used) or drop the per-part learning rates."
        )
