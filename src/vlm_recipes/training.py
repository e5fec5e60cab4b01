"""The pieces of `scripts/sft.py` that other scripts share: preparing a recipe's model and data."""

from __future__ import annotations

import logging
from pathlib import Path

from .configs import VLMScriptArguments
from .data import BadRowReport, DataError, build_dataset
from .files import apply_user_modes
from .tasks import task_from_args
from .tiny import build_tiny_model

logger = logging.getLogger(__name__)

__all__ = ["ensure_demo_inputs", "load_splits"]


def ensure_demo_inputs(script_args: VLMScriptArguments, model_name_or_path: str | None) -> None:
    """Build the tiny model and generate the demo data that a demo recipe asks for, when they are missing.

    Only rank 0 builds; the other processes wait, so that no process reads a half-written directory.
    """
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if not state.is_main_process:
            return
        if script_args.tiny_model_family and model_name_or_path and not Path(model_name_or_path).exists():
            logger.info("Building a tiny %s model at %s", script_args.tiny_model_family, model_name_or_path)
            _build_atomically(
                Path(model_name_or_path), lambda tmp: build_tiny_model(script_args.tiny_model_family, tmp)
            )
        if script_args.generate_data_if_missing and script_args.dataset_path:
            data_dir = Path(script_args.dataset_path)
            if not data_dir.exists():
                task = task_from_args(script_args)
                logger.info("Generating %d %s demo samples at %s", script_args.demo_data_size, task.name, data_dir)
                _build_atomically(data_dir, lambda tmp: task.make_data(tmp, script_args.demo_data_size, seed=0))


def _build_atomically(target: Path, build) -> None:
    """Build into a temporary sibling directory and rename it into place, so a crash leaves nothing half-built."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(temporary)
        apply_user_modes(temporary)  # mkdtemp made it 0o700, safetensors the tiny model's weights 0o600
        temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


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
