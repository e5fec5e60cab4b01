"""Saves that are whole or absent, and resuming from them exactly.

A run writes every directory it saves (each `checkpoint-<step>/` and the final output) into a hidden staging sibling
(`.tmp-checkpoint-<step>/`, `.tmp-final/`) and moves it into place only once every file is written, so a kill at any
moment of a save leaves either the previous state or the whole new directory, never a folder that passes for
finished. What readers check:

- `checkpoint_problem`: why a `checkpoint-<step>/` cannot be resumed from (no or unreadable `trainer_state.json`, no
  or truncated weights, empty files), for checkpoints written by other tools or older versions of this one;
- `find_checkpoints_to_resume`: the complete checkpoints of an output directory, newest last, and the incomplete ones
  with the reason (staging leftovers included), which resuming and `scripts/fix_checkpoints.py` report;
- `resolve_resume_checkpoint`: `resume_from_checkpoint: true` as the newest complete checkpoint, a path checked;
- `load_full_weights`: a full fine-tuning checkpoint loaded back into the model in memory the way `from_pretrained`
  loads it (key renamings included), stopping on any weight that did not load;
- `check_adapter_loaded`: the same check for a LoRA adapter.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from .constants import ADAPTER_WEIGHT_FILES, FULL_WEIGHT_FILES
from .files import apply_user_modes

logger = logging.getLogger(__name__)

__all__ = [
    "FINAL_STAGING_NAME",
    "CheckpointError",
    "check_adapter_loaded",
    "checkpoint_problem",
    "find_checkpoints_to_resume",
    "has_full_weights",
    "load_full_weights",
    "publish_directory",
    "replace_directory",
    "resolve_resume_checkpoint",
    "staging_name",
    "unfinished_saves",
]

STAGING_PREFIX = ".tmp-"
FINAL_STAGING_NAME = f"{STAGING_PREFIX}final"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGED_CHECKPOINT_NAME = re.compile(r"^\.tmp-checkpoint-(\d+)$")
# The files without which `from_pretrained` finds no model (full weights / LoRA adapter): moved into place last, and
# taken away first when a new save replaces an old one, so a directory caught half-way never loads as a model.
COMPLETION_FILES = ("config.json", "adapter_config.json")
TRUE_STRINGS = ("true", "yes", "1")
FALSE_STRINGS = ("false", "no", "0", "none", "")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names it, why, and what to do (one line, exit 2)."""


def staging_name(name: str) -> str:
    return f"{STAGING_PREFIX}{name}"


# --------------------------------------------------------------------------------------------------------------------
# Moving a finished save into place
# --------------------------------------------------------------------------------------------------------------------
def replace_directory(staged: Path, target: Path) -> None:
    """Put the whole directory `staged` at `target` by rename; an existing `target` is moved aside and deleted."""
    staged, target = Path(staged), Path(target)
    apply_user_modes(staged)  # safetensors writes weights 0o600 (see vlm_recipes.files)
    old = target.with_name(staging_name(f"old-{target.name}"))
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def withdraw_completion_files(directory: Path) -> None:
    """Remove a previous save's `config.json` / `adapter_config.json` and weights before a new save replaces its
    files: a leftover single `model.safetensors` beside a new sharded save would be read instead of the new shards."""
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = set()
        for shard in shards:
            if "/" not in shard:
                (directory / shard).unlink(missing_ok=True)
    for name in (*COMPLETION_FILES, *FULL_WEIGHT_FILES, *ADAPTER_WEIGHT_FILES):
        (directory / name).unlink(missing_ok=True)


def publish_directory(staging: Path, directory: Path) -> list[str]:
    """Move every entry of `staging` into `directory` (each by rename), the completion files last; returns the names.

    `directory` may hold other things (the run's checkpoints, `run_info.json`): they are left alone. Call
    `withdraw_completion_files(directory)` before the new files are written.
    """
    staging, directory = Path(staging), Path(directory)
    apply_user_modes(staging)  # safetensors writes weights 0o600 (see vlm_recipes.files)
    entries = sorted(staging.iterdir(), key=lambda entry: (entry.name in COMPLETION_FILES, entry.name))
    for entry in entries:
        target = directory / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    return [entry.name for entry in entries]


# --------------------------------------------------------------------------------------------------------------------
# Which checkpoints are complete
# --------------------------------------------------------------------------------------------------------------------
def _unreadable_safetensors(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as opened:
            opened.keys()
    except Exception as error:  # noqa: BLE001 - any failure to read the header means the file is not whole
        return f"{path.name} is unreadable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return None


def _weights_problem(directory: Path) -> str | None:
    """Why the weights of `directory` are not whole, or None. DeepSpeed (`global_step*/`) and FSDP checkpoints are
    taken as whole when their folders are there."""
    if any(
        child.is_dir() and child.name.startswith(("global_step", "pytorch_model_fsdp"))
        for child in directory.iterdir()
    ):
        return None
    present = [name for name in (*FULL_WEIGHT_FILES, *ADAPTER_WEIGHT_FILES) if (directory / name).is_file()]
    if not present:
        return "no weights (model.safetensors or adapter_model.safetensors)"
    for name in present:
        path = directory / name
        if name.endswith(".index.json"):
            try:
                shards = set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, TypeError):
                return f"{name} is not a valid weight index"
            missing = sorted(shard for shard in shards if not (directory / shard).is_file())
            if missing:
                return f"weight shard(s) missing: {', '.join(missing)}"
            for shard in sorted(shards):
                if shard.endswith(".safetensors") and (problem := _unreadable_safetensors(directory / shard)):
                    return problem
        elif name.endswith(".safetensors") and (problem := _unreadable_safetensors(path)):
            return problem
    return None


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why `directory` (a `checkpoint-<step>/` of a run) cannot be resumed from, or None when it is complete."""
    directory = Path(directory)
    if _STAGED_CHECKPOINT_NAME.match(directory.name):
        return "an interrupted save (staging directory)"
    if not directory.is_dir():
        return "not a directory"
    empty = sorted(entry.name for entry in directory.iterdir() if entry.is_file() and entry.stat().st_size == 0)
    if empty:
        return f"empty file(s): {', '.join(empty)}"
    state_path = directory / TRAINER_STATE_NAME
    if not state_path.is_file():
        return f"no {TRAINER_STATE_NAME}"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        return f"{TRAINER_STATE_NAME} is not valid JSON ({error})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE_NAME} has no global_step"
    return _weights_problem(directory)


def _step(directory: Path) -> int:
    match = _CHECKPOINT_NAME.match(directory.name) or _STAGED_CHECKPOINT_NAME.match(directory.name)
    return int(match.group(1)) if match else -1


def find_checkpoints_to_resume(output_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The complete `checkpoint-<step>/` directories of `output_dir`, oldest first, and the incomplete ones (staging
    leftovers of an interrupted save included), each with the reason."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return [], []
    complete, incomplete = [], []
    candidates = [
        child
        for child in output_dir.iterdir()
        if child.is_dir() and (_CHECKPOINT_NAME.match(child.name) or _STAGED_CHECKPOINT_NAME.match(child.name))
    ]
    for directory in sorted(candidates, key=lambda path: (_step(path), path.name)):
        problem = checkpoint_problem(directory)
        if problem is None:
            complete.append(directory)
        else:
            incomplete.append((directory, problem))
    return complete, incomplete


def unfinished_saves(root: str | Path) -> list[tuple[Path, str]]:
    """Every save under `root` that cannot be used: incomplete `checkpoint-<step>/` directories, staging leftovers of
    interrupted checkpoint saves, and final outputs whose save was interrupted (`.tmp-final/` left beside them)."""
    found = []
    for current, subdirectories, _ in os.walk(root):
        current = Path(current)
        _, incomplete = find_checkpoints_to_resume(current)
        found += incomplete
        if (current / FINAL_STAGING_NAME).is_dir():
            found.append((current, "an interrupted final save (.tmp-final/ left; no config.json)"))
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
    return found


def _as_flag(value) -> bool | None:
    """True/False for a boolean given as such or as a string (`--resume_from_checkpoint true`), None for a path."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    return None


def resolve_resume_checkpoint(value, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from for a `resume_from_checkpoint` value, checked complete, or None.

    `true` takes the newest complete checkpoint in `output_dir` and says which incomplete ones it passed over; a path
    must be a complete checkpoint. Raises `CheckpointError` otherwise.
    """
    flag = _as_flag(value)
    if flag is False:
        return None
    if flag is True:
        complete, incomplete = find_checkpoints_to_resume(output_dir)
        for directory, problem in incomplete:
            logger.warning("Skipping incomplete checkpoint %s: %s.", directory, problem)
        if not complete:
            passed = (
                f" (incomplete: {', '.join(f'{path.name}: {why}' for path, why in incomplete)})" if incomplete else ""
            )
            raise CheckpointError(
                f"`resume_from_checkpoint: true` found no complete checkpoint in {output_dir}{passed}; "
                "drop the key to train from the start, or give a checkpoint path."
            )
        logger.info("Resuming from the newest complete checkpoint, %s.", complete[-1])
        return str(complete[-1])
    path = Path(str(value))
    if not path.exists():
        raise CheckpointError(f"`resume_from_checkpoint`: {path} not found.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"`resume_from_checkpoint`: {path} is incomplete ({problem}); use an earlier checkpoint or "
            "`resume_from_checkpoint: true` for the newest complete one."
        )
    return str(path)


# --------------------------------------------------------------------------------------------------------------------
# Loading weights back, checked
# --------------------------------------------------------------------------------------------------------------------
def has_full_weights(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in FULL_WEIGHT_FILES)


def _listed(keys, most: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:most])
    return f"{shown} and {len(keys) - most} more" if len(keys) > most else shown


def load_full_weights(model, checkpoint: str | Path) -> None:
    """Load a full fine-tuning checkpoint into `model` (in place), renaming its keys as `from_pretrained` does.

    Why ours: the Trainer's `_load_from_checkpoint` (transformers 5.24) passes the saved state dict straight to
    `load_state_dict(strict=False)`. Checkpoints are saved in the original key layout (Qwen2-VL's `model.layers.*`,
    `visual.*`) while the model in memory uses transformers' renamed one (`model.language_model.layers.*`,
    `model.visual.*`), so no key matched, the run only logged "missing keys" and trained on from the initial weights.
    Here the checkpoint is loaded by the model's own class, which applies the family's key conversions, and its
    weights are copied into the model; any weight that is missing, unexpected or of another shape stops the run.
    """
    import torch

    checkpoint = Path(checkpoint)
    floating = [parameter.dtype for parameter in model.parameters() if parameter.is_floating_point()]
    loaded, info = type(model).from_pretrained(
        checkpoint, dtype=floating[0] if floating else torch.float32, output_loading_info=True
    )
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_listed(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {_listed(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"other shapes {_listed(str(entry[0]) for entry in info['mismatched_keys'])}")
    if problems:
        raise CheckpointError(
            f"Resuming from {checkpoint}: its weights do not all load into {type(model).__name__} "
            f"({'; '.join(problems)}); is it a checkpoint of this model?"
        )
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"Resuming from {checkpoint}: the loaded weights do not match the model in memory (missing "
            f"{_listed(result.missing_keys) or 'none'}; unexpected {_listed(result.unexpected_keys) or 'none'})."
        )
    logger.info("Loaded all %d weights of %s.", len(loaded.state_dict()), checkpoint)


def check_adapter_loaded(model, checkpoint: str | Path, adapter_name: str = "default") -> None:
    """Stop unless every tensor of the checkpoint's adapter is now the model's adapter weight (PEFT only warns)."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint) / "adapter_model.safetensors"
    if not path.is_file():
        return
    saved = load_file(str(path))
    current = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = [key for key in saved if key not in current]
    differing = [
        key
        for key in saved
        if key in current and not torch.equal(saved[key], current[key].detach().to("cpu", saved[key].dtype))
    ]
    if missing or differing:
        raise CheckpointError(
            f"Resuming from {checkpoint}: the adapter did not load (not in the model: {_listed(missing) or 'none'}; "
            f"not loaded: {_listed(differing) or 'none'})."
        )
