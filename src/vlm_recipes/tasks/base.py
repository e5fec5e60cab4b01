"""The task interface and registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import BadRowReport

__all__ = ["TASKS", "Task", "get_task", "register_task"]

TASKS: dict[str, type[Task]] = {}


class Task:
    """One task: reads its native data format into `{"id", "images": [paths], "messages"}` rows.

    Subclasses set `name` and implement `load_rows`; tasks with demo data implement `make_data`.
    """

    name: str = ""

    def load_rows(self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport) -> list[dict[str, Any]]:
        raise NotImplementedError

    def split_exists(self, data_dir: Path, split: str) -> bool:
        raise NotImplementedError

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        raise NotImplementedError(f"Task {self.name!r} has no demo-data generator.")


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a `name`.")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {sorted(TASKS)}.")
    return TASKS[name]()
