"""The files evaluation writes (`vlm_recipes.evaluation`): `metrics.json` is strict JSON that any reader parses."""

import json
import math

import numpy
import pytest
import torch

from vlm_recipes.configs import VLMScriptArguments
from vlm_recipes.data.splits import load_splits
from vlm_recipes.evaluation import evaluate_task
from vlm_recipes.files import strict_json_value, write_json_atomically
from vlm_recipes.tasks import get_task


def strict_loads(text: str):
    """`json.loads` that refuses `NaN`, `Infinity` and `-Infinity`, as JavaScript, `jq` and Go do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


class TestStrictJson:
    def test_non_finite_numbers_become_null(self):
        value = {"a": float("nan"), "b": [float("inf"), -math.inf, 1.5], "c": {"d": numpy.float32("nan")}}
        value |= {"e": torch.tensor(0.25).item(), "f": numpy.float64(2.0), "g": True, "h": 3, "i": None}
        assert strict_json_value(value) == {
            "a": None,
            "b": [None, None, 1.5],
            "c": {"d": None},
            "e": 0.25,
            "f": 2.0,
            "g": True,
            "h": 3,
            "i": None,
        }

    def test_written_file_parses_strictly(self, tmp_path):
        write_json_atomically({"metrics": {"x": float("nan"), "y": 1.0}}, tmp_path / "m.json")
        assert strict_loads((tmp_path / "m.json").read_text()) == {"metrics": {"x": None, "y": 1.0}}


@pytest.fixture(scope="module")
def ui_actions_test_split(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ui-actions")
    get_task("ui_actions").make_data(directory, num=20, seed=0)
    (test,), _ = load_splits(VLMScriptArguments(task="ui_actions", dataset_path=str(directory)), ["test"])
    return test


def test_ui_actions_metrics_without_a_parsed_click(ui_actions_test_split, tmp_path, monkeypatch):
    """No answer parses, so no click is parsed: the mean click distance is a mean over nothing (NaN in memory),
    written as null."""
    task = get_task("ui_actions")
    monkeypatch.setattr(task, "predict", lambda model, processor, rows, **generation: ["no idea"] * len(rows))
    metrics = evaluate_task(None, None, task, ui_actions_test_split, tmp_path)
    assert math.isnan(metrics["mean_click_distance"])
    written = strict_loads((tmp_path / "metrics.json").read_text())
    assert written["task"] == "ui_actions"
    assert written["metrics"]["mean_click_distance"] is None
    assert written["metrics"]["parse_rate"] == 0.0
