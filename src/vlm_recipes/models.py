"""Model and processor loading, and what a recipe decides about the model's parts.

- Loading: `AutoModelForImageTextToText` + `AutoProcessor`, with the recipe's `dtype`, `attn_implementation`,
  `trust_remote_code`; 4-bit (NF4, double quantisation, compute dtype = training dtype) or 8-bit bitsandbytes.
- LoRA targets per part (`peft_config_for`): the language model's linear layers by default; the vision tower and
  projector only with `lora_vision: true`. Targets come from the family registry's module layout
  (`vlm_recipes.families`), never from bare layer names, which also match vision blocks (Qwen2.5-VL's `gate_proj`).
- Freezing (`freeze_vision_tower`, `freeze_projector`) and per-part learning rates (`part_learning_rates`; the
  parameter groups are built by `vlm_recipes.trainer.VLMSFTTrainer`, which also owns gradient checkpointing and the
  frozen vision tower).
- Whether a model can be loaded at all (`check_model_available`), before anything else loads.
- Early checks with the fix in the message (`check_model_args`, `check_training_setup`,
  `check_quantization_for_zero3`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from trl import ModelConfig, get_peft_config

from ._compat import forward_pre_hooks, peft_target_matches, turn_off_4bit_cpu_repacking
from .chat_templates import fill_missing_chat_template
from .families import UnknownFamilyError, detect_family, family_of_model

logger = logging.getLogger(__name__)

__all__ = [
    "check_model_args",
    "check_quantization_for_zero3",
    "check_training_setup",
    "deepspeed_zero_stage",
    "freeze_parts",
    "load_model",
    "load_processor",
    "lora_target_modules_for",
    "parameter_count",
    "part_learning_rates",
    "peft_config_for",
    "quantization_config_for",
    "training_dtype",
]

PARTS = ("vision", "projector", "language")  # the family registry's part names (`ModelFamily.part_of`)
ALL_LINEAR = "all-linear"  # PEFT's shorthand; here it means "every linear layer of the parts that get LoRA"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_QUANT_STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
PART_LR_KEYS = {"vision": "vision_tower_lr", "projector": "projector_lr", "language": "language_model_lr"}
PART_NAMES = {"vision": "vision tower", "projector": "projector", "language": "language model"}


# --------------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------------
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
        return _DTYPES[model_args.dtype]
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


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def load_processor(
    model_args: ModelConfig,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
):
    from transformers import AutoProcessor

    def load(**kwargs):
        return AutoProcessor.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )

    processor = load()
    pixels = {key: value for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if value}
    if pixels and not set_pixel_budget(processor, min_pixels, max_pixels):
        processor = load(**pixels)  # a processor that takes the budget only as keywords
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
        logger.info("The tokenizer has no pad token; padding with eos %r.", processor.tokenizer.eos_token)
    fill_missing_chat_template(processor)  # PaliGemma, Florence-2 ship none (vlm_recipes.chat_templates)
    return processor


class ModelNotAvailableError(ValueError):
    """`model_name_or_path` cannot be loaded; the message names it, why, and what to do (one line, exit 2)."""


def _looks_like_a_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or "\\" in name


def check_model_available(model_name_or_path: str, revision: str | None = None, timeout: float = 10.0) -> str:
    """Stop in seconds, with the model id and the fix, when the model cannot be loaded; returns where it comes from
    (`local directory`, `local cache`, `hub`).

    Why: `from_pretrained` on an id the hub does not know, or with the hub unreachable, retries for minutes
    (148 s measured offline) and ends in chained tracebacks whose last line names neither the id nor a way on. One
    metadata request with a short timeout tells the cases apart first; a model already in the local cache needs none.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    name = str(model_name_or_path)
    key = f"`model_name_or_path: {name}`"
    if Path(name).expanduser().is_dir():
        if not (Path(name).expanduser() / "config.json").is_file():
            raise ModelNotAvailableError(f"{key}: the directory has no config.json; is it a saved model?")
        return "local directory"
    if _looks_like_a_path(name):
        raise ModelNotAvailableError(f"{key}: no such directory, and not a hub id (`organization/name`).")
    download = f"download it first (`hf download {name}`), or set `model_name_or_path` to a local directory"
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return "local cache"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotAvailableError(
            f"{key} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1): {download}."
        )
    try:
        HfApi(endpoint=constants.ENDPOINT).model_info(name, revision=revision, timeout=timeout)
    except GatedRepoError:
        raise ModelNotAvailableError(
            f"{key} is gated: accept its terms on its hub page, then log in (`hf auth login`) or set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotAvailableError(
            f"{key} is neither a local directory nor a model on the Hugging Face hub: check it for a typo; a private "
            "model needs a login (`hf auth login` or HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise ModelNotAvailableError(f"{key}: the hub has no revision {revision!r} of it.") from None
    except Exception as error:  # noqa: BLE001 - any other failure means the hub could not answer
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ModelNotAvailableError(
            f"{key}: the Hugging Face hub ({constants.ENDPOINT}) could not be reached ({reason}): check the network, "
            f"or {download}."
        ) from None
    return "hub"


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None) -> bool:
    """Give an area-resizing (Qwen-VL) processor the pixel budget as its `size`; False for other processors.

    Why not `from_pretrained(min_pixels=..., max_pixels=...)`: transformers 5.24 keeps them as attributes that it
    then passes to every processor call, which warns that `min_pixels`/`max_pixels` are deprecated there (once per
    run, on every Qwen run). `size={"shortest_edge": min_pixels, "longest_edge": max_pixels}` is the same budget in
    the form it asks for, and it is what `save_pretrained` writes into each checkpoint.
    """
    changed = False
    for name in ("image_processor", "video_processor"):
        component = getattr(processor, name, None)
        size = getattr(component, "size", None)
        if component is None or not hasattr(component, "merge_size") or size is None:
            continue
        current = dict(size) if not hasattr(size, "__dataclass_fields__") else dataclasses.asdict(size)
        if "shortest_edge" not in current or "longest_edge" not in current:
            continue
        component.size = {
            "shortest_edge": min_pixels or current["shortest_edge"],
            "longest_edge": max_pixels or current["longest_edge"],
        }
        changed = True
    return changed


def quantization_config_for(model_args: ModelConfig, training_args=None):
    """The `BitsAndBytesConfig` of the recipe, or None without `load_in_4bit` / `load_in_8bit`.

    Ours rather than TRL's `get_quantization_config`, which passes the `dtype` string ("float32", "auto") as the
    compute dtype: here the compute dtype is the training dtype (`training_dtype`), and under ZeRO-3 an unset
    `bnb_4bit_quant_storage` becomes that dtype (see `check_quantization_for_zero3`).
    """
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        compute = training_dtype(model_args, training_args)
        storage = model_args.bnb_4bit_quant_storage
        if storage is None and training_args is not None and deepspeed_zero_stage(training_args) == 3:
            storage = str(compute).removeprefix("torch.")
            logger.info("DeepSpeed ZeRO-3: storing 4-bit weights as %s (`bnb_4bit_quant_storage`).", storage)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=storage or "uint8",
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _quantized_device_map(training_args) -> dict[str, int | str] | None:
    """bitsandbytes quantises weights as they are placed, so they are placed at load time: each process puts the
    whole model on its own GPU (DDP and ZeRO shard later). Without CUDA, None lets the quantizer place it on CPU."""
    if training_args is not None and getattr(training_args, "use_cpu", False):
        return {"": "cpu"} if torch.cuda.is_available() else None
    if not torch.cuda.is_available():
        return None
    # ZeRO-3 and FSDP place (and shard) the weights themselves; transformers refuses a device_map under ZeRO-3.
    from transformers.integrations import is_deepspeed_zero3_enabled

    fsdp = bool(training_args is not None and getattr(training_args, "fsdp", None))
    fsdp = fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if is_deepspeed_zero3_enabled() or fsdp:
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_model(model_args: ModelConfig, training_args=None):
    """`AutoModelForImageTextToText` (or the family's own auto class) with the recipe's dtype, attention, quantisation and frozen parts.

    `training_args` (the run's `SFTConfig`) gives `trust_remote_code`, the training dtype (4-bit compute dtype) and
    the DeepSpeed set-up; the checks of `check_training_setup` run before anything loads.
    """
    import transformers

    trust_remote_code = bool(getattr(training_args, "trust_remote_code", False))
    if training_args is not None:
        check_training_setup(model_args, training_args)
    try:
        family = detect_family(model_args.model_name_or_path)
    except UnknownFamilyError:
        family = None  # loading works for any model; what needs the parts says so (peft_config_for, freeze_parts)
    if family is not None and family.trust_remote_code and not trust_remote_code:
        raise ValueError(
            f"{model_args.model_name_or_path} ({family.name}) needs remote code: set `trust_remote_code: true`."
        )
    if getattr(model_args, "lora_vision", False) and not model_args.use_peft:
        logger.warning(
            "`lora_vision: true` has no effect without `use_peft: true`; in full fine-tuning the vision tower and "
            "projector train unless `freeze_vision_tower` / `freeze_projector` are set."
        )

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else _DTYPES[model_args.dtype]
    quantization_config = quantization_config_for(model_args, training_args)
    # The family's auto class (Phi-3-vision's remote code registers AutoModelForCausalLM only).
    model_class = (
        getattr(transformers, family.auto_model_class) if family else transformers.AutoModelForImageTextToText
    )
    model = model_class.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        device_map=_quantized_device_map(training_args) if quantization_config is not None else None,
        quantization_config=quantization_config,
    )
    if quantization_config is not None:
        # No `peft.prepare_model_for_kbit_training` (TRL's SFTTrainer no longer calls it either): it upcasts every
        # non-quantised weight (embeddings, norms, the whole vision stem) to float32, which costs memory and breaks
        # the single dtype ZeRO-3 needs; input gradients and checkpointing are set up by `VLMSFTTrainer`. Note that
        # TRL casts the trainable (LoRA) weights of a quantised model to bfloat16, as the QLoRA paper does.
        logger.info("Loaded %s quantised: %s.", type(model).__name__, _quantization_summary(quantization_config))
        release_checkpoint_mapping(model)
        keep_4bit_outputs_in_autocast_dtype(model)
        keep_4bit_weights_unpacked_on_cpu(model)
    freeze_parts(model, model_args)
    return model


def release_checkpoint_mapping(model) -> None:
    """Copy a quantised model's unquantised CPU weights out of the checkpoint's memory map, so the map is closed.

    Why: transformers loads a checkpoint whose dtype matches without copying; the tensors are views of one memory map
    of the whole `.safetensors` file. Quantising reads every weight through that map, and the few weights left
    unquantised (embeddings, norms, the vision tower) keep the whole map, and so every page read, in the process's
    resident memory. On a CPU run of a random Qwen2-VL with a 6 x 1536 language model that was 284 MiB of file pages
    held for 6 MiB of weights, more than the 4-bit weights themselves. On a GPU the weights are copied to the device
    and nothing here applies.
    """
    import bitsandbytes as bnb

    quantised = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            # Meta and device tensors have no map behind them.
            if not isinstance(tensor, quantised) and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def keep_4bit_outputs_in_autocast_dtype(model) -> int:
    """Make each bitsandbytes 4-bit linear of `model` return autocast's dtype, as `nn.Linear` does. Returns how many
    layers it hooked.

    Why ours: `bnb.nn.Linear4bit` casts its input to its compute dtype and its output back to the input's dtype, while
    autocast makes `nn.Linear` return the autocast dtype whatever its input. CUDA's autocast runs `layer_norm` in
    float32, so under bf16 mixed precision every 4-bit linear after an `nn.LayerNorm` returns float32, and the
    float32 spreads along the residual stream: in QLoRA, Qwen2-VL's vision tower (and the CLIP, SigLIP and DaViT
    towers, and Florence-2's language model) ran in float32 from its first block on, with twice the activation memory
    of bf16 LoRA. The hook casts a float32 input to the autocast dtype before the layer when that is the layer's
    compute dtype: the layer would make the same cast itself, so its product is unchanged and its output stays in the
    autocast dtype, as `nn.Linear`'s does. What follows the layer (residual additions, the next norm's input) then
    runs in bf16 as with bf16 LoRA, so QLoRA's numerics change there. Outside autocast nothing changes. PEFT's LoRA
    wrappers keep the hooked layer as their `base_layer`. Not for 8-bit: `Linear8bitLt` computes in float16 and
    returns its input's dtype too, but a cast to the autocast dtype (bf16) before it would change its product.
    """
    import bitsandbytes as bnb

    hooked = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not has_4bit_autocast_hook(module):
            module.register_forward_pre_hook(_float32_input_to_autocast_dtype)
            hooked += 1
    return hooked


def has_4bit_autocast_hook(module) -> bool:
    """Whether `keep_4bit_outputs_in_autocast_dtype` hooked this layer."""
    return any(hook is _float32_input_to_autocast_dtype for hook in forward_pre_hooks(module))


def _float32_input_to_autocast_dtype(module, args):
    x = args[0] if args else None
    if not torch.is_tensor(x) or x.dtype != torch.float32:
        return None
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return None
    dtype = torch.get_autocast_dtype(device_type)
    if module.compute_dtype != dtype:
        return None
    return (x.to(dtype), *args[1:])


def keep_4bit_weights_unpacked_on_cpu(model) -> int:
    """Keep bitsandbytes from repacking the 4-bit weights of `model` for its CPU inference kernel. Returns how many
    4-bit linear layers it set.

    Why: bitsandbytes' CPU path rewrites a 4-bit weight in place, in eval mode, into the layout of its AVX512-BF16
    kernel; tiny models then fail at their first evaluation, and a repacked layer passes no gradient back when
    training goes on, merges and saves wrong weights, and computes in bfloat16 (the versions and the details:
    `vlm_recipes._compat.turn_off_4bit_cpu_repacking`). GPU runs never take that path. The cost: CPU inference of
    4-bit models goes without that kernel.
    """
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        turn_off_4bit_cpu_repacking(layer)
    return len(layers)


def _quantization_summary(config) -> str:
    if config.load_in_4bit:
        return (
            f"4-bit {config.bnb_4bit_quant_type}, double quantisation {config.bnb_4bit_use_double_quant}, compute "
            f"{config.bnb_4bit_compute_dtype}, storage {config.bnb_4bit_quant_storage}"
        )
    return "8-bit"


# --------------------------------------------------------------------------------------------------------------------
# Parts: freezing, LoRA targets
# --------------------------------------------------------------------------------------------------------------------
def parts_to_freeze(model_args: ModelConfig) -> set[str]:
    frozen = set()
    if getattr(model_args, "freeze_vision_tower", False):
        frozen.add("vision")
    if getattr(model_args, "freeze_projector", False):
        frozen.add("projector")
    return frozen


def freeze_parts(model, model_args: ModelConfig) -> dict[str, int]:
    """Set `requires_grad=False` on the parts the recipe freezes; returns {part: frozen parameter count}.

    This is what freezing means in full fine-tuning. With LoRA every base weight is frozen anyway, and a frozen part
    gets no LoRA either (`lora_target_modules_for`).
    """
    frozen_parts = parts_to_freeze(model_args)
    if not frozen_parts:
        return {}
    family = family_of_model(model)
    counts = dict.fromkeys(sorted(frozen_parts), 0)
    tensors = dict.fromkeys(sorted(frozen_parts), 0)
    for name, parameter in model.named_parameters():
        part = family.part_of(name)
        if part in frozen_parts:
            parameter.requires_grad_(False)
            counts[part] += parameter_count(parameter)
            tensors[part] += 1
    for part, count in tensors.items():
        if count == 0:
            raise ValueError(
                f"`{'freeze_vision_tower' if part == 'vision' else 'freeze_projector'}: true` but {family.name} has no "
                f"{PART_NAMES[part]} parameters under {getattr(family, f'{part}_prefixes')}; fix the family entry "
                "in vlm_recipes.families."
            )
    logger.info(
        "Frozen: %s.", ", ".join(f"{PART_NAMES[part]} ({count:,} parameters)" for part, count in counts.items())
    )
    return counts


def _lora_parts(model_args: ModelConfig) -> set[str]:
    """The parts that may get LoRA: the language model, plus the vision tower and projector with `lora_vision`
    unless the recipe freezes them."""
    parts = {"language"}
    if getattr(model_args, "lora_vision", False):
        parts |= {"vision", "projector"} - parts_to_freeze(model_args)
    return parts


def _name_pattern(module_name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model\\.layers\\.\\d+\\.mlp\\.up_proj`: one pattern for every block."""
    return r"\.".join(r"\d+" if segment.isdigit() else re.escape(segment) for segment in module_name.split("."))


def _exact_regex(chosen: Iterable[str], all_names: list[str]) -> str:
    """A regex (PEFT full-matches a string `target_modules`) that matches exactly `chosen` among `all_names`.

    Layer indices are folded into `\\d+`, so the regex stays short for deep models; a folded pattern that would
    also match an unchosen module (e.g. an activation `mlp.1` between `mlp.0` and `mlp.2`) is spelled out instead.
    """
    chosen = list(dict.fromkeys(chosen))
    chosen_set = set(chosen)
    by_pattern: dict[str, list[str]] = {}
    for name in chosen:
        by_pattern.setdefault(_name_pattern(name), []).append(name)
    alternatives = []
    for pattern, members in by_pattern.items():
        compiled = re.compile(pattern)
        if all(name in chosen_set for name in all_names if compiled.fullmatch(name)):
            alternatives.append(pattern)
        else:
            alternatives.extend(re.escape(member) for member in members)
    # Siblings share their parent: `layers\.\d+\.mlp\.(?:gate_proj|up_proj)`.
    by_parent: dict[str, list[str]] = {}
    for alternative in alternatives:
        parent, _, leaf = alternative.rpartition(r"\.")
        by_parent.setdefault(parent, []).append(leaf)
    pieces = []
    for parent, leaves in by_parent.items():
        leaf = leaves[0] if len(leaves) == 1 else f"(?:{'|'.join(leaves)})"
        pieces.append(rf"{parent}\.{leaf}" if parent else leaf)
    regex = "|".join(pieces)
    matched = {name for name in all_names if re.fullmatch(regex, name)}
    if matched != chosen_set:  # cannot happen by construction; a wrong adapter would be worse than a crash
        raise AssertionError(f"LoRA target regex mismatch: {sorted(matched ^ chosen_set)[:5]}")
    return regex


def _explicit_targets(model, targets, modules_to_save) -> list[str]:
    """Module names that `lora_target_modules` selects, matched the way PEFT matches them."""
    from peft import LoraConfig

    # TRL turns a one-item list into a string, which PEFT reads as a regex that a bare name (`q_proj`) never
    # full-matches; a plain name stays a name here.
    if isinstance(targets, str) and re.fullmatch(r"[\w\-]+", targets):
        targets = [targets]
    config = LoraConfig(target_modules=targets, modules_to_save=modules_to_save)
    return [name for name, _ in model.named_modules() if name and peft_target_matches(config, name)]


def lora_target_modules_for(model, model_args: ModelConfig) -> str:
    """PEFT `target_modules` for the recipe: a regex that names exactly the chosen modules of `model`.

    - Parts: the language model; the vision tower and projector only with `lora_vision: true` (and not frozen).
    - Layers: every linear layer of those parts (bitsandbytes' `Linear4bit`/`Linear8bitLt` included, they subclass
      `torch.nn.Linear`) except the output head, when `lora_target_modules` is unset or `all-linear`. PEFT's own
      `all-linear` would also take the vision tower's layers; here it means all linear layers of the chosen parts.
    - An explicit `lora_target_modules` (names or a regex, PEFT's matching) picks layers within those parts: matches
      in other parts are left out with a warning (bare names like `gate_proj` also hit Qwen2.5-VL's vision blocks).
    """
    family = family_of_model(model)
    output_embeddings = model.get_output_embeddings()
    named_modules = dict(model.named_modules())
    all_names = [name for name in named_modules if name]
    parts = _lora_parts(model_args)
    requested = model_args.lora_target_modules
    if requested is None or requested == ALL_LINEAR or requested == [ALL_LINEAR]:
        saved = model_args.lora_modules_to_save or []
        candidates = [
            name
            for name, module in named_modules.items()
            if isinstance(module, torch.nn.Linear)
            and module is not output_embeddings
            # a module trained in full (`lora_modules_to_save`) cannot also hold an adapter; PEFT's matching
            and not any(re.match(rf"(^|.*\.){saved_name}($|\..*)", name) for saved_name in saved)
        ]
        source = "all linear layers"
    else:
        candidates = _explicit_targets(model, requested, model_args.lora_modules_to_save)
        source = f"`lora_target_modules: {requested}`"
        if not candidates:
            raise ValueError(f"{source} matches no module of {type(model).__name__}; check the layer names.")
        head = [name for name in candidates if named_modules[name] is output_embeddings]
        if head:
            logger.warning(
                "%s matches the output head %s: left out (train it with `lora_modules_to_save`).", source, head
            )
            candidates = [name for name in candidates if name not in head]

    chosen = [name for name in candidates if family.part_of(name) in parts]
    left_out: dict[str, int] = {}
    for name in candidates:
        part = family.part_of(name)
        if part not in parts:
            left_out[str(part)] = left_out.get(str(part), 0) + 1
    if not chosen:
        raise ValueError(
            f"{source} selects no layer in the parts that get LoRA ({', '.join(sorted(parts))}) of {family.name}: "
            "set `lora_target_modules` to layers of the language model, or `lora_vision: true` for vision layers."
        )
    by_part = {part: sum(1 for name in chosen if family.part_of(name) == part) for part in PARTS}
    logger.info(
        "LoRA on %s: %s.",
        source,
        ", ".join(f"{count} module(s) in the {PART_NAMES[part]}" for part, count in by_part.items() if count),
    )
    if left_out:
        message = ", ".join(
            f"{count} in the {PART_NAMES.get(part, 'rest of the model')}" for part, count in left_out.items()
        )
        why = "the vision tower and projector get LoRA only with `lora_vision: true`, and not when frozen"
        if requested is None or requested == ALL_LINEAR or requested == [ALL_LINEAR]:
            logger.info("No LoRA on %d linear layers (%s): %s.", sum(left_out.values()), message, why)
        else:
            logger.warning("%s also matches %s, left out: %s.", source, message, why)
    return _exact_regex(chosen, all_names)


def peft_config_for(model, model_args: ModelConfig):
    """TRL's LoRA config from the recipe, with targets chosen per part (`lora_target_modules_for`)."""
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        return None
    if model_args.lora_target_parameters is not None and model_args.lora_target_modules is None:
        logger.info("LoRA on `lora_target_parameters` only: %s.", model_args.lora_target_parameters)
        return peft_config
    try:
        peft_config.target_modules = lora_target_modules_for(model, model_args)
    except UnknownFamilyError:
        if model_args.lora_target_modules is None or model_args.lora_target_modules == ALL_LINEAR:
            raise
        logger.warning(
            "Unknown model family: `lora_target_modules: %s` is passed to PEFT unchecked (it may reach the vision "
            "tower). Add the family to vlm_recipes.families to target by part.",
            model_args.lora_target_modules,
        )
    return peft_config


def part_learning_rates(model_args: ModelConfig) -> dict[str, float | None]:
    """{part: the recipe's learning rate for it, or None for `learning_rate`}."""
    return {part: getattr(model_args, key, None) for part, key in PART_LR_KEYS.items()}


def parameter_count(parameter) -> int:
    """Weights of a parameter: a bitsandbytes 4-bit parameter packs two per byte and keeps its shape aside; a
    ZeRO-3 partitioned parameter is empty here and keeps its size as `ds_numel`."""
    if getattr(parameter, "ds_numel", None) is not None:
        return int(parameter.ds_numel)
    quant_state = getattr(parameter, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()
