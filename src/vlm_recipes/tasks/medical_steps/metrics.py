"""Metrics of medical_steps, per step (`step_scores`) and per split (`task_metrics`).

JSON validity (the answer, stripped of whitespace, is one JSON object), field accuracy (target keys whose predicted
value is equal, pooled over all steps), exact step match (the predicted object equals the target) and task success
(every step of the task exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["step_scores", "task_metrics"]


def step_scores(predicted: dict[str, Any] | None, target: dict[str, Any]) -> dict[str, float]:
    """One step's scores: JSON validity, fields of the target predicted equal (count and fraction), exact match.

    An invalid prediction (`None`) gets every target field wrong. A step with no target field has field accuracy 1
    when the prediction is valid (nothing was asked); its exact match still requires `{}`.
    """
    valid = predicted is not None
    correct = sum(1 for key, value in target.items() if valid and key in predicted and predicted[key] == value)
    total = len(target)
    return {
        "json_valid": float(valid),
        "fields_correct": float(correct),
        "fields_total": float(total),
        "field_accuracy": correct / total if total else float(valid),
        "exact_match": float(valid and predicted == target),
    }


def task_metrics(scores: Sequence[dict[str, float]], task_ids: Sequence[Any]) -> dict[str, float]:
    """Split metrics from per-step `step_scores` and each step's task id.

    `field_accuracy` pools the fields of all steps (a step with many fields weighs more); `task_success_rate` is the
    fraction of tasks whose every step matches exactly.
    """
    if len(scores) != len(task_ids):
        raise ValueError(f"{len(scores)} step scores for {len(task_ids)} task ids.")
    count = len(scores)
    nan = float("nan")
    fields_total = sum(score["fields_total"] for score in scores)
    success: dict[Any, bool] = {}
    for score, task_id in zip(scores, task_ids):
        success[task_id] = success.get(task_id, True) and score["exact_match"] == 1.0
    return {
        "json_validity_rate": sum(score["json_valid"] for score in scores) / count if count else nan,
        "field_accuracy": sum(score["fields_correct"] for score in scores) / fields_total if fields_total else nan,
        "exact_step_match_rate": sum(score["exact_match"] for score in scores) / count if count else nan,
        "task_success_rate": sum(success.values()) / len(success) if success else nan,
        "num_steps": float(count),
        "num_tasks": float(len(success)),
    }
