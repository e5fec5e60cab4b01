"""The file modes of what we publish: those the user's umask gives a new file or folder.

Two writers leave outputs readable by their owner only: `tempfile.mkdtemp` creates its directory 0o700 (we build into
one and rename it into place), and safetensors >= 0.8 writes every `*.safetensors` file 0o600 whatever the umask
(it writes a temporary file and renames it; safetensors/safetensors#782). A model saved that way cannot be read by
another user, a container user or a serving process running as someone else. `apply_user_modes` is called on a
finished staging tree, before it is renamed into place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["apply_user_modes", "current_umask"]


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
