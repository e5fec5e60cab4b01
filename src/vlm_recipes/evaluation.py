"""Evaluation by generation: a trained model (full or LoRA adapter) answers a task's held-out prompts, and the task
scores the answers. Used by `scripts/evaluate.py` and by `scripts/sft.py` with `eval_after_train: true`."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .chat_templates import fill_missing_chat_template
from .collator import normalize_messages, special_tokens_kwargs
from .families import model_class_for
from .reporting import log_evaluation
from .tasks.base import Task

logger = logging.getLogger(__name__)

__all__ = [
    "adapter_base",
    "base_precision",
    "evaluate_task",
    "format_metrics_table",
    "generate_answers",
    "load_for_generation",
    "strict_json_value",
    "write_json_atomically",
]


def adapter_base(model_path: str | Path) -> str | None:
    """The base model named by a LoRA adapter directory's `adapter_config.json`, or None for a full model."""
    config = Path(model_path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def base_precision(model_args) -> str:
    """How a run's base model was loaded, in words: `4-bit nf4`, `8-bit` or `unquantised`."""
    if getattr(model_args, "load_in_4bit", False):
        return f"4-bit {getattr(model_args, 'bnb_4bit_quant_type', 'nf4')}"
    return "8-bit" if getattr(model_args, "load_in_8bit", False) else "unquantised"


def load_for_generation(
    model_path: str | Path,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    quantized_as=None,
):
    """Load `(model, processor)` from a full model directory, or a LoRA adapter directory on its base model.

    The base model of an adapter is read from its `adapter_config.json` unless `base_model` is given. The processor
    comes from the directory itself when it holds processor files (our outputs always do), else from the base.
    `quantized_as=(model_args, training_args)` loads an adapter's base as that run loaded it (4-bit or 8-bit, through
    `models.load_model`), so that the adapter is evaluated on the base it trained on (`eval_after_train` evaluates
    the model in memory, on that base); without it the base is loaded unquantised, as `merge_adapter` merges it.
    """
    from transformers import AutoProcessor

    model_path = Path(model_path)
    if not model_path.exists():
        raise FileNotFoundError(f"Model path {model_path} not found.")
    if adapter_base(model_path) is not None:
        from peft import PeftModel

        base = base_model or adapter_base(model_path)
        if quantized_as is not None and base_precision(quantized_as[0]) != "unquantised":
            from dataclasses import replace

            from .models import load_model

            model_args, training_args = quantized_as
            model = load_model(replace(model_args, model_name_or_path=base), training_args)
            # In the adapter's saved dtype (bfloat16 for QLoRA, as TRL trains it), not PEFT's float32 upcast.
            model = PeftModel.from_pretrained(model, model_path, autocast_adapter_dtype=False)
        else:
            model = model_class_for(base).from_pretrained(base, trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(model, model_path)
        has_processor = any(
            (model_path / name).is_file() for name in ("processor_config.json", "tokenizer_config.json")
        )
        processor = AutoProcessor.from_pretrained(
            model_path if has_processor else base, trust_remote_code=trust_remote_code
        )
    else:
        model = model_class_for(model_path).from_pretrained(model_path, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    # Florence-2's processor drops a saved chat template on reload; PaliGemma ships none.
    fill_missing_chat_template(processor)
    model.eval()
    return model, processor


@torch.no_grad()
def generate_answers(
    model,
    processor,
    task: Task,
    rows: list[dict[str, Any]],
    batch_size: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    do_sample: bool = False,
) -> list[str]:
    """Batched generation with left padding (so every prompt ends where its answer starts); greedy by default."""
    from tqdm.auto import tqdm

    answers = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(rows), batch_size), desc="Generating", leave=False):
        batch_rows = rows[start : start + batch_size]
        texts = [
            processor.apply_chat_template(normalize_messages(task.prompt_messages(row)), add_generation_prompt=True)
            for row in batch_rows
        ]
        images = [list(row.get("images") or []) for row in batch_rows]
        inputs = processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            **special_tokens_kwargs(processor.tokenizer, texts),
        ).to(device)
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id, **sampling
        )
        # A decoder-only model returns prompt + answer; an encoder-decoder (Florence-2) returns the answer only.
        is_encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
        new_tokens = output if is_encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
        answers.extend(processor.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def strict_json_value(value: Any) -> Any:
    """`value` as plain JSON types, NaN and infinities as None: what strict JSON readers (`jq`, JavaScript, Go, Rust's
    serde_json) accept, where Python's `json.dumps` would write the non-standard `NaN` (a mean over no example, such
    as ui_actions' `mean_click_distance` when no click was parsed). Other numbers (numpy, torch scalars) become
    floats."""
    if isinstance(value, Mapping):
        return {str(key): strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def write_json_atomically(data: Any, path: Path) -> None:
    """Write strict JSON (`strict_json_value`: NaN and infinities as null), then rename, so that a crash never leaves
    a half-written file that looks complete."""
    temporary = path.with_name(f".{path.name}.tmp")
    text = json.dumps(strict_json_value(data), indent=2, sort_keys=True, allow_nan=False)
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)


def evaluate_task(
    model,
    processor,
    task: Task,
    dataset,
    output_dir: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    do_sample: bool = False,
    max_samples: int | None = None,
    log_to_run: bool = True,
) -> dict[str, float]:
    """Generate, score and write `predictions.csv` and `metrics.json` into `output_dir`; returns the metrics. With
    `log_to_run` (default) they also go into the active W&B run; a baseline's must not take the run's summary keys."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    rows = [dataset[index] for index in range(count)]
    predictions = task.predict(
        model,
        processor,
        rows,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        do_sample=do_sample,
    )
    targets = [task.target(row) for row in rows]
    scores = [task.score(prediction, target, row) for prediction, target, row in zip(predictions, targets, rows)]
    metrics = task.aggregate(scores, rows)
    task.save_artifacts(output_dir, scores, rows)

    score_keys = sorted({key for score in scores for key in score})
    temporary = output_dir / ".predictions.csv.tmp"
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "target", "prediction", *score_keys])
        for row, target, prediction, score in zip(rows, targets, predictions, scores):
            writer.writerow([row.get("id"), target, prediction, *(score.get(key, "") for key in score_keys)])
    os.replace(temporary, output_dir / "predictions.csv")
    write_json_atomically({"task": task.name, "metrics": metrics}, output_dir / "metrics.json")
    if log_to_run:
        log_evaluation(task, rows, targets, predictions, scores, metrics)  # into the W&B run, when one is active
    return metrics


def format_metrics_table(metrics: dict[str, Any], *others: dict[str, Any], names: tuple[str, ...] = ("value",)) -> str:
    """The scalar metrics as a table, one column per metrics dict (nested values stay in metrics.json)."""
    scalars = [key for key, value in metrics.items() if isinstance(value, (int, float))]
    columns = [metrics, *others]
    width = max((len(key) for key in scalars), default=6)

    def shown(value: Any) -> str:
        if isinstance(value, float) and not math.isnan(value):
            return f"{value:.4f}"
        return str(value) if value is not None else "-"

    lines = ["  ".join([f"{'metric':<{width}}", *(f"{name:>10}" for name in names)])]
    lines.append("  ".join(["-" * width, *("-" * max(10, len(name)) for name in names)]))
    for key in scalars:
        lines.append("  ".join([f"{key:<{width}}", *(f"{shown(c.get(key)):>10}" for c in columns)]))
    return "\n".join(lines)
