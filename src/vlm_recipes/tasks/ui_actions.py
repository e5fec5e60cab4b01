"""UI actions: a screenshot and a task ("Click the login button") -> the next action to take on that screen.

Native format: `<data_dir>/<split>.jsonl` (train, val, test), one row per line:
`{"id", "image", "task", "action", "target_bbox"?}`. `image` is a screenshot path relative to `image_base_dir`,
`task` the instruction, `action` one of

    {"type": "click", "x": 100, "y": 200}                      x, y in original-image pixels
    {"type": "type", "text": "hello"}                          typed into the focused field
    {"type": "scroll", "direction": "down", "amount": 100}     direction: up, down, left or right
    {"type": "wait", "seconds": 2}

and `target_bbox` `[x0, y0, x1, y1]` the target element's box in original-image pixels: a click is right when it
lands inside it. Other keys (the demo data's `elements`, every drawn element with its box) are ignored.

The assistant answer is the action in one of three `action_format`s:

    action   text                json                                      coordinates
    click    click(100, 200)     {"type": "click", "x": 100, "y": 200}    100 200 click
    type     type("hello")       {"type": "type", "text": "hello"}        type "hello"
    scroll   scroll(down, 100)   {"type": "scroll", "direction": ...}     scroll down 100
    wait     wait(2)             {"type": "wait", "seconds": 2}           wait 2

The coordinates format is `[x y] verb [arguments]`: the point first when the action has one (the form of GUI agents
that answer "where" before "what"), then the verb, then its other arguments. Typed text is written as a JSON string
literal in the text and coordinates formats too, so that quotes, backslashes and newlines survive a round trip.

Points are in the `coordinate_system`: `absolute` (pixels of the original screenshot) or `normalized` (a 0-1000 grid
over the screenshot, `x_norm = round(x / width * 1000)`). A processor that resizes images (Qwen2-VL's smart resize,
see `smart_resize`) shows the model a screenshot of another size than the original: normalized points mean the same
place at any size, while absolute points ask the model to answer in pixels of a screenshot it never saw at that size
(learnable when all screenshots share a size; prefer `normalized` for mixed resolutions). `to_resized` and
`from_resized` map points into and out of a resized image. Metrics always compare in original-image pixels.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.errors import BadRow
from ..data.images import read_image_header, resolve_image
from ..data.rows import BadRowReport, demo_split_sizes, read_jsonl
from ..files import write_text_atomically
from .base import Task, register_task

__all__ = [
    "ACTION_FORMATS",
    "ACTION_SYNTAX",
    "ACTION_TYPES",
    "COORDINATE_SYSTEMS",
    "SCROLL_DIRECTIONS",
    "ActionDecoder",
    "UIActionsOptions",
    "UIActionsTask",
    "aggregate_action_scores",
    "box_centre",
    "encode_action",
    "from_normalized",
    "from_resized",
    "point_in_box",
    "score_action",
    "smart_resize",
    "to_coordinate_system",
    "to_normalized",
    "to_original_pixels",
    "to_resized",
    "validate_action",
    "validate_bbox",
]

ACTION_TYPES = ("click", "type", "scroll", "wait")
ACTION_FORMATS = ("text", "json", "coordinates")
COORDINATE_SYSTEMS = ("absolute", "normalized")
SCROLL_DIRECTIONS = ("up", "down", "left", "right")
NORMALIZED_GRID = 1000
# `annotate_image` (W&B sample table): the target box and point, and the predicted point.
ANNOTATION_COLOURS = {"target": (0, 200, 0), "prediction": (230, 0, 0)}

# Qwen2-VL's image processor defaults: sides are multiples of 28 (14-pixel patches merged 2x2) and the area stays
# within [56*56, 28*28*1280] pixels.
QWEN2_VL_FACTOR = 28
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280

Point = tuple[float, float]
Size = tuple[int, int]


# Actions ---------------------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain_number(value: int | float) -> int | float:
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
        return {"type": "click", "x": _plain_number(action["x"]), "y": _plain_number(action["y"])}
    if kind == "type":
        if not isinstance(action.get("text"), str):
            raise ValueError(f"a type action needs a string `text`, got {action!r}")
        return {"type": "type", "text": action["text"]}
    if kind == "scroll":
        if action.get("direction") not in SCROLL_DIRECTIONS:
            raise ValueError(f"a scroll needs a `direction` among {list(SCROLL_DIRECTIONS)}, got {action!r}")
        if not _is_number(action.get("amount")) or action["amount"] < 0:
            raise ValueError(f"a scroll needs a non-negative numeric `amount`, got {action!r}")
        return {"type": "scroll", "direction": action["direction"], "amount": _plain_number(action["amount"])}
    if not _is_number(action.get("seconds")) or action["seconds"] < 0:
        raise ValueError(f"a wait needs a non-negative numeric `seconds`, got {action!r}")
    return {"type": "wait", "seconds": _plain_number(action["seconds"])}


def validate_bbox(bbox: Any) -> list[int | float]:
    """`[x0, y0, x1, y1]` with x0 <= x1 and y0 <= y1, or a `ValueError` saying what is wrong."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(value) for value in bbox):
        raise ValueError(f"`target_bbox` must be 4 numbers [x0, y0, x1, y1], got {bbox!r}")
    x0, y0, x1, y1 = bbox
    if x0 > x1 or y0 > y1:
        raise ValueError(f"`target_bbox` {list(bbox)} has x0 > x1 or y0 > y1; expected [x0, y0, x1, y1]")
    return [_plain_number(value) for value in bbox]


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


def _syntax(action_format: str, kind: str) -> str:
    return ACTION_SYNTAX[action_format][kind].format(**_PLACEHOLDERS)


def _parse_number(text: str) -> int | float:
    return _plain_number(float(text)) if any(c in text for c in ".eE") else int(text)


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
            f"{name}: " + ", ".join(_syntax(name, kind) for kind in ACTION_TYPES) for name in self.formats
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


# Coordinates -----------------------------------------------------------------------------------------------------
def to_normalized(point: Point, image_size: Size) -> tuple[int, int]:
    """Original-image pixels -> the 0-1000 grid (`round(x / width * 1000)`), which means the same place at any size."""
    (x, y), (width, height) = point, image_size
    return round(x / width * NORMALIZED_GRID), round(y / height * NORMALIZED_GRID)


def from_normalized(point: Point, image_size: Size) -> Point:
    """The 0-1000 grid -> pixels of an image of `image_size` (unrounded, so metrics lose nothing more)."""
    (x, y), (width, height) = point, image_size
    return x / NORMALIZED_GRID * width, y / NORMALIZED_GRID * height


def to_resized(point: Point, original_size: Size, resized_size: Size) -> Point:
    """Original-image pixels -> pixels of the image the processor resized to `resized_size`."""
    (x, y), (width, height), (new_width, new_height) = point, original_size, resized_size
    return x * new_width / width, y * new_height / height


def from_resized(point: Point, original_size: Size, resized_size: Size) -> Point:
    """Pixels of a resized image -> original-image pixels (how a prediction on a resized image is scored)."""
    (x, y), (width, height), (new_width, new_height) = point, original_size, resized_size
    return x * width / new_width, y * height / new_height


def smart_resize(
    width: int,
    height: int,
    factor: int = QWEN2_VL_FACTOR,
    min_pixels: int = QWEN2_VL_MIN_PIXELS,
    max_pixels: int = QWEN2_VL_MAX_PIXELS,
) -> Size:
    """The `(width, height)` a Qwen2-VL-style processor resizes an image to: each side the nearest multiple of
    `factor`, then scaled (keeping the aspect ratio) into `[min_pixels, max_pixels]`. Lets tests and tools predict
    where a point lands without loading a processor."""
    if width <= 0 or height <= 0:
        raise ValueError(f"Image size must be positive, got {width}x{height}.")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}.")
    new_width = max(factor, round(width / factor) * factor)
    new_height = max(factor, round(height / factor) * factor)
    if new_width * new_height > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        new_width = max(factor, math.floor(width / scale / factor) * factor)
        new_height = max(factor, math.floor(height / scale / factor) * factor)
    elif new_width * new_height < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        new_width = math.ceil(width * scale / factor) * factor
        new_height = math.ceil(height * scale / factor) * factor
    return new_width, new_height


def _map_point(action: dict[str, Any], mapping) -> dict[str, Any]:
    if action["type"] != "click":
        return dict(action)
    x, y = mapping((action["x"], action["y"]))
    return {**action, "x": _plain_number(x), "y": _plain_number(y)}


def to_coordinate_system(action: dict[str, Any], coordinate_system: str, image_size: Size) -> dict[str, Any]:
    """An action with its point (if any) moved from original-image pixels into `coordinate_system`."""
    if coordinate_system == "absolute":
        return dict(action)
    if coordinate_system == "normalized":
        return _map_point(action, lambda point: to_normalized(point, image_size))
    raise ValueError(f"Unknown coordinate_system {coordinate_system!r}; expected one of {list(COORDINATE_SYSTEMS)}.")


def to_original_pixels(action: dict[str, Any], coordinate_system: str, image_size: Size) -> dict[str, Any]:
    """An action with its point (if any) moved from `coordinate_system` back to original-image pixels."""
    if coordinate_system == "absolute":
        return dict(action)
    if coordinate_system == "normalized":
        return _map_point(action, lambda point: from_normalized(point, image_size))
    raise ValueError(f"Unknown coordinate_system {coordinate_system!r}; expected one of {list(COORDINATE_SYSTEMS)}.")


# Metrics ---------------------------------------------------------------------------------------------------------
def point_in_box(point: Point, bbox: Sequence[float]) -> bool:
    """Whether a point is inside `[x0, y0, x1, y1]`, edges included (a click on the border still hits the element)."""
    x, y = point
    x0, y0, x1, y1 = bbox
    return x0 <= x <= x1 and y0 <= y <= y1


def box_centre(bbox: Sequence[float]) -> Point:
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def score_action(
    predicted: dict[str, Any] | None, target: dict[str, Any], target_bbox: Sequence[float] | None
) -> dict[str, float]:
    """Per-example scores of a predicted action (None: unparsed) against the target, both in original-image pixels.

    Always: `parsed`, `type_correct`, `step_success` (type and every argument right: a click inside the box, the same
    text, the same scroll direction and amount, the same wait), `target_type_index` and `predicted_type_index` (-1:
    unparsed), so that `aggregate_action_scores` can break results down by type from the scores alone. Click targets
    add `click_in_box` and, when the prediction is a click, `click_distance` to the box centre. A click target without
    a box is scored by `click_distance` to the target point only: `click_in_box` and `step_success` are left out, as
    there is no element to hit. Type targets add `text_exact_match`.
    """
    kind = target["type"]
    same_type = predicted is not None and predicted["type"] == kind
    scores = {
        "parsed": float(predicted is not None),
        "type_correct": float(same_type),
        "target_type_index": float(ACTION_TYPES.index(kind)),
        "predicted_type_index": float(ACTION_TYPES.index(predicted["type"]) if predicted is not None else -1),
    }
    success: bool | None
    if kind == "click":
        point = (predicted["x"], predicted["y"]) if same_type else None
        if target_bbox is not None:
            success = point is not None and point_in_box(point, target_bbox)
            scores["click_in_box"] = float(success)
            centre = box_centre(target_bbox)
        else:
            success = None
            centre = (target["x"], target["y"])
        if point is not None:
            scores["click_distance"] = math.dist(point, centre)
    elif kind == "type":
        success = same_type and predicted["text"] == target["text"]
        scores["text_exact_match"] = float(success)
    elif kind == "scroll":
        success = (
            same_type and predicted["direction"] == target["direction"] and predicted["amount"] == target["amount"]
        )
    else:
        success = same_type and predicted["seconds"] == target["seconds"]
    if success is not None:
        scores["step_success"] = float(success)
    return scores


def aggregate_action_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Split-level metrics from `score_action` results; each is the mean over the examples it applies to (NaN if none).

    `parse_rate`, `action_type_accuracy`, `step_success`: all examples (clicks without a box aside for the last);
    `click_accuracy`: click targets with a box; `mean_click_distance`: click targets predicted as clicks;
    `typed_text_exact_match`: type targets; `step_success/<type>` and `count/<type>`: per target type.
    """

    def mean(key: str, subset: list[dict[str, float]] = scores) -> float:
        values = [score[key] for score in subset if key in score]
        return sum(values) / len(values) if values else float("nan")

    metrics = {
        "parse_rate": mean("parsed"),
        "action_type_accuracy": mean("type_correct"),
        "click_accuracy": mean("click_in_box"),
        "mean_click_distance": mean("click_distance"),
        "typed_text_exact_match": mean("text_exact_match"),
        "step_success": mean("step_success"),
    }
    for index, kind in enumerate(ACTION_TYPES):
        of_kind = [score for score in scores if score["target_type_index"] == index]
        metrics[f"step_success/{kind}"] = mean("step_success", of_kind)
        metrics[f"count/{kind}"] = float(len(of_kind))
    metrics["num_examples"] = float(len(scores))
    return metrics


# Prompt ----------------------------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "You operate a graphical user interface from screenshots. Given a screenshot and a task, answer with the single "
    "next action and nothing else, in one of these forms:\n{actions}\n{coordinates}"
)
USER_PROMPT = "Task: {task_description}"
_ACTION_DESCRIPTIONS = {
    "click": "click the point (x, y)",
    "type": "type the text into the focused field",
    "scroll": "scroll up, down, left or right by amount pixels",
    "wait": "wait that many seconds for the screen to change",
}
_COORDINATE_DESCRIPTIONS = {
    "absolute": "x and y are pixels of the screenshot, with (0, 0) at its top-left corner.",
    "normalized": (
        "x and y are on a 0-1000 grid over the screenshot, whatever its size: (0, 0) is its top-left corner and "
        "(1000, 1000) its bottom-right corner."
    ),
}


def _load_few_shot_examples(examples: Sequence[dict[str, Any]] | str | Path | None) -> list[dict[str, Any]]:
    """Validated few-shot examples: a list of `{"task", "action"}`, or the path of a JSON file holding one."""
    if examples is None:
        return []
    if isinstance(examples, (str, Path)):
        path = Path(examples)
        if not path.is_file():
            raise ValueError(f"few_shot_examples file {path} not found; give a JSON list of {{'task', 'action'}}.")
        examples = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(examples, (list, tuple)):
        raise ValueError(
            f"few_shot_examples must be a list of {{'task', 'action'}} dicts, got {type(examples).__name__}."
        )
    checked = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict) or not isinstance(example.get("task"), str):
            raise ValueError(f"few_shot_examples[{index}] must be a dict with a string `task`, got {example!r}.")
        try:
            checked.append({"task": example["task"], "action": validate_action(example.get("action"))})
        except ValueError as error:
            raise ValueError(f"few_shot_examples[{index}]: {error}.") from None
    return checked


# Demo data -------------------------------------------------------------------------------------------------------
# One screen size: 224x168 pixels are 8x6 Qwen image tokens of 28x28 pixels.
_SCREEN_SIZE = (224, 168)
# Click screens: four app screens, each known by its colours and title, each with its own fixed layout of four big
# buttons on a 2x2 grid below its title bar (as a real app keeps its buttons in place). The layouts form a Latin
# square (every label sits in every cell on one screen), so where to click depends on which screen the screenshot
# shows, not on the task's words alone: a model that ignores the image hits 1 click in 4. A tiny model can learn that
# from a few hundred examples; finding a button anywhere on a screen it never saw needs a real model.
_GRID_COLUMNS, _GRID_ROWS = 2, 2
_GRID_BUTTONS = {
    "Login": (40, 100, 210),
    "Submit": (30, 150, 90),
    "Cancel": (200, 40, 40),
    "Next": (235, 170, 20),
}
# (title, title-bar colour, background colour) of each click screen: backgrounds far apart from each other and from the
# buttons, since a tiny model tells the screens apart by their colours.
_CLICK_SCREENS = (
    ("Mail", (60, 64, 72), (250, 250, 250)),
    ("Shop", (20, 20, 24), (150, 70, 170)),
    ("Bank", (20, 60, 70), (70, 190, 200)),
    ("Chat", (90, 90, 90), (30, 30, 35)),
)
_TITLE_HEIGHT = 16
_FIELD_LABELS = ("Name", "Email", "User", "City", "Phone", "Code")
_FIELD_VALUES = ("alice", "bob42", "a@b.io", "Paris", "555-0199", "hello", "x7k2", "Oslo", "carol", "12345")
_BUTTON_LABELS = ("Login", "Submit", "Cancel", "Next", "Save", "Back", "Send", "Reset")
_LIST_ITEMS = ("Inbox", "Drafts", "Sent", "Archive", "Spam", "Trash", "Photos", "Music", "Videos", "Notes")
_TITLES = ("Sign in", "Settings", "Profile", "Checkout", "Mail", "Files")
_BACKGROUNDS = ((245, 245, 245), (236, 240, 246), (250, 247, 240))
_BUTTON_COLOURS = ((40, 100, 210), (30, 150, 90), (200, 70, 50), (110, 110, 120))
_DEMO_ACTION_CYCLE = ("click", "type", "click", "scroll", "click", "wait")


class _Screen:
    """A synthetic screenshot under construction, with the box of every element drawn on it."""

    def __init__(self, size: Size, rng: random.Random):
        from PIL import Image, ImageDraw, ImageFont

        self.size, self.rng = size, rng
        self.image = Image.new("RGB", size, rng.choice(_BACKGROUNDS))
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.elements: list[dict[str, Any]] = []

    def text_width(self, text: str) -> int:
        left, _, right, _ = self.draw.textbbox((0, 0), text, font=self.font)
        return right - left

    def label(self, xy: tuple[int, int], text: str, fill=(30, 30, 30)) -> None:
        self.draw.text(xy, text, fill=fill, font=self.font)

    def add(self, kind: str, label: str, bbox: list[int]) -> dict[str, Any]:
        element = {"kind": kind, "label": label, "bbox": bbox}
        self.elements.append(element)
        return element

    def title(self, text: str) -> None:
        width, _ = self.size
        self.draw.rectangle([0, 0, width - 1, 15], fill=(60, 64, 72))
        self.label((4, 2), text, fill=(255, 255, 255))

    def button(self, x: int, y: int, text: str) -> dict[str, Any]:
        bbox = [x, y, x + self.text_width(text) + 12, y + 16]
        self.draw.rectangle(bbox, fill=self.rng.choice(_BUTTON_COLOURS))
        self.label((x + 6, y + 3), text, fill=(255, 255, 255))
        return self.add("button", text, bbox)

    def field(self, y: int, text: str, value: str = "", focused: bool = False) -> dict[str, Any]:
        width, _ = self.size
        self.label((6, y + 3), text)
        bbox = [48, y, width - 8, y + 16]
        outline, border = ((40, 110, 230), 2) if focused else ((150, 150, 150), 1)
        self.draw.rectangle(bbox, fill=(255, 255, 255), outline=outline, width=border)
        if value:
            self.label((bbox[0] + 4, y + 3), value, fill=(90, 90, 90))
        if focused:  # a caret, so that the focused field is visible
            self.draw.line([bbox[0] + 4, y + 3, bbox[0] + 4, y + 13], fill=(0, 0, 0))
        return self.add("field", text, bbox)


def _form_screen(size: Size, rng: random.Random, focused: int | None = None) -> tuple[_Screen, list[dict[str, Any]]]:
    """A form: a title, two or three labelled fields (one maybe focused) and a row of buttons."""
    screen = _Screen(size, rng)
    width, height = size
    screen.title(rng.choice(_TITLES))
    labels = rng.sample(_FIELD_LABELS, rng.randint(2, 3))
    fields = []
    top = 22 + rng.randint(0, 6)
    for index, text in enumerate(labels):
        value = "" if index == focused or rng.random() < 0.5 else rng.choice(_FIELD_VALUES)
        fields.append(screen.field(top + 22 * index, text, value, focused=index == focused))
    x, y = 8 + rng.randint(0, 10), height - 24 - rng.randint(0, 4)
    for text in rng.sample(_BUTTON_LABELS, 2):
        if x + screen.text_width(text) + 12 > width - 4:
            break
        screen.button(x, y, text)
        x = screen.elements[-1]["bbox"][2] + 8 + rng.randint(0, 12)
    return screen, fields


def _list_screen(size: Size, rng: random.Random, thumb_low: bool = False) -> _Screen:
    """A list of items with a scrollbar (its thumb low when there is more above, for scroll-up tasks)."""
    screen = _Screen(size, rng)
    width, height = size
    screen.title(rng.choice(_TITLES))
    row_height = 18
    rows = (height - 22) // row_height
    for index, text in enumerate(rng.sample(_LIST_ITEMS, min(rows, len(_LIST_ITEMS)))):
        top = 20 + index * row_height
        bbox = [4, top, width - 14, top + row_height - 2]
        screen.draw.rectangle(bbox, fill=(255, 255, 255) if index % 2 == 0 else (232, 234, 238))
        screen.label((10, top + 3), text)
        screen.add("item", text, bbox)
    screen.draw.rectangle([width - 10, 18, width - 4, height - 4], fill=(215, 215, 220))
    thumb_top = height - 4 - 30 if thumb_low else 18
    screen.draw.rectangle([width - 10, thumb_top, width - 4, thumb_top + 30], fill=(120, 120, 130))
    return screen


def _loading_screen(size: Size, rng: random.Random) -> _Screen:
    """A page still loading: a message and a partly filled progress bar."""
    screen = _Screen(size, rng)
    width, height = size
    screen.title(rng.choice(_TITLES))
    screen.label((width // 2 - 24, height // 2 - 20), "Loading...")
    left, right = 16, width - 16
    filled = left + int((right - left) * rng.uniform(0.1, 0.8))
    screen.draw.rectangle([left, height // 2, right, height // 2 + 8], outline=(120, 120, 130))
    screen.draw.rectangle([left, height // 2, filled, height // 2 + 8], fill=(40, 100, 210))
    return screen


def _button_grid_screen(size: Size, rng: random.Random) -> _Screen:
    """One of `_CLICK_SCREENS`, its buttons in its own cells of the grid under the title bar (a margin aside)."""
    screen_index = rng.randrange(len(_CLICK_SCREENS))
    title, title_colour, background = _CLICK_SCREENS[screen_index]
    screen = _Screen(size, rng)
    width, height = size
    screen.draw.rectangle([0, 0, width - 1, height - 1], fill=background)
    screen.draw.rectangle([0, 0, width - 1, _TITLE_HEIGHT - 1], fill=title_colour)
    screen.label((4, 2), title, fill=(255, 255, 255))
    cell_width, cell_height = width // _GRID_COLUMNS, (height - _TITLE_HEIGHT) // _GRID_ROWS
    for position, (text, colour) in enumerate(_GRID_BUTTONS.items()):
        cell = (position + screen_index) % (_GRID_COLUMNS * _GRID_ROWS)  # the Latin square
        left, top = (cell % _GRID_COLUMNS) * cell_width, _TITLE_HEIGHT + (cell // _GRID_COLUMNS) * cell_height
        bbox = [left + 8, top + 8, left + cell_width - 9, top + cell_height - 9]
        screen.draw.rectangle(bbox, fill=colour)
        screen.label((bbox[0] + 6, (bbox[1] + bbox[3]) // 2 - 6), text, fill=(255, 255, 255))
        screen.add("button", text, bbox)
    return screen


def _centre_point(bbox: list[int]) -> tuple[int, int]:
    return (bbox[0] + bbox[2]) // 2, (bbox[1] + bbox[3]) // 2


def _demo_example(kind: str, rng: random.Random) -> tuple[Any, dict[str, Any]]:
    """One synthetic screenshot and its native row (without `id` and `image`) for an action of type `kind`."""
    size = _SCREEN_SIZE
    if kind == "click":
        screen = _button_grid_screen(size, rng)
        element = rng.choice(screen.elements)
        x, y = _centre_point(element["bbox"])
        templates = {"button": "Click the {} button", "field": "Click the {} field", "item": "Open {}"}
        row = {
            "task": templates[element["kind"]].format(element["label"]),
            "action": {"type": "click", "x": x, "y": y},
            "target_bbox": element["bbox"],
        }
    elif kind == "type":
        focused_index = rng.randint(0, 1)
        screen, fields = _form_screen(size, rng, focused=focused_index)
        focused = fields[focused_index]
        value = rng.choice(_FIELD_VALUES)
        row = {
            "task": f"Enter {value} in the {focused['label']} field",
            "action": {"type": "type", "text": value},
            "target_bbox": focused["bbox"],
        }
    elif kind == "scroll":
        direction = rng.choice(("up", "down"))
        amount = rng.choice((100, 200, 300))
        screen = _list_screen(size, rng, thumb_low=direction == "up")
        row = {
            "task": f"Scroll {direction} by {amount} pixels",
            "action": {"type": "scroll", "direction": direction, "amount": amount},
        }
    else:
        seconds = rng.choice((1, 2, 3, 5))
        screen = _loading_screen(size, rng)
        unit = "second" if seconds == 1 else "seconds"
        row = {"task": f"Wait {seconds} {unit} for the page to load", "action": {"type": "wait", "seconds": seconds}}
    row["elements"] = screen.elements
    return screen.image, row


# Task ------------------------------------------------------------------------------------------------------------
@dataclass
class UIActionsOptions:
    """Recipe keys of the `ui_actions` task.

    Args:
        action_format (`str`, *optional*, defaults to `"text"`):
            How the assistant writes an action: `text` (`click(100, 200)`), `json` (`{"type": "click", "x": 100,
            "y": 200}`) or `coordinates` (`100 200 click`).
        coordinate_system (`str`, *optional*, defaults to `"absolute"`):
            `absolute` pixels of the original screenshot, or `normalized` 0-1000 grid (robust to image resizing).
        few_shot_examples (`str`, *optional*):
            Path of a JSON file holding a list of `{"task", "action"}` examples for the system prompt, their points
            already in `coordinate_system` (the examples have no screenshot to scale against).
    """

    action_format: str = field(default="text", metadata={"help": "text, json or coordinates."})
    coordinate_system: str = field(default="absolute", metadata={"help": "absolute (pixels) or normalized (0-1000)."})
    few_shot_examples: str | None = field(
        default=None, metadata={"help": "JSON file with a list of {task, action} examples for the system prompt."}
    )

    def __post_init__(self):
        if self.action_format not in ACTION_FORMATS:
            raise ValueError(f"`action_format` must be one of {list(ACTION_FORMATS)}, got {self.action_format!r}.")
        if self.coordinate_system not in COORDINATE_SYSTEMS:
            raise ValueError(
                f"`coordinate_system` must be one of {list(COORDINATE_SYSTEMS)}, got {self.coordinate_system!r}."
            )


@register_task
class UIActionsTask(Task):
    """Screenshot + task -> next UI action; see the module docstring for the formats.

    Args:
        action_format (`str`, *optional*, defaults to `"text"`): `text`, `json` or `coordinates`.
        coordinate_system (`str`, *optional*, defaults to `"absolute"`): `absolute` or `normalized`.
        few_shot_examples (`list[dict]` or `str`, *optional*): `{"task", "action"}` examples (or a JSON file of
            them) rendered into the system prompt as given, i.e. with points already in `coordinate_system`.
    """

    name = "ui_actions"
    options = UIActionsOptions

    def __init__(
        self,
        action_format: str = "text",
        coordinate_system: str = "absolute",
        few_shot_examples: Sequence[dict[str, Any]] | str | Path | None = None,
    ):
        UIActionsOptions(action_format, coordinate_system)  # the same checks as a recipe's
        self.action_format = action_format
        self.coordinate_system = coordinate_system
        self.few_shot_examples = _load_few_shot_examples(few_shot_examples)
        # Every format parses, so that a model answering in another format than it was taught is still scored on
        # what it meant; the parse rate measures answers that are no action at all.
        self.decoder = ActionDecoder()
        self.system_prompt = self._system_prompt()

    # Prompt ----------------------------------------------------------------------------------------------------
    def _system_prompt(self) -> str:
        actions = "\n".join(
            f"- {_syntax(self.action_format, kind)}: {_ACTION_DESCRIPTIONS[kind]}" for kind in ACTION_TYPES
        )
        prompt = SYSTEM_PROMPT.format(actions=actions, coordinates=_COORDINATE_DESCRIPTIONS[self.coordinate_system])
        if self.few_shot_examples:
            shots = "\n\n".join(
                f"Task: {example['task']}\nAction: {encode_action(example['action'], self.action_format)}"
                for example in self.few_shot_examples
            )
            prompt += f"\n\nExamples:\n\n{shots}"
        return prompt

    def build_messages(self, task_description: str, answer: str) -> list[dict[str, Any]]:
        """System prompt, user turn (screenshot + task), assistant answer."""
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": USER_PROMPT.format(task_description=task_description)},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]

    def encode_target(self, action: dict[str, Any], image_size: Size) -> str:
        """The answer text of an action given in original-image pixels."""
        return encode_action(to_coordinate_system(action, self.coordinate_system, image_size), self.action_format)

    def decode_prediction(self, text: str, image_size: Size) -> dict[str, Any] | None:
        """A generated answer as an action in original-image pixels, or None when it does not parse."""
        action = self.decoder.try_decode(text)
        return None if action is None else to_original_pixels(action, self.coordinate_system, image_size)

    # Data ------------------------------------------------------------------------------------------------------
    def load_rows(
        self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport
    ) -> list[dict[str, Any]]:
        """Rows `{"id", "images", "messages", "action", "target_bbox", "image_size"}`; the last three, in
        original-image pixels, are what `score` compares against."""
        file = self.split_file(data_dir, split)
        rows = []
        for line, raw in read_jsonl(file, report):
            try:
                rows.append(self._row(raw, file, line, split, Path(image_base_dir), report.max_image_pixels))
            except BadRow as error:
                report.handle(error.with_row_id(raw.get("id")))
        return rows

    def _row(
        self, raw: dict[str, Any], file: Path, line: int, split: str, image_base_dir: Path, max_pixels: int | None
    ) -> dict[str, Any]:
        for key in ("image", "task", "action"):
            if key not in raw:
                raise BadRow(file, line, f"missing key `{key}`")
        if not isinstance(raw["task"], str) or not raw["task"].strip():
            raise BadRow(file, line, f"`task` must be a non-empty string, got {raw['task']!r}")
        try:
            action = validate_action(raw["action"])
            bbox = validate_bbox(raw["target_bbox"]) if raw.get("target_bbox") is not None else None
        except ValueError as error:
            raise BadRow(file, line, str(error)) from None
        image = resolve_image(raw["image"], image_base_dir, file, line, max_pixels)  # its header is checked
        image_size = read_image_header(image, max_pixels=None).size
        if action["type"] == "click":
            width, height = image_size
            if not (0 <= action["x"] <= width and 0 <= action["y"] <= height):
                raise BadRow(file, line, f"click ({action['x']}, {action['y']}) is outside the {width}x{height} image")
        return {
            "id": raw.get("id", f"{split}-{line}"),
            "images": [image],
            "messages": self.build_messages(raw["task"], self.encode_target(action, image_size)),
            "action": action,
            "target_bbox": bbox,
            "image_size": image_size,
        }

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        """Write `train/val/test.jsonl` (80/10/10) and PNG screenshots, half of them clicks (the one action that needs
        the image) and the other three action types in turn; the same `seed` writes the same bytes."""
        if num < 3:
            raise ValueError(f"make_data needs num >= 3 (one example per split at least), got {num}.")
        output_dir = Path(output_dir)
        rng = random.Random(seed)
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        for split, count in demo_split_sizes(num).items():
            lines = []
            for index in range(count):
                image, row = _demo_example(_DEMO_ACTION_CYCLE[index % len(_DEMO_ACTION_CYCLE)], rng)
                relative = f"images/{split}_{index:05d}.png"
                image.save(output_dir / relative)
                lines.append(json.dumps({"id": f"{split}-{index:05d}", "image": relative, **row}))
            rng.shuffle(lines)
            # Written last and whole, so that an interrupted run never leaves a split that looks complete.
            write_text_atomically(output_dir / f"{split}.jsonl", "\n".join(lines) + "\n")

    # Evaluation ------------------------------------------------------------------------------------------------
    def score(self, prediction: str, target: str, row: dict[str, Any]) -> dict[str, float]:
        """`score_action` of the decoded prediction against the row's action and box, in original-image pixels."""
        missing = [key for key in ("action", "target_bbox", "image_size") if key not in row]
        if missing:
            raise ValueError(
                f"Row {row.get('id')!r} lacks {missing}: ui_actions scores against the `action`, `target_bbox` and "
                "`image_size` that `load_rows` puts in each row; keep those columns when building the dataset."
            )
        image_size = tuple(row["image_size"])
        bbox = row["target_bbox"]
        return score_action(
            self.decode_prediction(prediction, image_size),
            validate_action(row["action"]),
            validate_bbox(bbox) if bbox is not None else None,
        )

    def aggregate(self, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> dict[str, float]:
        return aggregate_action_scores(scores)

    def annotate_image(self, image, row: dict[str, Any], prediction: str):
        """The screenshot with the target box and point in green and the predicted click (if any) in red, in
        original-image pixels."""
        from PIL import ImageDraw

        image = image.convert("RGB")  # a copy
        draw = ImageDraw.Draw(image)
        radius = max(3, min(image.size) // 40)
        if row.get("target_bbox") is not None:
            draw.rectangle(list(row["target_bbox"]), outline=ANNOTATION_COLOURS["target"], width=2)
        target = row.get("action") or {}
        if target.get("type") == "click":
            x, y = target["x"], target["y"]
            draw.line([x - radius, y, x + radius, y], fill=ANNOTATION_COLOURS["target"], width=2)
            draw.line([x, y - radius, x, y + radius], fill=ANNOTATION_COLOURS["target"], width=2)
        predicted = self.decode_prediction(prediction, tuple(row.get("image_size") or image.size))
        if predicted is not None and predicted["type"] == "click":
            x, y = predicted["x"], predicted["y"]
            draw.ellipse(
                [x - radius, y - radius, x + radius, y + radius], outline=ANNOTATION_COLOURS["prediction"], width=2
            )
        return image
