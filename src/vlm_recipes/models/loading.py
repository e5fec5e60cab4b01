"""Loading a recipe's model and processor.

- `check_model_available`: whether the model can be loaded at all, answered in seconds before anything else loads;
- `load_processor`: `AutoProcessor` with the recipe's pixel budget, a pad token and a chat template;
- `load_model`: `AutoModelForImageTextToText` (or the family's own auto class) with the recipe's `dtype`,
  `attn_implementation`, `trust_remote_code`, quantisation (`vlm_recipes.models.quantization`) and frozen parts
  (`vlm_recipes.models.parts`), after the checks of `vlm_recipes.models.checks`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from trl import ModelConfig

from ..chat_templates import fill_missing_chat_template
from ..families import UnknownFamilyError, detect_family
from .checks import DTYPES, check_training_setup
from .parts import freeze_parts
from .quantization import (
    keep_4bit_outputs_in_autocast_dtype,
    keep_4bit_weights_unpacked_on_cpu,
    quantization_config_for,
    quantization_summary,
    release_checkpoint_mapping,
)

logger = logging.getLogger(__name__)

__all__ = ["ModelNotAvailableError", "check_model_available", "load_model", "load_processor", "set_pixel_budget"]


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

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else DTYPES[model_args.dtype]
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
        logger.info("Loaded %s quantised: %s.", type(model).__name__, quantization_summary(quantization_config))
        release_checkpoint_mapping(model)
        keep_4bit_outputs_in_autocast_dtype(model)
        keep_4bit_weights_unpacked_on_cpu(model)
    freeze_parts(model, model_args)
    return model
