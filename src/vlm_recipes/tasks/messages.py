"""The generic task: data already in messages format, one JSONL file per split.

`<dataset_path>/<split>.jsonl`, one row per line: `{"id": ..., "images": ["relative/or/absolute.png", ...],
"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
{"role": "assistant", "content": "..."}]}`. Image paths are relative to `image_base_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.errors import BadRow
from ..data.images import resolve_image
from ..data.rows import BadRowReport, read_jsonl
from .base import Task, register_task


def check_messages(messages: Any, num_images: int, file: Path, row: int | str) -> None:
    """Structural checks of one row's messages, so that a broken row is reported at load time, not mid-training."""
    if not isinstance(messages, list) or not messages:
        raise BadRow(file, row, "`messages` must be a non-empty list")
    placeholders = 0
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise BadRow(file, row, f"message {turn} needs a `role` of system, user or assistant")
        content = message.get("content")
        if isinstance(content, list):
            placeholders += sum(isinstance(item, dict) and item.get("type") == "image" for item in content)
        elif not isinstance(content, str):
            raise BadRow(file, row, f"message {turn} has no string or list `content`")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRow(file, row, "no assistant turn to learn from")
    if placeholders != num_images:
        raise BadRow(file, row, f"{placeholders} image placeholder(s) in `messages` but {num_images} image(s)")


@register_task
class MessagesTask(Task):
    name = "messages"

    def load_rows(
        self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport
    ) -> list[dict[str, Any]]:
        file = self.split_file(data_dir, split)
        rows = []
        for line_number, raw in read_jsonl(file, report):
            try:
                images = raw.get("images") or []
                if not isinstance(images, list):
                    raise BadRow(file, line_number, "`images` must be a list of paths")
                images = [
                    resolve_image(path, image_base_dir, file, line_number, report.max_image_pixels) for path in images
                ]
                check_messages(raw.get("messages"), len(images), file, line_number)
            except BadRow as error:
                report.handle(error.with_row_id(raw.get("id")))
                continue
            rows.append({"id": raw.get("id", f"{split}-{line_number}"), "images": images, "messages": raw["messages"]})
        return rows
