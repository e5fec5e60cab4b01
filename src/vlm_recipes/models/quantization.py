"""bitsandbytes quantisation as the recipe asks for it: 4-bit (NF4, double quantisation, compute dtype = training
dtype) or 8-bit (`quantization_config_for`), and what a quantised model needs after loading, each with why:
`release_checkpoint_mapping`, `keep_4bit_outputs_in_autocast_dtype`, `keep_4bit_weights_unpacked_on_cpu`.
"""

from __future__ import annotations

import logging

import torch
from trl import ModelConfig

from .._compat import forward_pre_hooks, turn_off_4bit_cpu_repacking
from .checks import deepspeed_zero_stage, training_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "has_4bit_autocast_hook",
    "keep_4bit_outputs_in_autocast_dtype",
    "keep_4bit_weights_unpacked_on_cpu",
    "quantization_config_for",
    "quantization_summary",
    "release_checkpoint_mapping",
]


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


def quantization_summary(config) -> str:
    """The quantisation of a `BitsAndBytesConfig` in words, for the log."""
    if config.load_in_4bit:
        return (
            f"4-bit {config.bnb_4bit_quant_type}, double quantisation {config.bnb_4bit_use_double_quant}, compute "
            f"{config.bnb_4bit_compute_dtype}, storage {config.bnb_4bit_quant_storage}"
        )
    return "8-bit"
