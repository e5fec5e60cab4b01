"""The chess task: board image -> position JSON (see `format`), read from the native rows (see `native`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...data.errors import BadRow, DataError
from ...data.rows import BadRowReport, decode_utf8_lines
from ..base import Task, register_task
from .demo_data import write_demo_data
from .metrics import aggregate_position_scores, position_scores
from .native import row_from_native

__all__ = ["ChessTask"]


@register_task
class ChessTask(Task):
    """Board image -> position JSON; see `format` for the answer and `metrics.position_scores` for the metrics."""

    name = "chess"

    split_filename = "{split}.json"

    def load_rows(
        self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport
    ) -> list[dict[str, Any]]:
        """Rows `{"id", "images", "messages", "fen"}`; a bad row (its `row` is its 0-based index in the list) goes to
        `report`. A file that is not a JSON list cannot be read row by row, so it raises a `DataError` naming the
        file and the line instead."""
        file = self.split_file(data_dir, split)
        if not file.is_file():
            raise FileNotFoundError(f"Data file {file} not found.")
        lines, problems = decode_utf8_lines(file.read_bytes())
        if problems:
            line = min(problems)
            raise DataError(f"{file}, line {line}: {problems[line]}")
        text = "".join(lines)
        if not text.strip():
            raise DataError(f"{file}: the file is empty; a chess data file holds a JSON list of rows.")
        try:
            raw_rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{file}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(raw_rows, list):
            raise DataError(f"{file} must hold a JSON list of rows, got a {type(raw_rows).__name__}.")
        rows = []
        for index, raw in enumerate(raw_rows):
            try:
                rows.append(row_from_native(raw, file, index, split, Path(image_base_dir), report.max_image_pixels))
            except BadRow as error:
                report.handle(error.with_row_id(raw.get("id") if isinstance(raw, dict) else None))
        return rows

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        """Write `train/val/test.json` (80/10/10, at least one held-out row each) and 128x128 board PNGs of random
        legal positions, the same bytes for the same seed."""
        write_demo_data(output_dir, num, seed)

    def score(self, prediction: str, target: str, row: dict[str, Any]) -> dict[str, float | None]:
        # From the target text, not row["fen"]: evaluation rows come back from a `datasets.Dataset` without it.
        return position_scores(prediction, target)

    def aggregate(self, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> dict[str, float]:
        return aggregate_position_scores(scores)
