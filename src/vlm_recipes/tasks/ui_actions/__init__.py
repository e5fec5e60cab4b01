"""The ui_actions task: a screenshot and a task -> the next UI action.

Modules: `format` (the action codec), `geometry` (coordinate systems and resizing), `metrics`, `demo_data` (synthetic
screenshots) and `task` (prompts, loading, the registered `UIActionsTask`).
"""

from .task import UIActionsTask

__all__ = ["UIActionsTask"]
