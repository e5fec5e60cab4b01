"""Task plug-ins: each module turns one native data format into messages (and, later, prompts and metrics).

A new task is one module here that subclasses `Task` and decorates it with `@register_task`; nothing in
`scripts/sft.py` or the collator changes.
"""

from . import chess, element, medical_steps, messages, shapes, ui_actions  # noqa: E402,F401  (registers the tasks)
from .base import TASKS, Task, get_task, register_task, task_from_args

__all__ = ["TASKS", "Task", "get_task", "register_task", "task_from_args"]
