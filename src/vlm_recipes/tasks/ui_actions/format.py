"""The ui_actions answer format: an action dict <-> the assistant's answer text.

An action is one of

    {"type": "click", "x": 100, "y": 200}                      x, y in original-image pixels
    {"type": "type", "text": "hello"}                          typed into the focused field
    {"type": "scroll", "direction": "down", "amount": 100}     direction: up, down, left or right
    {"type": "wait", "seconds": 2}

and the assistant answer is the action in one of three `action_format`s:

    action   text                json                                      coordinates
    click    click(100, 200)     {"type": "click", "x": 100, "y": 200}    100 200 click
    type     type("hello")       {"type": "type", "text": "hello"}        type "hello"
    scroll   scroll(down, 100)   {"type": "scroll", "direction": ...}     scroll down 100
    wait     wait(2)             {"type": "wait", "seconds": 2}           wait 2

The coordinates format is `[x y] verb [arguments]`: the point first when the action has one (the form of GUI agents
that answer "where" before "what"), then the verb, then its other arguments. Typed text is written as a JSON string
literal in the text and coordinates formats too, so that quotes, backslashes and newlines survive a round trip.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ACTION_FORMATS",
    "ACTION_SYNTAX",
    "ACTION_TYPES",
    "SCROLL_DIRECTIONS",
    "ActionDecoder",
    "action_syntax",
    "encode_action",
    "plain_number",
    "validate_action",
    "validate_bbox",
]

ACTION_TYPES = ("click", "type", "scroll", "wait")
ACTION_FORMATS = ("text", "json", "coordinates")
SCROLL_DIRECTIONS = ("up", "down", "left", "right")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plain_number(value: int | float) -> int | float:
    """`100.0` -> `100`, so that the encoded answer never carries a spurious `.0` for the model to learn."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def validate_action(action: Any) -> dict[str, Any]:
    """The canonical form of an action dict (its known keys only, in a fixed order), or a `ValueError` saying what
    is wrong.

    Keys an action type does not use are ignored, so that rows from a table that unifies all action types (an Arrow
    struct with nulls) validate as well as native rows.
    """
    if not isinstance(action, dict):
        raise ValueError(f"an action must be an object with a `type`, got {action!r}")
    kind = action.get("type")
    if kind not in ACTION_TYPES:
        raise ValueError(f"unknown action type {kind!r}; expected one of {list(ACTION_TYPES)}")
    if kind == "click":
        if not (_is_number(action.get("x")) and _is_number(action.get("y"))):
            raise ValueError(f"a click needs numeric `x` and `y` coordinates, got {action!r}")
        return {"type": "click", "x": plain_number(action["x"]), "y": plain_number(action["y"])}
    if kind == "type":
        if not isinstance(action.get("text"), str):
            raise ValueError(f"a type action needs a string `text`, got {action!r}")
        return {"type": "type", "text": action["text"]}
    if kind == "scroll":
        if action.get("direction") not in SCROLL_DIRECTIONS:
            raise ValueError(f"a scroll needs a `direction` among {list(SCROLL_DIRECTIONS)}, got {action!r}")
        if not _is_number(action.get("amount")) or action["amount"] < 0:
            raise ValueError(f"a scroll needs a non-negative numeric `amount`, got {action!r}")
        return {"type": "scroll", "direction": action["direction"], "amount": plain_number(action["amount"])}
    if not _is_number(action.get("seconds")) or action["seconds"] < 0:
        raise ValueError(f"a wait needs a non-negative numeric `seconds`, got {action!r}")
    return {"type": "wait", "seconds": plain_number(action["seconds"])}


def validate_bbox(bbox: Any) -> list[int | float]:
    """`[x0, y0, x1, y1]` with x0 <= x1 and y0 <= y1, or a `ValueError` saying what is wrong."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(value) for value in bbox):
        raise ValueError(f"`target_bbox` must be 4 numbers [x0, y0, x1, y1], got {bbox!r}")
    x0, y0, x1, y1 = bbox
    if x0 > x1 or y0 > y1:
        raise ValueError(f"`target_bbox` {list(bbox)} has x0 > x1 or y0 > y1; expected [x0, y0, x1, y1]")
    return [plain_number(value) for value in bbox]


def _format_number(value: int | float) -> str:
    # repr keeps every digit of a float, so that decoding gives back the same number.
    return str(value) if isinstance(value, int) else repr(value)


def encode_action(action: dict[str, Any], action_format: str) -> str:
    """The answer text of an action in `action_format` (see the module docstring); `ActionDecoder` reverses it."""
    if action_format not in ACTION_FORMATS:
        raise ValueError(f"Unknown action_format {action_format!r}; expected one of {list(ACTION_FORMATS)}.")
    action = validate_action(action)
    kind = action["type"]
    if action_format == "json":
        return json.dumps(action, ensure_ascii=False)
    if kind == "click":
        x, y = _format_number(action["x"]), _format_number(action["y"])
        return f"click({x}, {y})" if action_format == "text" else f"{x} {y} click"
    if kind == "type":
        text = json.dumps(action["text"], ensure_ascii=False)
        return f"type({text})" if action_format == "text" else f"type {text}"
    if kind == "scroll":
        direction, amount = action["direction"], _format_number(action["amount"])
        return f"scroll({direction}, {amount})" if action_format == "text" else f"scroll {direction} {amount}"
    seconds = _format_number(action["seconds"])
    return f"wait({seconds})" if action_format == "text" else f"wait {seconds}"


_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_STRING = r'("(?:[^"\\]|\\.)*")'
_DIRECTION = r"(up|down|left|right)"
_PATTERN_SOURCES = {
    "text": {
        "click": rf"click\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)",
        "type": rf"type\(\s*{_STRING}\s*\)",
        "scroll": rf"scroll\(\s*{_DIRECTION}\s*,\s*{_NUMBER}\s*\)",
        "wait": rf"wait\(\s*{_NUMBER}\s*\)",
    },
    "coordinates": {
        "click": rf"{_NUMBER}\s+{_NUMBER}\s+click",
        "type": rf"type\s+{_STRING}",
        "scroll": rf"scroll\s+{_DIRECTION}\s+{_NUMBER}",
        "wait": rf"wait\s+{_NUMBER}",
    },
}
_PATTERNS = {
    name: {kind: re.compile(pattern, re.DOTALL) for kind, pattern in by_kind.items()}
    for name, by_kind in _PATTERN_SOURCES.items()
}

# What each format looks like, for error messages and the system prompt (`{x}`... are filled with placeholder names).
ACTION_SYNTAX = {
    "text": {
        "click": "click({x}, {y})",
        "type": "type({text})",
        "scroll": "scroll({direction}, {amount})",
        "wait": "wait({seconds})",
    },
    "json": {
        "click": '{{"type": "click", "x": {x}, "y": {y}}}',
        "type": '{{"type": "type", "text": {text}}}',
        "scroll": '{{"type": "scroll", "direction": "{direction}", "amount": {amount}}}',
        "wait": '{{"type": "wait", "seconds": {seconds}}}',
    },
    "coordinates": {
        "click": "{x} {y} click",
        "type": "type {text}",
        "scroll": "scroll {direction} {amount}",
        "wait": "wait {seconds}",
    },
}
_PLACEHOLDERS = {
    "x": "x",
    "y": "y",
    "text": '"text"',
    "direction": "direction",
    "amount": "amount",
    "seconds": "seconds",
}


def action_syntax(action_format: str, kind: str) -> str:
    """How an action of type `kind` looks in `action_format`, with placeholder names (`click(x, y)`)."""
    return ACTION_SYNTAX[action_format][kind].format(**_PLACEHOLDERS)


def _parse_number(text: str) -> int | float:
    return plain_number(float(text)) if any(c in text for c in ".eE") else int(text)


class ActionDecoder:
    """Parse answer text in any of `formats` into a canonical action dict (the inverse of `encode_action`).

    One decoder for all formats, so that scoring, data checks and tests agree on what counts as a parsed action. Only
    surrounding whitespace is forgiven: an answer with extra words is not an action the agent could execute.

    Args:
        formats (`Sequence[str]`, *optional*, defaults to all of `ACTION_FORMATS`):
            The formats to accept, tried in order.
    """

    def __init__(self, formats: Sequence[str] = ACTION_FORMATS):
        unknown = [name for name in formats if name not in ACTION_FORMATS]
        if unknown or not formats:
            raise ValueError(
                f"ActionDecoder formats must be a non-empty subset of {list(ACTION_FORMATS)}, got {formats!r}."
            )
        self.formats = tuple(formats)

    def decode(self, text: str) -> dict[str, Any]:
        """The action in `text`, or a `ValueError` that quotes the text and lists the accepted forms."""
        if not isinstance(text, str):
            raise ValueError(f"Cannot parse an action from {text!r}: expected a string.")
        stripped = text.strip()
        problem = ""
        for name in self.formats:
            try:
                action = self._decode_json(stripped) if name == "json" else self._decode_pattern(name, stripped)
            except ValueError as error:  # the right shape but an invalid action: say why
                problem = f" ({name}: {error})"
                continue
            if action is not None:
                return action
        forms = "; ".join(
            f"{name}: " + ", ".join(action_syntax(name, kind) for kind in ACTION_TYPES) for name in self.formats
        )
        raise ValueError(f"Cannot parse an action from {text!r}{problem}. Accepted forms: {forms}.")

    def try_decode(self, text: str) -> dict[str, Any] | None:
        """The action in `text`, or None when it does not parse (an unparsed prediction, for scoring)."""
        try:
            return self.decode(text)
        except ValueError:
            return None

    @staticmethod
    def _decode_json(text: str) -> dict[str, Any] | None:
        if not text.startswith("{"):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        return validate_action(value)

    @staticmethod
    def _decode_pattern(action_format: str, text: str) -> dict[str, Any] | None:
        for kind, pattern in _PATTERNS[action_format].items():
            match = pattern.fullmatch(text)
            if match is None:
                continue
            if kind == "click":
                return {"type": "click", "x": _parse_number(match[1]), "y": _parse_number(match[2])}
            if kind == "type":
                try:  # strict=False: a raw newline inside the quotes is still the text the model meant
                    typed = json.loads(match[1], strict=False)
                except json.JSONDecodeError as error:
                    raise ValueError(f"bad string literal {match[1]!r} ({error.msg})") from None
                return {"type": "type", "text": typed}
            if kind == "scroll":
                return {"type": "scroll", "direction": match[1], "amount": _parse_number(match[2])}
            return {"type": "wait", "seconds": _parse_number(match[1])}
        return None
