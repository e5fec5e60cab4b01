"""Every demo recipe runs from a clean state (no tiny model, no data), on CPU, offline: it builds, trains, saves
and, where it asks for it, evaluates by generation into metrics.json."""

import json
from pathlib import Path

import pytest
import yaml

from vlm_recipes.tasks import TASKS

from conftest import REPO_ROOT, run_script

DEMOS = sorted(path.name for path in (REPO_ROOT / "recipes" / "demo").glob("*.yaml"))
# Only there to stop a hang. One at a time, on 2 cores shared with other work (load ~3), a demo took 23-167 s
# (medical_steps the longest, chess 106 s); all in one pytest run, chess took 272 s. 1800 s is 10x the slowest
# single run: room for a machine 3x slower under 3x the load.
DEMO_TIMEOUT = 1800
# What each demo must reach on its test split to count as learning (the untrained model scores 0 on each), set below
# the values measured on 2 loaded cores. ui_actions measured click accuracy 1.0 and 0.89 on its 18 test clicks (two
# training seeds; a model that ignores the screenshot gets about 0.25); issue 17 asks for 0.5. Metrics a demo does
# not reach yet (chess's board metrics) are not listed, see each recipe's header.
DEMO_THRESHOLDS = {
    "messages.yaml": {"exact_match": 0.25},
    "ui_actions.yaml": {"parse_rate": 0.9, "action_type_accuracy": 0.8, "click_accuracy": 0.5},
    "chess.yaml": {"valid_json_rate": 0.5},
    "medical_steps.yaml": {"json_validity_rate": 0.8, "exact_step_match_rate": 0.55},
}


@pytest.mark.slow
@pytest.mark.parametrize("demo", [demo for demo in DEMOS if demo != "element.yaml"])  # element: test_task_element
def test_demo_runs_from_a_clean_state(demo, tmp_path):
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "demo" / demo).read_text())
    output = tmp_path / "out"
    arguments = ["scripts/sft.py", f"recipes/demo/{demo}", "--output_dir", str(output)]
    arguments += ["--model_name_or_path", str(tmp_path / "tiny")]
    if recipe.get("generate_data_if_missing"):  # the messages demo reads its committed example data in place
        arguments += ["--dataset_path", str(tmp_path / "data")]
    result = run_script(arguments, timeout=DEMO_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (output / "recipe.yaml").is_file() and (output / "config.json").is_file()
    if recipe.get("eval_after_train"):
        metrics = json.loads((output / "metrics.json").read_text())
        assert metrics["task"] == recipe["task"]
        assert metrics["metrics"]["num_examples"] > 0
        rows = (output / "predictions.csv").read_text().splitlines()
        assert len(rows) == metrics["metrics"]["num_examples"] + 1
        # A demo evaluates its untrained model too (output_dir/baseline/) and prints both columns.
        baseline = json.loads((output / "baseline" / "metrics.json").read_text())["metrics"]
        assert "trained" in result.stdout and "untrained" in result.stdout
        for metric, threshold in DEMO_THRESHOLDS.get(demo, {}).items():
            value = metrics["metrics"][metric]
            assert value >= threshold, f"{demo}: {metric} {value} < {threshold} (untrained: {baseline.get(metric)})"
    if recipe["task"] == "medical_steps":  # the inference API on the trained model
        from vlm_recipes.tasks.medical_steps.predictor import load_predictor

        image = sorted((tmp_path / "data" / "images").iterdir())[0]
        predictor = load_predictor(str(output))
        step = predictor.predict_step(str(image), "Load the MRI scan", short_term_memory={}, long_term_memory={})
        assert isinstance(step, dict) and step  # parsed step, or {"_raw", "_error"} for an unparseable answer
        steps = predictor.run_task([{"image_path": str(image), "user_goal": "Load the MRI scan"}] * 2)
        assert len(steps) == 2 and all(isinstance(s, dict) for s in steps)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_make_data_script(task, tmp_path):
    if task == "messages":
        pytest.skip("the generic messages task reads data; it has no generator")
    result = run_script(["scripts/make_data.py", task, "--output", str(tmp_path / task), "--num", "30", "--seed", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    files = {path.name for path in (tmp_path / task).iterdir()}
    assert files & {"train.json", "train.jsonl", "steps.csv", "train.csv"}, files
    assert not any(name.endswith(".tmp") for name in files)


def test_every_task_has_a_demo_and_a_real_recipe():
    tasks_with_demo = {yaml.safe_load(Path(REPO_ROOT / "recipes" / "demo" / d).read_text())["task"] for d in DEMOS}
    real = [p for p in (REPO_ROOT / "recipes").glob("*.yaml")]
    tasks_with_real = {yaml.safe_load(p.read_text())["task"] for p in real}
    for task in ("chess", "ui_actions", "element", "medical_steps"):
        assert task in tasks_with_demo and task in tasks_with_real, task
