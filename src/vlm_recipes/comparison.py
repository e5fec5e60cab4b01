"""Comparing training runs: `load_local_run` (an output directory of `scripts/sft.py`) and `wandb_runs` (the runs of
a W&B project, through `wandb.Api`) give `RunRecord`s of the same shape, which `format_comparison` turns into a table
of the config keys that differ and the final metrics, and `plot_comparison` into a PNG of curves and task metrics.

Light on imports (no torch, no transformers), so that `scripts/compare_runs.py` starts fast; the recipe defaults
(`vlm_recipes.configs`, which imports TRL) are imported only when the runs' recipes do not hold the same keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMPUTE_REPORT_NAME",
    "RUN_INFO_NAME",
    "RunRecord",
    "differing_config",
    "effective_config",
    "final_metrics",
    "flatten",
    "format_comparison",
    "load_local_run",
    "plot_comparison",
    "wandb_runs",
]

# Files of an output directory that a comparison reads (written by `vlm_recipes.reporting` and `.compute`).
RUN_INFO_NAME = "run_info.json"
COMPUTE_REPORT_NAME = "compute_report.json"


def flatten(values: Mapping[str, Any], separator: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with `separator` (`{"a": {"b": 1}}` -> `{"a/b": 1}`)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, separator, name))
        else:
            flat[name] = value
    return flat


# Single-value figures of the trainer's final log entry (kept as they are, as WandbCallback does).
TRAIN_SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
# Curves drawn by `plot_comparison`, in this order, where the runs have them.
PLOTTED_CURVES = (
    "train/loss",
    "eval/loss",
    "train/mean_token_accuracy",
    "eval/mean_token_accuracy",
    "train/learning_rate",
)
# Compute-report figures shown in the comparison table.
COMPARED_COMPUTE_KEYS = (
    "wall_seconds",
    "gpu_hours",
    "cpu_hours",
    "peak_memory_gib",
    "samples_seen",
    "tokens_seen",
    "padding_fraction",
    "samples_per_second",
    "tokens_per_second",
)


@dataclass
class RunRecord:
    """One run, from an output directory or from W&B, in the same shape.

    Args:
        name (`str`): the run's name.
        config (`dict`): its resolved recipe.
        summary (`dict`): final figures, W&B names: `train/loss` (last logged), `train_loss` (mean over the run),
            `eval/loss`, `eval/<task>/<metric>`, `compute/<figure>`.
        curves (`dict[str, list[tuple[float, float]]]`): logged values by W&B name (`train/loss`...), as
            `(global step, value)`.
        source (`str`): where it was read from.
    """

    name: str
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    source: str = ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _log_name(key: str) -> str:
    """A Trainer log key under its W&B name (as transformers' WandbCallback renames them)."""
    return f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else f"train/{key}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it may be from an interrupted run.") from None


def _trainer_state_file(run_dir: Path) -> Path | None:
    """`trainer_state.json` of the run, or of its last checkpoint when the run did not write one at the end."""
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    checkpoints = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    return checkpoints[-1] if checkpoints else None


def load_local_run(run_dir: str | Path) -> RunRecord:
    """A run from its output directory: `run_info.json` (or `recipe.yaml`), `trainer_state.json`, `metrics.json`,
    `compute_report.json`; each file but the recipe is optional."""
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} not found.")
    name, config = run_dir.name, None
    if (run_dir / RUN_INFO_NAME).is_file():
        info = _read_json(run_dir / RUN_INFO_NAME)
        name, config = info.get("run_name") or name, info.get("recipe")
    if config is None and (run_dir / "recipe.yaml").is_file():
        config = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
        name = config.get("run_name") or name
    if config is None:
        raise FileNotFoundError(
            f"{run_dir} holds neither {RUN_INFO_NAME} nor recipe.yaml: not an output directory of scripts/sft.py."
        )
    record = RunRecord(name=str(name), config=config, source=str(run_dir))
    state_file = _trainer_state_file(run_dir)
    if state_file is not None:
        for entry in _read_json(state_file).get("log_history", []):
            step = entry.get("step")
            for key, value in entry.items():
                if key in ("step", "epoch") or not _is_number(value):
                    continue
                if key in TRAIN_SUMMARY_KEYS:
                    record.summary[key] = value
                elif step is not None:
                    record.curves.setdefault(_log_name(key), []).append((step, value))
        for curve, points in record.curves.items():
            record.summary[curve] = points[-1][1]
    if (run_dir / "metrics.json").is_file():
        metrics = _read_json(run_dir / "metrics.json")
        for key, value in flatten(metrics.get("metrics", {})).items():
            record.summary[f"eval/{metrics.get('task', 'task')}/{key}"] = value
    if (run_dir / COMPUTE_REPORT_NAME).is_file():
        report = _read_json(run_dir / COMPUTE_REPORT_NAME)
        report.pop("definitions", None)
        for key, value in flatten(report).items():
            record.summary[f"compute/{key}"] = value
    return record


def wandb_runs(
    project: str, entity: str | None = None, group: str | None = None, api=None, history_samples: int = 2000
) -> list[RunRecord]:
    """The runs of a W&B project (of one group), read through `wandb.Api` (`api` stands in for it in tests)."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    records = []
    for run in api.runs(path, filters={"group": group} if group else None):
        config = dict(run.config)
        # Our runs carry the whole resolved recipe under `recipe`; other runs compare on their flat config.
        recipe = config.get("recipe") if isinstance(config.get("recipe"), Mapping) else None
        if recipe is None:
            recipe = {key: value for key, value in config.items() if not key.startswith("_")}
        summary = {key: value for key, value in dict(run.summary_metrics).items() if not key.startswith("_")}
        curves: dict[str, list[tuple[float, float]]] = {}
        for row in run.history(samples=history_samples, pandas=False):
            step = row.get("train/global_step", row.get("_step"))
            for key, value in row.items():
                if key.startswith("_") or key == "train/global_step" or not _is_number(value) or step is None:
                    continue
                if isinstance(value, float) and math.isnan(value):
                    continue
                curves.setdefault(key, []).append((step, value))
        for points in curves.values():
            points.sort(key=lambda point: point[0])
        records.append(RunRecord(name=run.name, config=dict(recipe), summary=summary, curves=curves, source=path))
    if not records:
        raise ValueError(f"No runs found in W&B project {path!r}" + (f" group {group!r}." if group else "."))
    return records


_MISSING = object()


@functools.cache
def _recipe_defaults(task: str | None) -> dict[str, Any]:
    """The default of every recipe key for a run of `task` (None: the default task): fields of our three dataclasses
    and of the task's options (another task's options are no keys of this run), in the form `resolved_recipe` writes
    values in."""
    from .configs import RECIPE_DATACLASSES, _field_default, _plain, _task_option_classes

    def defaults_of(cls: type) -> dict[str, Any]:
        defaults = {}
        for dataclass_field in dataclasses.fields(cls):
            default = _field_default(dataclass_field)
            if dataclass_field.init and default is not dataclasses.MISSING:
                defaults[dataclass_field.name] = _plain(default)
        return defaults

    defaults = {key: value for cls in RECIPE_DATACLASSES for key, value in defaults_of(cls).items()}
    options = _task_option_classes().get(task or defaults["task"])
    return {**defaults, **(defaults_of(options) if options is not None else {})}


def effective_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved recipe with the keys it leaves out filled in: `recipe.yaml` and `run_info.json` hold only the keys
    whose value differs from the default (`vlm_recipes.configs.resolved_recipe`), so a key a run lacks has its
    default. Keys that are no recipe keys stay as they are."""
    task = config.get("task")
    return {**_recipe_defaults(task if isinstance(task, str) else None), **config}


def differing_config(records: list[RunRecord]) -> dict[str, list[Any]]:
    """Config keys (nested ones joined with `.`) whose effective values differ between runs: key -> one value per run.

    Where the runs' configs do not hold the same keys, each is first completed with the defaults of the keys it lacks
    (`effective_config`): a key left at its default in one run shows that default, not a blank, and `null` in one run
    equals an absent key whose default is null. `_MISSING` stays where a run lacks a key that has no default there
    (not a recipe key, or an option of another task).
    """
    flat = [flatten(record.config, separator=".") for record in records]
    if any(set(config) != set(flat[0]) for config in flat):
        flat = [flatten(effective_config(record.config), separator=".") for record in records]
    keys = sorted(set().union(*flat))
    differing = {}
    for key in keys:
        values = [config.get(key, _MISSING) for config in flat]
        if any(
            json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str)
            for v in values
        ):
            differing[key] = values
    return differing


def final_metrics(records: list[RunRecord]) -> dict[str, list[Any]]:
    """Final figures to compare: losses, the task metrics, the trainer's throughput and the compute report's main
    figures; metric -> one value per run (None where a run lacks it)."""
    summaries = [record.summary for record in records]
    present = set().union(*summaries)
    losses = [key for key in ("train/loss", "train_loss", "eval/loss") if key in present]
    task_metrics = sorted(
        key
        for key in present
        if key.startswith("eval/") and key.count("/") >= 2 and any(_is_number(s.get(key)) for s in summaries)
    )
    accuracies = [key for key in ("train/mean_token_accuracy", "eval/mean_token_accuracy") if key in present]
    throughput = [key for key in ("train_runtime", "train_samples_per_second") if key in present]
    compute = [f"compute/{key}" for key in COMPARED_COMPUTE_KEYS if f"compute/{key}" in present]
    keys = [*losses, *accuracies, *task_metrics, *throughput, *compute]
    table = {key: [summary.get(key) for summary in summaries] for key in keys}
    return {key: values for key, values in table.items() if any(value is not None for value in values)}


def _shown(value: Any, null: str = "-") -> str:
    if value is _MISSING:
        return "-"
    if value is None:
        return null
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_comparison(records: list[RunRecord]) -> str:
    """A text table: the config keys that differ between the runs, then their final metrics; one column per run."""
    sections = [("config (keys that differ)", differing_config(records)), ("final metrics", final_metrics(records))]
    names = [record.name for record in records]
    # A config value of None is the recipe's `null`, set or by default; "-" is a key the run does not have.
    nulls = {sections[0][0]: "null", sections[1][0]: "-"}
    rows = [
        (key, [_shown(value, nulls[title]) for value in values])
        for title, table in sections
        for key, values in table.items()
    ]
    key_width = max([len(key) for key, _ in rows] + [len(title) for title, _ in sections] + [3])
    widths = [max([len(name)] + [len(cells[index]) for _, cells in rows]) for index, name in enumerate(names)]

    def line(first: str, cells: list[str]) -> str:
        return "  ".join([f"{first:<{key_width}}", *(f"{cell:>{width}}" for cell, width in zip(cells, widths))])

    lines = [line("run", names), line("-" * key_width, ["-" * width for width in widths])]
    for title, table in sections:
        lines.append(f"[{title}]")
        if not table:
            lines.append("  (none)")
        for key, values in table.items():
            lines.append(line(key, [_shown(value, nulls[title]) for value in values]))
    return "\n".join(lines)


def plot_comparison(records: list[RunRecord], path: str | Path) -> Path:
    """A PNG of the runs' curves (`PLOTTED_CURVES` they have) and a bar chart of their final task metrics in [0, 1]
    (accuracies, rates); written atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [name for name in PLOTTED_CURVES if any(record.curves.get(name) for record in records)]
    metrics = final_metrics(records)
    bars = [
        key
        for key, values in metrics.items()
        if key.startswith("eval/")
        and key.count("/") >= 2
        and not key.split("/", 2)[-1].startswith(("num_", "count"))
        and any(_is_number(v) and not math.isnan(v) for v in values)
        and all(v is None or (_is_number(v) and (math.isnan(v) or 0 <= v <= 1)) for v in values)
    ]
    panels = len(curves) + (1 if bars else 0)
    if panels == 0:
        raise ValueError(
            "Nothing to plot: the runs have no logged curves (trainer_state.json) and no task metrics (metrics.json)."
        )
    columns = min(panels, 2)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4 * rows), squeeze=False)
    flat_axes = list(axes.flat)
    for axis, curve in zip(flat_axes, curves):
        for record in records:
            points = record.curves.get(curve)
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=record.name)
        axis.set_title(curve)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if bars:
        axis = flat_axes[len(curves)]
        width = 0.8 / len(records)
        for index, record in enumerate(records):
            values = [metrics[key][index] if _is_number(metrics[key][index]) else float("nan") for key in bars]
            positions = [position + index * width for position in range(len(bars))]
            axis.bar(positions, values, width=width, label=record.name)
        axis.set_xticks([position + width * (len(records) - 1) / 2 for position in range(len(bars))])
        axis.set_xticklabels([key.split("/", 2)[-1] for key in bars], rotation=45, ha="right", fontsize=7)
        axis.set_ylim(0, 1)
        axis.set_title(f"final task metrics ({', '.join(sorted({key.split('/')[1] for key in bars}))})")
        axis.legend(fontsize=7)
    for axis in flat_axes[panels:]:
        axis.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    os.replace(temporary, path)
    return path
