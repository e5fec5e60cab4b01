"""Writing outputs: atomically (a temporary sibling, then a rename), as strict JSON, with the user's file modes.

A crash never leaves a half-written file under its real name; JSON files hold no `NaN` (strict readers reject it);
what we publish gets the modes the user's umask gives a new file. Two writers leave outputs readable by their owner
only: `tempfile.mkdtemp` creates its directory 0o700 (we build into one and rename it into place), and
safetensors >= 0.8 writes every `*.safetensors` file 0o600 whatever the umask (it writes a temporary file and
renames it; safetensors/safetensors#782), so a model saved that way cannot be read by another user, a container user
or a serving process running as someone else: `apply_user_modes` is called on a finished staging tree, before it is
renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["apply_user_modes", "current_umask", "strict_json_value", "write_json_atomically", "write_text_atomically"]


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written file that looks complete."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def strict_json_value(value: Any) -> Any:
    """`value` as plain JSON types, NaN and infinities as None: what strict JSON readers (`jq`, JavaScript, Go, Rust's
    serde_json) accept, where Python's `json.dumps` would write the non-standard `NaN` (a mean over no example, such
    as ui_actions' `mean_click_distance` when no click was parsed). Other numbers (numpy, torch scalars) become
    floats."""
    if isinstance(value, Mapping):
        return {str(key): strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def write_json_atomically(data: Any, path: Path) -> None:
    """Write strict JSON (`strict_json_value`: NaN and infinities as null), then rename, so that a crash never leaves
    a half-written file that looks complete."""
    temporary = path.with_name(f".{path.name}.tmp")
    text = json.dumps(strict_json_value(data), indent=2, sort_keys=True, allow_nan=False)
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)


def current_umask() -> int:
    """The process umask. Reading it means setting it: set a stricter one for that instant, never a looser one."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_user_modes(path: str | Path) -> None:
    """Give `path` and everything under it the modes of a newly created entry: directories `0o777 & ~umask`, files
    `0o666 & ~umask` (`0o777 & ~umask` for a file that was executable). Symbolic links are left as they are."""
    mask = current_umask()
    path = Path(path)
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        for current, directories, files in os.walk(path):
            entries += [Path(current) / name for name in (*directories, *files)]
    for entry in entries:
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        executable = stat.S_ISDIR(mode) or mode & 0o111
        os.chmod(entry, (0o777 if executable else 0o666) & ~mask)
