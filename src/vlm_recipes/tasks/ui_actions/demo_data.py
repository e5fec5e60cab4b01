"""Demo data of ui_actions: synthetic screenshots (forms, lists, loading pages, button grids) and native rows."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ...data.rows import demo_split_sizes
from ...files import write_text_atomically
from .geometry import Size

__all__ = ["write_demo_data"]

# One screen size: 224x168 pixels are 8x6 Qwen image tokens of 28x28 pixels (the demo's tiny SmolVLM sees it as a
# 128x96 view).
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
# Five clicks in eight rows: the clicks are what needs the screenshot, and at half of the rows the tiny demo model
# learned the 16 (screen, button) places in some training seeds only (click accuracy 0.47-0.87 over three runs).
_DEMO_ACTION_CYCLE = ("click", "type", "click", "scroll", "click", "wait", "click", "click")


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


def write_demo_data(output_dir: Path, num: int, seed: int) -> None:
    """Write `train/val/test.jsonl` (80/10/10) and PNG screenshots, five in eight of them clicks (the one action
    that needs the image) and the other three action types in turn; the same `seed` writes the same bytes."""
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
