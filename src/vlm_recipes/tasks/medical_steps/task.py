"""Medical software procedures, one step at a time, with memory: screenshot + goal + memory -> the step's output JSON.

The native file (`native`) is read into tasks, split at task level (`splits`), and each step becomes a row whose
prompt carries the memory of the task's earlier outputs (`format`); the metrics are in `metrics`.

Bad rows
    A bad row (a cell that is not valid JSON, an `Output` that is not an object, an empty `Instruction`, a missing
    image, a missing or extra field, a step out of order) is reported with its file, CSV line and reason. One bad step
    spoils its whole task (the later steps' memory would be wrong), so the task's other steps are reported too, each
    with the line of the bad step. Under `on_bad_row: error` a bad row anywhere in the file stops the load of any
    split, so that a bad test row stops the run before training rather than after it; under `skip` a split reports
    (and counts) the rows of its own tasks only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...data.errors import BadRow
from ...data.rows import BadRowReport
from ..base import Task, register_task
from .demo_data import write_demo_data
from .format import build_step_messages, next_memory, parse_step_context, parse_step_output
from .metrics import step_scores, task_metrics
from .native import (
    STEPS_FILE,
    StepRecord,
    group_tasks,
    order_problems,
    parse_json_cell,
    read_records,
    resolve_step_image,
)
from .splits import SPLITS, assign_splits, is_integer

logger = logging.getLogger(__name__)

__all__ = ["RESULTS_FILE", "MedicalStepsOptions", "MedicalStepsTask", "generate_step_answers", "step_prompt_row"]

RESULTS_FILE = "step_results.json"


@dataclass
class MedicalStepsOptions:
    """Recipe options of the `medical_steps` task.

    Args:
        task_start (`int`, *optional*):
            Smallest `Task_id` to use (inclusive); `None` for no lower bound. Task ids are compared as integers.
        task_end (`int`, *optional*):
            Largest `Task_id` to use (inclusive); `None` for no upper bound.
        val_split (`float`, defaults to `0.1`):
            Fraction of the tasks (not steps) held out as the `val` split; 0 for none.
        test_split (`float`, defaults to `0.1`):
            Fraction of the tasks held out as the `test` split; 0 for none.
        split_seed (`int`, defaults to `0`):
            Seed of the shuffle of task ids that assigns tasks to splits.
        image_dir (`str`, defaults to `"images"`):
            Directory of the `Image_id` files, absolute or relative to `image_base_dir` (by default the data
            directory).
    """

    task_start: int | None = field(default=None, metadata={"help": "Smallest Task_id to use (inclusive), or None."})
    task_end: int | None = field(default=None, metadata={"help": "Largest Task_id to use (inclusive), or None."})
    val_split: float = field(default=0.1, metadata={"help": "Fraction of tasks (not steps) held out as `val`."})
    test_split: float = field(default=0.1, metadata={"help": "Fraction of tasks (not steps) held out as `test`."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the task-id shuffle that assigns tasks to splits."})
    image_dir: str = field(
        default="images", metadata={"help": "Directory of the Image_id files, absolute or relative to the data dir."}
    )

    def __post_init__(self):
        for name in ("val_split", "test_split"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"`{name}`={value} must be a fraction of the tasks in [0, 1).")
        if self.val_split + self.test_split >= 1:
            raise ValueError(
                f"`val_split`={self.val_split} and `test_split`={self.test_split} leave no task for training; "
                "keep their sum below 1."
            )
        if self.task_start is not None and self.task_end is not None and self.task_start > self.task_end:
            raise ValueError(f"`task_start`={self.task_start} is above `task_end`={self.task_end}; swap them.")


# The task ----------------------------------------------------------------------------------------------------------
def _step_id(task_id: Any, step_index: int) -> str:
    return f"{task_id}/{step_index}"


def _task_and_step(row: dict[str, Any]) -> tuple[str, int]:
    """A row's `(task id, step index)`: from its own keys, else from its id (`build_dataset` keeps only the id)."""
    if "task_id" in row and "step_index" in row:
        return str(row["task_id"]), int(row["step_index"])
    task_id, _, step = str(row["id"]).rpartition("/")
    if not task_id or not step.isdigit():
        raise ValueError(f"Row id {row['id']!r} is not a medical_steps id `<task_id>/<step_index>`.")
    return task_id, int(step)


def _group_rows(rows: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of `rows` by task (tasks in order of first appearance), each task's ordered by step index."""
    tasks: dict[str, list[tuple[int, int]]] = {}
    for index, row in enumerate(rows):
        task_id, step_index = _task_and_step(row)
        tasks.setdefault(task_id, []).append((step_index, index))
    groups = []
    for task_id, steps in tasks.items():
        steps.sort()
        indices = [step for step, _ in steps]
        if len(set(indices)) != len(indices):
            raise ValueError(f"The rows hold a step of task {task_id!r} twice (step indices {indices}).")
        groups.append([index for _, index in steps])
    return groups


def _open_image(image: Any):
    """A PIL image from a path, or the image itself (dataset rows already hold decoded images)."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image


def step_prompt_row(
    image: Any, user_goal: str, short_term: dict[str, Any], long_term: dict[str, Any]
) -> dict[str, Any]:
    """The prompt row of one step (`{"images", "messages"}`, ending with the user turn), the memory given."""
    return {"images": [_open_image(image)], "messages": build_step_messages(user_goal, short_term, long_term)}


def generate_step_answers(model, processor, task: Task, prompt_rows: list[dict[str, Any]], **generation: Any):
    """Answers to prompt rows (`{"images", "messages"}` ending with the user turn): the one place that generates, so
    that tests can replace it (in this module for `MedicalStepsTask.predict`, in `predictor` for the predictor)."""
    from ...generation import generate_answers

    return generate_answers(model, processor, task, prompt_rows, **generation)


@register_task
class MedicalStepsTask(Task):
    name = "medical_steps"
    options = MedicalStepsOptions

    def __init__(self, **options: Any):
        self.config = MedicalStepsOptions(**options)
        # What `predict` saw and answered, by row id, for `save_artifacts` (which is not given the predictions).
        self.last_run: dict[str, dict[str, Any]] = {}

    # Data ------------------------------------------------------------------------------------------------------
    def steps_file(self, data_dir: Path) -> Path:
        return Path(data_dir) / STEPS_FILE

    def split_exists(self, data_dir: Path, split: str) -> bool:
        fractions = {"train": 1.0, "val": self.config.val_split, "test": self.config.test_split}
        return split in fractions and fractions[split] > 0 and self.steps_file(data_dir).is_file()

    def _has_task_range(self) -> bool:
        return self.config.task_start is not None or self.config.task_end is not None

    def _in_range(self, task_id: str) -> bool:
        """Whether the task id is in `task_start..task_end`. A non-integer id is kept, to be reported as bad in its
        split, rather than dropped unseen."""
        if not self._has_task_range() or not is_integer(task_id):
            return True
        number = int(task_id)
        start, end = self.config.task_start, self.config.task_end
        return (start is None or number >= start) and (end is None or number <= end)

    def load_rows(
        self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport
    ) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise ValueError(f"Unknown medical_steps split {split!r}; the splits are {list(SPLITS)}.")
        file = self.steps_file(data_dir)
        if not file.is_file():
            raise FileNotFoundError(f"Data file {file} not found; medical_steps reads one `{STEPS_FILE}` per data dir")
        image_folder = Path(self.config.image_dir)
        if not image_folder.is_absolute():
            image_folder = Path(image_base_dir) / image_folder
        records, has_step_column = read_records(file)
        tasks = {task_id: steps for task_id, steps in group_tasks(records).items() if self._in_range(task_id)}
        splits = assign_splits(list(tasks), self.config.val_split, self.config.test_split, self.config.split_seed)
        # Tasks of other splits are checked too, into a report of their own: under `error` their bad rows stop the
        # load now (not after training, when the test split is read); under `skip` they count when their split loads.
        others = BadRowReport(policy=report.policy, max_image_pixels=report.max_image_pixels)
        rows = []
        for task_id, steps in tasks.items():
            own = splits[task_id] == split
            task_rows = self._task_rows(file, task_id, steps, has_step_column, image_folder, report if own else others)
            if own:
                rows.extend(task_rows)
        logger.info("medical_steps %s: %d steps of %d tasks", split, len(rows), len({r["task_id"] for r in rows}))
        return rows

    def _task_rows(
        self,
        file: Path,
        task_id: str,
        records: list[StepRecord],
        has_step_column: bool,
        image_folder: Path,
        report: BadRowReport,
    ) -> list[dict[str, Any]]:
        """The rows of one task, memory chained from its target outputs; none (all reported) if any step is bad."""
        problems = {position: record.problem for position, record in enumerate(records) if record.problem}
        for position, problem in order_problems(records, has_step_column).items():
            problems.setdefault(position, problem)
        if task_id and self._has_task_range() and not is_integer(task_id):
            for position in range(len(records)):
                problems.setdefault(
                    position, f"Task_id {task_id!r} is not an integer, so `task_start`/`task_end` cannot place it"
                )
        parsed = []
        for position, record in enumerate(records):
            if position in problems:
                parsed.append(None)
                continue
            try:
                goal = record.cells["Instruction"].strip()
                if not goal:
                    raise ValueError("`Instruction` (the user goal) is empty")
                output = parse_json_cell(record, "Output")
                if not isinstance(output, dict):
                    raise ValueError(f"`Output` must be a JSON object, got {type(output).__name__}")
                grounding = parse_json_cell(record, "Grounding", allow_empty=True)
                image = resolve_step_image(record.cells["Image_id"].strip(), image_folder, report.max_image_pixels)
            except ValueError as error:
                problems[position] = str(error)
                parsed.append(None)
                continue
            parsed.append((goal, output, grounding, image))
        if problems:

            def step_id(position: int) -> str | None:  # the id the row would have had
                return _step_id(task_id, position) if task_id else None

            # The bad steps first, so that under `error` the raised row is the one to fix, not a bystander.
            for position in sorted(problems):
                record = records[position]
                if record.problem_line is not None:  # the line's bytes are not UTF-8: it was never read as a row
                    bad = BadRow(file, record.problem_line, problems[position], row_id=step_id(position), unit="line")
                else:
                    bad = BadRow(file, record.line, problems[position], row_id=step_id(position))
                report.handle(bad)
            first_bad = records[min(problems)].line
            for position, record in enumerate(records):
                if position not in problems:
                    reason = f"skipped with its task {task_id!r}: its step at row {first_bad} is bad, so this step's "
                    report.handle(
                        BadRow(file, record.line, reason + "memory would be wrong", row_id=step_id(position))
                    )
            return []
        key = int(task_id) if is_integer(task_id) else task_id
        rows = []
        short_term: dict[str, Any] = {}
        long_term: dict[str, Any] = {}
        for step_index, (goal, output, grounding, image) in enumerate(parsed):
            rows.append(
                {
                    "id": _step_id(key, step_index),
                    "images": [image],
                    "messages": build_step_messages(goal, short_term, long_term, output),
                    "task_id": key,
                    "step_index": step_index,
                    "output": output,
                    "grounding": grounding,
                    "user_goal": goal,
                }
            )
            short_term, long_term = next_memory(long_term, output)
        return rows

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        """Write `steps.csv` and `images/` with `num` synthetic procedures (tasks) of 3 to 5 steps each.

        `num` counts tasks, not steps, since a split never cuts a task. The same seed writes the same bytes.
        """
        write_demo_data(Path(output_dir), num, seed)

    # Evaluation ------------------------------------------------------------------------------------------------
    def prompt_messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The user turn; prompt rows built at prediction time end there already (they have no answer)."""
        messages = row["messages"]
        return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages

    def predict(self, model, processor, rows: list[dict[str, Any]], **generation: Any) -> list[str]:
        """Answers for `rows`, each step prompted with the memory of the model's own earlier answers of its task.

        Steps run in order within each task; the tasks' k-th steps are answered together (batched). A task's first
        step is the first of its rows given (`max_samples` may cut a task short; it then counts the steps given).
        """
        answers: list[str] = [""] * len(rows)
        self.last_run = {}
        groups = _group_rows(rows)
        for group in groups:
            steps = [_task_and_step(rows[index]) for index in group]
            if [step_index for _, step_index in steps] != list(range(len(steps))):
                logger.warning(
                    "Task %s: steps %s given, not 0..%d; its memory starts at the first step given, unlike training.",
                    steps[0][0],
                    [step_index for _, step_index in steps],
                    len(steps) - 1,
                )
        memories: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {}) for _ in groups]
        for position in range(max((len(group) for group in groups), default=0)):
            active = [number for number, group in enumerate(groups) if position < len(group)]
            prompt_rows = []
            for number in active:
                row = rows[groups[number][position]]
                user_goal = row.get("user_goal") or parse_step_context(row["messages"])[0]
                short_term, long_term = memories[number]
                prompt_rows.append(step_prompt_row(row["images"][0], user_goal, short_term, long_term))
            texts = generate_step_answers(model, processor, self, prompt_rows, **generation)
            for number, text in zip(active, texts, strict=True):
                index = groups[number][position]
                short_term, long_term = memories[number]
                answers[index] = text
                self.last_run[str(rows[index]["id"])] = {
                    "prediction": text,
                    "short_term_memory": short_term,
                    "long_term_memory": long_term,
                }
                memories[number] = next_memory(long_term, parse_step_output(text)[0])
        return answers

    def score(self, prediction: str, target: str, row: dict[str, Any]) -> dict[str, float]:
        return step_scores(parse_step_output(prediction)[0], json.loads(target))

    def aggregate(self, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> dict[str, float]:
        metrics = task_metrics(scores, [_task_and_step(row)[0] for row in rows])
        # Every task reports `num_examples` (here: steps), so that reports and run comparisons read one key.
        return {**metrics, "num_examples": metrics["num_steps"]}

    def save_artifacts(self, output_dir: Path, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> None:
        """Write `step_results.json`: per task (in order) and step, the target, the prediction with the memory it was
        prompted with, and the scores; the prediction is null for a row that `predict` did not answer."""
        from ...files import write_json_atomically

        tasks: dict[str, list[dict[str, Any]]] = {}
        for group in _group_rows(rows):
            for index in group:
                row = rows[index]
                task_id, step_index = _task_and_step(row)
                run = self.last_run.get(str(row["id"]), {})
                prediction = run.get("prediction")
                tasks.setdefault(task_id, []).append(
                    {
                        "id": str(row["id"]),
                        "step_index": step_index,
                        "target": json.loads(self.target(row)),
                        "prediction": prediction,
                        "parsed_prediction": parse_step_output(prediction)[0] if prediction is not None else None,
                        "short_term_memory": run.get("short_term_memory"),
                        "long_term_memory": run.get("long_term_memory"),
                        "scores": scores[index],
                    }
                )
        results = {
            "task": self.name,
            "metrics": self.aggregate(scores, rows),
            "tasks": [
                {
                    "task_id": task_id,
                    "success": all(step["scores"]["exact_match"] == 1.0 for step in steps),
                    "steps": steps,
                }
                for task_id, steps in tasks.items()
            ],
        }
        write_json_atomically(results, Path(output_dir) / RESULTS_FILE)
