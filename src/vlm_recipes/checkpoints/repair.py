"""Finding checkpoints whose processor does not load alone, and repairing them from their base model
(`scripts/fix_checkpoints.py`).

`find_checkpoints`, `diagnose_checkpoint` and `repair_checkpoint` find such directories and copy the missing files
from the base model (a local directory or the HF cache, found by `resolve_base_model`); `is_base_model` tells the base
models that lie among them (the demos' tiny models) from what training wrote.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import ADAPTER_WEIGHT_FILES, FULL_WEIGHT_FILES
from ..recipe_files import read_run_recipe
from .processor_files import (
    GENERATION_CONFIG_NAME,
    LEGACY_IMAGE_PROCESSOR_NAME,
    copy_processor_files,
    save_processor_files,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MERGE_INFO_NAME",
    "BaseModel",
    "BaseModelNotFoundError",
    "Diagnosis",
    "RepairReport",
    "diagnose_checkpoint",
    "find_checkpoints",
    "is_base_model",
    "one_line_error",
    "repair_checkpoint",
    "resolve_base_model",
]

TOKENIZER_VOCABULARY_NAMES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
WEIGHT_FILE_NAMES = (*FULL_WEIGHT_FILES, *ADAPTER_WEIGHT_FILES)
# Written by `merge_adapter` beside the merged weights: where they came from.
MERGE_INFO_NAME = "merge_info.json"
# Files that only training or merging writes. A run's final output holds all of `trainer_state.json`,
# `training_args.bin`, `recipe.yaml` and `run_info.json` (the last from the start of the run), each `checkpoint-*` the
# first two, a LoRA adapter `adapter_config.json`, a merged model `merge_info.json`. A base model (a hub download,
# `vlm_recipes.tiny.build_tiny_model`'s output) holds none of them.
TRAINING_OUTPUT_FILE_NAMES = (
    "trainer_state.json",
    "training_args.bin",
    "recipe.yaml",
    "run_info.json",
    "adapter_config.json",
    MERGE_INFO_NAME,
)


# --------------------------------------------------------------------------------------------------------------------
# Finding and diagnosing checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _is_checkpoint_dir(directory: Path) -> bool:
    return directory.name.startswith("checkpoint-") or any((directory / name).is_file() for name in WEIGHT_FILE_NAMES)


def is_base_model(directory: str | Path) -> bool:
    """Whether a model directory is a base model rather than the output of a training run or of `merge_adapter`.

    It is one when it is not a `checkpoint-*` directory and neither it nor its parent (the run of a checkpoint) holds
    a file of `TRAINING_OUTPUT_FILE_NAMES`. Such a directory was never saved by our trainer, so the files that our
    saves add for other tools (`preprocessor_config.json`) are no fault of it, and it has no base to repair it from.
    """
    directory = Path(directory)
    if directory.name.startswith("checkpoint-"):
        return False
    return not any(
        (folder / name).is_file() for folder in (directory, directory.parent) for name in TRAINING_OUTPUT_FILE_NAMES
    )


def find_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint and model directories under `root` (itself included): `checkpoint-*` dirs and dirs with weights."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory.")
    found = []
    for current, subdirectories, _ in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        if _is_checkpoint_dir(Path(current)):
            found.append(Path(current))
    return found


def one_line_error(error: BaseException) -> str:
    """`TypeName: first line of the message`, at most about 200 characters: an error as one row of a report."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return f"{type(error).__name__}: {line if len(line) <= 200 else line[:197] + '...'}"


@dataclass
class Diagnosis:
    """What a directory lacks to reload its processor (and generation config) on its own.

    Args:
        directory (`Path`): the directory checked.
        processor_problem (`str`, *optional*): why `AutoProcessor.from_pretrained(directory)` alone does not give a
            usable processor (does not load, no image processor, no chat template), or None when it does.
        missing_files (`list[str]`): files a complete directory holds that this one lacks, although its processor may
            load (`preprocessor_config.json`, `generation_config.json`).
        processor (`ProcessorMixin`, *optional*): the processor as loaded, when it loaded.
    """

    directory: Path
    processor_problem: str | None = None
    missing_files: list[str] = field(default_factory=list)
    processor: Any = None
    no_chat_template: bool = False

    @property
    def broken(self) -> bool:
        return self.processor_problem is not None

    @property
    def ok(self) -> bool:
        return not self.broken and not self.missing_files

    def describe(self) -> str:
        parts = [self.processor_problem] if self.processor_problem else []
        if self.missing_files:
            parts.append(f"missing {', '.join(self.missing_files)}")
        return "; ".join(parts) if parts else "processor loads alone; all files present"


def _missing_processor_files(directory: Path) -> list[str]:
    """Files without which a processor loads wrong rather than not at all, so loading alone is not proof enough.

    With `config.json` beside it, transformers 5.23 builds an *empty* tokenizer (vocabulary of 1) when the tokenizer
    files are gone, and falls back to other special tokens (eos `<|endoftext|>` instead of `<|im_end|>` for Qwen)
    when only `tokenizer_config.json` is gone; neither raises.
    """
    missing = []
    if not (directory / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not any((directory / name).is_file() for name in TOKENIZER_VOCABULARY_NAMES):
        missing.append(f"tokenizer vocabulary ({' / '.join(TOKENIZER_VOCABULARY_NAMES)})")
    if not any((directory / name).is_file() for name in ("processor_config.json", LEGACY_IMAGE_PROCESSOR_NAME)):
        missing.append("processor_config.json")
    return missing


def diagnose_checkpoint(directory: str | Path, trust_remote_code: bool = False) -> Diagnosis:
    """Check the processor files, try `AutoProcessor.from_pretrained(directory)` alone, and list missing extras."""
    from transformers import AutoProcessor, ProcessorMixin

    directory = Path(directory)
    diagnosis = Diagnosis(directory)
    missing = _missing_processor_files(directory)
    try:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any failure to load is what we report
        diagnosis.processor_problem = f"processor does not load alone ({one_line_error(error)})"
    else:
        if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
            diagnosis.processor_problem = f"AutoProcessor gives a {type(processor).__name__}, no image processor"
        elif missing:
            diagnosis.processor_problem = "processor loads, but not as trained"
        elif not processor.chat_template:
            diagnosis.processor_problem = "no chat template (chat_template.jinja)"
            diagnosis.no_chat_template = True
            diagnosis.processor = processor
        else:
            diagnosis.processor = processor
    if missing:
        diagnosis.processor_problem += f": no {', no '.join(missing)}"
    for name in (LEGACY_IMAGE_PROCESSOR_NAME, GENERATION_CONFIG_NAME):
        if not (directory / name).is_file():
            diagnosis.missing_files.append(name)
    return diagnosis


# --------------------------------------------------------------------------------------------------------------------
# Finding the base model
# --------------------------------------------------------------------------------------------------------------------
class BaseModelNotFoundError(FileNotFoundError):
    """No base model of a checkpoint could be found locally (directory or HF cache)."""


@dataclass(frozen=True)
class BaseModel:
    """A checkpoint's base model: its name as recorded, the local directory it resolves to, and where it was read."""

    name: str
    path: Path
    source: str


def _base_candidates(directory: Path) -> list[tuple[str, str]]:
    """(name, where it was read) in order of trust: the adapter's or merge's own record, the model config, the run's
    recipe."""
    candidates = []
    for record, key in (("adapter_config.json", "base_model_name_or_path"), (MERGE_INFO_NAME, "base_model")):
        path = directory / record
        if path.is_file():
            name = json.loads(path.read_text(encoding="utf-8")).get(key)
            if name:
                candidates.append((name, f"{path} `{key}`"))
    config = directory / "config.json"
    if config.is_file():
        # transformers 4 wrote `_name_or_path` (the path the model was loaded from); transformers 5 no longer does.
        name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        if name and Path(name).resolve() != directory.resolve():
            candidates.append((name, f"{config} `_name_or_path`"))
    recipe, recipe_path = read_run_recipe(directory)
    if recipe.get("model_name_or_path"):
        candidates.append((str(recipe["model_name_or_path"]), f"{recipe_path} `model_name_or_path`"))
    return candidates


def _locate(name: str, directory: Path) -> tuple[Path | None, str]:
    """A base model name as a local directory: as given, relative to the checkpoint's ancestors, or the HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve(), ""
    if not path.is_absolute():
        # A recipe's relative `model_name_or_path` is relative to where training ran, usually an ancestor of the run.
        for ancestor in directory.resolve().parents:
            if (ancestor / path).is_dir():
                return (ancestor / path).resolve(), ""
    if path.is_absolute() or name.startswith("."):
        return None, "no such directory"
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True)), ""
    except Exception as error:  # noqa: BLE001 - not a valid repo id, or not cached
        return None, f"not a local directory and not in the HF cache ({one_line_error(error)})"


def resolve_base_model(directory: str | Path, base_model: str | None = None) -> BaseModel:
    """Find the base model of a checkpoint, offline.

    The name is `base_model` when given; else, in order, the first of these that resolves: `adapter_config.json`'s
    `base_model_name_or_path`, `config.json`'s `_name_or_path` (written by transformers 4 only), and the run's
    recipe's `model_name_or_path` (`recipe.yaml` or `run_info.json`, in the directory or, for a `checkpoint-*`, its
    parent). A name resolves to a local directory (as given, or relative to an ancestor of the checkpoint) or to a
    snapshot in the HF cache.

    Raises:
        BaseModelNotFoundError: naming each candidate tried and why it failed, and the fix.
    """
    directory = Path(directory)
    candidates = [(base_model, "--base_model")] if base_model else _base_candidates(directory)
    tried = []
    for name, source in candidates:
        path, why = _locate(name, directory)
        if path is not None:
            return BaseModel(name, path, source)
        tried.append(f"{name!r} from {source}: {why}")
    if not candidates:
        raise BaseModelNotFoundError(
            f"{directory}: no base model recorded (no adapter_config.json, no `_name_or_path` in config.json, no "
            "recipe.yaml or run_info.json here or in the parent); pass --base_model NAME_OR_DIR."
        )
    raise BaseModelNotFoundError(
        f"{directory}: base model not found locally: {'; '.join(tried)}. Download it (e.g. `hf download NAME`) or "
        "pass --base_model NAME_OR_DIR."
    )


# --------------------------------------------------------------------------------------------------------------------
# Repairing
# --------------------------------------------------------------------------------------------------------------------


def _base_generation_config(base: BaseModel):
    from transformers import AutoConfig, GenerationConfig

    if (base.path / GENERATION_CONFIG_NAME).is_file():
        return GenerationConfig.from_pretrained(base.path)
    return GenerationConfig.from_model_config(AutoConfig.from_pretrained(base.path))


def _apply_recipe_pixels(directory: Path, report: RepairReport, trust_remote_code: bool) -> None:
    """Re-apply the run's `min_pixels`/`max_pixels` to an image-processor config copied from the base.

    `load_processor` applied them at training time, so the base's config lacks them; with them the checkpoint's
    processor is again the one it was trained with.
    """
    from transformers import AutoProcessor

    values, recipe = read_run_recipe(directory)
    pixels = {key: values[key] for key in ("min_pixels", "max_pixels") if values.get(key) is not None}
    if not pixels:
        return
    try:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code, **pixels)
    except Exception as error:  # noqa: BLE001 - still broken: the diagnosis that follows reports it
        logger.warning("%s: could not apply %s: %s", directory, pixels, one_line_error(error))
        return
    save_processor_files(directory, processor)
    report.actions.append(f"applied {pixels} from {recipe} to the image processor")


@dataclass
class RepairReport:
    """What `repair_checkpoint` found (`before`), did (`actions`, from `base`) and left (`after`) in one directory."""

    directory: Path
    before: Diagnosis
    after: Diagnosis
    actions: list[str] = field(default_factory=list)
    base: BaseModel | None = None
    base_error: str | None = None
    attempted: bool = False

    @property
    def ok(self) -> bool:
        return self.after.ok

    @property
    def status(self) -> str:
        """`ok`, `broken` / `incomplete` (not repaired), `fixed`, or `still broken` / `still incomplete`."""
        if self.before.ok:
            return "ok"
        if not self.attempted:
            return "broken" if self.before.broken else "incomplete"
        if self.after.ok:
            return "fixed"
        return "still broken" if self.after.broken else "still incomplete"


def repair_checkpoint(
    directory: str | Path, base_model: str | None = None, trust_remote_code: bool = False, dry_run: bool = False
) -> RepairReport:
    """Make a directory reload its processor alone: copy what it lacks from the base model, then check again.

    Processor files (tokenizer, chat template, processor configs) that the directory lacks are copied from the base
    model; files already there are kept (a fine-tuned tokenizer may differ from the base's). A missing
    `preprocessor_config.json` is written from the directory's own processor, a missing `generation_config.json`
    from the base model's. The result is verified with `AutoProcessor.from_pretrained(directory)`. With `dry_run`,
    nothing is written: the report holds the diagnosis and the base model a repair would use.
    """
    directory = Path(directory)
    before = diagnose_checkpoint(directory, trust_remote_code)
    report = RepairReport(directory, before, before)
    if before.ok:
        return report

    def base() -> BaseModel | None:
        if report.base is None and report.base_error is None:
            try:
                report.base = resolve_base_model(directory, base_model)
            except BaseModelNotFoundError as error:
                report.base_error = str(error)
        return report.base

    if dry_run:
        base()
        return report
    report.attempted = True
    current = before
    if current.broken and base() is not None:
        copied = copy_processor_files(report.base.path, directory)
        if copied:
            report.actions.append(f"copied {', '.join(copied)} from {report.base.path} ({report.base.source})")
        if {"processor_config.json", LEGACY_IMAGE_PROCESSOR_NAME} & set(copied):
            _apply_recipe_pixels(directory, report, trust_remote_code)
        current = diagnose_checkpoint(directory, trust_remote_code)
        if current.no_chat_template:
            # The base keeps its template where our copy by file name does not reach it (e.g. inside
            # tokenizer_config.json, a file the checkpoint already has): take it from the loaded base processor.
            from transformers import AutoProcessor

            template = AutoProcessor.from_pretrained(report.base.path, trust_remote_code=trust_remote_code)
            if template.chat_template:
                current.processor.chat_template = template.chat_template
                written = save_processor_files(directory, current.processor, only_missing=True)
                report.actions.append(f"wrote {', '.join(written)} (chat template of {report.base.path})")
                current = diagnose_checkpoint(directory, trust_remote_code)
    if not current.broken and current.missing_files:
        generation_config = None
        if GENERATION_CONFIG_NAME in current.missing_files and base() is not None:
            generation_config = _base_generation_config(report.base)
        written = save_processor_files(directory, current.processor, generation_config, only_missing=True)
        if written:
            sources = ["its own processor"] + (
                [f"generation config of {report.base.path}"] if generation_config else []
            )
            report.actions.append(f"wrote {', '.join(written)} (from {' and '.join(sources)})")
        current = diagnose_checkpoint(directory, trust_remote_code)
    report.after = current
    return report
