"""Model-family registry: one entry per VLM family, with how to recognise it and where its parts live.

The parts of a VLM (vision tower, projector, language model) sit under different module names in each family, and
bare layer names do not tell them apart (Qwen2.5-VL's vision blocks have `gate_proj` too). Everything that treats
the parts differently (LoRA targets, freezing, per-part learning rates) asks this registry instead of guessing.

Module prefixes are the names of `model.named_modules()` of the model as `AutoModelForImageTextToText` loads it
(transformers 5 layout). A module belongs to the part whose prefix is the longest match, so a projector nested in
the vision tower (Qwen's `model.visual.merger`) counts as projector.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "UnknownFamilyError",
    "detect_family",
    "family_of_model",
    "module_part",
]

PARTS = ("vision", "projector", "language")


class UnknownFamilyError(ValueError):
    """The model's family is not in the registry."""


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    Args:
        name (`str`): registry key, e.g. `qwen2_vl`.
        model_types (`tuple[str, ...]`): the transformers `model_type` values of its `config.json`.
        hub_pattern (`str`): case-insensitive regex that matches its hub names, e.g. `qwen2-vl`.
        vision_prefixes (`tuple[str, ...]`): module-name prefixes of the vision tower.
        projector_prefixes (`tuple[str, ...]`): module-name prefixes of the projector (connector / merger).
        language_prefixes (`tuple[str, ...]`): module-name prefixes of the language model (including `lm_head`).
        image_tokens (`tuple[str, ...]`): the special tokens the processor expands images into.
        trust_remote_code (`bool`): the family needs `trust_remote_code: true`.
    """

    name: str
    model_types: tuple[str, ...]
    hub_pattern: str
    vision_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]
    language_prefixes: tuple[str, ...]
    image_tokens: tuple[str, ...]
    trust_remote_code: bool = False

    def part_of(self, module_name: str) -> str | None:
        """`vision`, `projector`, `language`, or None for a module outside all three (e.g. the root)."""
        name = _strip_wrappers(module_name)
        best, best_length = None, -1
        for part, prefixes in zip(PARTS, (self.vision_prefixes, self.projector_prefixes, self.language_prefixes)):
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_length:
                    best, best_length = part, len(prefix)
        return best


_QWEN_PARTS = dict(
    vision_prefixes=("model.visual",),
    projector_prefixes=("model.visual.merger",),
    language_prefixes=("model.language_model", "lm_head"),
    image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
)

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(name="qwen2_vl", model_types=("qwen2_vl",), hub_pattern=r"qwen2-vl", **_QWEN_PARTS),
        ModelFamily(name="qwen2_5_vl", model_types=("qwen2_5_vl",), hub_pattern=r"qwen2\.5-vl", **_QWEN_PARTS),
        ModelFamily(
            name="idefics3",
            model_types=("idefics3", "smolvlm"),
            hub_pattern=r"smolvlm|idefics3",
            vision_prefixes=("model.vision_model",),
            projector_prefixes=("model.connector",),
            language_prefixes=("model.text_model", "lm_head"),
            image_tokens=("<image>", "<fake_token_around_image>", "<global-img>"),
        ),
    )
}

# PEFT wraps the model as `base_model.model.<name>`; module names are compared without that wrapper.
_WRAPPER_PREFIX = re.compile(r"^(base_model\.model\.)+")


def _strip_wrappers(module_name: str) -> str:
    return _WRAPPER_PREFIX.sub("", module_name)


def module_part(model, module_name: str) -> str | None:
    """The part (`vision`, `projector`, `language` or None) of one of `model`'s modules."""
    return family_of_model(model).part_of(module_name)


def _family_for_model_type(model_type: str, where: str) -> ModelFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnknownFamilyError(
        f"Unknown model family: model_type {model_type!r} ({where}). Known families: {sorted(FAMILIES)}. "
        "Add a `ModelFamily` entry to `vlm_recipes.families.FAMILIES` with its model_type and module prefixes."
    )


def family_of_model(model) -> ModelFamily:
    """The family of a loaded model (PEFT-wrapped or not), from its config's `model_type`."""
    config = model.config
    return _family_for_model_type(config.model_type, f"{type(model).__name__}")


def detect_family(name_or_path: str | Path) -> ModelFamily:
    """The family of a hub name, a local model directory, or a LoRA adapter directory.

    A local directory is read for `config.json` (`model_type`) or `adapter_config.json` (its base model, detected
    in turn); anything else is matched as a hub name against each family's `hub_pattern`.
    """
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            if "model_type" in config:
                return _family_for_model_type(config["model_type"], str(path / "config.json"))
        if (path / "adapter_config.json").is_file():
            adapter = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            base = adapter.get("base_model_name_or_path")
            if not base:
                raise UnknownFamilyError(f"{path / 'adapter_config.json'} names no `base_model_name_or_path`.")
            return detect_family(base)
        raise UnknownFamilyError(
            f"{path} has neither config.json with a `model_type` nor adapter_config.json; is it a model directory?"
        )
    name = str(name_or_path)
    for family in FAMILIES.values():
        if re.search(family.hub_pattern, name, flags=re.IGNORECASE):
            return family
    raise UnknownFamilyError(
        f"Cannot tell the model family of {name!r}: no local directory by that name and no family's hub pattern "
        f"matches. Known families: {sorted(FAMILIES)}. Add a `ModelFamily` entry to `vlm_recipes.families.FAMILIES`."
    )
