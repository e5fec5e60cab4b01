"""The model's parts (vision tower, projector, language model) as a recipe treats them: which are frozen
(`freeze_vision_tower`, `freeze_projector`), and the learning rate of each (`vision_tower_lr`, `projector_lr`,
`language_model_lr`; the parameter groups are built by `vlm_recipes.trainer.VLMSFTTrainer`).

Where each part lives in a model comes from the family registry (`vlm_recipes.families`).
"""

from __future__ import annotations

import logging

import torch
from trl import ModelConfig

from ..families import family_of_model

logger = logging.getLogger(__name__)

__all__ = [
    "PARTS",
    "PART_LR_KEYS",
    "PART_NAMES",
    "freeze_parts",
    "parameter_count",
    "part_learning_rates",
    "parts_to_freeze",
]

PARTS = ("vision", "projector", "language")  # the family registry's part names (`ModelFamily.part_of`)
PART_LR_KEYS = {"vision": "vision_tower_lr", "projector": "projector_lr", "language": "language_model_lr"}
PART_NAMES = {"vision": "vision tower", "projector": "projector", "language": "language model"}


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
