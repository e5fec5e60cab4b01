"""Task plug-ins: each turns one native data format into messages, prompts and metrics.

A small task is one module here (`element`, `shapes`, `messages`); a large one is a package (`chess`, `ui_actions`,
`medical_steps`) with a module per concern (answer format, metrics, demo data, the task) whose `__init__` imports
its task. Either subclasses `Task` and decorates it with `@register_task`; nothing in `scripts/sft.py` or the
collator changes.
"""

from . import chess, element, medical_steps, messages, shapes, ui_actions  # noqa: E402,F401  (registers the tasks)
from .base import TASKS, Task, get_task, register_task, task_from_args

__all__ = ["TASKS", "Task", "get_task", "register_task", "task_from_args"]
