"""The train, val and test splits of medical_steps, carved from the one file at task level.

No task has steps on both sides: the task ids in `task_start..task_end` are sorted, shuffled with
`random.Random(split_seed)`, and the first `test_split` fraction of them (at least one task when the fraction is above
0) is `test`, the next `val_split` fraction `val`, the rest `train`. The assignment depends on the file's task ids only,
not on which rows are bad, so it is the same under `on_bad_row: error` and `skip`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

__all__ = ["SPLITS", "assign_splits", "is_integer"]

SPLITS = ("train", "val", "test")


def _held_out_count(fraction: float, num_tasks: int) -> int:
    return max(1, round(fraction * num_tasks)) if fraction > 0 else 0


def assign_splits(task_ids: Sequence[str], val_split: float, test_split: float, seed: int) -> dict[str, str]:
    """`{task_id: split}`: a seeded shuffle of the sorted ids; the first ones are `test`, the next `val`, the rest
    `train`."""
    # Sorting first makes the assignment independent of the file's row order; integer ids sort as numbers.
    ordered = sorted(set(task_ids), key=lambda text: (0, int(text), "") if is_integer(text) else (1, 0, text))
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


def is_integer(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None
