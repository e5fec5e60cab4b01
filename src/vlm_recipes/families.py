"""Model-family registry: one entry per VLM family, with how to recognise it and where its parts live.

The parts of a VLM (vision tower, projector, language model) sit under different module names in each family, and
bare layer names do not tell them apart (Qwen2.5-VL's vision blocks have `gate_proj` too). Everything that treats
the parts differently (LoRA targets, freezing, per-part learning rates) asks this registry instead of guessing.

Module prefixes are the names of `model.named_modules()` of the model as `AutoModelForImageTextToText` loads it
(transformers 5 layout). A module belongs to the part whose prefix is the longest match, so a projector nested in
the vision tower (Qwen's `model.visual.merger`) counts as projector. The prefixes of every family that transformers
ships are checked against a tiny model of that family by `tests/unit/test_families.py`.

A family is recognised from:
- a local directory: `config.json`'s `model_type`; a LoRA adapter's `adapter_config.json` (its base model, in turn);
  failing both, the `processor_class` of its processor files;
- anything else, as a hub name: each family's `hub_pattern` (the patterns are exclusive: one name, one family).

Adding a family: one `ModelFamily` below (and a `TinyFamily` in `vlm_recipes.tiny` to test it offline).
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
    "LAYOUTS",
    "ModelFamily",
    "UnknownFamilyError",
    "detect_family",
    "family_of_model",
    "family_of_processor",
    "model_class_for",
    "module_part",
    "processor_layout",
]

PARTS = ("vision", "projector", "language")

# How a family's model consumes one training conversation:
# - `causal`: one decoder-only sequence, the whole conversation rendered by the chat template (most VLMs);
# - `prefix_suffix`: one sequence of a prompt (prefix, attended bidirectionally) and an answer (suffix, causal),
#   told apart by `token_type_ids` (PaliGemma);
# - `encoder_decoder`: the prompt goes to the encoder, the answer is the decoder's target (Florence-2).
LAYOUTS = ("causal", "prefix_suffix", "encoder_decoder")


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
        processor_classes (`tuple[str, ...]`): class names of its processors (`processor_class` in its files).
        layout (`str`, defaults to `"causal"`): how the model consumes a conversation, one of `LAYOUTS`.
        chat_template (`str`, *optional*): name of a template in `vlm_recipes.chat_templates` in the family's own
            prompt format, for checkpoints that ship no chat template (PaliGemma, Florence-2).
        notes (`str`): what a user should know (untested paths, checkpoints to prefer).
        auto_model_class (`str`, defaults to `"AutoModelForImageTextToText"`): the transformers auto class that
            loads the family's checkpoints (remote-code families register theirs elsewhere, e.g. Phi-3-vision's
            `AutoModelForCausalLM`).
    """

    name: str
    model_types: tuple[str, ...]
    hub_pattern: str
    vision_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]
    language_prefixes: tuple[str, ...]
    image_tokens: tuple[str, ...]
    trust_remote_code: bool = False
    processor_classes: tuple[str, ...] = ()
    layout: str = "causal"
    chat_template: str | None = None
    notes: str = ""
    auto_model_class: str = "AutoModelForImageTextToText"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"Family {self.name!r}: `layout` must be one of {LAYOUTS}, got {self.layout!r}.")

    def part_of(self, module_name: str) -> str | None:
        """`vision`, `projector`, `language`, or None for a module outside all three (e.g. the root)."""
        name = _strip_wrappers(module_name)
        best, best_length = None, -1
        for part, prefixes in zip(PARTS, (self.vision_prefixes, self.projector_prefixes, self.language_prefixes)):
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_length:
                    best, best_length = part, len(prefix)
        return best


_QWEN_PARTS = {
    "vision_prefixes": ("model.visual",),
    "projector_prefixes": ("model.visual.merger",),
    "language_prefixes": ("model.language_model", "lm_head"),
    "image_tokens": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
}
# LLaVA-1.5 and PaliGemma: a vision tower, a projector and a language model side by side under `model`.
_LLAVA_PARTS = {
    "vision_prefixes": ("model.vision_tower",),
    "projector_prefixes": ("model.multi_modal_projector",),
    "language_prefixes": ("model.language_model", "lm_head"),
}

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        # `qwen2[-_]?vl` cannot match "qwen2.5-vl" or "qwen2_5_vl": the character after "qwen2" is "." or "_5".
        ModelFamily(
            name="qwen2_vl",
            model_types=("qwen2_vl",),
            hub_pattern=r"qwen2[-_]?vl",
            processor_classes=("Qwen2VLProcessor",),
            **_QWEN_PARTS,
        ),
        ModelFamily(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            hub_pattern=r"qwen2[._]5[-_]?vl",
            processor_classes=("Qwen2_5_VLProcessor",),
            **_QWEN_PARTS,
        ),
        # Qwen3-VL adds "deepstack" mergers that feed vision features of inner blocks into early decoder layers;
        # they project vision features into the language model's width, so they are projector. The MoE variant
        # (Qwen3-VL-30B-A3B, `qwen3_vl_moe`) has the same module tree.
        ModelFamily(
            name="qwen3_vl",
            model_types=("qwen3_vl", "qwen3_vl_moe"),
            hub_pattern=r"qwen3[-_]?vl",
            processor_classes=("Qwen3VLProcessor",),
            vision_prefixes=("model.visual",),
            projector_prefixes=("model.visual.merger", "model.visual.deepstack_merger_list"),
            language_prefixes=("model.language_model", "lm_head"),
            image_tokens=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
        ),
        ModelFamily(
            name="idefics3",
            model_types=("idefics3", "smolvlm"),
            hub_pattern=r"smolvlm|idefics3",
            processor_classes=("Idefics3Processor", "SmolVLMProcessor"),
            vision_prefixes=("model.vision_model",),
            projector_prefixes=("model.connector",),
            language_prefixes=("model.text_model", "lm_head"),
            image_tokens=("<image>", "<fake_token_around_image>", "<global-img>"),
        ),
        # Idefics2's connector is a projection plus a perceiver resampler (64 latents per image).
        ModelFamily(
            name="idefics2",
            model_types=("idefics2",),
            hub_pattern=r"idefics2",
            processor_classes=("Idefics2Processor",),
            vision_prefixes=("model.vision_model",),
            projector_prefixes=("model.connector",),
            language_prefixes=("model.text_model", "lm_head"),
            image_tokens=("<image>", "<fake_token_around_image>"),
        ),
        # LLaVA-1.5 only: "llava-v1.6" / "llava-next" / "llava-onevision" are other model types with other
        # processors (image tiling), not in the registry yet. BakLLaVA is a `llava` model.
        ModelFamily(
            name="llava",
            model_types=("llava",),
            hub_pattern=r"llava[-_]?v?1\.5|bakllava",
            processor_classes=("LlavaProcessor",),
            image_tokens=("<image>",),
            **_LLAVA_PARTS,
        ),
        # PaliGemma (and PaliGemma 2, the same `paligemma` model type) is a prefix-LM: the prompt is attended
        # bidirectionally, the answer causally, told apart by `token_type_ids`; its checkpoints ship no chat template.
        ModelFamily(
            name="paligemma",
            model_types=("paligemma",),
            hub_pattern=r"paligemma",
            processor_classes=("PaliGemmaProcessor",),
            image_tokens=("<image>",),
            layout="prefix_suffix",
            chat_template="paligemma",
            notes="Prefix/suffix training (token_type_ids); one prompt and one answer per sample.",
            **_LLAVA_PARTS,
        ),
        # Florence-2 is an encoder-decoder (DaViT vision tower, BART language model). The `model.*` prefixes are
        # the transformers-native layout (florence-community/* checkpoints); the bare ones are the layout of
        # microsoft/Florence-2-* under `trust_remote_code` (from its modeling file; not testable offline).
        ModelFamily(
            name="florence2",
            model_types=("florence2",),
            hub_pattern=r"florence[-_]?2",
            processor_classes=("Florence2Processor",),
            vision_prefixes=("model.vision_tower", "vision_tower"),
            projector_prefixes=(
                "model.multi_modal_projector",
                "image_projection",
                "image_proj_norm",
                "image_pos_embed",
                "visual_temporal_embed",
            ),
            language_prefixes=("model.language_model", "lm_head", "language_model"),
            image_tokens=("<image>",),
            layout="encoder_decoder",
            chat_template="florence2",
            notes=(
                "Encoder-decoder: the prompt feeds the encoder, the answer is the decoder's target; one image, one "
                "prompt and one answer per sample. Use the transformers-native florence-community/* checkpoints."
            ),
        ),
        # Phi-3-vision / Phi-3.5-vision ship their own modeling code (`Phi3VForCausalLM`, registered for
        # `AutoModelForCausalLM`, not `AutoModelForImageTextToText`). Prefixes from that code: the CLIP tower is
        # `img_processor`, the projector `img_projection` plus the learned separators `glb_GN` / `sub_GN`. The
        # n-th image of a prompt is written `<|image_n|>`. Not testable offline (no tiny model without the code).
        ModelFamily(
            name="phi3_v",
            model_types=("phi3_v",),
            hub_pattern=r"phi-?3(\.5)?-vision",
            processor_classes=("Phi3VProcessor",),
            vision_prefixes=("model.vision_embed_tokens.img_processor",),
            projector_prefixes=(
                "model.vision_embed_tokens.img_projection",
                "model.vision_embed_tokens.glb_GN",
                "model.vision_embed_tokens.sub_GN",
            ),
            language_prefixes=("model.embed_tokens", "model.layers", "model.norm", "lm_head"),
            image_tokens=("<|image_1|>",),
            trust_remote_code=True,
            auto_model_class="AutoModelForCausalLM",
            notes=(
                "Remote code (`trust_remote_code: true`), loaded by AutoModelForCausalLM; untested offline (only "
                "detection, prefixes and the choice of loading class are tested)."
            ),
        ),
    )
}

# PEFT wraps the model as `base_model.model.<name>`; module names are compared without that wrapper.
_WRAPPER_PREFIX = re.compile(r"^(base_model\.model\.)+")

_HOW_TO_ADD = (
    "Add a `ModelFamily` entry to `vlm_recipes.families.FAMILIES` with its `model_type` (from config.json), a "
    "`hub_pattern`, the module prefixes of its vision tower, projector and language model (from "
    "`[name for name, _ in model.named_modules()]` of the model that AutoModelForImageTextToText loads) and its "
    "image tokens; then a `TinyFamily` in `vlm_recipes.tiny` so that the tests check it offline."
)


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
        + _HOW_TO_ADD
    )


def family_of_model(model) -> ModelFamily:
    """The family of a loaded model (PEFT-wrapped or not), from its config's `model_type`."""
    config = model.config
    return _family_for_model_type(config.model_type, f"{type(model).__name__}")


def family_of_processor(processor) -> ModelFamily | None:
    """The family whose processor class `processor` is, or None for a processor class the registry does not list."""
    class_name = type(processor).__name__
    for family in FAMILIES.values():
        if class_name in family.processor_classes:
            return family
    return None


def processor_layout(processor) -> str:
    """How the model behind `processor` consumes a conversation (see `LAYOUTS`); `causal` when not registered."""
    family = family_of_processor(processor)
    return family.layout if family is not None else "causal"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UnknownFamilyError(f"{path} is not valid JSON ({error}); cannot tell the model family.") from error


def _family_from_processor_files(path: Path) -> ModelFamily | None:
    """A processor-only directory (no config.json) still names its processor class."""
    for file_name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (path / file_name).is_file():
            class_name = _read_json(path / file_name).get("processor_class")
            for family in FAMILIES.values():
                if class_name in family.processor_classes:
                    return family
    return None


def _family_from_hub_name(name: str) -> ModelFamily:
    matches = [family for family in FAMILIES.values() if re.search(family.hub_pattern, name, flags=re.IGNORECASE)]
    if len(matches) > 1:
        raise UnknownFamilyError(
            f"{name!r} matches the hub patterns of several families ({[family.name for family in matches]}); "
            "make their `hub_pattern`s exclusive in `vlm_recipes.families.FAMILIES`."
        )
    if not matches:
        raise UnknownFamilyError(
            f"Cannot tell the model family of {name!r}: no local directory by that name and no family's hub pattern "
            f"matches. Known families: {sorted(FAMILIES)}. " + _HOW_TO_ADD
        )
    return matches[0]


def detect_family(name_or_path: str | Path) -> ModelFamily:
    """The family of a hub name, a local model directory, or a LoRA adapter directory.

    A local directory is read for `config.json` (`model_type`) or `adapter_config.json` (its base model, detected
    in turn), then for the `processor_class` of its processor files; anything else is matched as a hub name against
    each family's `hub_pattern`.

    Raises:
        UnknownFamilyError: no family matches; the message says what to add to the registry.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return _family_from_hub_name(str(name_or_path))
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if "model_type" in config:
            return _family_for_model_type(config["model_type"], str(path / "config.json"))
    if (path / "adapter_config.json").is_file():
        base = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise UnknownFamilyError(
                f"{path / 'adapter_config.json'} names no `base_model_name_or_path`; set it to the base model."
            )
        return detect_family(base)
    family = _family_from_processor_files(path)
    if family is not None:
        return family
    raise UnknownFamilyError(
        f"{path} has no config.json with a `model_type`, no adapter_config.json and no processor files naming a "
        "known `processor_class`; is it a model directory?"
    )


def model_class_for(name_or_path: str | Path):
    """The transformers auto class that loads `name_or_path`: its family's (`auto_model_class`), or
    `AutoModelForImageTextToText` for a model of no known family (loading needs no family; what needs the parts
    says so itself)."""
    import transformers

    try:
        family = detect_family(name_or_path)
    except UnknownFamilyError:
        return transformers.AutoModelForImageTextToText
    return getattr(transformers, family.auto_model_class)
