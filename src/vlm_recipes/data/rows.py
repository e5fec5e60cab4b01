"""Rows: reading a task's data files (JSONL, UTF-8 lines), the bad-row policy (error | skip, counted), and the
`datasets.Dataset` that the rows become (`build_dataset`).

Every task turns its native rows into `{"id", "images": [path, ...], "messages": [...]}`; `build_dataset` turns those
into a `datasets.Dataset` whose `images` column decodes to RGB PIL images on access, which is what the collator takes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadRow, DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb_image

__all__ = [
    "LISTED_BAD_ROWS",
    "BadRowReport",
    "build_dataset",
    "decode_utf8_lines",
    "decode_images",
    "decode_json_columns",
    "demo_split_sizes",
    "read_jsonl",
    "row_name",
]

# Bad rows listed by name in a report; the rest are counted.
LISTED_BAD_ROWS = 20


@dataclass
class BadRowReport:
    """Rows left out under `on_bad_row: skip`, so that nothing is dropped silently.

    It goes to every task's `load_rows` with what the rows are checked against: `max_image_pixels`, the most pixels
    an image's header may claim (`resolve_image(..., max_pixels=report.max_image_pixels)`).
    """

    policy: str = "error"
    skipped: list[BadRow] = field(default_factory=list)
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def handle(self, error: BadRow) -> None:
        if self.policy == "error":
            raise error
        self.skipped.append(error)

    def summary(self) -> str:
        if not self.skipped:
            return "no malformed rows"
        lines = [f"skipped {len(self.skipped)} malformed row(s):"]
        lines += [f"  - {error}" for error in self.skipped[:LISTED_BAD_ROWS]]
        if len(self.skipped) > LISTED_BAD_ROWS:
            lines.append(f"  ... and {len(self.skipped) - LISTED_BAD_ROWS} more")
        return "\n".join(lines)


def demo_split_sizes(num: int, min_held_out: int = 1) -> dict[str, int]:
    """Sizes of generated demo splits: 10% each for val and test (at least `min_held_out`), the rest for train."""
    held_out = max(min_held_out, num // 10)
    if num - 2 * held_out < 1:
        raise ValueError(f"{num} samples cannot fill val and test ({held_out} each) and leave any for train.")
    return {"train": num - 2 * held_out, "val": held_out, "test": held_out}


def decode_utf8_lines(data: bytes) -> tuple[list[str], dict[int, str]]:
    """The lines of a UTF-8 file (split where a text file's lines end: `\\n`, `\\r\\n` or `\\r`; each keeps its end)
    and, by 1-based line number, why a line is not UTF-8: `not UTF-8 (byte 0x.. at column N)`. Such a line is decoded
    with replacement characters, so that the lines after it can still be read; its caller reports it as a bad line."""
    lines, problems = [], {}
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            problems[number] = f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
            lines.append(raw.decode("utf-8", errors="replace"))
    return lines, problems


def read_jsonl(path: str | Path, report: BadRowReport) -> list[tuple[int, dict[str, Any]]]:
    """Return `(line number, row)` pairs of a JSONL file; a line that is not a JSON object (or not UTF-8) is a bad row.

    Each line is parsed on its own, so that a broken line (a truncated last line, say) is reported as that line. A
    file without any row is an error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} not found.")
    lines, problems = decode_utf8_lines(path.read_bytes())
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: the file is empty; a JSONL data file holds one JSON object per line.")
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if line_number in problems:
            report.handle(BadRow(path, line_number, problems[line_number], unit="line"))
            continue
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


def build_dataset(rows: list[dict[str, Any]], max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """A `datasets.Dataset` with `id`, `images` (decoded to RGB PIL images on access, by `load_rgb_image`) and
    `messages` columns, plus every other key of the rows (what a task's scoring needs: targets, boxes, task ids...).

    An image that cannot be decoded does not raise: its place in `images` holds None and the example's `image_error`
    says which image and why (`{"image", "reason"}`; None on a good example), for the collator's `on_bad_row`.
    """
    import datasets

    if not rows:
        raise DataError("No usable rows: the dataset is empty after loading.")
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
    return dataset.with_transform(functools.partial(decode_json_columns, max_image_pixels=max_image_pixels))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot store a {type(value).__name__} in a dataset row; use JSON types.")


def decode_images(images: Any, max_image_pixels: int | None) -> tuple[list[Any], dict | None]:
    """A row's images (paths, bytes or `datasets.Image` storage dicts; one, a list, or None) as RGB PIL images, and
    the first decoding error (`{"image", "reason"}`), the failed image's place holding None."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    decoded, error = [], None
    for image in images:
        try:
            decoded.append(load_rgb_image(image, max_image_pixels))
        # Why so broad: this runs in the DataLoader, mid-training, and PIL's decoders raise many types for a corrupt
        # file (OSError, SyntaxError, ValueError, struct.error, zlib.error, MemoryError...); each is recorded and left
        # to the collator's `on_bad_row`, which stops naming the sample or skips it.
        except Exception as exception:  # noqa: BLE001
            decoded.append(None)
            name = (image.get("path") or "(image bytes)") if isinstance(image, dict) else image
            name = "(image bytes)" if isinstance(name, (bytes, bytearray)) else name
            error = error or {"image": str(name), "reason": f"cannot decode: {exception}"}
    return decoded, error


def decode_json_columns(batch: dict[str, list[Any]], max_image_pixels: int | None = None) -> dict[str, list[Any]]:
    """The transform of our datasets: images decoded (`decode_images`), `messages` and the task's `extra` fields
    parsed from their JSON text."""
    if "images" in batch:  # `datasets.Image` storage dicts -> RGB PIL images, or None and an `image_error`
        decoded = [decode_images(images, max_image_pixels) for images in batch["images"]]
        batch["images"] = [images for images, _ in decoded]
        batch["image_error"] = [error for _, error in decoded]
    batch["messages"] = [json.loads(messages) for messages in batch["messages"]]
    if "extra" not in batch:  # rows of a `dataset_name` dataset carry no task fields
        return batch
    extras = [json.loads(extra) for extra in batch.pop("extra")]
    for key in sorted({key for extra in extras for key in extra}):
        batch[key] = [extra.get(key) for extra in extras]
    return batch


def row_name(example: dict[str, Any], index: int) -> str:
    """How errors name a row of a batch or split: its index and its id."""
    row_id = example.get("id")
    return f"row {index} (id {row_id!r})" if row_id is not None else f"row {index}"
