"""Dataset loading shared by the tasks: row checks, image paths, and the bad-row policy (error | skip, counted).

Every task turns its native rows into `{"id", "images": [path, ...], "messages": [...]}`; `build_dataset` turns those
into a `datasets.Dataset` whose `images` column decodes to RGB PIL images on access, which is what the collator takes.

Images are checked twice, so that no image stops a run with a PIL traceback:
- at load time, `resolve_image` reads each image's header (size and mode, no pixels): a missing, empty or non-image
  file, or one over `max_image_pixels`, is a bad row of its data file (error | skip);
- when pixels are decoded (a truncated file is found only then), the dataset's transform records the failure in the
  example's `image_error` instead of raising, and the collator applies the same policy to it.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "BadRow",
    "BadRowReport",
    "DataError",
    "ImageHeader",
    "build_dataset",
    "decode_utf8_lines",
    "demo_split_sizes",
    "load_rgb_image",
    "read_image_header",
    "read_jsonl",
    "resolve_image",
    "row_name",
    "to_rgb",
    "without_pil_pixel_limit",
]

# PIL's own `Image.MAX_IMAGE_PIXELS` (Pillow 11-13), the default of the recipe key `max_image_pixels`.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Bad rows listed by name in a report; the rest are counted.
LISTED_BAD_ROWS = 20
# Image modes that `to_rgb` converts (PIL converts "La" to nothing; other modes do not come out of `Image.open`).
RGB_CONVERTIBLE_MODES = frozenset(
    ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F")
    + ("I;16", "I;16L", "I;16B", "I;16N")
)
_EXIF_ORIENTATION = 0x0112


class DataError(ValueError):
    """A problem with the data (a file, a row, an image), reported as one line without a traceback (exit 2)."""


class BadRow(DataError):
    """A malformed data row; the message names the file, the row (and its id, when known) and what is wrong."""

    def __init__(self, file: str | Path, row: int | str, reason: str, row_id: str | None = None, unit: str = "row"):
        # `unit`: "line" where the row could not be read at all (bytes that are not UTF-8), so it has no row yet.
        self.file, self.row, self.reason, self.row_id, self.unit = str(file), row, reason, row_id, unit
        where = f"{unit} {row}" if row_id is None or str(row_id) == str(row) else f"{unit} {row} (id {row_id})"
        super().__init__(f"{file}, {where}: {reason}")

    def with_row_id(self, row_id: Any) -> BadRow:
        """This error naming the row's id too: the checks that raise (`resolve_image`...) do not know it."""
        if row_id is None or self.row_id is not None:
            return self
        return BadRow(self.file, self.row, self.reason, row_id=str(row_id), unit=self.unit)


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


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding its pixels."""

    width: int
    height: int
    mode: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


# Why: PIL's decompression-bomb check (`Image.MAX_IMAGE_PIXELS`, process-wide) warns above its limit and raises above
# twice it; we hold every image to the recipe's `max_image_pixels` instead, which may be higher or lower. PIL's check
# is off only while a file is opened (the header is read); the lock keeps two threads from restoring the wrong value.
_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def without_pil_pixel_limit():
    """PIL's decompression-bomb check off inside (for opening a file; the caller checks `max_image_pixels`)."""
    from PIL import Image

    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(size: tuple[int, int], name: Any, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise DataError(f"image {name} has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(
            f"image {name} is {width}x{height} ({width * height:,} pixels), over max_image_pixels={max_pixels:,}: "
            "a decompression bomb or an image too large to train on; raise `max_image_pixels` to allow it"
        )


def read_image_header(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Size and mode of an image file from its header (no pixels decoded), or a `DataError` saying why it is unusable:
    missing, empty, not an image PIL can read, in a mode with no RGB conversion, or over `max_pixels` pixels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"image file {path} is empty (0 bytes)")
        with without_pil_pixel_limit(), Image.open(path) as image:
            header = ImageHeader(image.width, image.height, image.mode)
    except FileNotFoundError:
        raise DataError(f"image file {path} not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path} is not an image file that PIL can read") from None
    # What PIL's format plugins raise for a header they cannot parse.
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read the header of image {path}: {error}") from None
    if header.mode not in RGB_CONVERTIBLE_MODES:
        raise DataError(f"image {path} has mode {header.mode!r}, which cannot be converted to RGB")
    _check_pixels(header.size, path, max_pixels)
    return header


def resolve_image(
    path_value: Any, base_dir: Path, file: Path, row: int | str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> str:
    """Absolute path of a usable image file, or a `BadRow` that says what is wrong with it.

    The image's header is read (`read_image_header`: size and mode, no pixels), so that a missing, empty, non-image
    or over-`max_pixels` file is a bad row of its data file at load time rather than a crash during training. Tasks
    pass `report.max_image_pixels`, the recipe's limit.
    """
    if not isinstance(path_value, str) or not path_value:
        raise BadRow(file, row, f"image path must be a non-empty string, got {path_value!r}")
    image_path = Path(path_value)
    if not image_path.is_absolute():
        image_path = base_dir / image_path
    if not image_path.is_file():
        raise BadRow(file, row, f"image file {image_path} not found")
    try:
        read_image_header(image_path, max_pixels)
    except DataError as error:
        raise BadRow(file, row, str(error)) from None
    return str(image_path)


def to_rgb(image):
    """An RGB copy of a PIL image (the image itself when it is RGB already), whatever its mode.

    - 16-bit grayscale (`I;16*`, and `I`, as which PIL opens 16-bit PNGs) is scaled to 8 bits (value >> 8, i.e. / 257
      rounded down), where PIL's own conversion clips every value above 255 to white;
    - transparency (an alpha band, or a palette's or colour key's `transparency`) is composited on white, as
      transformers' `convert_to_rgb` does (a plain conversion would drop alpha and show the hidden colours);
    - other modes (palette, CMYK, bilevel, YCbCr...) go through PIL's conversion.
    """
    import numpy
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = numpy.asarray(image).astype(numpy.int64)
        gray = (numpy.clip(values, 0, 65535) >> 8).astype(numpy.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(source: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Decode an image (a path, or a `datasets.Image` storage dict `{"path", "bytes"}`) to an RGB PIL image: pixel
    count checked against `max_pixels`, EXIF rotation applied (as `datasets` does), then `to_rgb`.

    Raises what PIL raises for a file it cannot decode (`OSError: image file is truncated`...).
    """
    from PIL import Image, ImageOps

    name, data = source, None
    if isinstance(source, dict):
        name, data = source.get("path"), source.get("bytes")
    with without_pil_pixel_limit():
        image = Image.open(io.BytesIO(data) if data else name)
    with image:  # closes the file; the decoded pixels stay
        _check_pixels(image.size, name or "(bytes)", max_pixels)
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION) is not None:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)


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
    return dataset.with_transform(functools.partial(_decode_json_columns, max_image_pixels=max_image_pixels))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot store a {type(value).__name__} in a dataset row; use JSON types.")


def _decode_images(images: list[Any] | None, max_image_pixels: int | None) -> tuple[list[Any], dict | None]:
    decoded, error = [], None
    for image in images or []:
        try:
            decoded.append(load_rgb_image(image, max_image_pixels))
        # Why so broad: this runs in the DataLoader, mid-training, and PIL's decoders raise many types for a corrupt
        # file (OSError, SyntaxError, ValueError, struct.error, zlib.error, MemoryError...); each is recorded and left
        # to the collator's `on_bad_row`, which stops naming the sample or skips it.
        except Exception as exception:  # noqa: BLE001
            decoded.append(None)
            name = (image.get("path") or "(image bytes)") if isinstance(image, dict) else image
            error = error or {"image": str(name), "reason": f"cannot decode: {exception}"}
    return decoded, error


def _decode_json_columns(batch: dict[str, list[Any]], max_image_pixels: int | None = None) -> dict[str, list[Any]]:
    if "images" in batch:  # `datasets.Image` storage dicts -> RGB PIL images, or None and an `image_error`
        decoded = [_decode_images(images, max_image_pixels) for images in batch["images"]]
        batch["images"] = [images for images, _ in decoded]
        batch["image_error"] = [error for _, error in decoded]
    batch["messages"] = [json.loads(messages) for messages in batch["messages"]]
    extras = [json.loads(extra) for extra in batch.pop("extra")]
    for key in sorted({key for extra in extras for key in extra}):
        batch[key] = [extra.get(key) for extra in extras]
    return batch


def row_name(example: dict[str, Any], index: int) -> str:
    """How errors name a row of a batch or split: its index and its id."""
    row_id = example.get("id")
    return f"row {index} (id {row_id!r})" if row_id is not None else f"row {index}"
