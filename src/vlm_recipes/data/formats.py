"""The dataset formats users bring, detected from their columns and turned into our messages, one row at a time.

Known formats (`dataset_format` forces one; `auto` detects it from the columns, in this order):

- `messages`: TRL's conversational format, `messages` (`[{"role", "content"}]`) with `images` (or `image`). Content
  is a string or a list of items; items read from Arrow come with every key of every item type, unused ones null
  (`{"type": "image", "text": None, "index": 0}`), as in `HuggingFaceH4/llava-instruct-mix-vsft`.
- `prompt_completion`: TRL's prompt-completion format, `prompt` and `completion` (both conversations, or both
  strings) with `images`. The loss covers the completion only, as TRL's `completion_only_loss`: assistant turns inside
  the prompt are context (`weight: 0`).
- `llava`: LLaVA's JSON, `image` (or `images`) and `conversations` of `{"from": "human" | "gpt" | "system",
  "value"}` whose text holds an `<image>` marker where each image goes.
- `sharegpt`: ShareGPT JSONL, `conversations` as LLaVA's (or of `{"role", "content"}`), an optional `system` column,
  `images`, `<image>` markers.

A CSV file holds no nested data: there, a conversation or a list of images is JSON text in its cell, and a single
image is a path. Where a conversation has no image placeholder at all and the row has images, they go before the text of the first
user turn, as TRL's `prepare_multimodal_messages` places them.

`to_messages(row, fmt)` returns `(messages, image_refs)` or raises `RowProblem` with the reason; the caller names the
split and the row.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import DataError

__all__ = [
    "FORMATS",
    "IMAGE_MARKER",
    "RowProblem",
    "detect_format",
    "image_column",
    "to_messages",
]

FORMATS = ("messages", "prompt_completion", "llava", "sharegpt")
IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")
# ShareGPT / LLaVA speaker names -> roles.
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MARKER_SPLIT = re.compile(r"\s*" + re.escape(IMAGE_MARKER) + r"\s*")


class RowProblem(DataError):
    """Why one row of a dataset cannot be trained on; the caller adds which split and row."""


def image_column(columns: list[str] | set[str]) -> str | None:
    """The column holding a row's images: `images`, else `image`, else None (a text-only dataset)."""
    for name in ("images", "image"):
        if name in columns:
            return name
    return None


def detect_format(columns: list[str], forced: str = "auto", where: str = "the dataset") -> str:
    """The format of a dataset with these columns (`forced` unless `auto`), or a `DataError` naming what was found."""
    columns = list(columns)
    if forced != "auto":
        if forced not in FORMATS:
            raise DataError(f"`dataset_format: {forced}` is not a known format; use auto or one of {list(FORMATS)}.")
        needed = {
            "messages": ("messages",),
            "prompt_completion": ("prompt", "completion"),
            "llava": ("conversations",),
            "sharegpt": ("conversations",),
        }[forced]
        missing = [column for column in needed if column not in columns]
        if missing:
            raise DataError(
                f"{where} has no {', '.join(f'`{c}`' for c in missing)} column, which `dataset_format: {forced}` "
                f"reads; its columns are {columns}."
            )
        return forced
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "conversations" in columns:
        return "llava" if "image" in columns else "sharegpt"
    raise DataError(
        f"Cannot tell the format of {where} from its columns {columns}. Known formats: messages (`messages` + "
        "`images`), prompt_completion (`prompt`, `completion` + `images`), llava (`conversations` + `image`), "
        "sharegpt (`conversations` + `images`, optional `system`). Rename the columns, or set `dataset_format`."
    )


# --------------------------------------------------------------------------------------------------------------------
# Rows -> messages
# --------------------------------------------------------------------------------------------------------------------
def _from_json_text(value: Any, items: type) -> Any:
    """A list stored as JSON text (a CSV file holds no nested data) as the list, where it parses to a list of `items`
    (dicts for a conversation, strings for image paths); anything else unchanged, text that merely starts with `[`
    included."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(item, items) for item in parsed):
            return parsed
    return value


def _image_refs(row: dict[str, Any]) -> list[Any]:
    column = image_column(row.keys())
    value = _from_json_text(row.get(column), str) if column else None
    if value is None or value == "":
        return []
    refs = list(value) if isinstance(value, (list, tuple)) else [value]
    for position, ref in enumerate(refs):
        if ref is None or (isinstance(ref, dict) and not ref.get("bytes") and not ref.get("path")):
            raise RowProblem(f"image {position} of `{column}` is empty (null)")
    return refs


def _content_items(content: Any, where: str) -> list[dict[str, Any]] | str:
    """A message's content as typed items (a string stays a string); Arrow's null keys are dropped."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise RowProblem(f"{where} has no string or list `content`")
    items = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            items.append({"type": "image"})
        elif kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                raise RowProblem(f"{where} has a text item without text")
            items.append({"type": "text", "text": text})
        else:
            raise RowProblem(f"{where} has a content item of type {kind!r}; only image and text items are read")
    return items


def _conversation(messages: Any, what: str) -> list[dict[str, Any]]:
    """Role/content messages checked for roles and content; contents kept as strings or typed items."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowProblem(f"`{what}` must be a non-empty list of messages")
    result = []
    for turn, message in enumerate(messages):
        where = f"{what} message {turn}"
        if not isinstance(message, dict):
            raise RowProblem(f"{where} is not a `{{role, content}}` object")
        role = message.get("role")
        if role not in ROLES:
            raise RowProblem(f"{where} has unknown role {role!r}; roles are {list(ROLES)}")
        if message.get("content") is None:
            raise RowProblem(f"{where} has no `content`")
        result.append({"role": role, "content": _content_items(message["content"], where)})
    return result


def _split_markers(text: str) -> list[dict[str, Any]] | str:
    """Text with `<image>` markers as typed items (the whitespace around a marker dropped); a string without any."""
    if IMAGE_MARKER not in text:
        return text
    items: list[dict[str, Any]] = []
    pieces = _MARKER_SPLIT.split(text)
    for position, piece in enumerate(pieces):
        if position:
            items.append({"type": "image"})
        if piece:
            items.append({"type": "text", "text": piece})
    return items


def _sharegpt_conversation(row: dict[str, Any]) -> list[dict[str, Any]]:
    turns = _from_json_text(row.get("conversations"), dict)
    if not isinstance(turns, (list, tuple)) or not turns:
        raise RowProblem("`conversations` must be a non-empty list of turns")
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for turn, entry in enumerate(turns):
        where = f"conversations turn {turn}"
        if not isinstance(entry, dict):
            raise RowProblem(f"{where} is not a `{{from, value}}` object")
        speaker = entry.get("from") if entry.get("from") is not None else entry.get("role")
        value = entry.get("value") if entry.get("value") is not None else entry.get("content")
        if speaker not in SPEAKERS:
            raise RowProblem(f"{where} has unknown role {speaker!r}; known: {sorted(SPEAKERS)}")
        if not isinstance(value, str):
            raise RowProblem(f"{where} has no string `value`")
        messages.append({"role": SPEAKERS[speaker], "content": _split_markers(value)})
    return messages


def _place_images(messages: list[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """Every content as typed items; images go before the first user text where the conversation has no placeholder
    at all (TRL's `prepare_multimodal_messages`)."""
    has_placeholder = any(
        isinstance(message["content"], list) and any(item["type"] == "image" for item in message["content"])
        for message in messages
    )
    placed = has_placeholder or num_images == 0
    result = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
            if not placed and message["role"] == "user":
                content = [{"type": "image"} for _ in range(num_images)] + content
                placed = True
        result.append({**message, "content": content})
    return result


def _check(messages: list[dict[str, Any]], num_images: int) -> None:
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise RowProblem("no assistant turn to learn from")
    if roles[0] == "assistant":
        raise RowProblem("the conversation starts with an assistant turn")
    placeholders = 0
    for turn, message in enumerate(messages):
        images = sum(item["type"] == "image" for item in message["content"])
        if message["role"] == "assistant":
            if images:
                raise RowProblem(f"message {turn}: an assistant turn holds an image; images belong in user turns")
            if not "".join(item["text"] for item in message["content"]).strip():
                raise RowProblem(f"message {turn}: the assistant turn is empty")
        placeholders += images
    if placeholders != num_images:
        raise RowProblem(f"{placeholders} image placeholder(s) in the conversation but {num_images} image(s)")


def to_messages(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """`(messages, image_refs)` of one row of format `fmt`: messages with typed-item contents (an assistant turn of a
    prompt carries `weight: 0`), and the row's images as stored (path, bytes or `{"bytes", "path"}`)."""
    images = _image_refs(row)
    if fmt == "messages":
        messages = _conversation(_from_json_text(row.get("messages"), dict), "messages")
    elif fmt == "prompt_completion":
        prompt = _from_json_text(row.get("prompt"), dict)
        completion = _from_json_text(row.get("completion"), dict)
        if isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        elif isinstance(prompt, str) or isinstance(completion, str):
            raise RowProblem("`prompt` and `completion` must both be strings or both be conversations")
        else:
            prompt_messages = _conversation(prompt, "prompt")
            completion_messages = _conversation(completion, "completion")
            if any(message["role"] != "assistant" for message in completion_messages):
                raise RowProblem("the completion holds a turn that is not the assistant's")
            # TRL trains on the completion only: assistant turns of the prompt are context, not targets.
            messages = [
                {**message, "weight": 0} if message["role"] == "assistant" else message for message in prompt_messages
            ] + completion_messages
    elif fmt in ("llava", "sharegpt"):
        messages = _sharegpt_conversation(row)
    else:
        raise DataError(f"Unknown dataset format {fmt!r}; known: {list(FORMATS)}.")
    messages = _place_images(messages, len(images))
    _check(messages, len(images))
    return messages, images
