"""Run tracking: W&B set-up from the recipe, run metadata (`run_info.json` and the W&B config), and evaluation
results into W&B.

Tracking (used by `scripts/sft.py`):

- `start_run_tracking` (before the trainer is built) names the run (`run_name` defaults to
  `<task>-<model>-<recipe hash>`) and, when the recipe reports to W&B, puts the recipe's `wandb_project`,
  `wandb_entity`, `wandb_group` and `wandb_tags` into the environment variables that W&B reads (`WANDB_PROJECT`,
  `WANDB_ENTITY`, `WANDB_RUN_GROUP`, `WANDB_TAGS`), only where they are not set already: the environment wins.
  `WANDB_NAME` wins over `run_name`, and `WANDB_DIR` defaults to the output directory, so that an offline run's
  files sit beside the model. transformers' `WandbCallback` then starts the run at the beginning of training.
- `RunTracking.attach` adds the callbacks: at the start of training the run's metadata (resolved recipe, git commit,
  package versions, hardware) goes into `<output_dir>/run_info.json` and, with W&B, into the run's config; at the end
  the compute report (`vlm_recipes.compute`) is written and logged, with the samples the collator skipped for an
  image it could not decode (`skipped_samples`; they are recorded in `<output_dir>/skipped_samples.jsonl` as they
  happen, from every process and data-loading worker).
- `log_evaluation` (called by `evaluation.evaluate_task`) puts the task metrics into the active W&B run's summary as
  `eval/<task>/<metric>` and logs a table of sample predictions with their images, drawn on by the task
  (`Task.annotate_image`). Without an active run it does nothing, and this module never imports W&B itself (TRL
  does, when it is installed): a run with `report_to: none` starts no W&B run and writes nothing for it.

Comparing runs afterwards is `vlm_recipes.comparison`'s part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .comparison import COMPUTE_REPORT_NAME, RUN_INFO_NAME, flatten
from .compute import track_compute
from .files import write_text_atomically

logger = logging.getLogger(__name__)

__all__ = [
    "EVAL_TABLE_ROWS",
    "SKIPPED_SAMPLES_NAME",
    "RunInfoCallback",
    "RunTracking",
    "SkippedSamplesCallback",
    "apply_wandb_environment",
    "default_run_name",
    "git_info",
    "hardware_info",
    "log_evaluation",
    "package_versions",
    "recipe_hash",
    "reports_to_wandb",
    "start_run_tracking",
]

# Rows of the W&B table of sample predictions logged at evaluation.
EVAL_TABLE_ROWS = 32
# Where the collator records, as they happen, the samples it skips during training (`on_bad_row: skip`).
SKIPPED_SAMPLES_NAME = "skipped_samples.jsonl"
# Recipe keys -> the environment variables W&B reads them from.
WANDB_ENVIRONMENT = {
    "wandb_project": "WANDB_PROJECT",
    "wandb_entity": "WANDB_ENTITY",
    "wandb_group": "WANDB_RUN_GROUP",
    "wandb_tags": "WANDB_TAGS",
}
# Keys left out of the recipe hash of the default run name: the name itself, where and to whom a run reports, and how
# its data is loaded (`trainer.apply_data_loading_defaults` sets these from the machine's CPUs and CUDA), none of which
# changes what is trained: the same recipe gets the same name on every machine.
DATA_LOADING_KEYS = ("dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers")
NOT_HASHED = ("run_name", "output_dir", "report_to", *WANDB_ENVIRONMENT, *DATA_LOADING_KEYS)
PACKAGES = (
    "torch",
    "torchvision",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "deepspeed",
    "bitsandbytes",
    "wandb",
    "vlm-recipes",
)


# ---------------------------------------------------------------------------------------------------------------
# Run metadata
# ---------------------------------------------------------------------------------------------------------------
def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """`{"commit", "dirty"}` of the vlm-recipes checkout that holds `path` (default: this package); `commit` is
    `"unknown"` (and `dirty` None) for an installed copy outside a git checkout."""
    path = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        # A package installed into a virtualenv that happens to sit inside some other repository is not a checkout.
        if not (top / "src" / "vlm_recipes" / "__init__.py").is_file():
            return {"commit": "unknown", "dirty": None}
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages a run depends on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def hardware_info(num_processes: int = 1) -> dict[str, Any]:
    """The machine: platform, CPU cores, memory, and the CUDA devices visible to this process."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "num_processes": num_processes,
    }
    try:
        info["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        info["memory_gib"] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(index),
                "memory_gib": torch.cuda.get_device_properties(index).total_memory / 2**30,
            }
            for index in range(torch.cuda.device_count())
        ]
    else:
        info["gpus"] = []
    return info


# ---------------------------------------------------------------------------------------------------------------
# Run name and W&B environment
# ---------------------------------------------------------------------------------------------------------------
def recipe_hash(resolved: Mapping[str, Any]) -> str:
    """8 hex digits identifying what a resolved recipe trains (keys in `NOT_HASHED` left out)."""
    hashed = {key: value for key, value in resolved.items() if key not in NOT_HASHED}
    text = json.dumps(hashed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def default_run_name(task: str, model_name_or_path: str | None, resolved: Mapping[str, Any]) -> str:
    """`<task>-<model basename>-<recipe hash>`, e.g. `ui_actions-Qwen2-VL-2B-Instruct-1a2b3c4d`."""
    model = Path(str(model_name_or_path or "model").rstrip("/")).name or "model"
    return f"{task}-{model}-{recipe_hash(resolved)}"


def reports_to_wandb(training_args) -> bool:
    report_to = training_args.report_to
    return "wandb" in ([report_to] if isinstance(report_to, str) else (report_to or []))


def apply_wandb_environment(script_args, output_dir: str | Path, environ: dict | None = None) -> dict[str, str]:
    """Set the W&B environment variables from the recipe's `wandb_*` keys where they are not set; returns what was
    set. `WANDB_DIR` defaults to `output_dir`."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for key, variable in WANDB_ENVIRONMENT.items():
        value = getattr(script_args, key, None)
        if value is None:
            continue
        if key == "wandb_tags":
            tags = [value] if isinstance(value, str) else list(value)
            bad = [tag for tag in tags if "," in str(tag) or not str(tag).strip()]
            if bad:
                raise ValueError(
                    f"`wandb_tags` {bad} cannot be W&B tags: a tag must be non-empty and hold no comma "
                    "(WANDB_TAGS is comma-separated); give each tag as its own list item."
                )
            value = ",".join(str(tag) for tag in tags)
        values[variable] = str(value)
    values["WANDB_DIR"] = str(Path(output_dir).resolve())
    applied = {variable: value for variable, value in values.items() if not environ.get(variable)}
    environ.update(applied)
    if "WANDB_DIR" in applied:
        Path(applied["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    return applied


WANDB_QUIET_MODES = ("offline", "disabled", "dryrun")


def wandb_credentials_found(environ: Mapping[str, str] | None = None) -> bool:
    """Whether W&B will find a login without prompting: `WANDB_API_KEY`, an identity-token file, or an entry for its
    host in the netrc file that `wandb login` writes.

    Ours rather than wandb's: its credential lookup is internal (`wandb.sdk.lib.wbauth`, changed across 0.2x), and
    without credentials W&B fails only when the Trainer starts the run, after the data and the model have loaded.
    """
    import netrc
    from urllib.parse import urlparse

    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(environ.get("NETRC") or Path(environ.get("HOME", str(Path.home()))) / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def fall_back_to_offline_wandb(output_dir: str | Path, environ: dict | None = None) -> bool:
    """Without a W&B login, log offline (one notice) instead of failing once the model has loaded; True if so."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE", "").lower() in WANDB_QUIET_MODES or wandb_credentials_found(environ):
        return False
    environ["WANDB_MODE"] = "offline"
    logger.warning(
        "W&B: no login found (WANDB_API_KEY or `wandb login`): logging offline into %s/wandb; upload it later with "
        "`wandb sync`, or set `report_to: none`.",
        environ.get("WANDB_DIR") or output_dir,
    )
    return True


class RunTracking:
    """What `start_run_tracking` set up for one run; `attach` it to the trainer, `finish` it at the end."""

    def __init__(self, script_args, training_args, model_args, wandb_enabled: bool):
        self.script_args = script_args
        self.training_args = training_args
        self.model_args = model_args
        self.wandb_enabled = wandb_enabled
        self.compute = None

    def resolved_recipe(self) -> dict[str, Any]:
        from .configs import resolved_recipe

        return resolved_recipe(self.script_args, self.training_args, self.model_args)

    def attach(self, trainer, processor) -> None:
        """Add the run-metadata and compute-report callbacks to `trainer`; the collator's skips are recorded in
        `<output_dir>/skipped_samples.jsonl` and go into the compute report."""
        trainer.add_callback(RunInfoCallback(self))
        self.compute = track_compute(trainer, processor)
        collator = trainer.data_collator
        if callable(getattr(collator, "record_skips_to", None)):
            # Before `train()` starts the data-loading workers, which take their copy of the collator with it.
            collator.record_skips_to(
                Path(trainer.args.output_dir) / SKIPPED_SAMPLES_NAME, start_new=trainer.is_world_process_zero()
            )
            trainer.add_callback(SkippedSamplesCallback(self.compute, collator))

    def finish(self) -> None:
        """Close the W&B run (flushing an offline run's files), if one is active."""
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()


def start_run_tracking(script_args, training_args, model_args, environ: dict | None = None) -> RunTracking:
    """Name the run and prepare W&B before the trainer is built (see the module docstring)."""
    from .configs import resolved_recipe

    environ = os.environ if environ is None else environ
    wandb_enabled = reports_to_wandb(training_args)
    if "run_name" not in script_args.keys_set:
        resolved = resolved_recipe(script_args, training_args, model_args)
        training_args.run_name = default_run_name(script_args.task, model_args.model_name_or_path, resolved)
    if wandb_enabled:
        if environ.get("WANDB_NAME"):
            training_args.run_name = environ["WANDB_NAME"]
        applied = apply_wandb_environment(script_args, training_args.output_dir, environ)
        if applied:
            logger.info("W&B settings from the recipe: %s", ", ".join(f"{k}={v}" for k, v in sorted(applied.items())))
        fall_back_to_offline_wandb(training_args.output_dir, environ)
    return RunTracking(script_args, training_args, model_args, wandb_enabled)


class RunInfoCallback(TrainerCallback):
    """At the start of training (main process): the run's metadata into `run_info.json` and the W&B config."""

    def __init__(self, tracking: RunTracking):
        self.tracking = tracking
        self.info: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        metadata = {
            "recipe": self.tracking.resolved_recipe(),
            "git": git_info(),
            "versions": package_versions(),
            "hardware": hardware_info(args.world_size),
        }
        info = {"run_name": args.run_name, **metadata}
        wandb = sys.modules.get("wandb")
        run = wandb.run if wandb is not None else None
        if run is not None:
            # WandbCallback has put the flat TrainingArguments into the config; the recipe goes beside them whole.
            run.config.update(metadata, allow_val_change=True)
            info["wandb"] = {
                "id": run.id,
                "project": run.project,
                "entity": run.entity,
                "group": run.group,
                "tags": list(run.tags or ()),
                "mode": "offline" if run.offline else "online",
                "dir": str(Path(run.dir).parent),
            }
        self.info = info
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(
            output_dir / RUN_INFO_NAME, json.dumps(info, indent=2, sort_keys=True, default=str) + "\n"
        )


class SkippedSamplesCallback(TrainerCallback):
    """At the end of training (main process, after the compute report is written): the samples the collator skipped
    go into `compute_report.json` as `skipped_samples` (`count`, `substituted_batches`, `samples`: id, image, reason).

    The compute report is `vlm_recipes.compute`'s; this adds one section to it and writes it again, whole.
    """

    def __init__(self, compute, collator):
        self.compute = compute
        self.collator = collator

    def on_train_end(self, args, state, control, **kwargs):
        report = getattr(self.compute, "report", None)
        if not state.is_world_process_zero or report is None:
            return
        samples = self.collator.skipped_samples
        report["skipped_samples"] = {
            "count": len(samples),
            "substituted_batches": self.collator.num_substituted,
            "samples": samples,
        }
        report["definitions"] = {
            **report.get("definitions", {}),
            "skipped_samples": "samples left out of their batch under on_bad_row: skip because an image could not be "
            "decoded (a sample skipped in two epochs counts twice); substituted_batches: batches whose samples were "
            "all skipped, which the last good sample stood in for",
        }
        path = Path(args.output_dir) / COMPUTE_REPORT_NAME
        write_text_atomically(path, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation results into W&B
# ---------------------------------------------------------------------------------------------------------------
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(item.get("text", "") for item in content or [] if item.get("type") == "text")


def _prompt_text(task, row: Mapping[str, Any]) -> str:
    """The last user turn of the row's prompt (the system prompt is the same on every row)."""
    users = [message for message in task.prompt_messages(row) if message.get("role") == "user"]
    return _text_of(users[-1]["content"]) if users else ""


def _open_images(images: Iterable[Any]) -> list[Any]:
    from PIL import Image

    opened = []
    for image in images:
        if isinstance(image, (str, Path)):
            with Image.open(image) as handle:
                image = handle.copy()
        opened.append(image.convert("RGB"))
    return opened


def _side_by_side(images: list[Any]):
    """One image of several, left to right, at the height of the tallest."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    height = max(image.height for image in images)
    width = sum(image.width for image in images)
    panel = Image.new("RGB", (width, height), "white")
    left = 0
    for image in images:
        panel.paste(image, (left, 0))
        left += image.width
    return panel


def log_evaluation(
    task,
    rows: list[Mapping[str, Any]],
    targets: list[str],
    predictions: list[str],
    scores: list[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    max_rows: int = EVAL_TABLE_ROWS,
) -> bool:
    """Task metrics into the active W&B run's summary (`eval/<task>/<metric>`, nested keys joined with `/`) and a
    `eval/<task>/predictions` table of the first `max_rows` samples (id, image with the task's drawing, prompt,
    target, prediction, per-sample scores). Returns False, doing nothing, without an active run."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return False
    prefix = f"eval/{task.name}"
    for key, value in flatten(metrics).items():
        wandb.run.summary[f"{prefix}/{key}"] = value
    score_keys = sorted({key for score in scores for key in score})
    table = wandb.Table(columns=["id", "image", "prompt", "target", "prediction", *score_keys], allow_mixed_types=True)
    for row, target, prediction, score in list(zip(rows, targets, predictions, scores))[:max_rows]:
        images = _open_images(row.get("images") or [])
        if images:
            images[0] = task.annotate_image(images[0], row, prediction)
        image = wandb.Image(_side_by_side(images)) if images else None
        table.add_data(
            str(row.get("id")), image, _prompt_text(task, row), target, prediction, *(score.get(k) for k in score_keys)
        )
    wandb.run.log({f"{prefix}/predictions": table})
    return True
