"""The medical_steps task: memory, metrics on hand-computed cases, task-level splits, loading with bad rows, demo data,
and evaluation that feeds the model's own answers forward (generation replaced by a recording stub)."""

import csv
import dataclasses
import io
import json

import pytest
from PIL import Image

from vlm_recipes.data.errors import BadRow, DataError
from vlm_recipes.data.rows import BadRowReport
from vlm_recipes.tasks.base import TASKS
from vlm_recipes.tasks.medical_steps import predictor as medical_steps_predictor
from vlm_recipes.tasks.medical_steps import task as medical_steps_task
from vlm_recipes.tasks.medical_steps.format import (
    PROMPT_HEADER,
    build_step_messages,
    next_memory,
    parse_step_context,
    parse_step_output,
)
from vlm_recipes.tasks.medical_steps.metrics import step_scores, task_metrics
from vlm_recipes.tasks.medical_steps.predictor import MedicalStepsPredictor
from vlm_recipes.tasks.medical_steps.splits import assign_splits
from vlm_recipes.tasks.medical_steps.task import MedicalStepsOptions, MedicalStepsTask

HEADER = ["Task_id", "Image_id", "Instruction", "Output", "Grounding"]


def small_png() -> bytes:
    """A valid 2x2 PNG: loading reads every image's header, so a placeholder file must be a real image."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_steps(directory, records, header=HEADER, images=True):
    """Write `steps.csv` (records: lists of cells; dict cells become JSON) and a small PNG per Image_id."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with (directory / "steps.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for record in records:
            writer.writerow([json.dumps(cell) if isinstance(cell, dict) else cell for cell in record])
    if images and "Image_id" in header:
        for record in records:
            (directory / "images" / record[header.index("Image_id")]).write_bytes(small_png())


def step(task_id, number, output, goal="Open the scan.", grounding=None):
    return [task_id, f"t{task_id}_s{number}.png", goal, output, grounding or {"bbox": [0, 0, 1, 1]}]


def load(directory, split="train", policy="error", **options):
    options = {"val_split": 0.0, "test_split": 0.0, **options}
    report = BadRowReport(policy)
    rows = MedicalStepsTask(**options).load_rows(directory, split, directory, report)
    return rows, report


def context_of(prompt_row):
    """(user_goal, short-term, long-term) of a prompt row or training row."""
    return parse_step_context(prompt_row["messages"])


class TestOptions:
    def test_registered_with_its_options(self):
        assert TASKS["medical_steps"] is MedicalStepsTask and MedicalStepsTask.options is MedicalStepsOptions
        fields = {f.name: f for f in dataclasses.fields(MedicalStepsOptions)}
        assert {"task_start", "task_end", "val_split", "image_dir"} <= set(fields)
        assert all(f.metadata.get("help") for f in fields.values())
        assert MedicalStepsOptions() == MedicalStepsOptions(None, None, 0.1, 0.1, 0, "images")

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"val_split": 1.0}, "`val_split`=1.0 must be a fraction"),
            ({"val_split": 0.5, "test_split": 0.5}, "leave no task for training"),
            ({"task_start": 9, "task_end": 3}, "`task_start`=9 is above `task_end`=3"),
        ],
    )
    def test_invalid(self, options, message):
        with pytest.raises(ValueError, match=message):
            MedicalStepsTask(**options)

    def test_recipe_keys_reach_the_task(self, tmp_path):
        from vlm_recipes.configs import RecipeError, parse_recipe
        from vlm_recipes.tasks import task_from_args

        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(
            "task: medical_steps\ndataset_path: data\noutput_dir: out\nbf16: false\ntask_start: 2\nimage_dir: shots\n"
        )
        script_args, _, _ = parse_recipe([str(recipe), "--val_split", "0.25"])
        config = task_from_args(script_args).config
        assert (config.task_start, config.task_end, config.val_split, config.image_dir) == (2, None, 0.25, "shots")
        with pytest.raises(RecipeError, match="`test_split`=1.0 must be a fraction"):
            parse_recipe([str(recipe), "--test_split", "1.0"])


class TestMemory:
    def test_messages_carry_goal_memory_and_compact_sorted_answer(self):
        messages = build_step_messages("Load the MRI.", {"b": 2, "a": 1}, {"z": [1, 2]}, output={"y": "é", "x": 1})
        user, assistant = messages
        assert user["content"][0] == {"type": "image"}
        header, context = user["content"][1]["text"].split("\n")
        assert header == PROMPT_HEADER
        assert json.loads(context) == {
            "user_goal": "Load the MRI.",
            "short_term_memory": {"a": 1, "b": 2},
            "long_term_memory": {"z": [1, 2]},
        }
        assert assistant == {"role": "assistant", "content": [{"type": "text", "text": '{"x":1,"y":"é"}'}]}
        (prompt_only,) = build_step_messages("g", {}, {})
        context = '{"long_term_memory":{},"short_term_memory":{},"user_goal":"g"}'  # compact, keys sorted
        assert prompt_only["content"][1]["text"] == f"{PROMPT_HEADER}\n{context}"

    def test_context_round_trip_and_foreign_prompt(self):
        messages = build_step_messages("Send the report.", {"a": 1}, {"a": 1, "b": 2})
        assert parse_step_context(messages) == ("Send the report.", {"a": 1}, {"a": 1, "b": 2})
        with pytest.raises(ValueError, match="Not a medical_steps prompt"):
            parse_step_context([{"role": "user", "content": "Classify this."}])

    def test_next_memory_hand_computed(self):
        short, long = next_memory({}, {"action": "open", "app": "PACS"})
        assert (short, long) == ({"action": "open", "app": "PACS"}, {"action": "open", "app": "PACS"})
        short, long = next_memory(long, {"action": "select", "patient_id": "P-1"})
        assert short == {"action": "select", "patient_id": "P-1"}
        assert long == {"action": "select", "app": "PACS", "patient_id": "P-1"}  # a later value wins
        # An unparseable prediction remembers nothing new.
        assert next_memory(long, None) == ({}, long)

    def test_prompt_messages_of_training_and_prompt_rows(self):
        task = MedicalStepsTask()
        training = {"messages": build_step_messages("g", {}, {}, output={"a": 1})}
        prompt = {"messages": build_step_messages("g", {}, {})}
        assert task.prompt_messages(training) == prompt["messages"] == task.prompt_messages(prompt)
        assert task.target(training) == '{"a":1}'


class TestParseStepOutput:
    @pytest.mark.parametrize(
        ("text", "expected", "error"),
        [
            ('{"a": 1}', {"a": 1}, None),
            ('  {"a":[1,2]}\n', {"a": [1, 2]}, None),
            ('{"a": 1', None, "invalid JSON"),
            ("[1, 2]", None, "expected a JSON object, got list"),
            ('```json\n{"a": 1}\n```', None, "invalid JSON"),  # strict: no fence stripping
            ("", None, "invalid JSON"),
        ],
    )
    def test_cases(self, text, expected, error):
        output, reason = parse_step_output(text)
        assert output == expected
        assert (reason is None) if error is None else (error in reason)


class TestMetrics:
    TARGET = {"action": "select", "patient_id": "P-1", "series": "T2"}

    @pytest.mark.parametrize(
        ("predicted", "valid", "correct", "exact"),
        [
            ({"action": "select", "patient_id": "P-1", "series": "T2"}, 1, 3, 1),
            ({"action": "select", "patient_id": "P-2"}, 1, 1, 0),  # one wrong, one missing
            ({"action": "select", "patient_id": "P-1", "series": "T2", "extra": 1}, 1, 3, 0),  # extra key: not exact
            ({"action": "select", "patient_id": "P-1", "series": "t2"}, 1, 2, 0),  # values compare exactly
            (None, 0, 0, 0),
        ],
    )
    def test_step_scores(self, predicted, valid, correct, exact):
        scores = step_scores(predicted, self.TARGET)
        assert scores == {
            "json_valid": valid,
            "fields_correct": correct,
            "fields_total": 3,
            "field_accuracy": pytest.approx(correct / 3),
            "exact_match": exact,
        }

    def test_empty_target(self):
        assert step_scores({}, {})["field_accuracy"] == 1.0 and step_scores({}, {})["exact_match"] == 1.0
        assert step_scores({"a": 1}, {})["exact_match"] == 0.0 and step_scores(None, {})["field_accuracy"] == 0.0

    def test_task_metrics_hand_computed(self):
        target = {"a": 1, "b": 2}
        scores = [
            step_scores({"a": 1, "b": 2}, target),  # task 1: exact
            step_scores({"a": 1, "b": 2}, target),  # task 1: exact -> task 1 succeeds
            step_scores({"a": 1, "b": 0}, target),  # task 2: 1 of 2 fields
            step_scores(None, {"a": 1, "b": 2, "c": 3, "d": 4}),  # task 2: invalid, 0 of 4
            step_scores({"a": 1}, {"a": 1}),  # task 3: exact, one step
        ]
        metrics = task_metrics(scores, ["1", "1", "2", "2", "3"])
        assert metrics["json_validity_rate"] == pytest.approx(4 / 5)
        assert metrics["field_accuracy"] == pytest.approx((2 + 2 + 1 + 0 + 1) / (2 + 2 + 2 + 4 + 1))  # pooled fields
        assert metrics["exact_step_match_rate"] == pytest.approx(3 / 5)
        assert metrics["task_success_rate"] == pytest.approx(2 / 3)
        assert (metrics["num_steps"], metrics["num_tasks"]) == (5, 3)

    def test_score_and_aggregate_on_dataset_rows(self):
        """`build_dataset` keeps only id, images and messages: the task and step come back from the id."""
        task = MedicalStepsTask()
        rows = [
            {"id": f"{task_id}/{index}", "messages": build_step_messages("g", {}, {}, output={"a": index})}
            for task_id, index in [(7, 0), (7, 1), (8, 0)]
        ]
        predictions = ['{"a":0}', '{"a": 5}', '{"a":0}']
        scores = [task.score(p, task.target(row), row) for p, row in zip(predictions, rows)]
        metrics = task.aggregate(scores, rows)
        assert metrics["exact_step_match_rate"] == pytest.approx(2 / 3)
        assert metrics["task_success_rate"] == pytest.approx(1 / 2)
        assert metrics["field_accuracy"] == pytest.approx(2 / 3)


class TestSplits:
    def test_task_level_deterministic_disjoint(self):
        ids = [str(number) for number in range(1, 21)]
        splits = assign_splits(ids, val_split=0.2, test_split=0.1, seed=3)
        assert assign_splits(list(reversed(ids)), 0.2, 0.1, 3) == splits  # file order does not matter
        assert assign_splits(ids, 0.2, 0.1, 4) != splits
        counts = {name: sum(1 for value in splits.values() if value == name) for name in ("train", "val", "test")}
        assert counts == {"train": 14, "val": 4, "test": 2}
        # A fraction above 0 holds out at least one task; 0 turns the split off.
        assert sorted(assign_splits(["1", "2", "3"], 0.01, 0.0, 0).values()) == ["train", "train", "val"]

    def test_too_few_tasks(self):
        with pytest.raises(ValueError, match="cannot fill `test`.*lower `val_split`"):
            assign_splits(["1", "2"], 0.1, 0.1, 0)

    def test_load_rows_splits_tasks_and_range(self, tmp_path):
        write_steps(tmp_path, [step(task, number, {"n": number}) for task in range(1, 11) for number in (1, 2)])
        options = {"val_split": 0.2, "test_split": 0.2}
        by_split = {split: load(tmp_path, split, **options)[0] for split in ("train", "val", "test")}
        tasks = {split: {row["task_id"] for row in rows} for split, rows in by_split.items()}
        assert (len(tasks["train"]), len(tasks["val"]), len(tasks["test"])) == (6, 2, 2)
        assert set().union(*tasks.values()) == set(range(1, 11)) and sum(map(len, tasks.values())) == 10
        assert all(len(rows) == 2 * len(tasks[split]) for split, rows in by_split.items())  # whole tasks only
        ranged = load(tmp_path, "train", task_start=3, task_end=6)[0]
        assert {row["task_id"] for row in ranged} == {3, 4, 5, 6}

    def test_split_exists(self, tmp_path):
        task = MedicalStepsTask(test_split=0.0)
        assert not task.split_exists(tmp_path, "train")
        write_steps(tmp_path, [step(1, 1, {})])
        assert task.split_exists(tmp_path, "train") and task.split_exists(tmp_path, "val")
        assert not task.split_exists(tmp_path, "test") and not task.split_exists(tmp_path, "dev")


class TestLoadRows:
    def test_rows_and_teacher_forced_memory(self, tmp_path):
        write_steps(
            tmp_path,
            [
                step(4, 1, {"action": "open", "app": "PACS"}, goal="Load the MRI."),
                step(4, 2, {"action": "select", "patient_id": "P-1"}, goal="Load the MRI."),
                step(4, 3, {"action": "load", "patient_id": "P-1"}, goal="Load the MRI."),
            ],
        )
        rows, report = load(tmp_path)
        assert not report.skipped and [row["id"] for row in rows] == ["4/0", "4/1", "4/2"]
        first, second, third = rows
        assert first["images"] == [str(tmp_path / "images" / "t4_s1.png")]
        assert (first["task_id"], first["step_index"], first["user_goal"]) == (4, 0, "Load the MRI.")
        assert first["output"] == {"action": "open", "app": "PACS"} and first["grounding"] == {"bbox": [0, 0, 1, 1]}
        assert context_of(first) == ("Load the MRI.", {}, {})
        assert context_of(second)[1:] == ({"action": "open", "app": "PACS"}, {"action": "open", "app": "PACS"})
        assert context_of(third)[1:] == (
            {"action": "select", "patient_id": "P-1"},
            {"action": "select", "app": "PACS", "patient_id": "P-1"},
        )
        assert third["messages"][-1]["content"][0]["text"] == '{"action":"load","patient_id":"P-1"}'

    def test_bad_json_error_names_file_and_line(self, tmp_path):
        write_steps(tmp_path, [step(1, 1, {"a": 1}), [1, "t1_s2.png", "Open the scan.", "{oops", "{}"]])
        with pytest.raises(BadRow, match=r"steps.csv, row 3 \(id 1/1\): `Output` is not valid JSON"):
            load(tmp_path)

    def test_skip_drops_the_whole_task_and_counts_every_row(self, tmp_path):
        write_steps(
            tmp_path,
            [
                step(1, 1, {"a": 1}),
                [1, "t1_s2.png", "Open the scan.", {"a": 2}, "[1, 2"],  # bad Grounding JSON
                step(1, 3, {"a": 3}),
                step(2, 1, {"b": 1}),
                step(2, 2, {"b": 2}),
            ],
        )
        rows, report = load(tmp_path, policy="skip")
        assert [row["id"] for row in rows] == ["2/0", "2/1"]
        assert [(error.row, error.reason.split(" (")[0]) for error in report.skipped] == [
            (3, "`Grounding` is not valid JSON"),  # the bad step first, then the rest of its task
            (2, "skipped with its task '1': its step at row 3 is bad, so this step's memory would be wrong"),
            (4, "skipped with its task '1': its step at row 3 is bad, so this step's memory would be wrong"),
        ]
        assert "skipped 3 malformed row(s)" in report.summary()

    @pytest.mark.parametrize(
        ("records", "line", "reason"),
        [
            ([step(1, 1, {}), [1, "t1_s2.png", "Open.", "[1]", "{}"]], 3, "`Output` must be a JSON object, got list"),
            ([step(1, 1, {}), [1, "t1_s2.png", "  ", "{}", "{}"]], 3, "`Instruction` (the user goal) is empty"),
            ([step(1, 2, {}), step(1, 1, {})], 3, "step out of order: Image_id 't1_s1.png' (number 1) follows"),
            ([step(1, 1, {}), step(2, 1, {}), step(1, 2, {})], 4, "Task_id '1' resumes at this row after other tasks"),
            ([step(1, 1, {}), ["", "t_s2.png", "Open.", "{}", "{}"]], 3, "`Task_id` is empty"),
            ([step(1, 1, {}), [1, "t1_s2.png", "Open.", '{"a": 1', "x", "y"]], 3, "6 fields for 5 columns; quote"),
            ([step(1, 1, {}), [1, "t1_s2.png", "Open."]], 3, "missing field(s) ['Output', 'Grounding']"),
        ],
    )
    def test_bad_rows(self, tmp_path, records, line, reason):
        write_steps(tmp_path, records)
        rows, report = load(tmp_path, policy="skip")
        bad = [error for error in report.skipped if not error.reason.startswith("skipped with its task")]
        assert [error.row for error in bad] == [line] and bad[0].reason.startswith(reason), bad
        assert len(report.skipped) + len(rows) == len(records)  # nothing dropped silently

    def test_missing_image_and_suffix_lookup(self, tmp_path):
        write_steps(tmp_path, [[1, "shot_1", "Open.", "{}", "{}"], [1, "shot_2", "Open.", "{}", "{}"]], images=False)
        (tmp_path / "images" / "shot_1.jpg").write_bytes(small_png())
        rows, report = load(tmp_path, policy="skip")
        assert rows == [] and report.skipped[0].reason.startswith(
            f"image file {tmp_path / 'images' / 'shot_2'} (also with .png/.jpg/.jpeg) not found"
        )
        (tmp_path / "images" / "shot_2.png").write_bytes(small_png())
        rows, _ = load(tmp_path)
        assert [row["images"][0].rsplit("/", 1)[1] for row in rows] == ["shot_1.jpg", "shot_2.png"]

    def test_image_dir_absolute(self, tmp_path):
        write_steps(tmp_path / "data", [step(1, 1, {})], images=False)
        (tmp_path / "shots").mkdir()
        (tmp_path / "shots" / "t1_s1.png").write_bytes(small_png())
        rows, _ = load(tmp_path / "data", image_dir=str(tmp_path / "shots"))
        assert rows[0]["images"] == [str(tmp_path / "shots" / "t1_s1.png")]

    def test_step_column_orders_steps(self, tmp_path):
        header = [*HEADER, "Step"]
        records = [[*step(1, 9, {}), 1], [*step(1, 3, {}), 2], [*step(2, 1, {}), 1], [*step(2, 2, {}), 3]]
        write_steps(tmp_path, records, header)
        rows, report = load(tmp_path, policy="skip")
        assert [row["id"] for row in rows] == ["1/0", "1/1"]  # Image_id numbers are not checked with a Step column
        assert report.skipped[0].row == 5 and "`Step` is 3, expected 2" in report.skipped[0].reason

    def test_multiline_cell_line_numbers(self, tmp_path):
        write_steps(tmp_path, [step(1, 1, {}, goal="Open\nthe scan."), [1, "t1_s2.png", "Open.", "{bad", "{}"]])
        with pytest.raises(BadRow, match=r"row 4 \(id 1/1\): `Output`"):  # the first record spans lines 2-3
            load(tmp_path)

    def test_bytes_that_are_not_utf8_make_their_line_bad(self, tmp_path):
        write_steps(tmp_path, [step(1, 1, {}), step(1, 2, {}), step(2, 1, {})])
        csv_file = tmp_path / "steps.csv"
        csv_file.write_bytes(csv_file.read_bytes().replace(b"t1_s2.png,Open the", b"t1_s2.png,Open th\xe9"))
        with pytest.raises(BadRow) as raised:
            load(tmp_path)
        assert str(raised.value) == f"{csv_file}, line 3 (id 1/1): not UTF-8 (byte 0xe9 at column 20)"
        rows, report = load(tmp_path, policy="skip")
        assert [row["id"] for row in rows] == ["2/0"]  # task 1 goes with its bad step
        assert [(error.row, error.unit) for error in report.skipped] == [(3, "line"), (2, "row")]

    def test_empty_file_names_the_file(self, tmp_path):
        (tmp_path / "steps.csv").write_text("")
        with pytest.raises(DataError, match=r"steps.csv: the file is empty"):
            load(tmp_path)

    def test_missing_column_is_a_file_error(self, tmp_path):
        write_steps(tmp_path, [["1", "a.png", "Open.", "{}"]], header=HEADER[:4])
        with pytest.raises(ValueError, match=r"missing column\(s\) \['Grounding'\]"):
            load(tmp_path)

    def test_non_integer_task_id_with_a_range(self, tmp_path):
        write_steps(tmp_path, [step("A7", 1, {}), step(3, 1, {})])
        rows, report = load(tmp_path, policy="skip", task_start=1)
        assert [row["task_id"] for row in rows] == [3]
        assert "Task_id 'A7' is not an integer" in report.skipped[0].reason
        assert [row["task_id"] for row in load(tmp_path)[0]] == ["A7", 3]  # no range: any id is fine

    def test_error_policy_checks_every_split(self, tmp_path):
        """A bad test row stops the load of `train` (before training), not only the later load of `test`."""
        records = [step(task, 1, {"a": task}) for task in range(1, 11)]
        options = {"val_split": 0.0, "test_split": 0.2}
        splits = assign_splits([str(task) for task in range(1, 11)], 0.0, 0.2, 0)
        test_task = next(task for task, split in splits.items() if split == "test")
        records[int(test_task) - 1][3] = "{bad"
        write_steps(tmp_path, records)
        with pytest.raises(BadRow, match="`Output` is not valid JSON"):
            load(tmp_path, "train", **options)
        train, report = load(tmp_path, "train", policy="skip", **options)
        assert len(train) == 8 and not report.skipped  # the bad row is counted with its own split
        test, report = load(tmp_path, "test", policy="skip", **options)
        assert len(test) == 1 and len(report.skipped) == 1


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("medical-steps-demo")
    MedicalStepsTask().make_data(directory, 12, seed=7)
    return directory


class TestMakeData:
    def test_deterministic_for_a_seed(self, tmp_path, demo_dir):
        MedicalStepsTask().make_data(tmp_path / "same", 12, seed=7)
        MedicalStepsTask().make_data(tmp_path / "other", 12, seed=8)
        assert (tmp_path / "same" / "steps.csv").read_bytes() == (demo_dir / "steps.csv").read_bytes()
        assert (tmp_path / "other" / "steps.csv").read_bytes() != (demo_dir / "steps.csv").read_bytes()
        images = sorted(path.name for path in (demo_dir / "images").iterdir())
        assert images == sorted(path.name for path in (tmp_path / "same" / "images").iterdir())
        for name in images:
            assert (demo_dir / "images" / name).read_bytes() == (tmp_path / "same" / "images" / name).read_bytes()
        assert not [path for path in (tmp_path / "same").rglob(".*")]  # no temporary file left behind

    def test_loads_cleanly_as_whole_tasks_of_three_to_five_steps(self, demo_dir):
        from PIL import Image

        rows = []
        for split in ("train", "val", "test"):
            split_rows, report = load(demo_dir, split, val_split=0.1, test_split=0.1)
            assert split_rows and not report.skipped
            rows += split_rows
        steps_per_task = {}
        for row in rows:
            steps_per_task[row["task_id"]] = steps_per_task.get(row["task_id"], 0) + 1
        assert sorted(steps_per_task) == list(range(1, 13))  # `num` counts tasks
        assert set(steps_per_task.values()) == {3, 4, 5}
        with Image.open(rows[0]["images"][0]) as image:
            assert image.size == (192, 144)
        bbox = rows[0]["grounding"]["bbox"]
        assert 0 <= bbox[0] < bbox[2] <= 192 and 0 <= bbox[1] < bbox[3] <= 144

    def test_last_step_needs_long_term_memory(self, demo_dir):
        rows, _ = load(demo_dir, "train", val_split=0.1, test_split=0.1)
        last_steps = [row for row in rows if row["step_index"] >= 2 and "patient_id" in row["output"]]
        for row in last_steps:
            long_term = context_of(row)[2]
            assert long_term["patient_id"] == row["output"]["patient_id"]
        # Some last steps must recall the patient id from long-term memory: the previous step did not name it.
        assert any("patient_id" not in context_of(row)[1] for row in last_steps)


class RecordingGenerator:
    """Stands in for `generate_step_answers`: records each call's prompt contexts and answers from a script."""

    def __init__(self, answer):
        self.answer = answer  # (user_goal, short_term, long_term, number of earlier calls for this goal) -> text
        self.calls = []
        self.seen = {}

    def __call__(self, model, processor, task, prompt_rows, **generation):
        contexts = [context_of(row) for row in prompt_rows]
        images = [row["images"] for row in prompt_rows]
        self.calls.append({"contexts": contexts, "generation": generation, "images": images})
        texts = []
        for goal, short_term, long_term in contexts:
            count = self.seen.get(goal, 0)
            self.seen[goal] = count + 1
            texts.append(self.answer(goal, short_term, long_term, count))
        return texts


def scripted(goal, short_term, long_term, count):
    """Goal A: two valid predictions that differ from the targets; goal B: an invalid one, then a valid one."""
    if goal == "A":
        return json.dumps({"guess": f"a{count}"})
    return "not json" if count == 0 else json.dumps({"guess": f"b{count}"})


def training_rows():
    """Two tasks (A: 3 steps, B: 2 steps), given interleaved and out of order, as `build_dataset` rows would be."""
    rows = {}
    for task_id, goal, count in [(1, "A", 3), (2, "B", 2)]:
        short_term, long_term = {}, {}
        for index in range(count):
            output = {"target": f"{goal}{index}"}
            rows[(task_id, index)] = {
                "id": f"{task_id}/{index}",
                "images": [("image", task_id, index)],  # not a path, so passed through unopened
                "messages": build_step_messages(goal, short_term, long_term, output),
            }
            short_term, long_term = next_memory(long_term, output)
    return [rows[key] for key in [(2, 1), (1, 0), (1, 2), (2, 0), (1, 1)]]


class TestPredict:
    def test_feeds_own_predictions_forward(self, monkeypatch):
        generator = RecordingGenerator(scripted)
        monkeypatch.setattr(medical_steps_task, "generate_step_answers", generator)
        task = MedicalStepsTask()
        rows = training_rows()
        answers = task.predict(object(), object(), rows, batch_size=4, max_new_tokens=64)

        # Step k of every task is answered in one call (batched across tasks), steps in order.
        assert len(generator.calls) == 3
        assert generator.calls[0]["generation"] == {"batch_size": 4, "max_new_tokens": 64}
        goals = [[goal for goal, _, _ in call["contexts"]] for call in generator.calls]
        assert goals == [["B", "A"], ["B", "A"], ["A"]]
        assert generator.calls[1]["images"] == [[("image", 2, 1)], [("image", 1, 1)]]
        first, second, third = generator.calls
        assert first["contexts"] == [("B", {}, {}), ("A", {}, {})]
        # Memory holds the model's answers, not the targets; an unparseable answer leaves nothing to remember.
        assert second["contexts"] == [("B", {}, {}), ("A", {"guess": "a0"}, {"guess": "a0"})]
        assert third["contexts"] == [("A", {"guess": "a1"}, {"guess": "a1"})]
        # Answers come back in the order of the rows given.
        assert answers == ['{"guess": "b1"}', '{"guess": "a0"}', '{"guess": "a2"}', "not json", '{"guess": "a1"}']

    def test_long_term_memory_accumulates(self, monkeypatch):
        def answer(goal, short_term, long_term, count):
            return json.dumps({f"k{count}": count, "step": count})

        generator = RecordingGenerator(answer)
        monkeypatch.setattr(medical_steps_task, "generate_step_answers", generator)
        MedicalStepsTask().predict(None, None, [row for row in training_rows() if row["id"].startswith("1/")])
        assert generator.calls[2]["contexts"] == [("A", {"k1": 1, "step": 1}, {"k0": 0, "k1": 1, "step": 1})]

    def test_warns_when_a_task_starts_mid_way(self, monkeypatch, caplog):
        monkeypatch.setattr(medical_steps_task, "generate_step_answers", RecordingGenerator(scripted))
        rows = [row for row in training_rows() if row["id"] in ("1/1", "1/2")]
        with caplog.at_level("WARNING", logger=medical_steps_task.__name__):
            MedicalStepsTask().predict(None, None, rows)
        assert "Task 1: steps [1, 2] given, not 0..1" in caplog.text

    def test_on_built_dataset_rows(self, monkeypatch, demo_dir):
        """The rows `evaluate_task` passes: decoded images, and only id/images/messages."""
        from vlm_recipes.data.rows import build_dataset

        generator = RecordingGenerator(lambda goal, short, long, count: "{}")
        monkeypatch.setattr(medical_steps_task, "generate_step_answers", generator)
        rows, _ = load(demo_dir, "test", val_split=0.1, test_split=0.1)
        dataset = build_dataset(rows)
        dataset_rows = [dataset[index] for index in range(len(dataset))]
        answers = MedicalStepsTask().predict(None, None, dataset_rows)
        assert answers == ["{}"] * len(rows)
        assert generator.calls[0]["contexts"][0] == (rows[0]["user_goal"], {}, {})
        assert generator.calls[0]["images"][0][0].size == (192, 144)

    def test_save_artifacts(self, monkeypatch, tmp_path):
        monkeypatch.setattr(medical_steps_task, "generate_step_answers", RecordingGenerator(scripted))
        task = MedicalStepsTask()
        rows = training_rows()
        answers = task.predict(None, None, rows)
        scores = [task.score(answer, task.target(row), row) for answer, row in zip(answers, rows)]
        task.save_artifacts(tmp_path, scores, rows)
        results = json.loads((tmp_path / "step_results.json").read_text())
        assert results["task"] == "medical_steps" and results["metrics"]["json_validity_rate"] == pytest.approx(4 / 5)
        assert [task["task_id"] for task in results["tasks"]] == ["2", "1"]  # order of first appearance
        second_of_a = results["tasks"][1]["steps"][1]
        assert second_of_a["id"] == "1/1" and second_of_a["target"] == {"target": "A1"}
        assert second_of_a["prediction"] == '{"guess": "a1"}' and second_of_a["parsed_prediction"] == {"guess": "a1"}
        assert second_of_a["short_term_memory"] == {"guess": "a0"} and second_of_a["scores"]["exact_match"] == 0.0
        assert results["tasks"][0]["steps"][0]["parsed_prediction"] is None


class TestPredictor:
    def test_run_task_and_predict_step(self, monkeypatch, demo_dir):
        generator = RecordingGenerator(scripted)
        monkeypatch.setattr(medical_steps_predictor, "generate_step_answers", generator)
        predictor = MedicalStepsPredictor(None, None, max_new_tokens=32)
        image = str(next((demo_dir / "images").iterdir()))
        results = predictor.run_task([{"image_path": image, "user_goal": "B"}] * 3)
        assert results[0] == {"_raw": "not json", "_error": results[0]["_error"]}
        assert results[0]["_error"].startswith("invalid JSON") and results[1:] == [{"guess": "b1"}, {"guess": "b2"}]
        assert [call["contexts"][0][1:] for call in generator.calls] == [({}, {}), ({}, {}), ({"guess": "b1"},) * 2]
        assert generator.calls[0]["generation"] == {"max_new_tokens": 32}
        assert generator.calls[0]["images"][0][0].size == (192, 144)  # a path is opened as a PIL image

        assert predictor.predict_step(image, "A") == {"guess": "a0"}
        assert predictor.predict_step(image, "A", {"x": 1}, {"x": 1, "y": 2}) == {"guess": "a1"}
        assert generator.calls[-1]["contexts"] == [("A", {"x": 1}, {"x": 1, "y": 2})]

    def test_run_task_on_rows(self, monkeypatch, demo_dir):
        generator = RecordingGenerator(lambda goal, short, long, count: json.dumps({"n": count}))
        monkeypatch.setattr(medical_steps_predictor, "generate_step_answers", generator)
        rows, _ = load(demo_dir, "val", val_split=0.1, test_split=0.1)
        task_rows = [row for row in rows if row["task_id"] == rows[0]["task_id"]]
        results = MedicalStepsPredictor(None, None).run_task(task_rows)
        assert results == [{"n": count} for count in range(len(task_rows))]
        assert generator.calls[1]["contexts"] == [(rows[0]["user_goal"], {"n": 0}, {"n": 0})]

    def test_load_predictor(self, monkeypatch):
        import vlm_recipes.generation

        loaded = []
        monkeypatch.setattr(
            vlm_recipes.generation, "load_for_generation", lambda *args: loaded.append(args) or ("model", "processor")
        )
        predictor = medical_steps_predictor.load_predictor("out/adapter", "base/model", temperature=0.5)
        assert loaded == [("out/adapter", "base/model", False)]
        assert (predictor.model, predictor.processor) == ("model", "processor")
        assert predictor.generation == {"max_new_tokens": 256, "temperature": 0.5}
