"""One messages-format collator for every task and model family.

`VisionChatCollator` renders each whole conversation with the processor's own chat template, runs the processor on
images and text together, and supervises the assistant turns only.

Why our own collator rather than TRL's `DataCollatorForVisionLanguageModeling`:
- TRL's assistant-only loss needs `{% generation %}` markers in the chat template; the real Qwen2-VL, SmolVLM and
  LLaVA templates have none. We find each assistant span by rendering conversation prefixes (the prompt up to the
  generation cue, then the prompt plus the assistant turn), which works for any prefix-consistent template and,
  where a template does have markers, gives the same span (checked by the tests).
- TRL truncates over-long vision samples; a cut inside or before the image tokens breaks the model's image/token
  alignment. We never truncate: a too-long sample is an error or is dropped and counted.
- We validate rows (image count against placeholders, missing assistant turn) and name the row in the error.

Character spans become token positions through the processor's own `return_offsets_mapping` and
`return_text_replacement_offsets` (transformers >= 5.18), so the image-token expansion of every family is handled
by the family's processor, not by us.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from jinja2.exceptions import TemplateError
from transformers import ProcessorMixin
from transformers.utils.chat_template_utils import render_jinja_template

from . import family_collation
from ._compat import compiled_chat_template
from .chat_templates import fill_missing_chat_template
from .constants import IGNORE_INDEX, LabelReason
from .data.errors import DataError
from .data.rows import LISTED_BAD_ROWS, row_name
from .families import processor_layout

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "LabelReason", "VisionChatCollator", "normalize_messages", "special_tokens_kwargs"]

# Rendered prompts a collator keeps (`VisionChatCollator._cached_prompt`): with their keys, about twice the text of
# 1024 prompts (2 MB for prompts of 1 KB), in each data-loading worker.
_PROMPT_CACHE_SIZE = 1024
# What lets a chat template render differently from one call to the next: the date (Llama 3.2 Vision), jinja's
# `random` filter and `lipsum` global.
_NONDETERMINISTIC_TEMPLATE = re.compile(r"strftime|random|lipsum")
TOO_LONG_POLICIES = ("error", "drop")
BAD_ROW_POLICIES = ("error", "skip")
ROLES = ("system", "user", "assistant")


@dataclass
class _RenderedRow:
    """One conversation rendered to text, with the character spans that the loss covers."""

    name: str
    text: str
    images: list[Any]
    assistant_spans: list[tuple[int, int]]
    # Filled only for `explain`: (start, end, role) of every message, and where an end-of-turn token was appended.
    message_regions: list[tuple[int, int, str]] = field(default_factory=list)
    added_eos_spans: list[tuple[int, int]] = field(default_factory=list)


def _sample_name(example: dict[str, Any]) -> str:
    """A sample of a batch by its id: its place in the batch says nothing about the data file."""
    row_id = example.get("id")
    return f"sample id {row_id!r}" if row_id is not None else "a sample without an id"


def _image_error_message(example: dict[str, Any], name: str) -> str:
    error = example["image_error"]
    if isinstance(error, dict) and error.get("image") is None:  # a malformed row of a stream, named in `reason`
        return str(error.get("reason"))
    if isinstance(error, dict):
        return f"{name}: image {error.get('image')}: {error.get('reason')}"
    return f"{name}: {error}"


def _normalize_content(content: Any, where: str) -> list[dict[str, Any]]:
    """Return content as a list of typed items; a plain string becomes one text item.

    Some templates (SmolVLM/Idefics3) iterate over `content` and would walk a string character by character.
    """
    if isinstance(content, str):
        return [{"type": "text", "text": content if type(content) is str else str.__str__(content)}]
    if not isinstance(content, list):
        raise DataError(f"{where}: `content` must be a string or a list of items, got {type(content).__name__}.")
    items = []
    for item in content:
        if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
            raise DataError(
                f"{where}: content items must be {{'type': 'image'}} or {{'type': 'text', 'text': ...}}, got {item!r}."
            )
        if item["type"] == "text":
            if not isinstance(item.get("text"), str):
                raise DataError(f"{where}: a text item needs a string `text`, got {item!r}.")
            text = item["text"]
            items.append({"type": "text", "text": text if type(text) is str else str.__str__(text)})  # exact str
        else:
            items.append({"type": "image"})
    return items


def normalize_messages(messages: list[dict[str, Any]], where: str = "messages") -> list[dict[str, Any]]:
    """Messages with every `content` as a list of typed items (what every family's template can render)."""
    return [
        {"role": message["role"], "content": _normalize_content(message["content"], f"{where}, message {turn}")}
        for turn, message in enumerate(messages)
    ]


def _as_int_array(value: Any) -> Any:
    """A padded batch of token ids (a rectangular list of int lists) as one numpy array, other values unchanged.

    Making the tensor from the array is several times faster than `torch.tensor` on nested Python lists, which was
    the largest share of the collator's own time per batch.
    """
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        return value
    width = len(value[0])
    if width == 0 or any(len(row) != width for row in value) or not isinstance(value[0][0], int):
        return value
    return numpy.asarray(value, dtype=numpy.int64)


def _offsets_array(offsets: list[list[tuple[int, int]]]) -> numpy.ndarray:
    """The processor's padded `offset_mapping` (rows of `(start, end)` tuples) as one `(rows, tokens, 2)` array.

    Streamed through `numpy.fromiter`: about twice as fast as `numpy.asarray` on the nested tuples (0.5 against 0.9 ms
    for 8 rows of 573 tokens), which was a visible share of the collator's own time.
    """
    width = len(offsets[0]) if offsets else 0
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(offsets))
    if any(len(row) != width for row in offsets):
        raise ValueError(
            f"offset_mapping rows have {sorted({len(row) for row in offsets})} tokens; expected a padded batch."
        )
    # A total that is not two values per token raises (tokenizers gives pairs; each entry is not checked).
    array = numpy.fromiter(flat, dtype=numpy.int64, count=len(offsets) * width * 2)  # raises if fewer values
    if next(flat, None) is not None:
        raise ValueError("offset_mapping holds entries that are not (start, end) pairs.")
    return array.reshape(len(offsets), width, 2)


def special_tokens_kwargs(tokenizer, texts: list[str]) -> dict[str, bool]:
    """As transformers' own `apply_chat_template`: a template that writes the BOS token must not get a second one."""
    bos = tokenizer.bos_token
    return {"add_special_tokens": False} if bos and all(text.startswith(bos) for text in texts) else {}


class VisionChatCollator:
    """Collate `{"images": [PIL.Image, ...], "messages": [...]}` examples into a training batch.

    Labels are `-100` on padding, on every image token, and on every system, user and template token; every token of
    an assistant turn is supervised, including its end-of-turn token (`<|im_end|>`, `<end_of_utterance>`...), so the
    model learns to stop.

    Args:
        processor (`ProcessorMixin`):
            The model's processor, with a chat template and a fast tokenizer.
        max_length (`int`, *optional*):
            Longest allowed sequence in tokens, image tokens included. `None` allows any length.
        too_long (`str`, defaults to `"error"`):
            What to do with a sample over `max_length`: `"error"` raises, naming the sample and its length; `"drop"`
            leaves it out of the batch and counts it in `num_dropped`. Samples are never truncated.
        add_eos_if_missing (`bool`, defaults to `True`):
            Some templates (LLaVA-1.5) end an assistant turn with no special token, so the model would never learn to
            stop. Then the tokenizer's `eos_token` is appended to each assistant turn (logged once).
        pad_to_multiple_of (`int`, *optional*):
            Pad the batch length to a multiple of this.
        on_bad_row (`str`, defaults to `"error"`):
            What to do with a sample whose image could not be decoded (the dataset's transform,
            `vlm_recipes.data.rows`, marks it with an `image_error` rather than raising): `"error"` raises a
            `DataError` naming the sample's id and the image; `"skip"` leaves it out of its batch and records it in
            `skipped_samples` (id, image, reason). When every sample of a batch is bad, the last good sample this
            collator returned stands in for them (trained on once more, counted in `num_substituted` and logged), so
            that the batch still has supervised tokens; before any good sample has been seen there is none to stand
            in, and it raises.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        too_long: str = "error",
        add_eos_if_missing: bool = True,
        pad_to_multiple_of: int | None = None,
        on_bad_row: str = "error",
    ):
        if too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"`too_long` must be one of {TOO_LONG_POLICIES}, got {too_long!r}.")
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"`on_bad_row` must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}.")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"`max_length` must be positive or None, got {max_length}.")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{type(processor).__name__} has no tokenizer; pass the model's multimodal processor.")
        fill_missing_chat_template(processor)  # PaliGemma, Florence-2: no template of their own
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"{type(processor).__name__} has no chat template; set `processor.chat_template` "
                "(e.g. from `trl/chat_templates/<family>.jinja`) or load the Instruct model's processor."
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("VisionChatCollator needs a fast tokenizer (offset mappings); install `tokenizers`.")
        if tokenizer.pad_token is None:
            raise ValueError("The tokenizer has no pad token; set `processor.tokenizer.pad_token` before collating.")
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.too_long = too_long
        self.add_eos_if_missing = add_eos_if_missing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_dropped = 0
        self.dropped_names: list[str] = []
        self.on_bad_row = on_bad_row
        # Skips and substitutions of this process, as `{"skipped": {...}}` / `{"substituted_by": id}` entries.
        self._skip_entries_here: list[dict[str, Any]] = []
        self._skip_record: Path | None = None
        self._last_good: dict[str, Any] | None = None
        self._warned_added_eos = False
        # PaliGemma (prefix/suffix) and Florence-2 (encoder-decoder) take the prompt and the answer as two inputs,
        # not one rendered conversation: `family_collation.PromptAnswerEncoder` encodes them (called
        # from encode, sample_length and explain).
        self.layout = processor_layout(processor)
        self.prompt_answer = family_collation.PromptAnswerEncoder(self) if self.layout != "causal" else None
        # A processor with its own `apply_chat_template` (SmolVLMProcessor, remote code) is always called through it.
        self._stock_apply = getattr(type(processor), "apply_chat_template", None) is ProcessorMixin.apply_chat_template
        # Special tokens that can close a turn: anything special except what stands for an image.
        image_tokens = {getattr(processor, name, None) for name in ("image_token", "video_token", "boi_token")}
        self._end_of_turn_tokens = tuple(
            token for token in tokenizer.all_special_tokens if token and token not in image_tokens
        )
        # Whether `_process` builds `mm_token_type_ids` itself (see `_mm_token_type_ids`); None until a batch with
        # image tokens has decided it.
        self._own_mm_token_types: bool | None = None
        # Rendered prompts (the messages before an assistant turn, with the generation cue), by what they render from.
        self._prompts: dict[tuple, str] = {}
        self._prompts_rendered_with: tuple | None = None
        self._prompts_cacheable = False

    # ---------------------------------------------------------------------------------------------------------------
    # Rendering: messages -> text and assistant character spans
    # ---------------------------------------------------------------------------------------------------------------
    @property
    def _direct_template(self) -> str | None:
        """The chat template that `_render` renders itself; None where the processor's own method is called."""
        template = self.processor.chat_template
        return template if self._stock_apply and isinstance(template, str) else None

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        template = self._direct_template
        if template is None or not add_generation_prompt:
            return self._render_uncached(template, messages, add_generation_prompt)
        return self._cached_prompt(template, messages)

    def _cached_prompt(self, template: str, messages: list[dict[str, Any]]) -> str:
        """A prompt rendered once per distinct `messages`: task datasets repeat one instruction over many images.

        The prompt is the second rendering each row needs (to find where its answer starts) and TRL's collator does
        not make it. A render is a pure function of the template, the special tokens and the messages, which
        `_validate` builds from roles, image placeholders and texts only (the images are not in them), so those are
        the key. Templates that can render differently from one call to the next (the date, `random`, `lipsum`) are
        never cached. At most `_PROMPT_CACHE_SIZE` prompts are kept: beyond that the cache starts again.
        """
        rendered_with = (template, tuple(self.tokenizer.special_tokens_map.items()))
        if rendered_with != self._prompts_rendered_with:
            self._prompts, self._prompts_rendered_with = {}, rendered_with
            self._prompts_cacheable = not _NONDETERMINISTIC_TEMPLATE.search(template)
        if not self._prompts_cacheable:
            return self._render_uncached(template, messages, add_generation_prompt=True)
        if len(self._prompts) >= _PROMPT_CACHE_SIZE:
            self._prompts.clear()
        # Every field of every message and content item, so that a field `_validate` may keep later joins the key.
        key = tuple(
            tuple(
                (name, tuple(tuple(item.items()) for item in value) if name == "content" else value)
                for name, value in message.items()
            )
            for message in messages
        )
        prompt = self._prompts.get(key)
        if prompt is None:
            prompt = self._prompts[key] = self._render_uncached(template, messages, add_generation_prompt=True)
        return prompt

    def _render_uncached(
        self, template: str | None, messages: list[dict[str, Any]], add_generation_prompt: bool
    ) -> str:
        if template is None:
            return self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # What the stock `ProcessorMixin.apply_chat_template(tokenize=False)` does once its arguments are resolved:
        # the same compiled template (transformers' own sandboxed environment and cache) and the same variables.
        # Called directly because each row is rendered at least twice (whole and prompt), where TRL renders once, and
        # the wrappers were over a third of that time. What `render_jinja_template` adds is a no-op here: it rebuilds
        # the messages from plain JSON types, and `_validate` builds them from exact str, dict and list only; it
        # aliases reasoning fields, which `_validate` does not keep. The tests (test_direct_rendering_is_the_processors)
        # check both give the same text on every family's template.
        compiled = compiled_chat_template(template)
        if compiled is None:  # gone from a later transformers: through its public function, slower
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                **self.tokenizer.special_tokens_map,
            )
            return rendered[0]
        return compiled.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )

    def validate_example(self, example: dict[str, Any], name: str) -> tuple[list[dict[str, Any]], list[Any]]:
        if not isinstance(example, dict) or "messages" not in example:
            raise DataError(f"{name}: an example must be a dict with `messages` (and `images`), got {example!r:.200}.")
        if example.get("image_error"):
            raise DataError(_image_error_message(example, name))
        images = example.get("images") or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        raw_messages = example["messages"]
        if not isinstance(raw_messages, list) or len(raw_messages) == 0:
            raise DataError(f"{name}: `messages` is empty; a training example needs a user and an assistant turn.")
        messages = []
        for turn, message in enumerate(raw_messages):
            where = f"{name}, message {turn}"
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise DataError(f"{where}: `role` must be one of {ROLES}, got {message!r:.200}.")
            if "content" not in message or message["content"] is None:
                raise DataError(f"{where}: the {message['role']} message has no `content`.")
            content = _normalize_content(message["content"], where)
            if message["role"] == "assistant":
                if any(item["type"] == "image" for item in content):
                    raise DataError(f"{where}: an assistant turn holds an image; images belong in user turns.")
                if not "".join(item["text"] for item in content).strip():
                    raise DataError(f"{where}: the assistant turn is empty; there is nothing to learn from it.")
            checked = {"role": ROLES[ROLES.index(message["role"])], "content": content}  # exact str
            if message["role"] == "assistant" and message.get("weight", 1) == 0:
                checked["weight"] = 0  # context, not a target: an assistant turn of a prompt-completion prompt
            messages.append(checked)
        roles = [message["role"] for message in messages]
        if "assistant" not in roles:
            raise DataError(f"{name}: no assistant turn; the loss is computed on assistant turns only.")
        if roles[0] == "assistant":
            raise DataError(f"{name}: the conversation starts with an assistant turn; add the user turn it answers.")
        num_placeholders = sum(item["type"] == "image" for m in messages for item in m["content"])
        if num_placeholders != len(images):
            raise DataError(
                f"{name}: {num_placeholders} image placeholder(s) ({{'type': 'image'}} items) in `messages` but "
                f"{len(images)} image(s) in `images`; they must match one to one, in order."
            )
        return messages, list(images)

    def _render_row(self, example: dict[str, Any], index: int, with_regions: bool = False) -> _RenderedRow:
        name = row_name(example, index)
        try:
            return self._render_validated_row(example, name, with_regions)
        except TemplateError as error:
            # A model's own template may refuse a conversation (Llama's "Conversation roles must alternate..."):
            # jinja's message names neither the row nor its id.
            raise DataError(f"{name}: the chat template refuses this conversation: {error}") from None

    def _render_validated_row(self, example: dict[str, Any], name: str, with_regions: bool) -> _RenderedRow:
        messages, images = self.validate_example(example, name)
        text = self.render_messages(messages)
        spans: list[tuple[int, int]] = []
        regions: list[tuple[int, int, str]] = []
        previous_end = 0
        for turn, message in enumerate(messages):
            if message["role"] != "assistant" and not with_regions:
                continue
            # The whole conversation is already rendered: its last turn needs no second rendering.
            through_turn = text if turn == len(messages) - 1 else self.render_messages(messages[: turn + 1])
            if not text.startswith(through_turn):
                raise ValueError(
                    f"{name}: the chat template renders the first {turn + 1} messages differently from the start of "
                    "the whole conversation, so assistant turns cannot be located. Use a template whose output for a "
                    "conversation prefix is a prefix of its output (e.g. one that keeps earlier reasoning)."
                )
            if message["role"] == "assistant":
                prompt = self.render_messages(messages[:turn], add_generation_prompt=True)
                if not through_turn.startswith(prompt) or not prompt.startswith(text[:previous_end]):
                    raise ValueError(
                        f"{name}: with `add_generation_prompt=True` the chat template does not render a prefix of "
                        f"message {turn}'s assistant turn; cannot tell the prompt from the answer."
                    )
                if message.get("weight", 1):
                    spans.append((len(prompt), len(through_turn)))
                regions.append((previous_end, len(prompt), "assistant_cue"))
                role = "assistant" if message.get("weight", 1) else "assistant_context"
                regions.append((len(prompt), len(through_turn), role))
            else:
                start = previous_end
                if turn == 0 and message["role"] != "system":
                    start = self._injected_system_turn_end(message, through_turn)
                    if start:
                        regions.append((0, start, "system"))
                regions.append((start, len(through_turn), message["role"]))
            previous_end = len(through_turn)
        row = _RenderedRow(name=name, text=text, images=images, assistant_spans=spans, message_regions=regions)
        self._close_assistant_turns(row)
        return row

    def _injected_system_turn_end(self, first_message: dict[str, Any], through_first: str) -> int:
        """Where a system turn that the template adds on its own ends in `through_first` (the conversation rendered
        through its first message, not a system one), or 0 when the template adds none. For `explain` only.

        Qwen2-VL's and Qwen2.5-VL's templates open a conversation without a system message with their own
        (`<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`): those tokens are a system turn, not the
        user's. The template's system turn is found by rendering one of our own
        around a marker text: what comes before the first message is a system turn when it has that turn's opening
        and closing text around it; template text that any conversation starts with (SmolVLM's `<|im_start|>`)
        does not.
        """
        marker = "vlm-recipes-system-turn-marker"
        system = {"role": "system", "content": [{"type": "text", "text": marker}]}
        try:
            system_only = self.render_messages([system])
            with_system = self.render_messages([system, first_message])
        except TemplateError:  # a template that takes no system turn adds none either
            return 0
        if marker not in system_only or not with_system.startswith(system_only):
            return 0
        first_turn = with_system[len(system_only) :]
        if not first_turn or not through_first.endswith(first_turn):
            return 0
        before_first = through_first[: len(through_first) - len(first_turn)]
        opening, closing = system_only.split(marker, 1)
        wrapped = before_first.startswith(opening) and before_first.endswith(closing)
        return len(before_first) if wrapped and len(before_first) >= len(opening) + len(closing) else 0

    def _close_assistant_turns(self, row: _RenderedRow) -> None:
        """Append `eos_token` to assistant turns that the template leaves without an end-of-turn token."""
        new_text, new_spans, shift, added = [], [], 0, []
        cursor = 0
        for start, end in row.assistant_spans:
            content_end = start + len(row.text[start:end].rstrip())
            if row.text[start:content_end].endswith(self._end_of_turn_tokens) or not self.add_eos_if_missing:
                new_spans.append((start + shift, end + shift))
                continue
            if not self._warned_added_eos:
                logger.warning(
                    "The chat template ends assistant turns without an end-of-turn token; appending %r to each "
                    "assistant turn so that the model learns to stop.",
                    self.tokenizer.eos_token,
                )
                self._warned_added_eos = True
            eos = self.tokenizer.eos_token
            new_text.append(row.text[cursor:content_end])
            new_text.append(eos)
            cursor = content_end
            added.append((content_end + shift, content_end + shift + len(eos)))
            new_spans.append((start + shift, content_end + shift + len(eos)))
            shift += len(eos)
        if not added:
            return
        new_text.append(row.text[cursor:])
        row.text = "".join(new_text)
        row.assistant_spans = new_spans
        row.added_eos_spans = added
        # Regions after an insertion move right by the characters inserted before them.
        row.message_regions = [
            (
                start + sum(len(self.tokenizer.eos_token) for a, _ in added if a < start),
                end + sum(len(self.tokenizer.eos_token) for a, _ in added if a < end),
                role,
            )
            for start, end, role in row.message_regions
        ]

    # ---------------------------------------------------------------------------------------------------------------
    # Processing: text + images -> tensors and labels
    # ---------------------------------------------------------------------------------------------------------------
    def _process(self, rows: list[_RenderedRow]) -> tuple[dict[str, Any], torch.Tensor, list[list[dict]]]:
        from transformers import BatchFeature

        texts = [row.text for row in rows]
        has_images = any(row.images for row in rows)
        kwargs = {}
        if self.pad_to_multiple_of is not None:
            kwargs["pad_to_multiple_of"] = self.pad_to_multiple_of
        kwargs.update(special_tokens_kwargs(self.tokenizer, texts))
        if self._own_mm_token_types:
            kwargs["return_mm_token_type_ids"] = False
        # Tensors are made after the replacement offsets are taken out: some processors (Idefics3) would try to
        # turn those lists of dicts into tensors too.
        encoded = self.processor(
            text=texts,
            images=[row.images for row in rows] if has_images else None,
            padding=True,
            padding_side="right",
            return_tensors=None,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            **kwargs,
        )
        encoded = dict(encoded)
        # Through numpy: a few times faster than `torch.as_tensor` on nested lists of (start, end) tuples.
        offsets = torch.from_numpy(_offsets_array(encoded.pop("offset_mapping")))
        replacements = encoded.pop("text_replacement_offsets", None)
        if replacements is None:  # a legacy processor (Idefics2) that does not report them: computed and checked
            replacements = family_collation.legacy_replacement_offsets(
                self.processor, texts, encoded, special_tokens_kwargs(self.tokenizer, texts)
            )
        replacements = replacements or [[] for _ in rows]
        encoded = {key: _as_int_array(value) for key, value in encoded.items()}
        if self._own_mm_token_types:
            # Where the processor puts them: after the text's keys, before the images'.
            items = list(encoded.items())
            cut = next((i + 1 for i, (key, _) in enumerate(items) if key == "attention_mask"), len(items))
            types = ("mm_token_type_ids", self._mm_token_type_ids(encoded["input_ids"]))
            encoded = dict([*items[:cut], types, *items[cut:]])
        elif self._own_mm_token_types is None:
            self._own_mm_token_types = self._can_build_mm_token_types(encoded)
        return dict(BatchFeature(encoded, tensor_type="pt")), offsets, replacements

    # Why: transformers (5.24) builds `mm_token_type_ids`, which M-RoPE models (the Qwen family) need, row by row
    # with `numpy.isin` on Python lists (`ProcessorMixin.create_mm_token_type_ids`): 8% of this collator's time on
    # the benchmark's Qwen2-VL batches. The same ids come from one comparison over the padded batch. Used only where
    # the processor uses that stock method, and only after a batch with image tokens was built both ways and came out
    # equal (until then, and where they differ, the processor builds them).
    def _mm_token_type_ids(self, input_ids: numpy.ndarray) -> numpy.ndarray:
        """0 for text, 1 for image, 2 for video, 3 for audio tokens (as `ProcessorMixin.create_mm_token_type_ids`)."""
        types = numpy.zeros_like(input_ids)
        for value, name in ((1, "image_token_ids"), (2, "video_token_ids"), (3, "audio_token_ids")):
            token_ids = [token_id for token_id in getattr(self.processor, name, None) or [] if token_id is not None]
            if token_ids:
                types[numpy.isin(input_ids, token_ids)] = value
        return types

    def _can_build_mm_token_types(self, encoded: dict[str, Any]) -> bool | None:
        """Whether later batches may ask for no `mm_token_type_ids` and get `_mm_token_type_ids` instead; None (ask
        again) after a batch with no image tokens, where both ways give zeros only and the comparison proves nothing."""
        stock = getattr(type(self.processor), "create_mm_token_type_ids", None)
        if stock is not ProcessorMixin.create_mm_token_type_ids or "mm_token_type_ids" not in encoded:
            return False
        ids, theirs = encoded["input_ids"], encoded["mm_token_type_ids"]
        if not isinstance(ids, numpy.ndarray) or not isinstance(theirs, numpy.ndarray):
            return False
        if not theirs.any():
            return None
        return numpy.array_equal(self._mm_token_type_ids(ids), theirs)

    @staticmethod
    def _to_processed_chars(position: int, replacements: list[dict]) -> int:
        """Map a character position of the rendered text to the processor's text, where image placeholders grew."""
        shift = 0
        for replacement in replacements:
            if replacement["span"][1] <= position:
                shift += (replacement["new_span"][1] - replacement["new_span"][0]) - (
                    replacement["span"][1] - replacement["span"][0]
                )
        return position + shift

    @staticmethod
    def _tokens_in(offsets: torch.Tensor, start, end) -> torch.Tensor:
        """Boolean mask of the tokens that overlap characters [start, end); zero-width tokens never do.

        `offsets` may be a torch tensor or a numpy array, of one row `(tokens, 2)` or several `(spans, tokens, 2)`
        with `start`/`end` as columns `(spans, 1)`; the mask is of the same kind."""
        token_starts, token_ends = offsets[..., 0], offsets[..., 1]
        return (token_starts < end) & (token_ends > start) & (token_ends > token_starts)

    @classmethod
    def _batch_tokens_in(cls, offsets: numpy.ndarray, spans: list[tuple[int, int, int]]) -> numpy.ndarray:
        """`(rows, tokens)` mask of the tokens that overlap any span `(row, start, end)`: `_tokens_in`, for a batch."""
        mask = numpy.zeros(offsets.shape[:2], dtype=bool)
        if not spans:
            return mask
        rows, starts, ends = numpy.asarray(spans, dtype=numpy.int64).T
        hits = cls._tokens_in(offsets[rows], starts[:, None], ends[:, None])
        numpy.logical_or.at(mask, rows, hits)
        return mask

    def _labels(
        self, rows: list[_RenderedRow], encoded: dict[str, Any], offsets: torch.Tensor, replacements: list[list[dict]]
    ) -> torch.Tensor:
        # One set of array operations for the whole batch, not a few per row and span: half the time (benchmark
        # part 1, 72 rows: 7.4 -> 3.5 ms).
        assistant = [
            (i, self._to_processed_chars(start, replacements[i]), self._to_processed_chars(end, replacements[i]))
            for i, row in enumerate(rows)
            for start, end in row.assistant_spans
        ]
        images = [(i, *replacement["new_span"]) for i in range(len(rows)) for replacement in replacements[i]]
        offsets = offsets.numpy()
        image_tokens = self._batch_tokens_in(offsets, images)  # never carry loss
        supervised = self._batch_tokens_in(offsets, assistant) & ~image_tokens
        supervised &= encoded["attention_mask"].numpy().astype(bool)
        return torch.where(torch.from_numpy(supervised), encoded["input_ids"], IGNORE_INDEX)

    def check_lengths(self, rows: list[_RenderedRow], encoded: dict[str, Any]) -> list[int]:
        """Return the indices of rows longer than `max_length` (raising in `error` mode)."""
        if self.max_length is None:
            return []
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        too_long = [i for i, length in enumerate(lengths) if length > self.max_length]
        if too_long and self.too_long == "error":
            i = too_long[0]
            raise DataError(
                f"{rows[i].name} is {lengths[i]} tokens long (image tokens included), over max_length="
                f"{self.max_length}. Samples are never truncated, since a cut inside or before the image tokens "
                "breaks the image/text alignment: raise `max_length`, lower the image pixel budget, or set "
                "`too_long: drop` to leave such samples out (they are counted and reported)."
            )
        return too_long

    def encode(self, examples: Sequence[dict[str, Any]], with_regions: bool = False):
        """Render, process and label examples; returns `(batch, rows)` with the rendered rows kept for inspection."""
        if self.layout != "causal":  # no character offsets there: `explain` has its own path for these families
            batch, rows = self.prompt_answer.encode(examples)
            return batch, rows, None, None
        rows = [self._render_row(example, i, with_regions) for i, example in enumerate(examples)]
        encoded, offsets, replacements = self._process(rows)
        too_long = self.check_lengths(rows, encoded)
        if too_long:
            rows = self.drop_too_long(rows, too_long)
            encoded, offsets, replacements = self._process(rows)
        encoded["labels"] = self._labels(rows, encoded, offsets, replacements)
        return encoded, rows, offsets, replacements

    def drop_too_long(self, rows: list, too_long: list[int]) -> list:
        """The rows left after dropping those at `too_long` (with `too_long: drop`), counted, named and logged."""
        self.num_dropped += len(too_long)
        self.dropped_names.extend(rows[i].name for i in too_long)
        logger.warning(
            "Dropped %d sample(s) over max_length=%d: %s (%d dropped so far).",
            len(too_long),
            self.max_length,
            ", ".join(rows[i].name for i in too_long),
            self.num_dropped,
        )
        dropped = set(too_long)
        kept = [row for i, row in enumerate(rows) if i not in dropped]
        if not kept:
            raise DataError(
                f"Every sample of this batch is over max_length={self.max_length}; filter the dataset first "
                "(`VisionChatCollator.filter_too_long`), raise `max_length` or lower the image pixel budget."
            )
        return kept

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch, _, _, _ = self.encode(self._usable(examples))
        return batch

    # ---------------------------------------------------------------------------------------------------------------
    # Samples whose images could not be decoded (`on_bad_row`)
    # ---------------------------------------------------------------------------------------------------------------
    def _usable(self, examples: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        """The examples without an `image_error` (skipped and recorded), or a `DataError` under `on_bad_row: error`."""
        bad = {i for i, example in enumerate(examples) if isinstance(example, dict) and example.get("image_error")}
        if not bad:
            if examples:
                self._last_good = examples[-1]
            return examples
        if self.on_bad_row == "error":
            example = examples[min(bad)]
            raise DataError(
                f"{_image_error_message(example, _sample_name(example))}. Fix or remove the image, or set "
                "`on_bad_row: skip` to leave such samples out (counted and listed)."
            )
        for i in bad:
            error = examples[i]["image_error"]
            image, reason = (error.get("image"), error.get("reason")) if isinstance(error, dict) else (None, error)
            self._record({"skipped": {"id": examples[i].get("id"), "image": image, "reason": reason}})
        good = [example for i, example in enumerate(examples) if i not in bad]
        logger.warning(
            "Skipped %d sample(s) whose image could not be decoded: %s.",
            len(bad),
            "; ".join(_image_error_message(examples[i], _sample_name(examples[i])) for i in sorted(bad)),
        )
        if good:
            self._last_good = good[-1]
            return good
        if self._last_good is None:
            raise DataError(
                f"Every sample of this batch has an image that cannot be decoded "
                f"({', '.join(_sample_name(examples[i]) for i in sorted(bad))}), and no good sample has been seen yet to "
                "stand in for them. Fix or remove those images (the run's first batch must hold a good one)."
            )
        # A batch needs supervised tokens (an all-masked batch divides its loss by zero): the last good sample
        # stands in, once more, and is counted as a substitution.
        self._record({"substituted_by": self._last_good.get("id")})
        logger.warning(
            "Every sample of this batch was skipped; the last good sample (%s) stands in for them.",
            _sample_name(self._last_good),
        )
        return [self._last_good]

    def _record(self, entry: dict[str, Any]) -> None:
        self._skip_entries_here.append(entry)
        if self._skip_record is None:
            return
        # One short line per `write` on a file opened for appending: lines from several data-loading workers and
        # training processes do not interleave.
        self._skip_record.parent.mkdir(parents=True, exist_ok=True)
        with self._skip_record.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    def record_skips_to(self, path: str | Path, start_new: bool = True) -> None:
        """Also append every skip to the JSONL file `path`, which `skipped_samples` then reads.

        Why: with `dataloader_num_workers > 0` the collator runs in worker processes (one copy each), and with several
        training processes each has its own; the skips they record in memory never reach the main process. Call
        this before the data loader starts its workers; `start_new` (on one process) removes an older file.
        """
        self._skip_record = Path(path)
        if start_new:
            self._skip_record.unlink(missing_ok=True)

    def _skip_entries(self) -> list[dict[str, Any]]:
        if self._skip_record is None:
            return self._skip_entries_here
        if not self._skip_record.is_file():
            return []
        lines = self._skip_record.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @property
    def skipped_samples(self) -> list[dict[str, Any]]:
        """Samples left out of their batch under `on_bad_row: skip`: `{"id", "image", "reason"}` each, in order. From
        every process and data-loading worker once `record_skips_to` was called, else from this process only."""
        return [entry["skipped"] for entry in self._skip_entries() if "skipped" in entry]

    @property
    def num_substituted(self) -> int:
        """Batches whose samples were all skipped, which the last good sample stood in for (same scope as above)."""
        return sum("substituted_by" in entry for entry in self._skip_entries())

    def skipped_summary(self) -> str:
        """The count of skipped samples, the first `LISTED_BAD_ROWS` by id, image and reason, and substitutions; the
        malformed rows of a stream (`dataset_streaming`), which reach the collator marked, on a line of their own."""
        samples = [s for s in self.skipped_samples if s["image"] is not None]
        lines = [f"samples skipped for an image that cannot be decoded: {len(samples)}"]
        lines += [f"  - id {s['id']!r}: image {s['image']}: {s['reason']}" for s in samples[:LISTED_BAD_ROWS]]
        if len(samples) > LISTED_BAD_ROWS:
            lines.append(f"  ... and {len(samples) - LISTED_BAD_ROWS} more")
        rows = [s for s in self.skipped_samples if s["image"] is None]
        if rows:
            lines.append(f"malformed streamed rows skipped: {len(rows)}")
            lines += [f"  - {s['reason']}" for s in rows[:LISTED_BAD_ROWS]]
            if len(rows) > LISTED_BAD_ROWS:
                lines.append(f"  ... and {len(rows) - LISTED_BAD_ROWS} more")
        if self.num_substituted:
            lines.append(f"  batches of bad samples only, where the last good sample stood in: {self.num_substituted}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------------------------
    # Helpers for scripts
    # ---------------------------------------------------------------------------------------------------------------
    def rendered_text(self, example: dict[str, Any], index: int = 0) -> str:
        """The text the processor gets for one example, one image placeholder per image; images are not touched.

        `vlm_recipes.lengths` counts tokens on it to size samples without processing their images.
        """
        return self._render_row(example, index).text

    def sample_length(self, example: dict[str, Any], index: int = 0) -> int:
        """Token count of one example as the model sees it (image tokens included), without truncation."""
        if self.layout != "causal":
            return self.prompt_answer.sample_length(example, index)
        row = self._render_row(example, index)
        encoded, _, _ = self._process([row])
        return int(encoded["attention_mask"].sum())

    def filter_too_long(self, dataset, name: str = "dataset") -> tuple[Any, list[str]]:
        """Return `(dataset without samples over max_length, names of those left out)`; shows progress."""
        from tqdm.auto import tqdm

        if self.max_length is None:
            return dataset, []
        kept, dropped = [], []
        for index in tqdm(range(len(dataset)), desc=f"Measuring {name} lengths", leave=False):
            example = dataset[index]
            if self.sample_length(example, index) > self.max_length:
                dropped.append(row_name(example, index))
            else:
                kept.append(index)
        return (dataset.select(kept) if dropped else dataset), dropped

    def explain(self, example: dict[str, Any]) -> list[tuple[int, str, int, str]]:
        """Return `(token_id, token_text, label, reason)` for each token of one example, for debugging data."""
        if self.layout != "causal":
            return self.prompt_answer.explain(example)
        batch, rows, offsets, replacements = self.encode([example], with_regions=True)
        row, offsets, replacements = rows[0], offsets[0], replacements[0]
        input_ids, labels, attention = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]

        def tokens_in(span: tuple[int, int]) -> torch.Tensor:
            start, end = (self._to_processed_chars(char, replacements) for char in span)
            return self._tokens_in(offsets, start, end)

        # Later assignments win: turn regions, then appended end-of-turn tokens, image tokens and padding.
        reasons = [LabelReason.TEMPLATE] * len(input_ids)
        role_reason = {
            "system": LabelReason.SYSTEM,
            "user": LabelReason.USER,
            "assistant_cue": LabelReason.PROMPT_CUE,
            "assistant": LabelReason.ASSISTANT,
            "assistant_context": LabelReason.ASSISTANT_CONTEXT,
        }
        layers = [(region[:2], role_reason[region[2]]) for region in row.message_regions]
        layers += [(span, LabelReason.ADDED_EOS) for span in row.added_eos_spans]
        for span, reason in layers:
            for position in tokens_in(span).nonzero().flatten().tolist():
                reasons[position] = reason
        for replacement in replacements:
            for position in self._tokens_in(offsets, *replacement["new_span"]).nonzero().flatten().tolist():
                reasons[position] = LabelReason.IMAGE
        for position in (~attention.bool()).nonzero().flatten().tolist():
            reasons[position] = LabelReason.PADDING
        tokens = self.tokenizer.convert_ids_to_tokens(input_ids.tolist())
        return [
            (int(token_id), token, int(label), reason)
            for token_id, token, label, reason in zip(input_ids.tolist(), tokens, labels.tolist(), reasons)
        ]
