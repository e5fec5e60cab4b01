"""A recipe's splits, loaded through its task as datasets (`load_splits`), with the report of the rows left out."""

from __future__ import annotations

import logging
from pathlib import Path

from ..configs import VLMScriptArguments
from ..tasks import task_from_args
from .errors import DataError
from .rows import BadRowReport, build_dataset

logger = logging.getLogger(__name__)

__all__ = ["load_splits"]


def load_splits(script_args: VLMScriptArguments, splits: list[str | None], limits: list[int | None] | None = None):
    """Load the task's splits as datasets (None where a split is not asked for), with the bad-row report.

    `limits` caps each split's size; by default the first split is capped by `max_train_samples` and the second by
    `max_eval_samples`.
    """
    if script_args.dataset_path is None:
        raise ValueError("Set `dataset_path` in the recipe: the local directory of the task's data.")
    data_dir = Path(script_args.dataset_path)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"Dataset path {data_dir} not found; create it (e.g. `python scripts/make_data.py {script_args.task} "
            f"--output {data_dir}`) or set `generate_data_if_missing: true` for demo data."
        )
    image_base_dir = Path(script_args.image_base_dir) if script_args.image_base_dir else data_dir
    task = task_from_args(script_args)
    report = BadRowReport(policy=script_args.on_bad_row, max_image_pixels=script_args.max_image_pixels)
    if limits is None:
        limits = [script_args.max_train_samples, script_args.max_eval_samples]
    datasets = []
    for position, split in enumerate(splits):
        if split is None:
            datasets.append(None)
            continue
        if not task.split_exists(data_dir, split):
            raise FileNotFoundError(f"Split {split!r} of task {task.name!r} not found in {data_dir}.")
        rows = task.load_rows(data_dir, split, image_base_dir, report)
        if not rows:
            # Under `skip` every row may have been left out: the reasons go into the error, or they would be lost.
            raise DataError(f"No usable rows in split {split!r} of {data_dir}: {report.summary()}")
        limit = limits[position] if position < len(limits) else None
        if limit is not None:
            rows = rows[:limit]
        datasets.append(build_dataset(rows, max_image_pixels=script_args.max_image_pixels))
    if report.skipped:
        logger.warning("%s", report.summary())
    return datasets, report
