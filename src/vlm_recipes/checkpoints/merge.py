"""Merging a LoRA adapter into its base model reloaded unquantised (`scripts/merge_adapter.py`)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from ..families import model_class_for
from ..recipe_files import read_run_recipe
from ..resume import replace_directory
from .processor_files import GENERATION_CONFIG_NAME, save_processor_files
from .repair import MERGE_INFO_NAME, diagnose_checkpoint, resolve_base_model

logger = logging.getLogger(__name__)

__all__ = ["MERGE_DTYPES", "default_merge_dtype", "merge_adapter"]

MERGE_DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_merge_dtype(adapter_dir: str | Path) -> str:
    """The dtype the run loaded its base in (the recipe's `dtype`, or that key's default), else `float32`.

    This is the weights' dtype, not the mixed-precision compute dtype (`vlm_recipes.models.checks.training_dtype`):
    merging into the weights as they were stored during training loses nothing that training did not already lose.
    """
    recipe, recipe_path = read_run_recipe(adapter_dir)
    if recipe_path is None:
        return "float32"
    dtype = recipe.get("dtype")
    if dtype is None:
        from ..configs import VLMModelConfig

        dtype = VLMModelConfig.__dataclass_fields__["dtype"].default
    return str(dtype or "float32")


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
    umask (see `vlm_recipes.files`) and renamed into place at the end.

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
        replace_directory(staging, output_dir)  # with the user's modes: mkdtemp made it 0o700, its weights 0o600
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
