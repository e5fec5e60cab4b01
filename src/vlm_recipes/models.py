"""Model and processor loading: `AutoModelForImageTextToText` + `AutoProcessor`, 4-bit/8-bit, LoRA targets."""

from __future__ import annotations

import logging
import re

import torch
from trl import ModelConfig, get_peft_config, get_quantization_config

logger = logging.getLogger(__name__)

__all__ = ["language_model_lora_targets", "load_model", "load_processor", "peft_config_for"]

# Linear layers of a decoder block; the vision tower has layers of the same names (e.g. Qwen2.5-VL's `gate_proj`),
# so targets are anchored on the language model's prefix, not matched by bare name.
DECODER_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_processor(
    model_args: ModelConfig,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
):
    from transformers import AutoProcessor

    kwargs = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    processor = AutoProcessor.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
        logger.info("The tokenizer has no pad token; padding with eos %r.", processor.tokenizer.eos_token)
    return processor


def _quantized_device_map() -> dict[str, int] | None:
    """Quantized weights must be placed at load time: each process puts the whole model on its own GPU."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_model(model_args: ModelConfig, trust_remote_code: bool = False):
    from transformers import AutoModelForImageTextToText

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        device_map=_quantized_device_map() if quantization_config is not None else None,
        quantization_config=quantization_config,
    )
    return model


def _language_model_prefix(model) -> str:
    inner = getattr(model, "model", model)
    for name in ("language_model", "text_model"):
        if hasattr(inner, name):
            return f"model.{name}" if inner is not model else name
    raise ValueError(
        f"Cannot find the language model inside {type(model).__name__} (no `language_model` or `text_model`); "
        "set `lora_target_modules` in the recipe."
    )


def language_model_lora_targets(model) -> str:
    """A PEFT `target_modules` regex for the decoder linear layers of the language model only."""
    prefix = _language_model_prefix(model)
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name.startswith(prefix + ".") and isinstance(module, torch.nn.Linear)
        }
        & set(DECODER_LINEAR_NAMES)
    )
    if not names:
        raise ValueError(f"No linear layers named {DECODER_LINEAR_NAMES} under `{prefix}`; set `lora_target_modules`.")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(names)})$"


def peft_config_for(model, model_args: ModelConfig):
    """TRL's LoRA config, with targets defaulting to the language model's decoder layers (never the vision tower)."""
    peft_config = get_peft_config(model_args)
    if peft_config is not None and model_args.lora_target_modules is None:
        peft_config.target_modules = language_model_lora_targets(model)
    return peft_config
