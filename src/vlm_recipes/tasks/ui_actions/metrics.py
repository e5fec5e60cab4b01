"""Metrics of ui_actions: a predicted action against the target, per example and per split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .format import ACTION_TYPES
from .geometry import box_centre, point_in_box

__all__ = ["aggregate_action_scores", "score_action"]


def score_action(
    predicted: dict[str, Any] | None, target: dict[str, Any], target_bbox: Sequence[float] | None
) -> dict[str, float]:
    """Per-example scores of a predicted action (None: unparsed) against the target, both in original-image pixels.

    Always: `parsed`, `type_correct`, `step_success` (type and every argument right: a click inside the box, the same
    text, the same scroll direction and amount, the same wait), `target_type_index` and `predicted_type_index` (-1:
    unparsed), so that `aggregate_action_scores` can break results down by type from the scores alone. Click targets
    add `click_in_box` and, when the prediction is a click, `click_distance` to the box centre. A click target without
    a box is scored by `click_distance` to the target point only: `click_in_box` and `step_success` are left out, as
    there is no element to hit. Type targets add `text_exact_match`.
    """
    kind = target["type"]
    same_type = predicted is not None and predicted["type"] == kind
    scores = {
        "parsed": float(predicted is not None),
        "type_correct": float(same_type),
        "target_type_index": float(ACTION_TYPES.index(kind)),
        "predicted_type_index": float(ACTION_TYPES.index(predicted["type"]) if predicted is not None else -1),
    }
    success: bool | None
    if kind == "click":
        point = (predicted["x"], predicted["y"]) if same_type else None
        if target_bbox is not None:
            success = point is not None and point_in_box(point, target_bbox)
            scores["click_in_box"] = float(success)
            centre = box_centre(target_bbox)
        else:
            success = None
            centre = (target["x"], target["y"])
        if point is not None:
            scores["click_distance"] = math.dist(point, centre)
    elif kind == "type":
        success = same_type and predicted["text"] == target["text"]
        scores["text_exact_match"] = float(success)
    elif kind == "scroll":
        success = (
            same_type and predicted["direction"] == target["direction"] and predicted["amount"] == target["amount"]
        )
    else:
        success = same_type and predicted["seconds"] == target["seconds"]
    if success is not None:
        scores["step_success"] = float(success)
    return scores


def aggregate_action_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Split-level metrics from `score_action` results; each is the mean over the examples it applies to (NaN if none).

    `parse_rate`, `action_type_accuracy`, `step_success`: all examples (clicks without a box aside for the last);
    `click_accuracy`: click targets with a box; `mean_click_distance`: click targets predicted as clicks;
    `typed_text_exact_match`: type targets; `step_success/<type>` and `count/<type>`: per target type.
    """

    def mean(key: str, subset: list[dict[str, float]] = scores) -> float:
        values = [score[key] for score in subset if key in score]
        return sum(values) / len(values) if values else float("nan")

    metrics = {
        "parse_rate": mean("parsed"),
        "action_type_accuracy": mean("type_correct"),
        "click_accuracy": mean("click_in_box"),
        "mean_click_distance": mean("click_distance"),
        "typed_text_exact_match": mean("text_exact_match"),
        "step_success": mean("step_success"),
    }
    for index, kind in enumerate(ACTION_TYPES):
        of_kind = [score for score in scores if score["target_type_index"] == index]
        metrics[f"step_success/{kind}"] = mean("step_success", of_kind)
        metrics[f"count/{kind}"] = float(len(of_kind))
    metrics["num_examples"] = float(len(scores))
    return metrics
