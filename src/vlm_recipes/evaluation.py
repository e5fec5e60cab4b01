"""Evaluation by generation: a trained model (full or LoRA adapter) answers a task's held-out prompts, and the task
scores the answers. Used by `scripts/evaluate.py` and by `scripts/sft.py` with `eval_after_train: true`."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

from .files import write_json_atomically
from .generation import load_for_generation
from .reporting import log_evaluation
from .tasks.base import Task

logger = logging.getLogger(__name__)

__all__ = [
    "evaluate_baseline",
    "evaluate_task",
    "format_metrics_table",
]


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


def evaluate_baseline(
    base_model: str | Path, task: Task, dataset, output_dir: str | Path, trust_remote_code: bool = False, **generation
) -> dict[str, float]:
    """The un-tuned `base_model`, reloaded fresh and evaluated like the trained one into `<output_dir>/baseline/`; kept
    out of the W&B run's summary, whose `eval/` keys are the trained model's."""
    model, processor = load_for_generation(base_model, trust_remote_code=trust_remote_code)
    return evaluate_task(
        model, processor, task, dataset, Path(output_dir) / "baseline", log_to_run=False, **generation
    )
