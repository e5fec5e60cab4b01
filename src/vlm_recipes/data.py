"""Dataset loading shared by the tasks: row checks, image paths, and the bad-row policy (error | skip, counted).

Every task turns its native rows into `{"id", "images": [path, ...], "messages": [...]}`; `build_dataset` turns those
into a `datasets.Dataset` whose `images` column decodes to PIL images on access, which is what the collator takes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BadRow",
    "DataError",
    "BadRowReport",
    "build_dataset",
    "read_jsonl",
    "demo_split_sizes",
    "resolve_image",
    "write_text_atomically",
]


class DataError(ValueError):
    """A problem with the data (a file, a row, an image), reported as one line without a traceback (exit 2)."""


class BadRow(DataError):
    """A malformed data row; the message names the file, the row (and its id, when known) and what is wrong."""

    def __init__(self, file: str | Path, row: int | str, reason: str, row_id: str | None = None):
        self.file, self.row, self.reason, self.row_id = str(file), row, reason, row_id
        where = f"row {row}" if row_id is None or str(row_id) == str(row) else f"row {row} (id {row_id})"
        super().__init__(f"{file}, {where}: {reason}")


@dataclass
class BadRowReport:
    """Rows left out under `on_bad_row: skip`, so that nothing is dropped silently."""

    policy: str = "error"
    skipped: list[BadRow] = field(default_factory=list)

    def handle(self, error: BadRow) -> None:
        if self.policy == "error":
            raise error
        self.skipped.append(error)

    def summary(self) -> str:
        if not self.skipped:
            return "no malformed rows"
        lines = [f"skipped {len(self.skipped)} malformed row(s):"]
        lines += [f"  - {error}" for error in self.skipped[:50]]
        if len(self.skipped) > 50:
            lines.append(f"  ... and {len(self.skipped) - 50} more")
        return "\n".join(lines)


def demo_split_sizes(num: int, min_held_out: int = 1) -> dict[str, int]:
    """Sizes of generated demo splits: 10% each for val and test (at least `min_held_out`), the rest for train."""
    held_out = max(min_held_out, num // 10)
    if num - 2 * held_out < 1:
        raise ValueError(f"{num} samples cannot fill val and test ({held_out} each) and leave any for train.")
    return {"train": num - 2 * held_out, "val": held_out, "test": held_out}


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written file that looks complete."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def read_jsonl(path: str | Path, report: BadRowReport) -> list[tuple[int, dict[str, Any]]]:
    """Return `(line number, row)` pairs of a JSONL file; a line that is not a JSON object is a bad row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} not found.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                report.handle(BadRow(path, line_number, f"invalid JSON ({error.msg} at column {error.colno})"))
                continue
            if not isinstance(row, dict):
                report.handle(BadRow(path, line_number, f"expected a JSON object, got {type(row).__name__}"))
                continue
            rows.append((line_number, row))
    return rows


def resolve_image(path_value: Any, base_dir: Path, file: Path, row: int | str) -> str:
    """Absolute path of an existing image file, or a `BadRow` that says which one is missing."""
    if not isinstance(path_value, str) or not path_value:
        raise BadRow(file, row, f"image path must be a non-empty string, got {path_value!r}")
    image_path = Path(path_value)
    if not image_path.is_absolute():
        image_path = base_dir / image_path
    if not image_path.is_file():
        raise BadRow(file, row, f"image file {image_path} not found")
    return str(image_path)


def build_dataset(rows: list[dict[str, Any]]):
    """A `datasets.Dataset` with `id`, `images` (decoded to PIL on access) and `messages` columns, plus every other
    key of the rows (what a task's scoring needs: targets, boxes, task ids...)."""
    import datasets

    if not rows:
        raise ValueError("No usable rows: the dataset is empty after loading.")
    core = ("id", "images", "messages")
    records = [
        {
            "id": str(row["id"]),
            "images": list(row["images"]),
            "messages": json.dumps(row["messages"]),
            "extra": json.dumps({key: value for key, value in row.items() if key not in core}, default=_jsonable),
        }
        for row in rows
    ]
    dataset = datasets.Dataset.from_list(records)
    # Images are decoded by our transform, once each: `datasets` 5.2 decodes the first image of every `List(Image())`
    # row twice (once only to test whether decoding changes it, in `features.decode_nested_example`).
    dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    # Messages and the task's extra fields are stored as JSON text (their shapes vary from row to row, which Arrow
    # would pad with nulls) and parsed back on access.
    return dataset.with_transform(_decode_json_columns)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot store a {type(value).__name__} in a dataset row; use JSON types.")


def _decode_json_columns(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    if "images" in batch:  # `datasets.Image` storage dicts -> PIL images (EXIF rotation applied, as datasets does)
        import datasets

        feature = datasets.Image()
        batch["images"] = [[feature.decode_example(image) for image in images or []] for images in batch["images"]]
    batch["messages"] = [json.loads(messages) for messages in batch["messages"]]
    extras = [json.loads(extra) for extra in batch.pop("extra")]
    for key in sorted({key for extra in extras for key in extra}):
        batch[key] = [extra.get(key) for extra in extras]
    return batch
