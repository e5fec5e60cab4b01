"""The compute report of a training run: what it consumed (wall time, devices, memory) and what it saw (samples,
tokens, supervised tokens, image tokens, padding), written to `<output_dir>/compute_report.json`.

Counts come from the batches the trainer actually consumed, read on each training process as they reach
`training_step`. They are not counted in the collator: with `dataloader_num_workers > 0` the collator runs in worker
processes, whose counters never reach the main process. Each process counts its own batches; the counts are summed
over processes at the end of training, and only the main process writes the report. The report covers one
`trainer.train()` call: a run resumed from a checkpoint counts from where it resumed.

Definitions (also written into the report under `definitions`):

- `samples_seen`: rows of the batches consumed, over all processes and micro-batches (a sample drawn twice, in two
  epochs or as accelerate's padding of an uneven last batch, counts twice).
- `tokens_seen`: non-padding tokens (`attention_mask` sum), image tokens included; SFTTrainer's `num_tokens`.
- `padded_tokens`: all positions of the batches (`input_ids.numel()`), padding included (and the masked dummy image
  that a text-only batch gets in runs of several processes, `vlm_recipes.distributed`: computed, but not data).
- `padding_fraction`: `1 - tokens_seen / padded_tokens`.
- `supervised_tokens`: positions whose label is not -100 (the tokens that carry loss).
- `image_tokens`: attended positions holding the processor's image token (`processor.image_token_id`), the
  placeholders that the vision features replace.
- `wall_seconds`: from the start to the end of `trainer.train()` (model loading and evaluation not included).
- `gpu_hours`: `wall_seconds * device_count / 3600` on GPUs (`null` on CPU); `cpu_hours`: `wall_seconds *
  num_processes / 3600` on CPU, process-hours rather than core-hours (`null` on GPU).
- `peak_memory_bytes`: per device, `torch.cuda.max_memory_allocated` since training started on GPUs; on CPU the peak
  resident set size of each process since it started (`peak_memory_kind` says which).
- `samples_per_second`, `tokens_per_second`: `samples_seen` and `tokens_seen` over `wall_seconds`.

The `trainer` section holds the trainer's own figures for the same run (`train_runtime`, `train_samples_per_second`,
SFTTrainer's `num_tokens`, `global_step`), side by side, so that the two can be checked against each other.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ._compat import add_first_callback, run_before_training_step
from .comparison import COMPUTE_REPORT_NAME
from .constants import IGNORE_INDEX
from .files import write_text_atomically

logger = logging.getLogger(__name__)

__all__ = ["COMPUTE_REPORT_NAME", "ComputeReportCallback", "image_token_id_of", "track_compute"]

# Order of the per-process counters in one tensor, so that one reduction sums them all.
COUNTERS = ("samples_seen", "tokens_seen", "padded_tokens", "supervised_tokens", "image_tokens")

DEFINITIONS = {
    "samples_seen": "rows of the batches consumed by training_step, summed over processes and micro-batches",
    "tokens_seen": "non-padding tokens (attention_mask sum), image tokens included; SFTTrainer's num_tokens",
    "padded_tokens": "all batch positions (input_ids.numel()), padding and masked dummy images included",
    "padding_fraction": "1 - tokens_seen / padded_tokens",
    "supervised_tokens": "positions whose label is not -100",
    "image_tokens": "attended positions holding the processor's image token (image_token_id)",
    "wall_seconds": "from the start to the end of trainer.train()",
    "gpu_hours": "wall_seconds * device_count / 3600 on GPUs; null on CPU",
    "cpu_hours": "wall_seconds * num_processes / 3600 on CPU (process-hours, not core-hours); null on GPU",
    "peak_memory_bytes": "per device: torch.cuda.max_memory_allocated during training (GPU), or the peak resident "
    "set size of each process since it started (CPU); see peak_memory_kind",
    "samples_per_second": "samples_seen / wall_seconds",
    "tokens_per_second": "tokens_seen / wall_seconds",
}


def image_token_id_of(processor) -> int | None:
    """The id of the token that stands for image features in `processor`'s sequences, or None for a processor
    without images."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is not None:
        return int(token_id)
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(
            f"The image token {token!r} of {type(processor).__name__} is not in its tokenizer's vocabulary; the "
            "processor files are inconsistent (reload them from the model's repository)."
        )
    return int(token_id)


class ComputeReportCallback(TrainerCallback):
    """Counts the batches a trainer consumes and writes `compute_report.json` into `output_dir` when training ends.

    Build it with `track_compute(trainer, processor)`, which also routes the trainer's batches through `count_batch`.
    """

    def __init__(self, accelerator, image_token_id: int | None, output_dir: str | Path):
        self.accelerator = accelerator
        self.image_token_id = image_token_id
        self.output_dir = Path(output_dir)
        self.counts: torch.Tensor | None = None
        self.start_time: float | None = None
        self.report: dict[str, Any] | None = None

    # Counting --------------------------------------------------------------------------------------------------
    def count_batch(self, inputs: dict[str, Any]) -> None:
        """Add one micro-batch to this process's counters (on the batch's device: no host sync per step)."""
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        zero = torch.zeros((), dtype=torch.int64, device=input_ids.device)
        image_tokens = input_ids == self.image_token_id if self.image_token_id is not None else None
        if image_tokens is not None and attention_mask is not None:
            # The masked dummy image of a text-only batch (`distributed.ImageInEveryBatch`) is not data seen.
            image_tokens &= attention_mask.bool()
        batch = torch.stack(
            [
                torch.tensor(input_ids.shape[0], dtype=torch.int64, device=input_ids.device),
                attention_mask.sum().to(torch.int64) if attention_mask is not None else zero + input_ids.numel(),
                zero + input_ids.numel(),
                (labels != IGNORE_INDEX).sum().to(torch.int64) if labels is not None else zero,
                image_tokens.sum().to(torch.int64) if image_tokens is not None else zero,
            ]
        )
        self.counts = batch if self.counts is None else self.counts + batch.to(self.counts.device)

    # Callback --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        self.counts = None  # one report per `train()` call (a retry of `auto_find_batch_size` starts again)
        self.start_time = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        wall_seconds = time.perf_counter() - self.start_time
        # Collective calls: every process takes part, only the main process writes.
        counts = self.counts if self.counts is not None else torch.zeros(len(COUNTERS), dtype=torch.int64)
        totals = self.accelerator.reduce(counts.to(args.device), reduction="sum").tolist()
        peak_kind, peak = _peak_memory(args.device)
        peaks = self.accelerator.gather(torch.tensor([peak], dtype=torch.int64, device=args.device)).tolist()
        if not state.is_world_process_zero:
            return
        self.report = build_report(dict(zip(COUNTERS, totals)), wall_seconds, peaks, peak_kind, args, state)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / COMPUTE_REPORT_NAME
        write_text_atomically(path, json.dumps(self.report, indent=2, sort_keys=True) + "\n")
        logger.info(
            "Compute report: %.1f s on %d x %s, %s samples, %s tokens -> %s",
            wall_seconds,
            self.report["device_count"],
            self.report["device_type"],
            self.report["samples_seen"],
            self.report["tokens_seen"],
            path,
        )
        _log_to_wandb(self.report, path)


def track_compute(trainer, processor) -> ComputeReportCallback:
    """Count `trainer`'s batches and write its compute report at the end of training; returns the callback.

    The callback goes first in the trainer's list, so that its clock starts before other callbacks' set-up (W&B's
    `init`) as the trainer's own `train_runtime` clock does.
    """
    callback = ComputeReportCallback(trainer.accelerator, image_token_id_of(processor), trainer.args.output_dir)
    add_first_callback(trainer, callback)
    # Whatever the trainer class a script uses: `training_step` sees every micro-batch on its training process.
    run_before_training_step(trainer, callback.count_batch)
    return callback


def _peak_memory(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return "cuda_max_memory_allocated", int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return "process_peak_rss", int(peak if sys.platform == "darwin" else peak * 1024)


def _device_type(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return device.type


def _trainer_figures(args, state) -> dict[str, Any]:
    """The trainer's own figures for the run, from its log history."""
    final = next((entry for entry in reversed(state.log_history) if "train_runtime" in entry), {})
    figures = {key: final[key] for key in ("train_runtime", "train_samples_per_second") if key in final}
    token_counts = [entry["num_tokens"] for entry in state.log_history if "num_tokens" in entry]
    if token_counts:
        figures["num_tokens"] = max(token_counts)  # SFTTrainer logs a running total
    seen = [entry["num_input_tokens_seen"] for entry in state.log_history if "num_input_tokens_seen" in entry]
    if seen:
        figures["num_input_tokens_seen"] = max(seen)
    figures["global_step"] = state.global_step
    figures["full_batch_samples"] = (
        state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    return figures


def build_report(
    totals: dict[str, int], wall_seconds: float, peaks: list[int], peak_kind: str, args, state
) -> dict[str, Any]:
    """The report dict from summed counters, the wall time and each process's peak memory."""
    device = args.device
    num_processes = args.world_size
    on_gpu = device.type == "cuda"
    device_count = num_processes * max(1, args.n_gpu) if on_gpu else num_processes
    hours = wall_seconds / 3600
    padded = totals["padded_tokens"]
    return {
        **totals,
        "padding_fraction": 1 - totals["tokens_seen"] / padded if padded else 0.0,
        "wall_seconds": wall_seconds,
        "device_type": _device_type(device),
        "device_count": device_count,
        "num_processes": num_processes,
        "gpu_hours": hours * device_count if on_gpu else None,
        "cpu_hours": hours * num_processes if device.type == "cpu" else None,
        "peak_memory_kind": peak_kind,
        "peak_memory_bytes": peaks,
        "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
        "samples_per_second": totals["samples_seen"] / wall_seconds if wall_seconds > 0 else None,
        "tokens_per_second": totals["tokens_seen"] / wall_seconds if wall_seconds > 0 else None,
        "global_step": state.global_step,
        "trainer": _trainer_figures(args, state),
        "definitions": DEFINITIONS,
    }


def _log_to_wandb(report: dict[str, Any], path: Path) -> None:
    """The report's figures into the active W&B run's summary (`compute/...`) and the file into its files."""
    wandb = sys.modules.get("wandb")  # never imported here: a run without W&B stays without it
    if wandb is None or wandb.run is None:
        return
    for key, value in report.items():
        if key == "definitions":
            continue
        if isinstance(value, dict):
            for inner_key, inner_value in value.items():
                wandb.run.summary[f"compute/{key}/{inner_key}"] = inner_value
        else:
            wandb.run.summary[f"compute/{key}"] = value
    wandb.save(str(path), base_path=str(path.parent), policy="now")
