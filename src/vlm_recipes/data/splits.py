"""A recipe's splits, loaded through its task as datasets (`load_splits`), with the report of the rows left out."""

from __future__ import annotations

import logging
from pathlib import Path

from ..configs import VLMScriptArguments
from ..tasks import task_from_args
from .errors import DataError
from .rows import LISTED_BAD_ROWS, BadRowReport, build_dataset

logger = logging.getLogger(__name__)

__all__ = ["eval_split_name", "load_generation_rows", "load_splits"]


def eval_split_name(script_args: VLMScriptArguments) -> str | None:
    """The split evaluated during training: `eval_split`, or for a `dataset_name` dataset where `eval_split` is not
    set, `dataset_test_split` (TRL's key and default)."""
    if getattr(script_args, "dataset_name", None) and "eval_split" not in script_args.keys_set:
        return script_args.dataset_test_split
    return script_args.eval_split


def load_splits(
    script_args: VLMScriptArguments,
    splits: list[str | None],
    limits: list[int | None] | None = None,
    num_proc: int | None = None,
    streaming: bool | None = None,
):
    """Load the recipe's splits as datasets (None where a split is not asked for), with the bad-row report.

    The rows come from `dataset_name` through `datasets` (`vlm_recipes.data.hub`: map-style, or streamed with
    `dataset_streaming`; `streaming` overrides it) or from the task's native files in `dataset_path`.
    `limits` caps each split's size; by default the first split is capped by `max_train_samples` and the second by
    `max_eval_samples`. `num_proc` processes convert a `dataset_name` dataset's rows (`dataset_num_proc`).
    """
    report = BadRowReport(policy=script_args.on_bad_row, max_image_pixels=script_args.max_image_pixels)
    if limits is None:
        limits = [script_args.max_train_samples, script_args.max_eval_samples]
    if getattr(script_args, "dataset_name", None):
        from .hub import open_source

        source = open_source(script_args, streaming=streaming)
        loaded = [
            None
            if split is None
            else source.load_split(split, report, limits[i] if i < len(limits) else None, num_proc=num_proc)
            for i, split in enumerate(splits)
        ]
        if report.skipped:
            logger.warning("%s", report.summary())
        return loaded, report
    if script_args.dataset_path is None:
        raise DataError(
            "Set `dataset_name` (a hub dataset, a local dataset folder or data file) or `dataset_path` (the local "
            "directory of the task's native data) in the recipe."
        )
    data_dir = Path(script_args.dataset_path)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"Dataset path {data_dir} not found; create it (e.g. `python scripts/make_data.py {script_args.task} "
            f"--output {data_dir}`) or set `generate_data_if_missing: true` for demo data."
        )
    image_base_dir = Path(script_args.image_base_dir) if script_args.image_base_dir else data_dir
    task = task_from_args(script_args)
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


def load_generation_rows(script_args: VLMScriptArguments, split: str, limit: int | None = None):
    """The rows of `split` evaluated by generation (at most `limit`): a dataset, or where the recipe streams
    (`dataset_streaming`), the first rows of the stream read into a list (generation takes rows by index), its bad
    rows left out and counted in a warning."""
    (rows,), _ = load_splits(script_args, [split], limits=[limit])
    if hasattr(rows, "__len__"):
        return rows
    if limit is None:
        raise DataError(
            f"The {split!r} split is streamed: evaluating it by generation reads its rows into memory, decoded; say "
            "how many (`generation_max_samples`, or `--max_samples` of scripts/evaluate.py)."
        )
    read = list(rows)
    good = [row for row in read if not row.get("image_error")]
    if len(good) < len(read):
        reasons = [row["image_error"]["reason"] for row in read if row.get("image_error")]
        logger.warning(
            "Evaluation by generation leaves out %d bad row(s) of the streamed %r split: %s",
            len(reasons),
            split,
            "; ".join(reasons[:LISTED_BAD_ROWS]),
        )
    if not good:
        raise DataError(f"No usable rows in the streamed {split!r} split to evaluate by generation.")
    return good
