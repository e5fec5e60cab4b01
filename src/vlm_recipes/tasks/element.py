"""Element classification: an image (and a one-line reason) -> one of five elements.

Native format: `<data_dir>/<split>.jsonl`, rows `{"image_path", "reason", "element"}` (an optional `id`), image paths
relative to `image_base_dir`. User turn: the image + `Classify into: water, land, fire, wood, metal.\\n\\nContext:
{reason}\\n\\nElement:`; assistant turn: the element word.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from ..data.errors import BadRow
from ..data.images import resolve_image
from ..data.rows import BadRowReport, demo_split_sizes, read_jsonl
from ..files import write_text_atomically
from .base import Task, register_task

ELEMENTS = ("water", "land", "fire", "wood", "metal")
PROMPT = "Classify into: water, land, fire, wood, metal.\n\nContext: {reason}\n\nElement:"

# Demo data: each element's base colour and a pool of one-line reasons.
_COLOURS = {
    "water": (40, 90, 200),
    "land": (120, 150, 60),
    "fire": (230, 70, 20),
    "wood": (120, 75, 35),
    "metal": (165, 170, 180),
}
_REASONS = {
    "water": ["Waves roll across a deep blue surface.", "A calm lake reflects the sky.", "Rain gathers in a pool."],
    "land": ["Green fields stretch to the hills.", "Soil and grass cover the ground.", "A dusty plain under the sun."],
    "fire": ["Flames rise from the burning logs.", "Hot embers glow orange and red.", "A blaze lights up the night."],
    "wood": ["The grain of an oak plank.", "Tree bark with deep brown lines.", "A stack of cut timber."],
    "metal": ["A polished steel sheet shines.", "Cold grey iron with a bright edge.", "Brushed aluminium plates."],
}


# Half the reasons say nothing about the element, so that the demo model must learn from the image too.
_NEUTRAL = ["A photo taken outdoors.", "A close-up picture.", "An image from the collection."]


def parse_element(prediction: str) -> str | None:
    """The element a generated answer names (its first word, case and punctuation ignored), or None if invalid."""
    words = prediction.strip().lower().split()
    if not words:
        return None
    word = words[0].strip(".,:;!?\"'")
    return word if word in ELEMENTS else None


def classification_metrics(predicted: list[str | None], targets: list[str], classes=ELEMENTS) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall, invalid-label rate and the confusion matrix.

    An invalid prediction (None) counts as wrong; it is a false negative of its target class and a false positive of
    no class. Precision of a class never predicted is 0, as is F1 when precision and recall are both 0.
    """
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predictions for {len(targets)} targets.")
    total = len(targets)
    index = {name: i for i, name in enumerate(classes)}
    # Rows: target class; columns: predicted class, then one "invalid" column.
    confusion = [[0] * (len(classes) + 1) for _ in classes]
    for prediction, target in zip(predicted, targets):
        confusion[index[target]][index[prediction] if prediction is not None else len(classes)] += 1
    metrics: dict[str, Any] = {
        "accuracy": sum(p == t for p, t in zip(predicted, targets)) / total if total else float("nan"),
        "invalid_label_rate": sum(p is None for p in predicted) / total if total else float("nan"),
    }
    f1_scores = []
    for name, i in index.items():
        true_positive = confusion[i][i]
        predicted_as = sum(confusion[row][i] for row in range(len(classes)))
        actual = sum(confusion[i])
        precision = true_positive / predicted_as if predicted_as else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics[f"precision/{name}"] = precision
        metrics[f"recall/{name}"] = recall
        f1_scores.append(f1)
    metrics["macro_f1"] = sum(f1_scores) / len(f1_scores)
    metrics["confusion_matrix"] = {"labels": [*classes, "invalid"], "rows_are_targets": confusion}
    return metrics


def save_confusion_png(confusion: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion["rows_are_targets"]
    labels = confusion["labels"]
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=30)
    axes.set_yticks(range(len(matrix)), labels[: len(matrix)])
    axes.set_xlabel("predicted")
    axes.set_ylabel("target")
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            axes.text(column, row, str(value), ha="center", va="center")
    axes.set_title("Element confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _draw(element: str, rng: random.Random, size: int = 56):
    from PIL import Image, ImageDraw

    base = _COLOURS[element]
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in base)
    image = Image.new("RGB", (size, size), jitter)
    draw = ImageDraw.Draw(image)
    light = tuple(min(255, c + 60) for c in jitter)
    dark = tuple(max(0, c - 50) for c in jitter)
    if element == "water":  # horizontal waves
        for y in range(4, size, 8):
            draw.line([(x, y + int(2 * math.sin((x + rng.random() * 6) / 3))) for x in range(0, size, 2)], fill=light)
    elif element == "land":  # speckles
        for _ in range(40):
            x, y = rng.randrange(size), rng.randrange(size)
            draw.point([(x, y), (x + 1, y)], fill=dark)
    elif element == "fire":  # upward flames
        for _ in range(6):
            x = rng.randrange(size)
            draw.polygon([(x - 5, size), (x, rng.randint(size // 4, size // 2)), (x + 5, size)], fill=(255, 200, 40))
    elif element == "wood":  # vertical grain
        for x in range(2, size, 5):
            draw.line([(x + rng.randint(-1, 1), 0), (x + rng.randint(-1, 1), size)], fill=dark)
    else:  # metal: diagonal shine
        for offset in range(-size, size, 12):
            draw.line([(offset, size), (offset + size, 0)], fill=light, width=2)
    return image


@register_task
class ElementTask(Task):
    name = "element"

    def load_rows(
        self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport
    ) -> list[dict[str, Any]]:
        file = self.split_file(data_dir, split)
        rows = []
        for line, raw in read_jsonl(file, report):
            try:
                for key in ("image_path", "reason", "element"):
                    if key not in raw:
                        raise BadRow(file, line, f"missing key `{key}`")
                element = str(raw["element"]).strip().lower()
                if element not in ELEMENTS:
                    raise BadRow(file, line, f"unknown element {raw['element']!r}; expected one of {list(ELEMENTS)}")
                if not isinstance(raw["reason"], str):
                    raise BadRow(file, line, "`reason` must be a string")
                image = resolve_image(raw["image_path"], image_base_dir, file, line, report.max_image_pixels)
            except BadRow as error:
                report.handle(error.with_row_id(raw.get("id")))
                continue
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(reason=raw["reason"])}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": element}]},
            ]
            rows.append({"id": raw.get("id", f"{split}-{line}"), "images": [image], "messages": messages})
        return rows

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        """Write `train/val/test.jsonl` (80/10/10, at least 10 per held-out split) and PNGs, balanced classes."""
        output_dir = Path(output_dir)
        rng = random.Random(seed)
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        for split, count in demo_split_sizes(num, min_held_out=10).items():
            lines = []
            for index in range(count):
                element = ELEMENTS[index % len(ELEMENTS)]
                relative = f"images/{split}_{index:05d}.png"
                _draw(element, rng).save(output_dir / relative)
                reason = rng.choice(_REASONS[element] if rng.random() < 0.5 else _NEUTRAL)
                row = {"id": f"{split}-{index:05d}", "image_path": relative, "reason": reason}
                lines.append(json.dumps({**row, "element": element}))
            rng.shuffle(lines)
            write_text_atomically(output_dir / f"{split}.jsonl", "\n".join(lines) + "\n")

    def score(self, prediction: str, target: str, row: dict[str, Any]) -> dict[str, float]:
        predicted = parse_element(prediction)
        # The predicted class index (-1: invalid) lets `aggregate` rebuild the confusion matrix from the scores.
        return {
            "correct": float(predicted == target),
            "invalid": float(predicted is None),
            "predicted_index": float(ELEMENTS.index(predicted) if predicted else -1),
        }

    def aggregate(self, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> dict[str, Any]:
        predicted = [ELEMENTS[int(s["predicted_index"])] if s["predicted_index"] >= 0 else None for s in scores]
        targets = [self.target(row) for row in rows]
        return {**classification_metrics(predicted, targets), "num_examples": len(scores)}

    def save_artifacts(self, output_dir: Path, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> None:
        save_confusion_png(self.aggregate(scores, rows)["confusion_matrix"], Path(output_dir) / "confusion_matrix.png")
