"""Checking that models load and generate (`scripts/check_models.py`): `discover_model_dirs` and `check_model` load
each model and answer one fixed prompt about one fixed image; `format_model_table` prints the results.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..families import detect_family
from .repair import is_base_model, one_line_error

logger = logging.getLogger(__name__)

__all__ = ["CHECK_PROMPT", "ModelCheck", "check_model", "demo_image", "discover_model_dirs", "format_model_table"]

CHECK_PROMPT = "Describe this image in one sentence."


def demo_image():
    """A fixed 224x224 picture (red square, blue circle, green bar on white), drawn here so no file is needed."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((24, 24, 104, 104), fill="red")
    draw.ellipse((120, 40, 200, 120), fill="blue")
    draw.rectangle((32, 150, 192, 180), fill="green")
    return image


def _is_model_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file() or (directory / "adapter_config.json").is_file()


def discover_model_dirs(
    paths: list[str | Path], include_checkpoints: bool = False, include_base_models: bool = False
) -> list[Path]:
    """Model directories (with `config.json` or `adapter_config.json`) among and under `paths`, in order.

    A path that is itself a model directory is always taken. Under it, hidden directories are skipped, and so are
    `checkpoint-*` directories unless `include_checkpoints`, and base models (`is_base_model`: the demos' tiny models
    under `outputs/tiny-models/`, a downloaded model) unless `include_base_models`: what is left is what training
    and merging wrote.
    """
    found: list[Path] = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} not found.")
        for current, subdirectories, _ in os.walk(root):
            subdirectories[:] = sorted(
                name
                for name in subdirectories
                if not name.startswith(".") and (include_checkpoints or not name.startswith("checkpoint-"))
            )
            current = Path(current)
            if not _is_model_dir(current) or current in found:
                continue
            if current == root or include_base_models or not is_base_model(current):
                found.append(current)
    return found


@dataclass
class ModelCheck:
    """One row of the model check: the model's family, how long loading and generating took, and its answer."""

    path: str
    family: str = "-"
    load_seconds: float | None = None
    generate_seconds: float | None = None
    output: str = ""
    error: str | None = None


def _generate_once(model, processor, prompt: str, max_new_tokens: int) -> str:
    import torch

    from ..collator import normalize_messages, special_tokens_kwargs

    messages = normalize_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}])
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        text=[text],
        images=[[demo_image()]],
        return_tensors="pt",
        **special_tokens_kwargs(processor.tokenizer, [text]),
    ).to(next(model.parameters()).device)
    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def check_model(
    path: str | Path,
    prompt: str = CHECK_PROMPT,
    max_new_tokens: int = 32,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> ModelCheck:
    """Load a model (full or LoRA adapter) and answer `prompt` about `demo_image()`; errors land in `.error`."""
    import torch

    from ..generation import load_for_generation

    result = ModelCheck(str(path))
    try:
        result.family = detect_family(path).name
    except Exception as error:  # noqa: BLE001 - an unknown family does not stop the model from loading; show it
        result.family = "unknown"
        logger.warning("%s: %s", path, error)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = None
    try:
        start = time.perf_counter()
        model, processor = load_for_generation(path, trust_remote_code=trust_remote_code)
        model.to(device)
        result.load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result.output = _generate_once(model, processor, prompt, max_new_tokens)
        result.generate_seconds = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - one model's failure is its row's error; the others still run
        result.error = one_line_error(error)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def format_model_table(results: list[ModelCheck], output_width: int = 60) -> str:
    """The checks as a fixed-width table: path, family, load and generation seconds, output, error."""

    def seconds(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    def clip(text: str) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= output_width else text[: output_width - 3] + "..."

    rows = [("path", "family", "load s", "generate s", "output", "error")]
    rows += [
        (r.path, r.family, seconds(r.load_seconds), seconds(r.generate_seconds), clip(r.output), r.error or "-")
        for r in results
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths)]
        lines.append("  ".join([*cells, row[5]]).rstrip())
        if index == 0:
            lines.append("  ".join(["-" * width for width in widths] + ["-----"]))
    return "\n".join(lines)
