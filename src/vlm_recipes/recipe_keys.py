"""The recipe's command line checked before anything heavy is imported: `--help`, the recipe file, key names, tasks.

Importing TRL's config classes (and with them transformers and torch) takes seconds, up to a minute on a loaded
machine; a missing recipe file, a YAML typo or a misspelt key should not wait for that. This module uses only the
standard library and PyYAML, and reads the names, types, defaults and help of every recipe key from
`recipe_keys.json`, an index that `python -m vlm_recipes.configs --write-key-index` builds from the installed TRL and
transformers (a test fails when it no longer matches them). `vlm_recipes.configs.parse_recipe` checks everything again
against the live classes. With other TRL or transformers versions than the index was built for, key names are
left to `parse_recipe` (slower to answer, never wrong).
"""

from __future__ import annotations

import difflib
import json
import textwrap
from collections.abc import Collection
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "KEY_INDEX_FILE",
    "RecipeError",
    "check_command_line",
    "format_help",
    "key_index",
    "read_recipe_file",
    "split_recipe_path",
    "unknown_key_error",
]

KEY_INDEX_FILE = Path(__file__).with_name("recipe_keys.json")
USAGE = "usage: sft.py RECIPE.yaml [--key value ...]   (or --config RECIPE.yaml)"

# Keys that older transformers had, and what stands for them now.
RENAMED_KEYS = {"group_by_length": "train_sampling_strategy: group_by_length (or random)"}


class RecipeError(ValueError):
    """A problem with the recipe or the command line, reported as one line without a traceback."""


@lru_cache(maxsize=1)
def key_index() -> dict[str, Any]:
    """`{"keys": {name: {"group", "type", "default", "help"}}, "tasks": [...], "versions": {...}}`."""
    return json.loads(KEY_INDEX_FILE.read_text(encoding="utf-8"))


def split_recipe_path(args: list[str]) -> tuple[str | None, list[str]]:
    """Accept the recipe positionally (first argument not starting with `--`) or as `--config PATH`."""
    args = list(args)
    recipe_path = None
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise RecipeError("`--config` needs a recipe path.")
        recipe_path = args[index + 1]
        del args[index : index + 2]
    elif args and not args[0].startswith("-"):
        recipe_path = args.pop(0)
    return recipe_path, args


def unknown_key_error(key: str, where: str, valid: Collection[str]) -> RecipeError:
    if key in RENAMED_KEYS:
        return RecipeError(f"Unknown key `{key}` in {where}; transformers 5 names it `{RENAMED_KEYS[key]}`.")
    valid = sorted(valid)
    # A truncated or extended name (`lora_rank` for `lora_r`) is the likeliest typo; then the closest spelling.
    prefixed = [name for name in valid if key.startswith(name) or name.startswith(key)]
    suggestions = sorted(prefixed, key=len, reverse=True)[:1] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean `{suggestions[0]}`?" if suggestions else "; see `python scripts/sft.py --help`."
    return RecipeError(f"Unknown key `{key}` in {where}{hint}")


def check_task_name(task: Any, where: str, tasks: Collection[str]) -> None:
    if task in tasks:
        return
    registered = ", ".join(f"`{name}`" for name in sorted(tasks))
    closest = difflib.get_close_matches(str(task), sorted(tasks), n=1, cutoff=0.5)
    hint = f"; did you mean `{closest[0]}`?" if closest else "."
    raise RecipeError(f"Unknown task `{task}` {where}; registered tasks: {registered}{hint}")


def read_recipe_file(path: str | Path, valid: Collection[str]) -> dict[str, Any]:
    """Load a recipe YAML, with one-line errors for a missing file, bad YAML, or keys not in `valid`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file {path} not found.")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        location = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{location}: YAML syntax error: {problem}.") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe file {path} must hold a mapping of keys to values, not {type(recipe).__name__}.")
    for key, value in recipe.items():
        if key not in valid:
            raise unknown_key_error(str(key), f"recipe {path}", valid)
        # YAML 1.1 reads a bare `no` as False, which the Trainer then rejects as a strategy.
        if str(key).endswith("_strategy") and isinstance(value, bool):
            raise RecipeError(
                f'{path}: `{key}: {"yes" if value else "no"}` reads as a YAML boolean; quote it: {key}: "no".'
            )
    return recipe


def check_command_line_keys(args: list[str], valid: Collection[str]) -> None:
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            if key not in valid and key not in ("help", "h"):
                raise unknown_key_error(key, "the command line", valid)


def _command_line_task(args: list[str]) -> str | None:
    """The last `--task` given, as argparse reads it."""
    for position in reversed(range(len(args))):
        if args[position].startswith("--task="):
            return args[position].split("=", 1)[1]
        if args[position] == "--task" and position + 1 < len(args):
            return args[position + 1]
    return None


def _index_matches_installed(index: dict[str, Any]) -> bool:
    """Whether the key index was built for the installed TRL and transformers (read from their metadata, without
    importing them): another version may have other keys, which only `parse_recipe` can know."""
    import importlib.metadata

    try:
        installed = {name: importlib.metadata.version(name) for name in index["versions"]}
    except importlib.metadata.PackageNotFoundError:
        return False
    return installed == index["versions"]


class _AnyKey:
    """Every key name counts as valid: the early check leaves key names to `parse_recipe`."""

    def __contains__(self, key: object) -> bool:
        return True


def check_command_line(args: list[str]) -> bool:
    """The checks that need no third-party library: the recipe file, its YAML, every key's name, the task's name.

    Returns True when the arguments ask for `--help` (the caller prints `format_help()` and stops).
    """
    if "--help" in args or "-h" in args:
        return True
    index = key_index()
    recipe_path, rest = split_recipe_path(args)
    # With other library versions, key names are left to `parse_recipe`; the file, its YAML and the task name are
    # still checked here.
    matches = _index_matches_installed(index)
    valid = set(index["keys"]) if matches else _AnyKey()
    recipe = read_recipe_file(recipe_path, valid) if recipe_path is not None else {}
    if matches:
        check_command_line_keys(rest, valid)
    task = _command_line_task(rest)
    if task is not None:
        check_task_name(task, "on the command line", index["tasks"])
    elif "task" in recipe:
        check_task_name(recipe["task"], f"in {recipe_path}", index["tasks"])
    return False


def format_help(width: int = 100) -> str:
    """Every recipe key by group, with its type, default and help, read from the key index."""
    index = key_index()
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, key in index["keys"].items():
        groups.setdefault(key["group"], []).append((name, key))
    versions = ", ".join(f"{name} {version}" for name, version in index["versions"].items())
    lines = [USAGE, "", "Keys go in the recipe YAML or on the command line (`--key value`, which wins)."]
    lines.append(
        f"The keys of {versions}" + ("." if _index_matches_installed(index) else " (not the versions installed).")
    )
    for group, keys in groups.items():
        lines += ["", f"{group}:"]
        for name, key in keys:
            default = "" if key["default"] is None else f" (default: {json.dumps(key['default'])})"
            lines.append(f"  --{name}  {key['type']}{default}")
            if key["help"]:
                indent = " " * 6
                lines += textwrap.wrap(
                    " ".join(key["help"].split()), width, initial_indent=indent, subsequent_indent=indent
                )
    return "\n".join(lines)
