"""UI actions: a screenshot and a task ("Click the login button") -> the next action to take on that screen.

Native format: `<data_dir>/<split>.jsonl` (train, val, test), one row per line:
`{"id", "image", "task", "action", "target_bbox"?}`. `image` is a screenshot path relative to `image_base_dir`,
`task` the instruction, `action` an action dict (see `format`: click, type, scroll or wait), and `target_bbox`
`[x0, y0, x1, y1]` the target element's box in original-image pixels: a click is right when it lands inside it.
Other keys (the demo data's `elements`, every drawn element with its box) are ignored.

The assistant answer is the action in the recipe's `action_format` (`format`), its point in the `coordinate_system`
(`geometry`); `score` decodes a prediction back to original-image pixels and scores it (`metrics`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...data.errors import BadRow
from ...data.images import read_image_header, resolve_image
from ...data.rows import BadRowReport, read_jsonl
from ..base import Task, register_task
from .demo_data import write_demo_data
from .format import (
    ACTION_FORMATS,
    ACTION_TYPES,
    ActionDecoder,
    action_syntax,
    encode_action,
    validate_action,
    validate_bbox,
)
from .geometry import COORDINATE_SYSTEMS, Size, to_coordinate_system, to_original_pixels
from .metrics import aggregate_action_scores, score_action

__all__ = ["ANNOTATION_COLOURS", "SYSTEM_PROMPT", "USER_PROMPT", "UIActionsOptions", "UIActionsTask"]

# `annotate_image` (W&B sample table): the target box and point, and the predicted point.
ANNOTATION_COLOURS = {"target": (0, 200, 0), "prediction": (230, 0, 0)}


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
    """Screenshot + task -> next UI action; see the module docstring and `format` for the formats.

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
            f"- {action_syntax(self.action_format, kind)}: {_ACTION_DESCRIPTIONS[kind]}" for kind in ACTION_TYPES
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
        """Synthetic screenshots and rows; see `demo_data.write_demo_data`."""
        write_demo_data(output_dir, num, seed)

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
