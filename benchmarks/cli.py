"""Throughput, padding and memory of vlm-recipes' training path, measured side by side with stock TRL.

Usage (from the repository root; `python scripts/benchmark.py` takes the same flags from anywhere):
    python -m benchmarks [--output benchmark.json] [--quick] [--parts 1,2,3,4] [--steps N] [--repeats R]
    python -m benchmarks --gpu [--output benchmark_gpu.json]      # adds parts 5 and 7; needs a CUDA GPU
    python -m benchmarks --parts 8 [--data_loading_rows 10000,50000,200000]   # data loading at scale

Prints a table and writes every figure, the settings, the machine and the target checks to `--output` (JSON,
written atomically). What each part measures and how is in `benchmarks/README.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .harness import torch_threads
from .parts import PARTS
from .parts.data_loading import data_loading_worker
from .parts.frozen_vision import vision_worker
from .parts.full_size import require_cuda
from .parts.memory import memory_worker
from .report import format_table, machine_info, target_checks
from .settings import Settings
from .workspace import Workspace

PROGRAM = "python -m benchmarks"


def parse_args(argv: list[str] | None = None, program: str = PROGRAM) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(prog=program, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmark.json", help="JSON file for every figure (written atomically).")
    parser.add_argument("--quick", action="store_true", help="Smallest sizes everywhere (for tests; noisy figures).")
    parser.add_argument("--gpu", action="store_true", help="Also run part 5 (full-size Qwen2-VL-2B) on CUDA.")
    parser.add_argument(
        "--parts",
        default=None,
        help="Comma-separated parts to run (default 1,2,3,4; 5 and 7 with --gpu; 6, 7, 8 on request).",
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed training steps of part 2.")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed warm-up steps before them.")
    parser.add_argument("--repeats", type=int, default=None, help="Repeats of part 2 (median reported).")
    parser.add_argument("--collator_repeats", type=int, default=None, help="Repeats of part 1 (median reported).")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads for parts 1-4 (default 1).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Peak bf16 TFLOP/s of the GPU, for MFU.")
    parser.add_argument(
        "--data_loading_rows",
        default=None,
        help="Comma-separated dataset sizes of part 8 (default 10000,50000,200000).",
    )
    parser.add_argument("--data_loading_repeats", type=int, default=None, help="Runs of each case of part 8 (median).")
    parser.add_argument("--workdir", default=None, help="Keep tiny models and data here (default: a temp dir).")
    parser.add_argument("--memory_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vision_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data_loading_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings.shrink()
    if args.parts:
        settings.parts = sorted({int(part) for part in args.parts.split(",")})
    elif args.gpu:
        settings.parts = [1, 2, 3, 4, 5, 7]
    if 5 in settings.parts and not args.gpu:
        parser.error("part 5 runs on a GPU: add --gpu")
    for key in ("steps", "warmup", "repeats", "collator_repeats", "data_loading_repeats", "peak_tflops", "threads"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    if args.data_loading_rows:
        settings.data_loading_rows = [int(rows) for rows in args.data_loading_rows.split(",")]
    if settings.warmup < 1:
        parser.error("--warmup must be at least 1 (the clock starts at the end of the last warm-up step)")
    return args, settings


def main(args: argparse.Namespace, settings: Settings, command: str = PROGRAM) -> dict[str, Any]:
    """Run the parts of `settings`, write the JSON report to `args.output` and print its table. `command` is how the
    benchmark was started, without its arguments, for the report."""
    from vlm_recipes.files import write_text_atomically

    if 5 in settings.parts:
        require_cuda()  # before anything is built
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlm-benchmark-"))
    workspace = Workspace(workdir)
    started = time.perf_counter()
    report: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(), "results": {}}
    try:
        for number in settings.parts:
            name, run_part = PARTS[number]
            print(f"[benchmark] part {number}: {name} ...", file=sys.stderr, flush=True)
            part_started = time.perf_counter()
            with torch_threads(settings.threads) if number != 5 else contextlib.nullcontext():
                report["results"][name] = run_part(workspace, settings)
            report["results"][name]["wall_seconds"] = time.perf_counter() - part_started
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["targets"] = target_checks(report["results"])
    report["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_seconds"] = time.perf_counter() - started
    report["command"] = " ".join([command, *sys.argv[1:]])
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output, json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(report))
    print(f"written: {output} ({report['wall_seconds']:.0f} s)")
    return report


def run(argv: list[str] | None = None, program: str = PROGRAM) -> None:
    """The command line: `program` is how it was started (`python -m benchmarks`, `python scripts/benchmark.py`).
    With `--memory_worker`/`--vision_worker`/`--data_loading_worker` this process is one case of part 4, 6 or 8, started
    by `run_worker`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    args, settings = parse_args(argv, program)
    if args.memory_worker:
        memory_worker(args.memory_worker)
    elif args.vision_worker:
        vision_worker(args.vision_worker)
    elif args.data_loading_worker:
        data_loading_worker(args.data_loading_worker)
    else:
        main(args, settings, command=program)
