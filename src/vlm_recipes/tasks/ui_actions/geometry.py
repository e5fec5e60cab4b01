"""Coordinates of ui_actions: where a point of an action lies, in which coordinate system and image size.

Points are in the `coordinate_system`: `absolute` (pixels of the original screenshot) or `normalized` (a 0-1000 grid
over the screenshot, `x_norm = round(x / width * 1000)`). A processor that resizes images (Qwen2-VL's smart resize,
see `smart_resize`) shows the model a screenshot of another size than the original: normalized points mean the same
place at any size, while absolute points ask the model to answer in pixels of a screenshot it never saw at that size
(learnable when all screenshots share a size; prefer `normalized` for mixed resolutions). `to_resized` and
`from_resized` map points into and out of a resized image. Metrics always compare in original-image pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .format import plain_number

__all__ = [
    "COORDINATE_SYSTEMS",
    "Point",
    "Size",
    "box_centre",
    "from_normalized",
    "from_resized",
    "point_in_box",
    "smart_resize",
    "to_coordinate_system",
    "to_normalized",
    "to_original_pixels",
    "to_resized",
]

COORDINATE_SYSTEMS = ("absolute", "normalized")
NORMALIZED_GRID = 1000

# Qwen2-VL's image processor defaults: sides are multiples of 28 (14-pixel patches merged 2x2) and the area stays
# within [56*56, 28*28*1280] pixels.
QWEN2_VL_FACTOR = 28
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 1280

Point = tuple[float, float]
Size = tuple[int, int]


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
    return {**action, "x": plain_number(x), "y": plain_number(y)}


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


def point_in_box(point: Point, bbox: Sequence[float]) -> bool:
    """Whether a point is inside `[x0, y0, x1, y1]`, edges included (a click on the border still hits the element)."""
    x, y = point
    x0, y0, x1, y1 = bbox
    return x0 <= x <= x1 and y0 <= y <= y1


def box_centre(bbox: Sequence[float]) -> Point:
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2, (y0 + y1) / 2
