"""Medical software procedures, one step at a time, with memory: screenshot + goal + memory -> the step's output JSON.

Native format
    `<data_dir>/steps.csv` with the columns `Task_id, Image_id, Instruction, Output, Grounding` (others are ignored,
    except an optional `Step`, see below). The rows of one `Task_id` are that task's steps, as consecutive rows, in
    order. `Instruction` is the user goal, `Output` the step's answer as a JSON object, `Grounding` any JSON (the
    element acted on: kept in the rows, not used by the prompt; an empty cell is null). `Image_id` names the
    screenshot in `image_dir` (by default `<image_base_dir>/images`, `image_base_dir` being the recipe key that
    defaults to the data directory); an `Image_id` without a suffix is also looked for as `.png`, `.jpg` and `.jpeg`.

Splits
    `train`, `val` and `test` are carved from the one file at task level, so that no task has steps on both sides:
    the task ids in `task_start..task_end` are sorted, shuffled with `random.Random(split_seed)`, and the first
    `test_split` fraction of them (at least one task when the fraction is above 0) is `test`, the next `val_split`
    fraction `val`, the rest `train`. The assignment depends on the file's task ids only, not on which rows are bad,
    so it is the same under `on_bad_row: error` and `skip`.

Step order
    With a `Step` column, a task's step numbers must count up by one from 0 or 1 in file order. Without one, the last
    number in each `Image_id` (`task12_step3.png` -> 3) must increase from row to row when every `Image_id` of the
    task has one; otherwise the file order is taken as is. A task whose rows are not consecutive is out of order too.

Bad rows
    A bad row (a cell that is not valid JSON, an `Output` that is not an object, an empty `Instruction`, a missing
    image, a missing or extra field, a step out of order) is reported with its file, CSV line and reason. One bad step
    spoils its whole task (the later steps' memory would be wrong), so the task's other steps are reported too, each
    with the line of the bad step. Under `on_bad_row: error` a bad row anywhere in the file stops the load of any
    split, so that a bad test row stops the run before training rather than after it; under `skip` a split reports
    (and counts) the rows of its own tasks only.

Prompt and memory
    User turn: the screenshot, then `PROMPT_HEADER` and one line of JSON `{"long_term_memory", "short_term_memory",
    "user_goal"}`. `short_term_memory` is the previous step's output (`{}` at the first step); `long_term_memory`
    is the union of the outputs of all earlier steps of the task, a later step's value winning for a key set twice
    (`next_memory`). Assistant turn: the step's `Output` as compact JSON with sorted keys. Training uses the target
    outputs as memory; evaluation (`predict`) and `MedicalStepsPredictor.run_task` use the model's own predictions.

Metrics (per step, `step_scores`; per split, `task_metrics`)
    JSON validity (the answer, stripped of whitespace, is one JSON object), field accuracy (target keys whose
    predicted value is equal, pooled over all steps), exact step match (the predicted object equals the target) and
    task success (every step of the task exact).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.errors import BadRow, DataError
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, read_image_header
from ..data.rows import BadRowReport, decode_utf8_lines
from .base import Task, register_task

logger = logging.getLogger(__name__)

__all__ = [
    "MedicalStepsOptions",
    "MedicalStepsPredictor",
    "MedicalStepsTask",
    "assign_splits",
    "build_step_messages",
    "generate_step_answers",
    "load_predictor",
    "next_memory",
    "parse_step_context",
    "parse_step_output",
    "step_scores",
    "task_metrics",
]

STEPS_FILE = "steps.csv"
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("Task_id", "Image_id", "Instruction", "Output", "Grounding")
STEP_COLUMN = "Step"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESULTS_FILE = "step_results.json"
PROMPT_HEADER = (
    "You operate medical imaging software one step at a time. From the screenshot, the user goal and the memory "
    "below, answer with this step's output as one JSON object."
)


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


# Prompt and memory -------------------------------------------------------------------------------------------------
def dumps_compact(value: Any) -> str:
    """The JSON text of an output or memory: compact, keys sorted, so that equal values render equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def build_step_messages(
    user_goal: str,
    short_term_memory: dict[str, Any],
    long_term_memory: dict[str, Any],
    output: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One step's conversation: the user turn (screenshot + goal + memory), and the answer when `output` is given."""
    context = {"user_goal": user_goal, "short_term_memory": short_term_memory, "long_term_memory": long_term_memory}
    text = f"{PROMPT_HEADER}\n{dumps_compact(context)}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if output is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": dumps_compact(output)}]})
    return messages


def parse_step_context(messages: list[dict[str, Any]]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """`(user_goal, short_term_memory, long_term_memory)` back from the user turn that `build_step_messages` wrote.

    Evaluation needs it because `build_dataset` keeps only `id`, `images` and `messages` of a row.
    """
    user = next((message for message in messages if message["role"] == "user"), None)
    content = user["content"] if user is not None else None
    text = (
        content
        if isinstance(content, str)
        else "".join(item.get("text", "") for item in content or [] if item.get("type") == "text")
    )
    header, _, context_line = text.partition("\n")
    try:
        if header != PROMPT_HEADER:
            raise ValueError("the first line is not the medical_steps prompt header")
        context = json.loads(context_line)
        return context["user_goal"], context["short_term_memory"], context["long_term_memory"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Not a medical_steps prompt ({error}); build rows with `MedicalStepsTask.load_rows` or "
            "`build_step_messages`."
        ) from None


def next_memory(
    long_term_memory: dict[str, Any], output: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(short_term, long_term)` memory for the step after one whose output is `output`.

    Short-term memory is that output; long-term memory adds its keys to the earlier ones (a later value wins). An
    unparseable prediction (`None`) leaves nothing to remember: empty short-term memory, long-term memory unchanged.
    """
    if output is None:
        return {}, dict(long_term_memory)
    return dict(output), {**long_term_memory, **output}


def parse_step_output(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """`(output, None)` when `text` (whitespace aside) is one JSON object, else `(None, why not)`.

    Strict on purpose: the model is trained to answer bare compact JSON, and a lenient parse would hide drift.
    """
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg} at column {error.colno})"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    return value, None


# Metrics -----------------------------------------------------------------------------------------------------------
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


# Splits ------------------------------------------------------------------------------------------------------------
def _held_out_count(fraction: float, num_tasks: int) -> int:
    return max(1, round(fraction * num_tasks)) if fraction > 0 else 0


def assign_splits(task_ids: Sequence[str], val_split: float, test_split: float, seed: int) -> dict[str, str]:
    """`{task_id: split}`: a seeded shuffle of the sorted ids; the first ones are `test`, the next `val`, the rest
    `train`."""
    # Sorting first makes the assignment independent of the file's row order; integer ids sort as numbers.
    ordered = sorted(set(task_ids), key=lambda text: (0, int(text), "") if _is_integer(text) else (1, 0, text))
    random.Random(seed).shuffle(ordered)
    num_test = _held_out_count(test_split, len(ordered))
    num_val = _held_out_count(val_split, len(ordered))
    if ordered and num_test + num_val >= len(ordered):
        raise ValueError(
            f"{len(ordered)} task(s) cannot fill `test` ({num_test}) and `val` ({num_val}) and leave any for `train`; "
            "lower `val_split`/`test_split` (0 turns a split off) or widen `task_start`..`task_end`."
        )
    splits = {}
    for position, task_id in enumerate(ordered):
        splits[task_id] = "test" if position < num_test else "val" if position < num_test + num_val else "train"
    return splits


def _is_integer(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None


# Reading the CSV ---------------------------------------------------------------------------------------------------
@dataclass
class _Record:
    """One CSV row: its first line in the file, its cells by column, and what is wrong with it (if anything)."""

    line: int
    cells: dict[str, str]
    problem: str | None = None
    # The line a problem is on, when it is one line's (bytes that are not UTF-8) rather than the row's.
    problem_line: int | None = None


def _read_records(file: Path) -> tuple[list[_Record], bool]:
    """The records of `steps.csv` (blank lines skipped) and whether it has a `Step` column."""
    records = []
    # Decoded line by line, so that bytes that are not UTF-8 make their line's row bad, named by its line.
    lines, undecodable = decode_utf8_lines(file.read_bytes())
    if lines:
        # Spreadsheet exports often start with a byte-order mark that would stick to the first column name.
        lines[0] = lines[0].removeprefix("\ufeff")
    if not any(line.strip() for line in lines):
        raise DataError(f"{file}: the file is empty; a medical_steps CSV needs a header and one row per step.")
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader, [])]
    if undecodable and min(undecodable) <= reader.line_num:
        line = min(undecodable)
        raise DataError(f"{file}, line {line}: {undecodable[line]}")
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise DataError(
            f"{file}: missing column(s) {missing}; found {header}. A medical_steps CSV needs the columns "
            f"{list(REQUIRED_COLUMNS)} (and optionally `{STEP_COLUMN}`)."
        )
    previous_end = reader.line_num
    for values in reader:
        # A quoted cell may span lines: a record starts on the line after the previous one ended.
        start, previous_end = previous_end + 1, reader.line_num
        bad_lines = [line for line in range(start, previous_end + 1) if line in undecodable]
        if bad_lines:
            cells = dict(zip(header, values))
            records.append(_Record(start, cells, undecodable[bad_lines[0]], problem_line=bad_lines[0]))
            continue
        if not values or all(not value.strip() for value in values):
            continue
        problem = None
        if len(values) > len(header):
            problem = (
                f"{len(values)} fields for {len(header)} columns; quote the JSON cells (a comma inside an "
                "unquoted cell splits it)"
            )
        elif len(values) < len(header):
            absent = [name for name in header[len(values) :] if name in REQUIRED_COLUMNS or name == STEP_COLUMN]
            problem = f"missing field(s) {absent}" if absent else None
        records.append(_Record(start, dict(zip(header, values)), problem))
    return records, STEP_COLUMN in header


def _parse_json_cell(record: _Record, column: str, allow_empty: bool = False) -> Any:
    text = record.cells.get(column, "").strip()
    if not text and allow_empty:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        reason = f"{error.msg} at column {error.colno}"
        raise ValueError(f"`{column}` is not valid JSON ({reason}): {text[:60]!r}") from None


def _resolve_image(image_id: str, image_folder: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """The path of a step's image, its header checked (`read_image_header`), or a `ValueError` saying what is wrong."""
    if not image_id:
        raise ValueError("`Image_id` is empty")
    path = image_folder / image_id
    candidates = [path] if path.suffix else [path, *(path.with_name(path.name + suffix) for suffix in IMAGE_SUFFIXES)]
    for candidate in candidates:
        if candidate.is_file():
            read_image_header(candidate, max_pixels)  # a `DataError` (a ValueError): unusable image
            return str(candidate)
    tried = " (also with .png/.jpg/.jpeg)" if len(candidates) > 1 else ""
    raise ValueError(f"image file {path}{tried} not found; check `Image_id` and `image_dir`")


def _image_number(image_id: str) -> int | None:
    """The last number in an `Image_id`'s stem (`task12_step3.png` -> 3), which orders the steps of a task."""
    numbers = re.findall(r"\d+", Path(image_id).stem)
    return int(numbers[-1]) if numbers else None


def _order_problems(records: list[_Record], has_step_column: bool) -> dict[int, str]:
    """`{position in task: why}` for the steps of one task (in file order) that break the step order."""
    problems = {}
    if has_step_column:
        previous = None
        for position, record in enumerate(records):
            text = record.cells.get(STEP_COLUMN, "").strip()
            if not re.fullmatch(r"-?\d+", text):
                problems[position] = f"`{STEP_COLUMN}` must be an integer, got {text!r}"
                break
            number = int(text)
            expected = (0, 1) if previous is None else (previous + 1,)
            if number not in expected:
                wanted = "0 or 1" if previous is None else str(previous + 1)
                problems[position] = f"step out of order: `{STEP_COLUMN}` is {number}, expected {wanted}"
                break
            previous = number
        return problems
    numbers = [_image_number(record.cells.get("Image_id", "")) for record in records]
    if any(number is None for number in numbers):
        return problems  # no number to order by: the file order stands, as documented
    for position in range(1, len(records)):
        if numbers[position] <= numbers[position - 1]:
            problems[position] = (
                f"step out of order: Image_id {records[position].cells['Image_id']!r} (number {numbers[position]}) "
                f"follows {records[position - 1].cells['Image_id']!r} (number {numbers[position - 1]}); sort the "
                f"task's rows by step or add a `{STEP_COLUMN}` column"
            )
            break
    return problems


def _group_tasks(records: list[_Record]) -> dict[str, list[_Record]]:
    """Records by `Task_id`, in file order; a task whose rows resume after another task's is marked at that row."""
    tasks: dict[str, list[_Record]] = {}
    current = None
    for record in records:
        task_id = record.cells.get("Task_id", "").strip()
        if not task_id and record.problem is None:
            record.problem = "`Task_id` is empty"
        if task_id != current and task_id in tasks and record.problem is None:
            record.problem = (
                f"Task_id {task_id!r} resumes at this row after other tasks' rows; a task's steps must be "
                "consecutive rows, in order"
            )
        tasks.setdefault(task_id, []).append(record)
        current = task_id
    return tasks


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


def _prompt_row(image: Any, user_goal: str, short_term: dict[str, Any], long_term: dict[str, Any]) -> dict[str, Any]:
    return {"images": [_open_image(image)], "messages": build_step_messages(user_goal, short_term, long_term)}


def generate_step_answers(model, processor, task: Task, prompt_rows: list[dict[str, Any]], **generation: Any):
    """Answers to prompt rows (`{"images", "messages"}` ending with the user turn): the one place that generates, so
    that tests can replace it."""
    from ..generation import generate_answers

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
        if not self._has_task_range() or not _is_integer(task_id):
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
        records, has_step_column = _read_records(file)
        tasks = {task_id: steps for task_id, steps in _group_tasks(records).items() if self._in_range(task_id)}
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
        records: list[_Record],
        has_step_column: bool,
        image_folder: Path,
        report: BadRowReport,
    ) -> list[dict[str, Any]]:
        """The rows of one task, memory chained from its target outputs; none (all reported) if any step is bad."""
        problems = {position: record.problem for position, record in enumerate(records) if record.problem}
        for position, problem in _order_problems(records, has_step_column).items():
            problems.setdefault(position, problem)
        if task_id and self._has_task_range() and not _is_integer(task_id):
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
                output = _parse_json_cell(record, "Output")
                if not isinstance(output, dict):
                    raise ValueError(f"`Output` must be a JSON object, got {type(output).__name__}")
                grounding = _parse_json_cell(record, "Grounding", allow_empty=True)
                image = _resolve_image(record.cells["Image_id"].strip(), image_folder, report.max_image_pixels)
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
        key = int(task_id) if _is_integer(task_id) else task_id
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
        _write_demo_data(Path(output_dir), num, seed)

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
                prompt_rows.append(_prompt_row(row["images"][0], user_goal, short_term, long_term))
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
        from ..files import write_json_atomically

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


# Inference API -----------------------------------------------------------------------------------------------------
class MedicalStepsPredictor:
    """Answers steps of a procedure with a trained model, prompting exactly as in training.

    Args:
        model, processor: as returned by `vlm_recipes.generation.load_for_generation`.
        generation: keywords of `generate_answers` (`max_new_tokens` defaults to 256 here: outputs are JSON objects).
    """

    def __init__(self, model, processor, **generation: Any):
        self.model, self.processor = model, processor
        self.task = MedicalStepsTask()
        self.generation = {"max_new_tokens": 256, **generation}

    def _answer(self, image: Any, user_goal: str, short_term: dict[str, Any], long_term: dict[str, Any]) -> str:
        prompt_row = _prompt_row(image, user_goal, short_term, long_term)
        (text,) = generate_step_answers(self.model, self.processor, self.task, [prompt_row], **self.generation)
        return text

    @staticmethod
    def _as_result(text: str) -> dict[str, Any]:
        output, error = parse_step_output(text)
        return output if output is not None else {"_raw": text, "_error": error}

    def predict_step(
        self,
        image_path: str | Path | Any,
        user_goal: str,
        short_term_memory: dict[str, Any] | None = None,
        long_term_memory: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The step's output as a dict; an unparseable answer gives `{"_raw": answer, "_error": why}`.

        `image_path` may also be a PIL image; a memory left `None` is empty (as at a task's first step).
        """
        text = self._answer(image_path, user_goal, short_term_memory or {}, long_term_memory or {})
        return self._as_result(text)

    def run_task(self, steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer a task's steps in order, each prompted with the memory of this run's own earlier answers.

        `steps`: dicts `{"image_path", "user_goal"}`, or rows of `load_rows` / a dataset (their first image, and their
        `user_goal` or the goal in their prompt). Returns one `predict_step`-style dict per step; an unparseable
        answer is remembered as nothing (see `next_memory`).
        """
        short_term: dict[str, Any] = {}
        long_term: dict[str, Any] = {}
        results = []
        for number, step in enumerate(steps):
            if "image_path" in step:
                image = step["image_path"]
            elif step.get("images"):
                image = step["images"][0]
            else:
                raise ValueError(f"Step {number} has neither `image_path` nor `images`.")
            user_goal = step.get("user_goal") or (step.get("messages") and parse_step_context(step["messages"])[0])
            if not user_goal:
                raise ValueError(f"Step {number} has neither `user_goal` nor a medical_steps prompt in `messages`.")
            text = self._answer(image, user_goal, short_term, long_term)
            results.append(self._as_result(text))
            short_term, long_term = next_memory(long_term, parse_step_output(text)[0])
        return results


def load_predictor(
    model_path: str | Path, base_model_name: str | None = None, trust_remote_code: bool = False, **generation: Any
) -> MedicalStepsPredictor:
    """A `MedicalStepsPredictor` for a trained model directory or LoRA adapter (on `base_model_name`, or the base in
    its `adapter_config.json`)."""
    from ..generation import load_for_generation

    model, processor = load_for_generation(model_path, base_model_name, trust_remote_code)
    return MedicalStepsPredictor(model, processor, **generation)


# Demo data ---------------------------------------------------------------------------------------------------------
_SCREEN_SIZE = (192, 144)
_NAMES = ["Ana Ruiz", "Ben Okafor", "Chen Wei", "Dana Levi", "Emil Novak", "Fatima Zahra", "Goran Ilic", "Hana Sato"]
_DOCTORS = ["Dr. Adams", "Dr. Baker", "Dr. Costa", "Dr. Diaz"]
_APPS = ["PACS Viewer", "Reports", "Lab Results", "Scheduler"]
_SERIES = ["T1 AX", "T2 AX", "FLAIR", "DWI"]
_PRESETS = ["Lung", "Bone", "Brain", "Abdomen"]
_REPORTS = ["X-ray", "CT", "MRI", "Ultrasound"]
_TOOLS = ["Ruler", "Angle", "ROI", "Zoom"]
# Each patient has one id and one MRI study, as in a hospital's records: a model can learn the id from the name in the
# goal (a tiny demo model cannot read random digits off a 192x144 screenshot), and the goal names the study by its
# year (each name comes in too few MRI goals for a model to learn its study).
_PATIENT_IDS = {name: f"P-{1000 + 1111 * index}" for index, name in enumerate(_NAMES)}
_MRI_YEARS = {name: 2017 + index for index, name in enumerate(_NAMES)}


@dataclass
class _Screen:
    title: str
    options: list[str]
    chosen: str
    output: dict[str, Any]


def _procedure(kind: int, rng: random.Random) -> tuple[str, list[_Screen]]:
    """One synthetic procedure: the user goal and its screens, the element to act on highlighted on each.

    The last step repeats the patient id, which the goal does not name (it names the patient): the model takes it
    from memory.
    """
    patients = rng.sample(_NAMES, 4)
    name = patients[0]
    patient_id = _PATIENT_IDS[name]
    patient = f"{name} {patient_id}"
    patient_rows = rng.sample([f"{other} {_PATIENT_IDS[other]}" for other in patients], 4)

    def screen(title: str, options: list[str], chosen: str, **output: str) -> _Screen:
        return _Screen(title, options, chosen, output)

    def opening(app: str, area: str) -> list[_Screen]:
        return [
            screen("Launcher", rng.sample(_APPS, 4), app, action="open_app", app=app),
            screen(f"{area} | Patients", patient_rows, patient, action="select_patient", patient_id=patient_id),
        ]

    if kind == 0:
        series = rng.choice(_SERIES)
        year = _MRI_YEARS[name]
        study = f"MRI {year}"
        studies = rng.sample([study, "CT 2016", "XR 2015"], 3)
        goal = f"Load the {series} series of the {year} MRI scan of patient {name}."
        screens = [
            *opening("PACS Viewer", "PACS"),
            screen("PACS | Studies", studies, study, action="choose_study", study=study),
            screen("PACS | Series", rng.sample(_SERIES, 4), series, action="choose_series", series=series),
            screen("PACS | Viewer", ["Load", "Cancel"], "Load", action="load", patient_id=patient_id, series=series),
        ]
    elif kind == 1:
        tool = rng.choice(_TOOLS)
        goal = f"Measure the lesion with the {tool} tool on the CT of patient {name}."
        screens = [
            *opening("PACS Viewer", "PACS"),
            screen("PACS | Tools", rng.sample(_TOOLS, 4), tool, action="select_tool", tool=tool),
            screen("PACS | Measure", ["Save", "Undo"], "Save", action="save", patient_id=patient_id, tool=tool),
        ]
    elif kind == 2:
        report, doctor = rng.choice(_REPORTS), rng.choice(_DOCTORS)
        goal = f"Send the {report} report of patient {name} to {doctor}."
        screens = [
            *opening("Reports", "Reports"),
            screen("Reports | Documents", rng.sample(_REPORTS, 4), report, action="open_report", report=report),
            screen("Reports | Send", _DOCTORS, doctor, action="send", patient_id=patient_id, recipient=doctor),
        ]
    else:
        preset = rng.choice(_PRESETS)
        goal = f"Apply the {preset} window to the CT of patient {name}."
        screens = [
            *opening("PACS Viewer", "PACS"),
            screen("PACS | Window", _PRESETS, preset, action="set_window", patient_id=patient_id, preset=preset),
        ]
    return goal, screens


def _render(screen: _Screen, rng: random.Random):
    """A small screenshot: a title bar, one button per option, the chosen one highlighted. Returns (image, bbox)."""
    from PIL import Image, ImageDraw

    width, height = _SCREEN_SIZE
    shade = rng.randint(-12, 12)
    image = Image.new("RGB", (width, height), (232 + shade // 2, 236 + shade // 2, 242))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width - 1, 15], fill=(30, 60 + shade, 120))
    draw.text((4, 2), screen.title, fill=(255, 255, 255))
    bbox = None
    for position, label in enumerate(screen.options):
        top = 22 + position * 28
        box = [8, top, width - 9, top + 22]
        if label == screen.chosen:
            draw.rectangle(box, fill=(255, 236, 150), outline=(220, 120, 0), width=2)
            bbox = box
        else:
            draw.rectangle(box, fill=(255, 255, 255), outline=(150, 150, 160))
        draw.text((14, top + 5), label, fill=(20, 20, 20))
    return image, bbox


def _write_demo_data(output_dir: Path, num: int, seed: int) -> None:
    if num < 1:
        raise ValueError(f"`num`={num}: medical_steps demo data needs at least one task.")
    rng = random.Random(seed)
    images = output_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for task_number in range(1, num + 1):
        goal, screens = _procedure((task_number - 1) % 4, rng)
        for step_number, screen in enumerate(screens, start=1):
            image_id = f"task{task_number:04d}_step{step_number:02d}.png"
            image, bbox = _render(screen, rng)
            temporary = images / f".{image_id}.tmp"
            image.save(temporary, format="PNG")
            os.replace(temporary, images / image_id)
            grounding = {"bbox": bbox, "label": screen.chosen}
            records.append([task_number, image_id, goal, dumps_compact(screen.output), dumps_compact(grounding)])
    temporary = output_dir / f".{STEPS_FILE}.tmp"
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REQUIRED_COLUMNS)
        writer.writerows(records)
    os.replace(temporary, output_dir / STEPS_FILE)
