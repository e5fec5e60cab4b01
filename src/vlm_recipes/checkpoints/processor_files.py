"""Processor files in every saved directory, so that it loads on its own.

Every `checkpoint-*/` and the final output directory of a run hold the processor files (tokenizer, chat template,
`processor_config.json` and the legacy `preprocessor_config.json`) and `generation_config.json`, so that
`AutoProcessor.from_pretrained(directory)` works with no base model at hand. `save_processor_files` writes them;
`VLMSFTTrainer` calls it for each checkpoint and the final output, before they are moved into place. The repair
(`vlm_recipes.checkpoints.repair`) copies them from a base model with `copy_processor_files`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "GENERATION_CONFIG_NAME",
    "LEGACY_IMAGE_PROCESSOR_NAME",
    "PROCESSOR_FILE_NAMES",
    "copy_processor_files",
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
GENERATION_CONFIG_NAME = "generation_config.json"
# transformers 5 folds the image-processor settings into processor_config.json; tools that read
# preprocessor_config.json (older transformers, vLLM, TGI) still look for it.
LEGACY_IMAGE_PROCESSOR_NAME = "preprocessor_config.json"
# Moved into place last: until they are there, AutoProcessor does not see a processor, so a crash part-way leaves a
# directory that fails `diagnose_checkpoint` rather than one that looks complete.
_MOVED_LAST = ("processor_config.json", LEGACY_IMAGE_PROCESSOR_NAME)
_STAGING_PREFIX = ".processor-files-"


# --------------------------------------------------------------------------------------------------------------------
# Writing and copying processor files
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


def copy_processor_files(source: Path, directory: Path) -> list[str]:
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
