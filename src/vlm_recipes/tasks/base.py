"""The task interface and registry.

A task owns one native data format and everything that depends on its meaning:
- `load_rows`: native files -> rows `{"id", "images": [paths], "messages": [...], ...}`, where `messages` ends with
  the assistant answer to learn (bad rows go through the `BadRowReport`: error or skip, counted);
- `make_data`: a deterministic demo-data generator writing the native format;
- `prompt_messages` / `target`: the conversation up to the answer, and the answer, for evaluation by generation;
- `score` (per example) and `aggregate` (per split): the task's metrics, as pure functions of text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.rows import BadRowReport

__all__ = ["TASKS", "Task", "get_task", "register_task", "task_from_args"]

TASKS: dict[str, type[Task]] = {}


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if item.get("type") == "text")


class Task:
    """One task. Subclasses set `name` and implement `load_rows`; the rest has defaults."""

    name: str = ""
    # A dataclass of the task's recipe options (its fields become recipe keys); instances get them as keywords.
    options: type | None = None
    # File of one split inside the data directory; a task with another layout overrides `split_exists`.
    split_filename: str = "{split}.jsonl"

    # Data ------------------------------------------------------------------------------------------------------
    def load_rows(
        self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def split_file(self, data_dir: Path, split: str) -> Path:
        return Path(data_dir) / self.split_filename.format(split=split)

    def split_exists(self, data_dir: Path, split: str) -> bool:
        return self.split_file(data_dir, split).is_file()

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        raise NotImplementedError(f"Task {self.name!r} has no demo-data generator.")

    # Evaluation ------------------------------------------------------------------------------------------------
    def prompt_messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The conversation up to (not including) the final assistant answer."""
        return row["messages"][:-1]

    def target(self, row: dict[str, Any]) -> str:
        """The final assistant answer, as text."""
        return _content_text(row["messages"][-1]["content"])

    def predict(self, model, processor, rows: list[dict[str, Any]], **generation: Any) -> list[str]:
        """Generated answers for `rows`, in order. The default answers each row's own prompt, in batches; a task
        whose prompts depend on earlier answers (multi-step procedures) overrides this."""
        from ..generation import generate_answers

        return generate_answers(model, processor, self, rows, **generation)

    def score(self, prediction: str, target: str, row: dict[str, Any]) -> dict[str, float]:
        """Per-example scores; the default is exact match after stripping whitespace."""
        return {"exact_match": float(prediction.strip() == target.strip())}

    def aggregate(self, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> dict[str, float]:
        """Split-level metrics; the default is the mean of each per-example score present."""
        keys = sorted({key for score in scores for key in score})
        metrics = {}
        for key in keys:
            values = [score[key] for score in scores if key in score and score[key] is not None]
            metrics[key] = sum(values) / len(values) if values else float("nan")
        metrics["num_examples"] = float(len(scores))
        return metrics

    def save_artifacts(self, output_dir: Path, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> None:
        """Write task-specific evaluation files (plots...) into `output_dir`; nothing by default."""

    def annotate_image(self, image, row: dict[str, Any], prediction: str):
        """The row's first image (PIL, original size) with the prediction and the target drawn on it, for the W&B
        table of sample predictions; the image unchanged by default. Draw on a copy."""
        return image


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a `name`.")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """An instance of the registered task `name`, built with its recipe options."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {sorted(TASKS)}.")
    return TASKS[name](**(options or {}))


def task_from_args(script_args) -> Task:
    """The task of parsed script arguments, with the options `parse_recipe` collected for it."""
    return get_task(script_args.task, script_args.task_options)
