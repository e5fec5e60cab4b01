"""The element task: parsing, metrics on hand-computed cases, loading with bad rows, demo data, and the demo run."""

import io
import json
import math

import pytest
from PIL import Image

from vlm_recipes.data.errors import BadRow
from vlm_recipes.data.rows import BadRowReport
from vlm_recipes.tasks import get_task
from vlm_recipes.tasks.element import classification_metrics, parse_element

from conftest import run_script


def small_png() -> bytes:
    """A valid 2x2 PNG: loading reads every image's header, so a placeholder file must be a real image."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


class TestParseElement:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [("fire", "fire"), (" Water.", "water"), ("METAL and more", "metal"), ("stone", None), ("", None)],
    )
    def test_first_word_case_and_punctuation(self, text, expected):
        assert parse_element(text) == expected


class TestClassificationMetrics:
    def test_hand_computed(self):
        targets = ["water", "water", "fire", "fire", "wood", "metal"]
        predicted = ["water", "fire", "fire", None, "wood", "wood"]
        metrics = classification_metrics(predicted, targets)
        assert metrics["accuracy"] == pytest.approx(3 / 6)
        assert metrics["invalid_label_rate"] == pytest.approx(1 / 6)
        # water: TP 1, predicted 1, actual 2 -> P 1, R 0.5, F1 2/3
        assert (metrics["precision/water"], metrics["recall/water"]) == (1.0, 0.5)
        # fire: TP 1, predicted 2, actual 2 -> P 0.5, R 0.5, F1 0.5
        assert (metrics["precision/fire"], metrics["recall/fire"]) == (0.5, 0.5)
        # wood: TP 1, predicted 2, actual 1 -> P 0.5, R 1, F1 2/3; metal: nothing right -> F1 0; land: absent -> 0
        assert (metrics["precision/wood"], metrics["recall/wood"]) == (0.5, 1.0)
        assert (metrics["precision/metal"], metrics["recall/metal"]) == (0.0, 0.0)
        assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 2 / 3 + 0 + 0) / 5)
        matrix = metrics["confusion_matrix"]["rows_are_targets"]
        labels = metrics["confusion_matrix"]["labels"]
        assert labels == ["water", "land", "fire", "wood", "metal", "invalid"]
        assert matrix[0] == [1, 0, 1, 0, 0, 0]  # water: one right, one called fire
        assert matrix[2] == [0, 0, 1, 0, 0, 1]  # fire: one right, one invalid
        assert matrix[4] == [0, 0, 0, 1, 0, 0]  # metal called wood

    def test_score_and_aggregate_agree_with_metrics(self):
        task = get_task("element")
        rows = [
            {"messages": [{"role": "assistant", "content": [{"type": "text", "text": t}]}]} for t in ("fire", "land")
        ]
        scores = [task.score("fire", "fire", rows[0]), task.score("xyz", "land", rows[1])]
        metrics = task.aggregate(scores, rows)
        assert metrics["accuracy"] == 0.5 and metrics["invalid_label_rate"] == 0.5 and metrics["num_examples"] == 2


class TestLoadRows:
    def write(self, tmp_path, lines):
        (tmp_path / "img.png").write_bytes(small_png())  # its header is read at load time, its pixels later
        (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")

    def test_bad_rows_error_names_file_and_row(self, tmp_path):
        good = json.dumps({"image_path": "img.png", "reason": "r", "element": "Fire"})
        self.write(tmp_path, [good, json.dumps({"image_path": "img.png", "reason": "r", "element": "stone"})])
        with pytest.raises(BadRow, match=r"train.jsonl, row 2: unknown element 'stone'"):
            get_task("element").load_rows(tmp_path, "train", tmp_path, BadRowReport("error"))

    def test_skip_counts_every_bad_row(self, tmp_path):
        good = json.dumps({"image_path": "img.png", "reason": "r", "element": "Fire"})
        self.write(
            tmp_path,
            [
                good,
                "{not json",
                json.dumps({"image_path": "missing.png", "reason": "r", "element": "fire"}),
                json.dumps({"image_path": "img.png", "element": "fire"}),
            ],
        )
        report = BadRowReport("skip")
        rows = get_task("element").load_rows(tmp_path, "train", tmp_path, report)
        assert len(rows) == 1 and rows[0]["messages"][1]["content"][0]["text"] == "fire"
        reasons = [(error.row, error.reason) for error in report.skipped]
        assert [row for row, _ in reasons] == [2, 3, 4]
        assert "invalid JSON" in reasons[0][1] and "not found" in reasons[1][1] and "`reason`" in reasons[2][1]
        assert "skipped 3 malformed row(s)" in report.summary()

    def test_prompt_format(self, tmp_path):
        self.write(tmp_path, [json.dumps({"image_path": "img.png", "reason": "Hot.", "element": "fire"})])
        (row,) = get_task("element").load_rows(tmp_path, "train", tmp_path, BadRowReport())
        user = row["messages"][0]["content"]
        assert user[0] == {"type": "image"}
        assert user[1]["text"] == "Classify into: water, land, fire, wood, metal.\n\nContext: Hot.\n\nElement:"


def test_make_data_is_deterministic(tmp_path):
    task = get_task("element")
    task.make_data(tmp_path / "a", 60, seed=5)
    task.make_data(tmp_path / "b", 60, seed=5)
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_text() == (tmp_path / "b" / f"{split}.jsonl").read_text()
    first = sorted((tmp_path / "a" / "images").iterdir())
    assert [p.read_bytes() for p in first] == [(tmp_path / "b" / "images" / p.name).read_bytes() for p in first]
    elements = [json.loads(line)["element"] for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert sorted(set(elements)) == sorted(["water", "land", "fire", "wood", "metal"])


@pytest.mark.slow
def test_element_demo_learns(tmp_path):
    """The demo recipe from a clean state: builds model and data, trains, evaluates; accuracy >= 0.95 (chance 0.2)."""
    output = tmp_path / "out"
    result = run_script(
        [
            "scripts/sft.py",
            "recipes/demo/element.yaml",
            "--output_dir",
            str(output),
            "--model_name_or_path",
            str(tmp_path / "tiny"),
            "--dataset_path",
            str(tmp_path / "data"),
        ],
        timeout=1800,  # only there to stop a hang: about 2 minutes alone on 2 cores
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] >= 0.95 and metrics["num_examples"] == 40  # measured 1.0
    assert math.isfinite(metrics["macro_f1"])
    assert (output / "predictions.csv").read_text().splitlines()[
        0
    ] == "id,target,prediction,correct,invalid,predicted_index"
    assert (output / "confusion_matrix.png").stat().st_size > 0
