"""A toy task for the CPU demo: name the colour of a shape drawn on a plain background.

Its native format is the generic messages JSONL (`vlm_recipes.tasks.messages`); what it adds is a deterministic
generator of images and conversations, so that the demo runs anywhere, offline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data.rows import demo_split_sizes
from ..files import write_text_atomically
from .base import register_task
from .messages import MessagesTask

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
QUESTION = "What colour is the shape?"


def _draw(colour: tuple[int, int, int], shape: str, size: tuple[int, int], rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    width, height = size
    side = rng.randint(min(size) // 3, min(size) * 2 // 3)
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (left, top, left + side, top + side)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(left, top + side), (left + side // 2, top), (left + side, top + side)], fill=colour)
    return image


@register_task
class ShapesTask(MessagesTask):
    name = "shapes"

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        """Write `train.jsonl`, `val.jsonl`, `test.jsonl` (80/10/10) and their PNG images under `output_dir`."""
        output_dir = Path(output_dir)
        rng = random.Random(seed)
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        for split, count in demo_split_sizes(num).items():
            lines = []
            for index in range(count):
                colour = rng.choice(sorted(COLOURS))
                shape = rng.choice(SHAPES)
                size = (rng.choice([56, 84, 112]), rng.choice([56, 84, 112]))
                relative = f"images/{split}_{index:05d}.png"
                _draw(COLOURS[colour], shape, size, rng).save(output_dir / relative)
                user = [{"type": "image"}, {"type": "text", "text": QUESTION}]
                if index % 8 == 7:  # some text-only rows, as real mixtures have
                    user, images = f"Which colour is the word {colour!r}?", []
                else:
                    images = [relative]
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": colour}]
                lines.append(json.dumps({"id": f"{split}-{index:05d}", "images": images, "messages": messages}))
            # Written last and whole, so that an interrupted run never leaves a split that looks complete.
            write_text_atomically(output_dir / f"{split}.jsonl", "\n".join(lines) + "\n")
