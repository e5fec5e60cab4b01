"""The resolved recipe that a run leaves beside its outputs, written and read back.

`recipe.yaml` (every key that differs from its default) is written into the final output at the end of training
(`save_resolved_recipe`); `run_info.json`, written at the start of the run by `vlm_recipes.reporting`, holds the same
recipe. The checkpoint tools read it back (`read_run_recipe`) to find a run's base model, pixel budget and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_run_recipe", "save_resolved_recipe"]


def save_resolved_recipe(resolved: dict, output_dir: str | Path) -> Path:
    """Write `resolved` (`vlm_recipes.configs.resolved_recipe`) as `recipe.yaml` in `output_dir`; returns its path."""
    import yaml

    path = Path(output_dir) / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved recipe of this run: every key that differs from its default.\n"
    path.write_text(header + yaml.safe_dump(resolved, sort_keys=True), encoding="utf-8")
    return path


def read_run_recipe(directory: str | Path) -> tuple[dict[str, Any], Path | None]:
    """The resolved recipe of the run a directory belongs to, and the file it was read from.

    `recipe.yaml` is written at the end of training, `run_info.json` (whose `recipe` is the same) at its start, so a
    run that stopped early still has the latter. Each is looked for in the directory itself (a final output) and in
    its parent (a `checkpoint-*`).
    """
    import yaml

    directory = Path(directory)
    for folder in (directory, directory.parent):
        if (folder / "recipe.yaml").is_file():
            return yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")) or {}, folder / "recipe.yaml"
    for folder in (directory, directory.parent):
        if (folder / "run_info.json").is_file():
            recipe = json.loads((folder / "run_info.json").read_text(encoding="utf-8")).get("recipe")
            if isinstance(recipe, dict):
                return recipe, folder / "run_info.json"
    return {}, None
