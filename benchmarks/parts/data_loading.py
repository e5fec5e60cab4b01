"""Part 8, data loading at scale: seconds from process start to the end of the first optimizer step, and the peak
resident memory by then, for `dataset_name` datasets of `data_loading_rows` rows (parquet shards in hub layout,
`messages` + `images` with embedded PNGs of mixed sizes, 32x32 to 4000x3000). Four cases, each in a fresh process:

- `ours_first`: `vlm_recipes.sft.main` (scripts/sft.py's path), map-style, on an empty `datasets` cache: the parquet
  read into Arrow, the rows converted (`vlm_recipes.data.hub`), the sample lengths measured (`vlm_recipes.lengths`);
- `ours_cached`: the same again on that cache: conversion and lengths read back;
- `ours_streaming`: `dataset_streaming: true` (an `IterableDataset`: no conversion pass, no length pass);
- `trl`: TRL's own SFT path, as its `trl/scripts/sft.py` runs a VLM: `datasets.load_dataset(folder)` on an empty
  cache and a stock `SFTTrainer` given the model's path (its `DataCollatorForVisionLanguageModeling`).

Tiny Qwen2-VL, `max_steps` 1, batch 2, no data-loading workers, CPU. The time counts from just before the process is
spawned (interpreter start and imports included); memory is the process's peak resident set (`VmHWM`, which counts
pages of memory-mapped Arrow files the process touched) and its peak anonymous resident memory (`RssAnon`, sampled
every 20 ms: what the process itself allocated), each the median of `data_loading_repeats` runs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..settings import Settings
from ..workers import run_worker, status_sizes
from ..workspace import Workspace

DATA_LOADING_MARKER = "BENCHMARK_DATA_LOADING "
CASES = ("ours_first", "ours_cached", "ours_streaming", "trl")
CASE_LABELS = {
    "ours_first": "ours, map-style, first run (empty cache)",
    "ours_cached": "ours, map-style, second run (cached)",
    "ours_streaming": "ours, dataset_streaming: true",
    "trl": "TRL: load_dataset + stock SFTTrainer",
}
# The image pool, (width, height): screenshots, photos and icons, reused across rows (row i takes image i mod 16).
IMAGE_SIZES = (
    (32, 32),
    (48, 64),
    (64, 64),
    (96, 128),
    (128, 128),
    (200, 150),
    (256, 256),
    (320, 240),
    (480, 360),
    (512, 512),
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (1920, 1080),
    (4000, 3000),
)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
# The targets, seconds to the first step at 50,000 rows on 2 cores (`report.data_loading_checks`; the memory
# target there too: our peak resident memory grows by under 300 MB from 10,000 rows to 200,000).
DATA_LOADING_TARGETS = {"ours_first": 60.0, "ours_cached": 10.0, "ours_streaming": 30.0}
ROWS_PER_SHARD = 10_000
ROWS_PER_WRITE = 1_000
BATCH_SIZE = 2
MAX_LENGTH = 512
SAMPLE_SECONDS = 0.02
# A case's figures, each the median of the repeats.
FIGURES = (
    "seconds_to_first_step",
    "process_seconds",
    "peak_rss_bytes",
    "peak_anonymous_bytes",
    "peak_file_bytes",
    "rss_at_first_step_bytes",
    "peak_rss_before_training_bytes",
    "peak_anonymous_before_training_bytes",
)
# The environment variable that carries the spawn time (`time.time()`) into the worker.
SPAWNED_AT = "VLM_BENCHMARK_SPAWNED_AT"


# --------------------------------------------------------------------------------------------------------------------
# Data: parquet shards in hub layout, written a thousand rows at a time
# --------------------------------------------------------------------------------------------------------------------
def image_pool() -> list[tuple[bytes, str]]:
    """The pool's PNGs (a flat background and one filled rectangle, which compress well even at 4000x3000), each
    with the colour of its rectangle."""
    from PIL import Image, ImageDraw

    pool = []
    names = list(COLOURS)
    for position, (width, height) in enumerate(IMAGE_SIZES):
        colour = names[position % len(names)]
        image = Image.new("RGB", (width, height), (245, 245, 240))
        ImageDraw.Draw(image).rectangle(
            [width // 4, height // 4, width // 4 + width // 3, height // 4 + height // 2], fill=COLOURS[colour]
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=9)
        pool.append((buffer.getvalue(), colour))
    return pool


def dataset_features():
    """TRL's conversational format with images: `messages` (content as a list of `{type, text}` items) and `images`
    (a list of `Image`)."""
    import datasets

    item = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    return datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(item)}),
            "images": datasets.List(datasets.Image()),
        }
    )


def _rows(start: int, stop: int, pool: list[tuple[bytes, str]]) -> dict[str, list]:
    messages, images = [], []
    for index in range(start, stop):
        png, colour = pool[index % len(pool)]
        question = "What colour is the rectangle?" + " Look closely." * (index % 7)
        messages.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "text": None},
                        {"type": "text", "text": f"Sample {index}. {question}"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            ]
        )
        images.append([{"bytes": png, "path": None}])
    return {"messages": messages, "images": images}


def write_dataset(path: Path, rows: int) -> None:
    """`rows` rows as `path/data/train-0000N-of-0000M.parquet` (10,000 rows a shard). Rows are built and written a
    thousand at a time, without dictionary or compression (the files are as large as the images in them, about
    4 KB a row); the folder is written under another name and renamed into place, so that an interrupted
    run's folder is never taken for a finished one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = image_pool()
    schema = dataset_features().arrow_schema
    shards = max(1, -(-rows // ROWS_PER_SHARD))
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    (scratch / "data").mkdir()
    for shard in range(shards):
        start, stop = shard * ROWS_PER_SHARD, min(rows, (shard + 1) * ROWS_PER_SHARD)
        # Neither dictionary nor compression: the pool's images repeat, and either would fold the repeats away, which
        # a real dataset's distinct images do not allow (its parquet is as large as its images).
        shard_path = scratch / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet"
        with pq.ParquetWriter(shard_path, schema, use_dictionary=False, compression="none") as writer:
            for first in range(start, stop, ROWS_PER_WRITE):
                batch = _rows(first, min(stop, first + ROWS_PER_WRITE), pool)
                writer.write_table(pa.Table.from_pydict(batch, schema=schema))
    shutil.rmtree(path, ignore_errors=True)
    scratch.rename(path)


def dataset_dir(workspace: Workspace, rows: int) -> Path:
    """The dataset of `rows` rows, generated on first use (`--workdir` keeps it between runs)."""
    path = workspace.root / "data" / "data_loading" / f"rows-{rows}"
    if not (path / "data").is_dir():
        write_dataset(path, rows)
    return path


def _folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


# --------------------------------------------------------------------------------------------------------------------
# The part: each case in a fresh process
# --------------------------------------------------------------------------------------------------------------------
def _run_case(workspace: Workspace, case: str, rows: int, data: Path, cache: Path, timeout: int) -> dict[str, Any]:
    spec = {
        "case": case,
        "rows": rows,
        "data_dir": str(data),
        "model_dir": str(workspace.tiny_model("qwen2_vl")),
        "output_dir": str(workspace.root / "outputs" / "data_loading" / f"{case}-{rows}"),
    }
    spec_path = workspace.root / "data_loading_spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    environment = {
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    started = time.time()
    result = run_worker(
        "--data_loading_worker",
        spec_path,
        DATA_LOADING_MARKER,
        f"Part 8 case {case} ({rows} rows)",
        timeout=timeout,
        environment=environment,
        allocator=None,  # glibc's default allocator: the memory and time a user's run gets
        spawned_at=SPAWNED_AT,
    )
    result["process_seconds"] = time.time() - started
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeats of one case and size: the median of each figure, the phases of the run of median time, and every
    run."""
    from ..stats import median

    by_time = sorted(runs, key=lambda run: run["seconds_to_first_step"])
    summary = dict(by_time[(len(by_time) - 1) // 2])
    for key in FIGURES:
        summary[key] = median([run[key] for run in runs])
    summary["seconds_range"] = [by_time[0]["seconds_to_first_step"], by_time[-1]["seconds_to_first_step"]]
    summary["runs"] = runs
    return summary


def benchmark_data_loading(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    sizes = list(settings.data_loading_rows)
    results: dict[str, dict[str, Any]] = {case: {} for case in CASES}
    data_sizes: dict[str, Any] = {}
    timeout = 600 if settings.quick else 3600
    for rows in sizes:
        generation_started = time.perf_counter()
        data = dataset_dir(workspace, rows)
        data_sizes[str(rows)] = {
            "parquet_bytes": _folder_bytes(data / "data"),
            "shards": len(list((data / "data").glob("*.parquet"))),
            "generation_seconds": time.perf_counter() - generation_started,
        }
        caches = workspace.root / "cache" / "data_loading" / f"rows-{rows}"
        runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
        for repeat in range(settings.data_loading_repeats):
            shutil.rmtree(caches, ignore_errors=True)  # empty caches: a first run is a first run
            for case in CASES:
                cache = caches / ("ours" if case in ("ours_first", "ours_cached") else case)
                print(f"[benchmark] part 8: {case}, {rows} rows, repeat {repeat + 1} ...", file=sys.stderr, flush=True)
                runs[case].append(_run_case(workspace, case, rows, data, cache, timeout))
            data_sizes[str(rows)]["cache_bytes"] = {
                name: _folder_bytes(caches / name) for name in ("ours", "trl") if (caches / name).is_dir()
            }
        shutil.rmtree(caches, ignore_errors=True)  # a 200k-row cache is gigabytes
        for case in CASES:
            results[case][str(rows)] = _median_run(runs[case])
    smallest, largest = str(sizes[0]), str(sizes[-1])
    growth = {
        case: {key: results[case][largest][key] - results[case][smallest][key] for key in FIGURES if "bytes" in key}
        for case in CASES
    }
    return {
        "model": "tiny Qwen2-VL (vlm_recipes.tiny), full fine-tuning, float32, CPU",
        "data": f"parquet in hub layout, {ROWS_PER_SHARD} rows a shard; messages + one embedded PNG a row, "
        f"{len(IMAGE_SIZES)} distinct images {IMAGE_SIZES[0][0]}x{IMAGE_SIZES[0][1]} to "
        f"{IMAGE_SIZES[-1][0]}x{IMAGE_SIZES[-1][1]}",
        "batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
        "rows": sizes,
        "repeats": settings.data_loading_repeats,
        "datasets": data_sizes,
        **results,
        "memory_growth": {"from_rows": sizes[0], "to_rows": sizes[-1], **growth},
        "note": "seconds from just before the process is spawned to the end of the first optimizer step, median of "
        "the repeats; peak_rss is VmHWM (memory-mapped Arrow pages the process touched count), peak_anonymous and "
        f"peak_file are RssAnon and RssFile sampled every {SAMPLE_SECONDS * 1000:.0f} ms.",
    }


# --------------------------------------------------------------------------------------------------------------------
# The worker: one case, in its own process
# --------------------------------------------------------------------------------------------------------------------
class _PeakSampler:
    """The largest anonymous (`RssAnon`) and file-backed (`RssFile`) resident memory seen, sampled every 20 ms in a
    daemon thread."""

    def __init__(self):
        self.peak = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> dict[str, int]:
        sizes = status_sizes("RssAnon", "RssFile", "VmRSS", "VmHWM")
        self.peak = max(self.peak, sizes.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, sizes.get("RssFile", 0))
        return sizes

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()


class _Phases:
    """Seconds since the spawn at the end of each phase, in order."""

    def __init__(self, spawned_at: float):
        self.spawned_at = spawned_at
        self.ends: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.ends[name] = time.time() - self.spawned_at

    def timed(self, name: str, function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            self.mark(name)
            return result

        return wrapper


def _first_step_callback(phases: _Phases, sampler: _PeakSampler, spec: dict[str, Any]):
    """A callback that, at the end of the first optimizer step, prints the case's figures and ends the process
    (what follows, saving and evaluation, is not part of the measurement)."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            phases.mark("train_begin")
            # The data phases' own peaks: the first step adds its batch's images, which differ with the sampler's
            # first batch (length grouping puts the longest first), not with the number of rows.
            sizes = sampler.sample()
            spec["before_training"] = {
                "peak_rss_before_training_bytes": sizes["VmHWM"],
                "peak_anonymous_before_training_bytes": sampler.peak,
            }

        def on_step_end(self, args, state, control, **kwargs):
            phases.mark("first_step_end")
            sizes = sampler.sample()
            result = {
                "case": spec["case"],
                "rows": spec["rows"],
                "seconds_to_first_step": phases.ends["first_step_end"],
                "phase_ends": phases.ends,
                "peak_rss_bytes": sizes["VmHWM"],
                "peak_anonymous_bytes": sampler.peak,
                "peak_file_bytes": sampler.peak_file,
                "rss_at_first_step_bytes": sizes["VmRSS"],
                "rss_after_imports_bytes": spec["rss_after_imports"],
                **spec["before_training"],
                "load_average": os.getloadavg(),
                "train_dataset": type(kwargs["train_dataloader"].dataset).__name__
                if kwargs.get("train_dataloader") is not None
                else None,
            }
            sys.stdout.write(DATA_LOADING_MARKER + json.dumps(result) + "\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    return FirstStep()


def _ours(spec: dict[str, Any], phases: _Phases, first_step_callback) -> None:
    import vlm_recipes.sft
    from vlm_recipes.configs import parse_recipe

    phases.mark("imports")
    spec["rss_after_imports"] = status_sizes("VmRSS")["VmRSS"]
    arguments = {
        "model_name_or_path": spec["model_dir"],
        "dataset_name": spec["data_dir"],
        "dtype": "float32",
        "bf16": False,
        "max_length": MAX_LENGTH,
        "too_long": "error",
        "output_dir": spec["output_dir"],
        "max_steps": 1,
        "per_device_train_batch_size": BATCH_SIZE,
        "learning_rate": 1.0e-4,
        "activation_checkpointing": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "use_cpu": True,
        "report_to": "none",
        "logging_steps": 1000,
        "seed": 0,
    }
    if spec["case"] == "ours_streaming":
        arguments["dataset_streaming"] = True
    command_line = [item for key, value in arguments.items() for item in (f"--{key}", str(value))]
    # Timing wrappers around the two data phases of `main` (the functions run unchanged), for the breakdown.
    vlm_recipes.sft.load_splits = phases.timed("load_splits", vlm_recipes.sft.load_splits)
    vlm_recipes.sft.prepare_lengths = phases.timed("prepare_lengths", vlm_recipes.sft.prepare_lengths)
    vlm_recipes.sft.main(
        *parse_recipe(command_line), on_trainer=lambda trainer: trainer.add_callback(first_step_callback())
    )


def _trl(spec: dict[str, Any], phases: _Phases, first_step_callback) -> None:
    """What `trl/scripts/sft.py` does for a VLM: `load_dataset(dataset_name)`, then `SFTTrainer(model=<path>)`, which
    loads the model and its processor and, for a dataset with `images`, uses `DataCollatorForVisionLanguageModeling`
    and skips its own dataset preparation."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    phases.mark("imports")
    spec["rss_after_imports"] = status_sizes("VmRSS")["VmRSS"]
    dataset = datasets.load_dataset(spec["data_dir"])
    phases.mark("load_dataset")
    training_args = SFTConfig(
        output_dir=spec["output_dir"],
        max_steps=1,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=1.0e-4,
        max_length=MAX_LENGTH,
        bf16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"},
        dataloader_num_workers=0,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
        seed=0,
    )
    trainer = SFTTrainer(model=spec["model_dir"], args=training_args, train_dataset=dataset["train"])
    phases.mark("trainer_built")
    trainer.add_callback(first_step_callback())
    trainer.train()


def data_loading_worker(spec_path: str) -> None:
    """One case of part 8 in this (fresh) process; prints its figures as a `DATA_LOADING_MARKER` line."""
    spawned_at = float(os.environ.get(SPAWNED_AT, time.time()))
    sampler = _PeakSampler()
    phases = _Phases(spawned_at)
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    run = _trl if spec["case"] == "trl" else _ours
    spec["rss_after_imports"] = None
    run(spec, phases, lambda: _first_step_callback(phases, sampler, spec))
    raise RuntimeError(f"Part 8 case {spec['case']}: training ended without a first optimizer step.")
