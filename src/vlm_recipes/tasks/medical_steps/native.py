"""Reading the native file of medical_steps, `steps.csv`, into records grouped by task.

Native format
    `<data_dir>/steps.csv` with the columns `Task_id, Image_id, Instruction, Output, Grounding` (others are ignored,
    except an optional `Step`, see below). The rows of one `Task_id` are that task's steps, as consecutive rows, in
    order. `Instruction` is the user goal, `Output` the step's answer as a JSON object, `Grounding` any JSON (the
    element acted on: kept in the rows, not used by the prompt; an empty cell is null). `Image_id` names the
    screenshot in `image_dir` (by default `<image_base_dir>/images`, `image_base_dir` being the recipe key that
    defaults to the data directory); an `Image_id` without a suffix is also looked for as `.png`, `.jpg` and `.jpeg`.

Step order
    With a `Step` column, a task's step numbers must count up by one from 0 or 1 in file order. Without one, the last
    number in each `Image_id` (`task12_step3.png` -> 3) must increase from row to row when every `Image_id` of the
    task has one; otherwise the file order is taken as is. A task whose rows are not consecutive is out of order too.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.errors import DataError
from ...data.images import DEFAULT_MAX_IMAGE_PIXELS, read_image_header
from ...data.rows import decode_utf8_lines

__all__ = [
    "IMAGE_SUFFIXES",
    "REQUIRED_COLUMNS",
    "STEPS_FILE",
    "STEP_COLUMN",
    "StepRecord",
    "group_tasks",
    "order_problems",
    "parse_json_cell",
    "read_records",
    "resolve_step_image",
]

STEPS_FILE = "steps.csv"
REQUIRED_COLUMNS = ("Task_id", "Image_id", "Instruction", "Output", "Grounding")
STEP_COLUMN = "Step"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class StepRecord:
    """One CSV row: its first line in the file, its cells by column, and what is wrong with it (if anything)."""

    line: int
    cells: dict[str, str]
    problem: str | None = None
    # The line a problem is on, when it is one line's (bytes that are not UTF-8) rather than the row's.
    problem_line: int | None = None


def read_records(file: Path) -> tuple[list[StepRecord], bool]:
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
            records.append(StepRecord(start, cells, undecodable[bad_lines[0]], problem_line=bad_lines[0]))
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
        records.append(StepRecord(start, dict(zip(header, values)), problem))
    return records, STEP_COLUMN in header


def parse_json_cell(record: StepRecord, column: str, allow_empty: bool = False) -> Any:
    text = record.cells.get(column, "").strip()
    if not text and allow_empty:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        reason = f"{error.msg} at column {error.colno}"
        raise ValueError(f"`{column}` is not valid JSON ({reason}): {text[:60]!r}") from None


def resolve_step_image(image_id: str, image_folder: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str:
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


def order_problems(records: list[StepRecord], has_step_column: bool) -> dict[int, str]:
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


def group_tasks(records: list[StepRecord]) -> dict[str, list[StepRecord]]:
    """Records by `Task_id`, in file order; a task whose rows resume after another task's is marked at that row."""
    tasks: dict[str, list[StepRecord]] = {}
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
