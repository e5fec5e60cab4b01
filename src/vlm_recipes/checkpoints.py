"""Checkpoints that load on their own: processor files in every saved directory, and the tools around them.

Every `checkpoint-*/` and the final output directory of a run hold the processor files (tokenizer, chat template,
`processor_config.json` and the legacy `preprocessor_config.json`) and `generation_config.json`, so that
`AutoProcessor.from_pretrained(directory)` works with no base model at hand. `save_processor_files` writes them;
`VLMSFTTrainer` calls it for each checkpoint and the final output, before they are moved into place.

The tools:

- `scripts/fix_checkpoints.py`: `find_checkpoints`, `diagnose_checkpoint` and `repair_checkpoint` find directories
  whose processor does not load alone and copy the missing files from the base model (a local directory or the HF
  cache, found by `resolve_base_model`); `is_base_model` tells the base models that lie among them (the demos' tiny
  models) from what training wrote;
- `scripts/merge_adapter.py`: `merge_adapter` merges a LoRA adapter into its base reloaded unquantised;
- `scripts/check_models.py`: `discover_model_dirs` and `check_model` load each model and answer one fixed prompt
  about one fixed image; `format_model_table` prints the results.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import ADAPTER_WEIGHT_FILES, FULL_WEIGHT_FILES
from .families import detect_family, model_class_for
from .files import apply_user_modes

logger = logging.getLogger(__name__)

__all__ = [
    "CHECK_PROMPT",
    "MERGE_DTYPES",
    "BaseModel",
    "BaseModelNotFoundError",
    "Diagnosis",
    "ModelCheck",
    "RepairReport",
    "check_model",
    "default_merge_dtype",
    "demo_image",
    "diagnose_checkpoint",
    "discover_model_dirs",
    "find_checkpoints",
    "format_model_table",
    "is_base_model",
    "merge_adapter",
    "repair_checkpoint",
    "resolve_base_model",
    "save_processor_files",
]

# Files of a processor (tokenizer, chat template, image/video processor) in any of the layouts transformers 4 and 5
# write; the repair copies whichever of them the base holds and the checkpoint lacks.
PROCESSOR_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
TOKENIZER_VOCABULARY_NAMES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
GENERATION_CONFIG_NAME = "generation_config.json"
# transformers 5 folds the image-processor settings into processor_config.json; tools that read
# preprocessor_config.json (older transformers, vLLM, TGI) still look for it.
LEGACY_IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
# Moved into place last: until they are there, AutoProcessor does not see a processor, so a crash part-way leaves a
# directory that fails `diagnose_checkpoint` rather than one that looks complete.
_MOVED_LAST = ("processor_config.json", LEGACY_IMAGE_PROCESSOR_NAME)
WEIGHT_FILE_NAMES = (*FULL_WEIGHT_FILES, *ADAPTER_WEIGHT_FILES)
_STAGING_PREFIX = ".processor-files-"
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
# Writing processor files
# --------------------------------------------------------------------------------------------------------------------
def _move_into(staging: Path, directory: Path, only_missing: bool) -> list[str]:
    """Move each entry of `staging` into `directory` by rename (atomic per file); returns the names moved."""
    moved = []
    entries = sorted(staging.iterdir(), key=lambda entry: (entry.name in _MOVED_LAST, entry.name))
    for entry in entries:
        target = directory / entry.name
        if target.exists() or target.is_symlink():
            if only_missing:
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
        os.replace(entry, target)
        moved.append(entry.name)
    return moved


def save_processor_files(
    directory: str | Path, processor, generation_config=None, only_missing: bool = False
) -> list[str]:
    """Write a processor's files, its legacy `preprocessor_config.json` and a generation config into `directory`.

    Everything is first written into a hidden staging directory inside `directory`, then renamed into place file by
    file, so no half-written file is ever visible under its real name.

    Args:
        directory (`str` or `Path`): the model directory (created if missing).
        processor (`ProcessorMixin`): the processor to save (tokenizer, chat template, image processor).
        generation_config (`GenerationConfig`, *optional*): saved as `generation_config.json` when given.
        only_missing (`bool`, defaults to `False`): keep the files `directory` already holds; write only the others.

    Returns:
        The names written into `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory))
    try:
        processor.save_pretrained(staging)
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None and not (staging / LEGACY_IMAGE_PROCESSOR_NAME).exists():
            image_processor.save_pretrained(staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        return _move_into(staging, directory, only_missing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def _first_line(error: BaseException) -> str:
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
        diagnosis.processor_problem = f"processor does not load alone ({_first_line(error)})"
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


def _run_recipe(directory: Path) -> tuple[dict[str, Any], Path | None]:
    """The resolved recipe of the run a directory belongs to, and the file it was read from.

    `recipe.yaml` is written at the end of training, `run_info.json` (whose `recipe` is the same) at its start, so a
    run that stopped early still has the latter. Each is looked for in the directory itself (a final output) and in
    its parent (a `checkpoint-*`).
    """
    import yaml

    for folder in (directory, directory.parent):
        if (folder / "recipe.yaml").is_file():
            return yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}, folder / "recipe.yaml"
    for folder in (directory, directory.parent):
        if (folder / "run_info.json").is_file():
            recipe = json.loads((folder / "run_info.json").read_text(encoding="utf-8")).get("recipe")
            if isinstance(recipe, dict):
                return recipe, folder / "run_info.json"
    return {}, None


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
    recipe, recipe_path = _run_recipe(directory)
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
        return None, f"not a local directory and not in the HF cache ({_first_line(error)})"


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
def _copy_missing_files(source: Path, directory: Path) -> list[str]:
    """Copy the processor files and generation config that `source` has and `directory` lacks (atomic per file)."""
    names = [
        name
        for name in (*PROCESSOR_FILE_NAMES, GENERATION_CONFIG_NAME)
        if (source / name).exists() and not (directory / name).exists()
    ]
    if not names:
        return []
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory))
    try:
        for name in names:
            # HF cache snapshots hold symlinks to blobs: copy the content, not the link.
            if (source / name).is_dir():
                shutil.copytree(source / name, staging / name)
            else:
                shutil.copyfile(source / name, staging / name)
        return _move_into(staging, directory, only_missing=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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

    values, recipe = _run_recipe(directory)
    pixels = {key: values[key] for key in ("min_pixels", "max_pixels") if values.get(key) is not None}
    if not pixels:
        return
    try:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code, **pixels)
    except Exception as error:  # noqa: BLE001 - still broken: the diagnosis that follows reports it
        logger.warning("%s: could not apply %s: %s", directory, pixels, _first_line(error))
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
        copied = _copy_missing_files(report.base.path, directory)
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


# --------------------------------------------------------------------------------------------------------------------
# Merging a LoRA adapter
# --------------------------------------------------------------------------------------------------------------------
MERGE_DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_merge_dtype(adapter_dir: str | Path) -> str:
    """The dtype the run loaded its base in (the recipe's `dtype`, or that key's default), else `float32`.

    This is the weights' dtype, not the mixed-precision compute dtype (`vlm_recipes.models.training_dtype`): merging
    into the weights as they were stored during training loses nothing that training did not already lose.
    """
    recipe, recipe_path = _run_recipe(Path(adapter_dir))
    if recipe_path is None:
        return "float32"
    dtype = recipe.get("dtype")
    if dtype is None:
        from .configs import VLMModelConfig

        dtype = VLMModelConfig.__dataclass_fields__["dtype"].default
    return str(dtype or "float32")


def _replace_directory(staging: Path, output_dir: Path) -> None:
    """Rename a finished staging directory into place; an existing output is swapped out first, then deleted."""
    previous = None
    if output_dir.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, previous / output_dir.name)
    os.replace(staging, output_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    dtype: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a LoRA adapter into its base model and save a standalone model with its processor.

    The base is reloaded **unquantised** (an adapter trained with QLoRA merges into the full-precision base), on CPU,
    in `dtype` (default: `default_merge_dtype`). The processor comes from the adapter directory when it loads there
    alone, else from the base; the generation config likewise; `merge_info.json` records the adapter, the base and
    the dtype. Everything is written into a temporary directory beside `output_dir`, given the modes of the user's
    umask (see `vlm_recipes.file_modes`) and renamed into place at the end.

    Returns:
        `output_dir`, which loads with `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_config.json: pass a LoRA adapter directory as --adapter."
        )
    if output_dir.resolve() == adapter_dir.resolve():
        raise ValueError(f"--output {output_dir} is the adapter directory itself; choose another directory.")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose another --output or pass --overwrite.")
    dtype = dtype or default_merge_dtype(adapter_dir)
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype {dtype!r} cannot be merged into; choose one of {MERGE_DTYPES}.")
    base = resolve_base_model(adapter_dir, base_model)
    base_config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    if getattr(base_config, "quantization_config", None):
        raise ValueError(
            f"The base model {base.path} is stored quantised; merging needs its full-precision weights. Pass "
            "--base_model with the original, unquantised model."
        )
    logger.info("Merging %s into %s (%s, from %s) in %s", adapter_dir, base.name, base.path, base.source, dtype)
    model = model_class_for(base.path).from_pretrained(
        base.path, dtype=dtype if dtype == "auto" else getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload(progressbar=True)

    own = diagnose_checkpoint(adapter_dir, trust_remote_code)
    if own.broken:
        processor = AutoProcessor.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    else:
        processor = own.processor
    generation_config = (
        GenerationConfig.from_pretrained(adapter_dir)
        if (adapter_dir / GENERATION_CONFIG_NAME).is_file()
        else merged.generation_config
    )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        merged.save_pretrained(staging)
        save_processor_files(staging, processor, generation_config)
        merge_info = {
            "adapter": str(adapter_dir),
            "base_model": base.name,
            "base_path": str(base.path),
            "dtype": dtype,
        }
        (staging / MERGE_INFO_NAME).write_text(json.dumps(merge_info, indent=2) + "\n", encoding="utf-8")
        apply_user_modes(staging)  # mkdtemp made it 0o700, safetensors its weights 0o600
        _replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# Checking that models load and generate
# --------------------------------------------------------------------------------------------------------------------
CHECK_PROMPT = "Describe this image in one sentence."


def demo_image():
    """A fixed 224x224 picture (red square, blue circle, green bar on white), drawn here so no file is needed."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((24, 24, 104, 104), fill="red")
    draw.ellipse((120, 40, 200, 120), fill="blue")
    draw.rectangle((32, 150, 192, 180), fill="green")
    return image


def _is_model_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file() or (directory / "adapter_config.json").is_file()


def discover_model_dirs(
    paths: list[str | Path], include_checkpoints: bool = False, include_base_models: bool = False
) -> list[Path]:
    """Model directories (with `config.json` or `adapter_config.json`) among and under `paths`, in order.

    A path that is itself a model directory is always taken. Under it, hidden directories are skipped, and so are
    `checkpoint-*` directories unless `include_checkpoints`, and base models (`is_base_model`: the demos' tiny models
    under `outputs/tiny-models/`, a downloaded model) unless `include_base_models`: what is left is what training
    and merging wrote.
    """
    found: list[Path] = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} not found.")
        for current, subdirectories, _ in os.walk(root):
            subdirectories[:] = sorted(
                name
                for name in subdirectories
                if not name.startswith(".") and (include_checkpoints or not name.startswith("checkpoint-"))
            )
            current = Path(current)
            if not _is_model_dir(current) or current in found:
                continue
            if current == root or include_base_models or not is_base_model(current):
                found.append(current)
    return found


@dataclass
class ModelCheck:
    """One row of the model check: the model's family, how long loading and generating took, and its answer."""

    path: str
    family: str = "-"
    load_seconds: float | None = None
    generate_seconds: float | None = None
    output: str = ""
    error: str | None = None


def _generate_once(model, processor, prompt: str, max_new_tokens: int) -> str:
    import torch

    from .collator import normalize_messages, special_tokens_kwargs

    messages = normalize_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}])
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        text=[text],
        images=[[demo_image()]],
        return_tensors="pt",
        **special_tokens_kwargs(processor.tokenizer, [text]),
    ).to(next(model.parameters()).device)
    tokenizer = processor.tokenizer
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def check_model(
    path: str | Path,
    prompt: str = CHECK_PROMPT,
    max_new_tokens: int = 32,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> ModelCheck:
    """Load a model (full or LoRA adapter) and answer `prompt` about `demo_image()`; errors land in `.error`."""
    import torch

    from .generation import load_for_generation

    result = ModelCheck(str(path))
    try:
        result.family = detect_family(path).name
    except Exception as error:  # noqa: BLE001 - an unknown family does not stop the model from loading; show it
        result.family = "unknown"
        logger.warning("%s: %s", path, error)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = None
    try:
        start = time.perf_counter()
        model, processor = load_for_generation(path, trust_remote_code=trust_remote_code)
        model.to(device)
        result.load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result.output = _generate_once(model, processor, prompt, max_new_tokens)
        result.generate_seconds = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - one model's failure is its row's error; the others still run
        result.error = _first_line(error)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def format_model_table(results: list[ModelCheck], output_width: int = 60) -> str:
    """The checks as a fixed-width table: path, family, load and generation seconds, output, error."""

    def seconds(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    def clip(text: str) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= output_width else text[: output_width - 3] + "..."

    rows = [("path", "family", "load s", "generate s", "output", "error")]
    rows += [
        (r.path, r.family, seconds(r.load_seconds), seconds(r.generate_seconds), clip(r.output), r.error or "-")
        for r in results
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths)]
        lines.append("  ".join([*cells, row[5]]).rstrip())
        if index == 0:
            lines.append("  ".join(["-" * width for width in widths] + ["-----"]))
    return "\n".join(lines)
