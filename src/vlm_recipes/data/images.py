"""Images of the rows: their headers read at load time (size and mode, no pixels), their pixels decoded to RGB on
access, both held to the recipe's `max_image_pixels` in place of PIL's own decompression-bomb limit."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadRow, DataError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageHeader",
    "load_rgb_image",
    "read_image_header",
    "resolve_image",
    "to_rgb",
    "without_pil_pixel_limit",
]

# PIL's own `Image.MAX_IMAGE_PIXELS` (Pillow 11-13), the default of the recipe key `max_image_pixels`.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Image modes that `to_rgb` converts (PIL converts "La" to nothing; other modes do not come out of `Image.open`).
RGB_CONVERTIBLE_MODES = frozenset(
    ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F")
    + ("I;16", "I;16L", "I;16B", "I;16N")
)
_EXIF_ORIENTATION = 0x0112


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
    """Decode an image (a path, its bytes, or a `datasets.Image` storage dict `{"path", "bytes"}`) to an RGB PIL image: pixel
    count checked against `max_pixels`, EXIF rotation applied (as `datasets` does), then `to_rgb`.

    Raises what PIL raises for a file it cannot decode (`OSError: image file is truncated`...).
    """
    from PIL import Image, ImageOps

    name, data = source, None
    if isinstance(source, (bytes, bytearray)):
        name, data = None, bytes(source)
    elif isinstance(source, dict):
        name, data = source.get("path"), source.get("bytes")
    with without_pil_pixel_limit():
        image = Image.open(io.BytesIO(data) if data else name)
    with image:  # closes the file; the decoded pixels stay
        _check_pixels(image.size, name or "(bytes)", max_pixels)
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION) is not None:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
