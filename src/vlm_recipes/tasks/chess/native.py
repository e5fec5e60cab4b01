"""The native chess rows: reading one into a training row, and writing one.

Native format: `<data_dir>/<split>.json` (`train`, `val`, `test`), each a JSON list of rows
`{"id": "chess_000001", "image": "train/images/train_000001.png", "conversations": [{"from": "user", "value":
"<image>\\nAnalyze this chess board image ..."}, {"from": "assistant", "value": "<position JSON>"}]}`, image paths
relative to `image_base_dir`. `from` may also use the LLaVA names `human` / `gpt`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...data.errors import BadRow
from ...data.images import resolve_image
from ...files import write_text_atomically
from .format import fen_to_position_json, format_position, position_json_to_fen

__all__ = ["IMAGE_MARKER", "PROMPT", "native_row", "row_from_native", "write_split_rows"]

PROMPT = (
    "Analyze this chess board image and describe the position in JSON format: the pieces (square, color, type) "
    "and the metadata (side to move, castling rights, en passant square, halfmove clock, fullmove number)."
)
IMAGE_MARKER = "<image>"

_USER_ROLES = {"user": "user", "human": "user"}
_ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant"}


def native_row(row_id: str, image: str, fen: str) -> dict[str, Any]:
    """The native row of a board image (its path as written in the file) labelled with a FEN."""
    return {
        "id": row_id,
        "image": image,
        "conversations": [
            {"from": "user", "value": f"{IMAGE_MARKER}\n{PROMPT}"},
            {"from": "assistant", "value": format_position(fen_to_position_json(fen))},
        ],
    }


def write_split_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the native rows of one split as `<split>.json`."""
    # Written whole then renamed, so that an interrupted run never leaves a split that looks complete.
    write_text_atomically(path, json.dumps(rows, indent=2) + "\n")


def row_from_native(
    raw: Any, file: Path, index: int, split: str, image_base_dir: Path, max_pixels: int | None
) -> dict[str, Any]:
    """One native row as a training row, or a `BadRow` naming what is wrong."""
    if not isinstance(raw, dict):
        raise BadRow(file, index, f"expected a JSON object, got {type(raw).__name__}")
    for key in ("image", "conversations"):
        if key not in raw:
            raise BadRow(file, index, f"missing key `{key}`")
    conversations = raw["conversations"]
    if not isinstance(conversations, list) or len(conversations) != 2:
        raise BadRow(file, index, "`conversations` must be a list of two turns (user, then assistant)")
    for turn, (message, roles) in enumerate(zip(conversations, (_USER_ROLES, _ASSISTANT_ROLES))):
        if (
            not isinstance(message, dict)
            or message.get("from") not in roles
            or not isinstance(message.get("value"), str)
        ):
            raise BadRow(file, index, f"turn {turn} must be {{'from': one of {sorted(roles)}, 'value': <string>}}")
    question, answer = conversations[0]["value"], conversations[1]["value"]
    markers = question.count(IMAGE_MARKER) + answer.count(IMAGE_MARKER)
    if markers != 1 or IMAGE_MARKER not in question:
        raise BadRow(file, index, f"expected one `{IMAGE_MARKER}` marker, in the user turn; found {markers}")
    try:
        position = json.loads(answer)
    except json.JSONDecodeError as error:
        raise BadRow(file, index, f"assistant value is not JSON ({error.msg} at column {error.colno})") from None
    try:
        fen = position_json_to_fen(position)
    except ValueError as error:
        raise BadRow(file, index, f"assistant value is not a valid position JSON: {error}") from None
    image = resolve_image(raw["image"], image_base_dir, file, index, max_pixels)
    # The image goes where the marker was, so that a prompt with text before the image keeps its order.
    before, after = (text.strip() for text in question.split(IMAGE_MARKER))
    user_content = [
        *([{"type": "text", "text": before}] if before else []),
        {"type": "image"},
        *([{"type": "text", "text": after}] if after else []),
    ]
    messages = [
        {"role": "user", "content": user_content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"id": raw.get("id", f"{split}-{index}"), "images": [image], "messages": messages, "fen": fen}
