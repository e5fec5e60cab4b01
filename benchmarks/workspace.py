"""`Workspace`: the tiny models, random models and demo data a run builds once and its parts share."""

from __future__ import annotations

import copy
import gc
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .settings import REPO_ROOT


class Workspace:
    """A directory of tiny models and demo data built on first use (`--workdir` keeps them between runs)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def tiny_model(self, family: str) -> Path:
        from vlm_recipes.tiny import build_tiny_model

        path = self.root / "models" / family
        if not (path / "config.json").is_file():
            build_tiny_model(family, path)
        return path

    def random_model(self, name: str, config, processor=None, device: str = "cpu", generation_config=None) -> Path:
        """A random-weight bf16 model of `config` (seed 0), with `processor`'s files and pad token and, if given,
        `generation_config`, saved once under `models/name`. It is built in a scratch directory and renamed into
        place, so an interrupted build is never taken for a finished one by the next run with the same `--workdir`."""
        import torch
        from transformers import AutoModelForImageTextToText

        path = self.root / "models" / name
        if (path / "config.json").is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path.parent))
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        if generation_config is not None:
            model.generation_config = copy.deepcopy(generation_config)
        if processor is not None:
            model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
            processor.save_pretrained(scratch)
        model.save_pretrained(scratch)
        del model
        gc.collect()
        shutil.rmtree(path, ignore_errors=True)  # what an interrupted build before this one left
        scratch.rename(path)
        return path

    def recipe(self, name: str) -> dict[str, Any]:
        import yaml

        return yaml.safe_load((REPO_ROOT / "recipes" / "demo" / f"{name}.yaml").read_text(encoding="utf-8"))

    def demo_data(self, name: str) -> Path:
        """The demo recipe's data, generated as `generate_data_if_missing` does (its task options and size)."""
        from vlm_recipes.tasks import get_task

        recipe = self.recipe(name)
        path = self.root / "data" / name
        if not path.is_dir():
            task = get_task(recipe["task"])
            options = {key: recipe[key] for key in _task_option_names(task) if key in recipe}
            task = get_task(recipe["task"], options)
            scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path.parent if path.parent.exists() else None))
            task.make_data(scratch, recipe.get("demo_data_size", 64), seed=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch.rename(path)
        return path

    def recipe_args(self, name: str, overrides: dict[str, Any] | None = None):
        """`parse_recipe` of a demo recipe pointed at this workspace's model and data, plus overrides."""
        from vlm_recipes.configs import parse_recipe

        recipe = self.recipe(name)
        values = {
            "model_name_or_path": self.tiny_model(recipe["tiny_model_family"]),
            "dataset_path": self.demo_data(name),
            "output_dir": self.root / "outputs" / name,
            "report_to": "none",
            "save_strategy": "no",
            "eval_strategy": "no",
            "eval_after_train": False,
            "verify_saved_model": False,
            "logging_steps": 1000,
            **(overrides or {}),
        }
        arguments = [str(REPO_ROOT / "recipes" / "demo" / f"{name}.yaml")]
        for key, value in values.items():
            arguments += [f"--{key}", str(value)]
        return parse_recipe(arguments)


def _task_option_names(task) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(task.options)] if task.options is not None else []
