"""Parts that measure memory run each case in a fresh process, a worker of this benchmark (`run_worker`), so that
one case's memory does not hide another's; and what such a process reads of its own resident memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .settings import REPO_ROOT

# glibc's allocator in the memory workers: blocks of 1 MiB and more are mapped and unmapped on their own, so that the
# resident set follows the memory that training holds, as CUDA's max_memory_allocated does. With glibc's default
# (a threshold that rises as blocks are freed) freed blocks stay in the heap or not depending on allocation order:
# five runs of the same QLoRA training peaked at 0.28, 0.45, 0.45, 0.28 and 0.28 GiB above start.
MEMORY_WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
# The worker's command line: this checkout's package, first on the path. (`python -m benchmarks` would look in the
# working directory first, which may hold a `benchmarks` of its own.)
WORKER_PROGRAM = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from benchmarks.cli import run; run()"


def run_worker(
    flag: str,
    path: Path,
    marker: str,
    what: str,
    timeout: int,
    environment: dict[str, str] | None = None,
    allocator: dict[str, str] | None = MEMORY_WORKER_MALLOC,
    spawned_at: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark as a worker (`flag path`) in a fresh process, with the memory workers' allocator setting
    (`allocator`; None keeps glibc's default) and `environment` on top of this process's, and return the JSON of its
    last `marker` line; its stderr's end is in the error if it fails. With `spawned_at`, that variable carries the
    time (`time.time()`) just before the process is spawned, for a worker that counts from its start."""
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **(allocator or {})}
    env.update(environment or {})
    if spawned_at:
        env[spawned_at] = repr(time.time())
    completed = subprocess.run(
        [sys.executable, "-c", WORKER_PROGRAM, flag, str(path)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(marker)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(marker) :])


def current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status_sizes(*keys: str) -> dict[str, int]:
    """Size fields of /proc/self/status (kB there), in bytes, for those of `keys` it has."""
    sizes = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in keys:
                sizes[key] = int(value.split()[0]) * 1024
    return sizes


def status_bytes(key: str) -> int:
    """One size field of /proc/self/status (`VmHWM`, the peak resident set), in bytes."""
    sizes = status_sizes(key)
    if key not in sizes:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return sizes[key]


def rss_parts() -> dict[str, int]:
    """Anonymous and file-backed resident bytes (`RssAnon`, `RssFile` of /proc/self/status)."""
    return status_sizes("RssAnon", "RssFile")
