"""Chat templates for families whose format TRL's `trl/chat_templates/` does not hold.

Where TRL ships a family's original template (Qwen2-VL/2.5-VL/3-VL, SmolVLM, Idefics3), that file is used as is.
For the others this module holds templates written here in each model's own prompt format:

- `llava_1_5`: LLaVA-1.5 (llava-hf/llava-1.5-*-hf), `USER: <image>\\n<text> ASSISTANT: <answer> `. It renders exactly
  what the original template renders (checked against the real processor's template by the tests), generation
  markers included, as in the original.
- `idefics2` (and `idefics2_training`, with generation markers): Idefics2 (HuggingFaceM4/idefics2-8b),
  `User:<image>What is it?<end_of_utterance>\\nAssistant: A cat.<end_of_utterance>\\n`.
- `paligemma`, `florence2`: these checkpoints ship no chat template, since they take a prompt and an answer rather
  than a conversation. The templates render the prompt only (what PaliGemma reads as its prefix, what Florence-2's
  encoder reads); `VisionChatCollator` gives the answer to the model separately (PaliGemma's `suffix`, Florence-2's
  decoder labels). Assistant turns render nothing and `add_generation_prompt` adds nothing.

Templates are Jinja as transformers renders it (`trim_blocks` and `lstrip_blocks` on); content may be a string or a
list of `{"type": "image"}` / `{"type": "text", "text": ...}` items.
"""

from __future__ import annotations

import logging

from ._compat import trl_chat_template_dir

logger = logging.getLogger(__name__)

__all__ = ["OWN_TEMPLATES", "chat_template_text", "fill_missing_chat_template", "trl_chat_template"]

# A message's content as a list of items, whether it was given as a string or as a list.
_ITEMS = (
    "{%- set items = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
    "else message['content'] -%}"
)

_LLAVA_1_5 = (
    "{#- LLaVA-1.5 format: a system message bare, then 'USER: ' / 'ASSISTANT: ' turns; a turn's images first, one "
    "'<image>\\n' each, then its texts, each followed by a space. No end-of-turn token: VisionChatCollator appends "
    "eos_token to assistant turns. -#}"
    "{%- for message in messages -%}" + _ITEMS + "{%- if message['role'] != 'system' -%}"
    "{{- (message['role'] | upper) + ': ' -}}"
    "{%- endif -%}"
    "{%- for item in items if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for item in items if item['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- item['text'] + ' ' -}}{%- endgeneration -%}"
    "{%- else -%}{{- item['text'] + ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def _idefics2(training: bool) -> str:
    # A turn opens with its role, then ':' directly before an image or ': ' before text, and closes with
    # '<end_of_utterance>\n'. The training variant wraps what follows 'Assistant:' in generation markers.
    turn_body = (
        "{%- for item in items -%}"
        "{%- if item['type'] == 'text' -%}{{- item['text'] -}}"
        "{%- elif item['type'] == 'image' -%}{{- '<image>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{{- '<end_of_utterance>\\n' -}}"
    )
    any_turn = "{{- message['role'] | capitalize -}}{{- ':' if items[0]['type'] == 'image' else ': ' -}}" + turn_body
    if training:
        assistant_turn = (
            "{{- 'Assistant:' -}}{%- generation -%}{{- '' if items[0]['type'] == 'image' else ' ' -}}"
            + turn_body
            + "{%- endgeneration -%}"
        )
        any_turn = (
            "{%- if message['role'] == 'assistant' -%}" + assistant_turn + "{%- else -%}" + any_turn + "{%- endif -%}"
        )
    return (
        "{#- Idefics2 format: 'User:<image>text<end_of_utterance>\\n' then 'Assistant: answer<end_of_utterance>\\n'. -#}"
        "{%- for message in messages -%}" + _ITEMS + any_turn + "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
    )


def _prompt_only(description: str, with_images: bool) -> str:
    # The text of each system and user turn, one turn per line; PaliGemma's images all come first (its processor puts
    # "<bos>" after the last image), Florence-2's processor inserts the one image itself.
    images = (
        "{%- for message in messages if message['role'] != 'assistant' -%}" + _ITEMS + ""
        "{%- for item in items if item['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
        "{%- endfor -%}"
        if with_images
        else ""
    )
    return (
        "{#- " + description + " -#}" + images + "{%- set prompt = namespace(texts=[]) -%}"
        "{%- for message in messages if message['role'] != 'assistant' -%}" + _ITEMS + ""
        "{%- set prompt.texts = prompt.texts + [items | selectattr('type', 'equalto', 'text') | map(attribute='text') "
        "| join('')] -%}"
        "{%- endfor -%}"
        "{{- prompt.texts | join('\\n') -}}"
    )


OWN_TEMPLATES: dict[str, str] = {
    "llava_1_5": _LLAVA_1_5,
    "idefics2": _idefics2(training=False),
    "idefics2_training": _idefics2(training=True),
    "paligemma": _prompt_only(
        "PaliGemma prompt (prefix): the images, then the prompt text. PaliGemmaProcessor adds '<bos>' after the "
        "images and '\\n' after the text; the answer is its `suffix`.",
        with_images=True,
    ),
    "florence2": _prompt_only(
        "Florence-2 encoder prompt: the prompt text (free text or a task token such as '<CAPTION>'). "
        "Florence2Processor adds the image, '<s>' and '</s>'; the answer is the decoder's target.",
        with_images=False,
    ),
}


def trl_chat_template(name: str) -> str:
    """Return the text of a chat template that TRL ships (`trl/chat_templates/<name>.jinja`)."""
    path = trl_chat_template_dir() / f"{name}.jinja"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.jinja"))
        raise FileNotFoundError(f"TRL ships no chat template named {name!r} ({path}); available: {available}")
    return path.read_text(encoding="utf-8")


def chat_template_text(name: str, training: bool = False) -> str:
    """A template of ours (`OWN_TEMPLATES`) or TRL's, by name; `training` picks the variant with generation markers.

    Our templates without a `_training` variant serve both: LLaVA-1.5's has markers already, and the prompt-only
    templates render no assistant text to mark.
    """
    if name in OWN_TEMPLATES:
        return OWN_TEMPLATES.get(f"{name}_training", OWN_TEMPLATES[name]) if training else OWN_TEMPLATES[name]
    return trl_chat_template(f"{name}_training" if training else name)


def fill_missing_chat_template(processor) -> None:
    """Give a processor without a chat template its family's template from this module, if the family has one.

    PaliGemma and Florence-2 checkpoints ship none, and transformers' `Florence2Processor` does not reload a saved one
    (its `__init__` names no `chat_template`, so `from_pretrained` drops it). Any other processor is left as it is.
    """
    from .families import family_of_processor

    if getattr(processor, "chat_template", None) is not None:
        return
    family = family_of_processor(processor)
    if family is not None and family.chat_template is not None:
        processor.chat_template = chat_template_text(family.chat_template)
        logger.info("%s has no chat template; using the %s prompt format.", type(processor).__name__, family.name)
