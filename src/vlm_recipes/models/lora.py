"""LoRA targets per part (`peft_config_for`): the language model's linear layers by default; the vision tower and
projector only with `lora_vision: true`, and not when frozen.

Targets come from the family registry's module layout (`vlm_recipes.families`), never from bare layer names, which
also match vision blocks (Qwen2.5-VL's `gate_proj`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from trl import ModelConfig, get_peft_config

from .._compat import peft_target_matches
from ..families import UnknownFamilyError, family_of_model
from .parts import PART_NAMES, PARTS, parts_to_freeze

logger = logging.getLogger(__name__)

__all__ = ["ALL_LINEAR", "lora_target_modules_for", "peft_config_for"]

ALL_LINEAR = "all-linear"  # PEFT's shorthand; here it means "every linear layer of the parts that get LoRA"


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
