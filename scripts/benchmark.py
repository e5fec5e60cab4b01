"""Throughput, padding and memory of vlm-recipes' training path, measured side by side with stock TRL.

Usage:
    python scripts/benchmark.py [--output benchmark.json] [--quick] [--parts 1,2,3,4] [--steps N] [--repeats R]
    python scripts/benchmark.py --gpu [--output benchmark_gpu.json]      # adds parts 5 and 7; needs a CUDA GPU

Prints a table and writes every figure, the settings, the machine and the target checks to `--output` (JSON,
written atomically). Each comparison runs in this one process on identical data, the sides alternating (part 1 batch
by batch, part 2 step by step) in rotating order, and the ratio of the two sides is taken per repeat; the targets use
the median of those paired ratios.

1. Collator throughput (examples/s): `VisionChatCollator` vs TRL's `DataCollatorForVisionLanguageModeling` on the same
   decoded demo examples (shapes, chess, UI screenshots), with the real Qwen2-VL processor at the Qwen2-VL recipes'
   pixel budget when `../shared/processors` (or `VLM_REAL_PROCESSORS`) holds it, else the tiny model's own processor.
   One torch thread, as in a dataloader worker.
2. Training throughput (samples/s, non-padding tokens/s) over `--steps` steps after `--warmup` steps: `scripts/sft.py`'s
   path (cheap lengths, `too_long` up front, length-grouped sampler, `VisionChatCollator`) vs a stock TRL `SFTTrainer`
   given `images` + `messages` and no collator (TRL's default VLM path), and ours with the random sampler (the
   equal-settings comparison). Same tiny Qwen2-VL, shapes demo data, batch size and steps. The three runs of a repeat
   take turns step by step, each in a thread of this process with only one running at a time (`take_turns`), so a
   change in the machine's load hits them alike; each run's time is the sum of its own steps.
3. Padding fraction and supervised-token fraction of the batches of one epoch of each demo recipe's data, with the
   random sampler and with length grouping (`train_sampling_strategy: group_by_length`), from the real collated
   batches; the cheap lengths are checked against them.
4. Peak memory of `scripts/sft.py` training a random Qwen2-VL of a few hundred MB with bf16 LoRA vs 4-bit QLoRA, each
   in a fresh process: on CPU the resident memory sampled while `trainer.train()` runs, above the process's footprint
   before `main()`; on CUDA `max_memory_allocated`. The weights' own bytes are reported beside it.
5. `--gpu`: the full-size Qwen2-VL-2B architecture from its config, random weights (no download), trained through
   `scripts/sft.py` with the Qwen2-VL recipe's training keys (pixel budget, gradient checkpointing, bf16), LoRA and
   4-bit QLoRA at batch sizes 1, 2, 4, 8 on 1280x720 screenshots: tokens/s, samples/s, peak GPU memory and model FLOPs
   utilisation, MFU = (6 x language-model parameters x tokens + f x vision-tower parameters x image patches) per
   second over the GPU's peak dense bf16 FLOP/s (`PEAK_BF16_TFLOPS`, or `--peak_tflops`); f = 2 for a frozen vision
   tower, which runs forward only (`detach_frozen_vision_inputs`), else 6. The factor 6 is the usual
   forward + backward count per parameter and token (Kaplan et al. 2020; PaLM's MFU); it leaves out attention's
   sequence-length term (~4% here), the recomputation of gradient checkpointing, and counts LoRA's frozen weights as
   if they had weight gradients, as MFU does.

6. `--parts 6` (not in the default set: about 7 minutes on 2 cores): what a frozen vision tower costs when autograd
   records it, as transformers' `enable_input_require_grads` has it do, against `VLMSFTTrainer`'s detached tower
   (`detach_frozen_vision_inputs`). One LoRA step (forward + backward, non-reentrant gradient checkpointing, fp32) of
   Qwen2-VL-2B's full vision tower and a one-layer language model on one 1280x720 screenshot at the recipe's pixel
   budget, each mode in a fresh process: seconds per step and resident memory above the start (CPU), or
   `max_memory_allocated` (CUDA).
7. `--parts 7` (2-4 minutes on 2 cores; in the `--gpu` set): what a vision tower recorded by autograd (LoRA on the
   tower, or no `detach_frozen_vision_inputs`) keeps for backward under bf16 autocast, with bf16 LoRA and with 4-bit
   QLoRA loaded by bitsandbytes alone and by `load_model`, whose 4-bit linears return autocast's dtype
   (`keep_4bit_outputs_in_autocast_dtype`). Qwen2-VL-2B's vision tower cut to 4 blocks, one 1280x720 screenshot at the
   recipe's pixel budget: the dtype and size of each block's input (what checkpointing keeps) and every activation
   saved for backward. CUDA's autocast runs `layer_norm` in float32; CPU's does not, so on a CPU that policy is
   emulated. On CUDA it also reports the peak memory of the tower's forward and backward.

Parts 1-4 run on CPU with one torch thread (`--threads`): on a small shared machine two threads contending with other
processes make step times swing by up to 10x. On a CPU the figures are for tiny models: they compare the two paths' overheads (collation, sampling, padding), not
what a GPU run of a real model does, where the model's step dominates.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_PROCESSORS = Path(os.environ.get("VLM_REAL_PROCESSORS", REPO_ROOT.parent / "shared" / "processors"))
# The Qwen2-VL recipe whose pixel budget (`max_pixels`) parts 1 and 5 use.
QWEN_RECIPE = REPO_ROOT / "recipes" / "ui_actions_qwen2vl.yaml"
DEMO_RECIPES = ("shapes_qwen2vl", "element", "chess", "ui_actions", "medical_steps")
MEMORY_MARKER = "BENCHMARK_MEMORY "
VISION_MARKER = "BENCHMARK_VISION "
# Peak dense (no sparsity) bf16 tensor-core FLOP/s of one GPU, from the vendors' data sheets. Keys are matched, in
# order, as substrings of `torch.cuda.get_device_name()`.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)
# Qwen2-VL-2B-Instruct's config.json, for when the real one is not at hand (`../shared/processors/qwen2-vl`).
QWEN2_VL_2B_CONFIG = {
    "model_type": "qwen2_vl",
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


@dataclass
class Settings:
    """What the benchmark runs; `--quick` shrinks every size (for the tests)."""

    parts: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    quick: bool = False
    # Part 2's repeats: each of the six orders of its three runs three times. With turns, one repeat's ratio still
    # spreads by about 0.05 (SD) on this machine, run to run; 9 repeats left the 90% interval of the median holding 1
    # in one run of three.
    repeats: int = 18
    # Torch threads of the CPU parts. One: on a small shared machine, two threads contending with other processes
    # make step times swing by 10x; one thread per process is also what dataloader workers get.
    threads: int = 1
    # Part 1
    collator_examples_per_task: int = 24
    collator_batch_size: int = 8
    collator_repeats: int = 11
    # Part 2
    batch_size: int = 8
    warmup: int = 3
    steps: int = 32
    # Part 3
    padding_recipes: list[str] = field(default_factory=lambda: list(DEMO_RECIPES))
    padding_seeds: int = 3
    # Part 4
    memory_hidden_size: int = 1536
    memory_intermediate_size: int = 4096
    memory_layers: int = 6
    memory_steps: int = 3
    memory_batch_size: int = 2
    # Part 5
    gpu_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    gpu_warmup: int = 2
    gpu_steps: int = 5
    gpu_samples: int = 64
    gpu_image_size: list[int] = field(default_factory=lambda: [720, 1280])  # height, width of a screenshot
    peak_tflops: float | None = None
    # Part 6
    vision_language_layers: int = 1
    vision_steps: int = 2
    vision_image_size: list[int] = field(default_factory=lambda: [720, 1280])  # height, width
    # Part 7
    autocast_vision_blocks: int = 4
    autocast_image_size: list[int] = field(default_factory=lambda: [720, 1280])  # height, width

    def shrink(self) -> None:
        self.quick = True
        self.repeats = 1
        self.collator_examples_per_task = 8
        self.collator_repeats = 3
        self.batch_size = 4
        self.warmup = 1
        self.steps = 3
        self.padding_recipes = ["shapes_qwen2vl"]
        self.padding_seeds = 1
        self.memory_hidden_size = 512
        self.memory_intermediate_size = 1024
        self.memory_layers = 2
        self.memory_steps = 1
        self.gpu_batch_sizes = [1, 2]
        self.gpu_steps = 2
        self.gpu_samples = 8
        self.vision_steps = 1
        self.vision_image_size = [56, 56]
        self.autocast_vision_blocks = 2
        self.autocast_image_size = [56, 56]


# --------------------------------------------------------------------------------------------------------------------
# Workspace: tiny models and demo data, built once per run
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Timing and counting a trainer's steps
# --------------------------------------------------------------------------------------------------------------------
class StepRecorder:
    """Wall time at the end of each optimizer step, and what each micro-batch held (counted in `training_step`)."""

    def __init__(self, trainer, vision_patches: bool = False, hand_over=None):
        from transformers import TrainerCallback

        recorder = self
        self.step_ends: list[float] = []
        # When each step's thread got the turn back (`TakingTurns`); without turns, right after the step's end.
        self.resumed: list[float] = []
        self.hand_overs = 0
        self.batches: list[dict[str, int]] = []
        self.args = trainer.args
        self.synchronize = trainer.args.device.type == "cuda"
        # The vision tower's FLOPs factor for MFU: 6 when it trains, 2 when it is frozen, since `VLMSFTTrainer` then
        # runs it forward only (`detach_frozen_vision_inputs`).
        self.vision_flops_factor = None
        if vision_patches:
            from vlm_recipes.trainer import part_has_trainable

            self.vision_flops_factor = 6 if part_has_trainable(trainer.model, "vision") else 2

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if recorder.synchronize:
                    import torch

                    torch.cuda.synchronize()
                recorder.step_ends.append(time.perf_counter())
                if hand_over is not None:
                    recorder.hand_overs += 1
                    hand_over()
                recorder.resumed.append(time.perf_counter())

        trainer.add_callback(_Callback())
        original_training_step = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            mask = inputs["attention_mask"]
            record = {"samples": int(mask.shape[0]), "tokens": int(mask.sum()), "positions": int(mask.numel())}
            if vision_patches and "image_grid_thw" in inputs:
                record["patches"] = int(inputs["image_grid_thw"].prod(dim=-1).sum())
            recorder.batches.append(record)
            return original_training_step(model, inputs, *args, **kwargs)

        trainer.training_step = training_step

    def rates(self, warmup: int) -> dict[str, float]:
        """Samples/s, tokens/s and padding of the steps after `warmup` (one micro-batch per step)."""
        if len(self.step_ends) <= warmup or warmup < 1:
            raise RuntimeError(f"Need more than {warmup} recorded steps (warm-up >= 1), got {len(self.step_ends)}.")
        # A step's time runs from when its thread resumed after the step before to the step's end: the batch's loading
        # and collation, forward, backward and optimizer step, and the trainer's work between steps.
        elapsed = sum(self.step_ends[i] - self.resumed[i - 1] for i in range(warmup, len(self.step_ends)))
        timed = self.batches[warmup : len(self.step_ends)]
        totals = {key: sum(batch.get(key, 0) for batch in timed) for key in ("samples", "tokens", "positions")}
        rates = {
            "steps": len(timed),
            "hand_overs": self.hand_overs,
            "seconds": elapsed,
            "samples_per_second": totals["samples"] / elapsed,
            "tokens_per_second": totals["tokens"] / elapsed,
            "padding_fraction": 1 - totals["tokens"] / totals["positions"],
        }
        if any("patches" in batch for batch in timed):
            rates["patches_per_second"] = sum(batch.get("patches", 0) for batch in timed) / elapsed
        return rates


def _record_steps(recorders: list[StepRecorder], trainer, vision_patches: bool = False, hand_over=None) -> None:
    recorders.append(StepRecorder(trainer, vision_patches=vision_patches, hand_over=hand_over))


class TakingTurns:
    """Threads that run one at a time, in a fixed rotation: the holder of the turn runs, the others wait.

    Part 2 times training paths against each other on a shared machine whose load changes from one second to the
    next. Timed one after the other, a run that falls in a slow spell is compared with one that does not: single runs
    of the same path differ by up to 40%, in a fast and a slow mode. Taking turns at every optimizer step puts the
    paths' steps in the same spells, and since only one thread runs at a time, they do not compete for the cores.
    (Dataloader worker processes would fill their prefetch queues while their run waits; part 2 has none, as its demo
    recipe sets `dataloader_num_workers: 0`.)
    """

    def __init__(self, names: list[str]):
        self._condition = threading.Condition()
        self._active = list(names)
        self._current = self._active[0] if self._active else None

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._current == name)

    def hand_over(self, name: str) -> None:
        """Give the turn to the next thread in the rotation, and wait until it comes back."""
        with self._condition:
            if self._current != name:
                raise RuntimeError(f"{name!r} handed over a turn it did not hold (held by {self._current!r}).")
            self._current = self._active[(self._active.index(name) + 1) % len(self._active)]
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._current == name)

    def leave(self, name: str) -> None:
        with self._condition:
            position = self._active.index(name)
            self._active.remove(name)
            if self._current == name:
                self._current = self._active[position % len(self._active)] if self._active else None
            self._condition.notify_all()


def take_turns(functions: dict[str, Any]) -> dict[str, Any]:
    """Run each `function(hand_over)` in its own thread, taking turns (`TakingTurns`) in the order given: a function
    runs until it calls `hand_over()`, and runs on when its turn comes back. Returns each function's result; the
    first error raised in any of them is raised here, after every thread has ended."""
    turns = TakingTurns(list(functions))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(name: str, function) -> None:
        try:
            turns.wait(name)
            results[name] = function(partial(turns.hand_over, name))
        except BaseException as error:  # noqa: BLE001 (raised again in the calling thread, below)
            errors.append(error)
        finally:
            turns.leave(name)

    # Daemon threads: an interrupt (Ctrl-C) in the calling thread ends the process instead of waiting for the runs.
    threads = [
        threading.Thread(target=run, args=item, name=f"turn-{item[0]}", daemon=True) for item in functions.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def torch_threads(count: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratios(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    """Per-repeat ratios of two figures timed side by side in each repeat, with their median and range.

    Each repeat times both paths together (alternating batches or steps), so a change in the machine's load hits
    both alike: the median of the paired ratios is much less sensitive to it than the ratio of the two medians (on
    this 2-core shared machine, part 2's medians have moved by 20% between repeats)."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "median": median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "median_interval_90": median_interval(ratios),
        "per_repeat": ratios,
    }


def median_interval(values: list[float], level: float = 0.90) -> list[float] | None:
    """A distribution-free confidence interval for the median: the k-th smallest and k-th largest values, k the
    largest for which the median of the distribution lies between them with probability >= `level` (the count of
    values below the median is Binomial(n, 1/2)). None where there are too few values (under 5 at 90%).

    9 values give the 2nd and 8th (96%); 11 give the 3rd and 9th (93%); 18 give the 6th and 13th (90.4%)."""
    n, ordered = len(values), sorted(values)
    best = None
    for k in range(1, n // 2 + 1):
        outside = 2 * sum(math.comb(n, i) for i in range(k)) / 2**n  # P(the median is below the k-th or above)
        if 1 - outside < level:
            break
        best = k
    return None if best is None else [ordered[best - 1], ordered[n - best]]


def ratio_verdict(ratios: dict[str, Any], threshold: float = 1.0) -> str:
    """`met` or `not met` where the median's 90% interval is on one side of `threshold`; `within noise` where the
    interval holds it (the repeats cannot tell). Without an interval (too few repeats), the median alone decides."""
    interval = ratios.get("median_interval_90")
    low, high = interval if interval else (ratios["median"], ratios["median"])
    if low >= threshold:
        return "met"
    if high < threshold:
        return "not met"
    return "within noise"


# --------------------------------------------------------------------------------------------------------------------
# Part 1: collator throughput
# --------------------------------------------------------------------------------------------------------------------
def qwen_pixel_budget() -> dict[str, int]:
    import yaml

    recipe = yaml.safe_load(QWEN_RECIPE.read_text(encoding="utf-8"))
    return {key: recipe[key] for key in ("min_pixels", "max_pixels") if recipe.get(key) is not None}


def qwen2_vl_processor(workspace: Workspace, **kwargs):
    """The real Qwen2-VL processor when `REAL_PROCESSORS` holds it, else the tiny Qwen2-VL's, loaded with `kwargs`
    (a pixel budget) and given a pad token; returns it with a description for the report."""
    real = REAL_PROCESSORS / "qwen2-vl"
    if (real / "tokenizer_config.json").is_file():
        path, name = real, f"real Qwen2-VL processor ({real})"
    else:
        path, name = (
            workspace.tiny_model("qwen2_vl"),
            f"tiny Qwen2-VL processor (no real processor under {REAL_PROCESSORS})",
        )
    return processor_with_pad_token(path, **kwargs), name


def processor_with_pad_token(path, **kwargs):
    """`AutoProcessor.from_pretrained(path, **kwargs)`, its tokenizer given a pad token (eos) if it has none."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, **kwargs)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def benchmark_collators(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlm_recipes.chat_templates import trl_chat_template
    from vlm_recipes.collator import VisionChatCollator
    from vlm_recipes.data.splits import load_splits

    budget = qwen_pixel_budget()
    processor, processor_name = qwen2_vl_processor(workspace, **budget)
    processor_name += f", {budget}"

    examples = []
    for name in ("shapes_qwen2vl", "chess", "ui_actions"):
        script_args, _, _ = workspace.recipe_args(name)
        (dataset,), _ = load_splits(script_args, ["train"], limits=[settings.collator_examples_per_task])
        examples += [dataset[index] for index in range(len(dataset))]  # images decoded here, outside the timing
    size = settings.collator_batch_size
    batches = [examples[start : start + size] for start in range(0, len(examples), size)]

    def new_collators() -> dict[str, Any]:
        return {
            "ours": VisionChatCollator(processor),
            "trl": DataCollatorForVisionLanguageModeling(processor=processor, max_length=None),
            # TRL doing the same work as ours (loss on assistant turns only) needs a template with generation markers.
            "trl_assistant_only": DataCollatorForVisionLanguageModeling(
                processor=processor,
                max_length=None,
                assistant_only_loss=True,
                chat_template=trl_chat_template("qwen2_5_vl_training"),  # Qwen2-VL's format, with the markers
            ),
        }

    collators = new_collators()

    def fresh(batch):  # TRL fills the image placeholders of the messages it is given; each call gets its own copy
        return [{"images": example["images"], "messages": copy.deepcopy(example["messages"])} for example in batch]

    runs: dict[str, list[float]] = {name: [] for name in collators}
    names = list(collators)
    with torch_threads(1):
        for collator in collators.values():  # warm-up: template compilation, first-call caches
            collator(fresh(batches[0]))
        for repeat in range(settings.collator_repeats):
            # New collators for each pass over the data, as in a first epoch: ours keeps the prompts it has rendered
            # (`VisionChatCollator._cached_prompt`), and a second pass would find all of them there.
            collators = new_collators()
            seconds = dict.fromkeys(names, 0.0)
            # Batch by batch, in rotating order, so that a change in the machine's load hits every collator alike.
            for index, batch in enumerate(batches):
                shift = (repeat + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    inputs = fresh(batch)
                    start = time.perf_counter()
                    collators[name](inputs)
                    seconds[name] += time.perf_counter() - start
            for name in names:
                runs[name].append(len(examples) / seconds[name])
    rates = {name: median(values) for name, values in runs.items()}
    return {
        "processor": processor_name,
        "examples": len(examples),
        "batch_size": size,
        "repeats": settings.collator_repeats,
        "torch_threads": 1,
        "ours_examples_per_second": rates["ours"],
        "trl_examples_per_second": rates["trl"],
        "trl_assistant_only_examples_per_second": rates["trl_assistant_only"],
        "ratio_ours_to_trl": rates["ours"] / rates["trl"],
        "ratio_ours_to_trl_assistant_only": rates["ours"] / rates["trl_assistant_only"],
        "paired_ratio_ours_to_trl": paired_ratios(runs["ours"], runs["trl"]),
        "paired_ratio_ours_to_trl_assistant_only": paired_ratios(runs["ours"], runs["trl_assistant_only"]),
        "runs_examples_per_second": runs,
        "note": "trl: TRL's default VLM collator, loss on every token, no checks. trl_assistant_only: the same with "
        "assistant_only_loss=True and TRL's qwen2_5_vl_training template, the work ours does (ours also checks rows "
        "and lengths and needs no template markers).",
    }


# --------------------------------------------------------------------------------------------------------------------
# Part 2: training throughput
# --------------------------------------------------------------------------------------------------------------------
def _shared_overrides(settings: Settings) -> dict[str, Any]:
    return {
        "max_steps": settings.warmup + settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "use_cpu": True,
    }


def _train_ours(workspace: Workspace, settings: Settings, sampling: str, hand_over=None) -> dict[str, float]:
    """`scripts/sft.py`'s own `main`, run in this process on the shapes demo recipe: whatever its path does (cheap
    lengths, `too_long` up front, length-grouped sampler, `VisionChatCollator`, its trainer class) is what is timed.
    The trainer class it uses is wrapped, in its namespace only, to attach the step recorder."""
    overrides = _shared_overrides(settings)
    overrides["output_dir"] = workspace.root / "outputs" / f"training-ours-{sampling}"
    if sampling != "default":
        overrides["train_sampling_strategy"] = sampling
    from vlm_recipes.sft import main

    recorders: list[StepRecorder] = []
    main(
        *workspace.recipe_args("shapes_qwen2vl", overrides),
        on_trainer=partial(_record_steps, recorders, hand_over=hand_over),
    )
    if len(recorders) != 1:
        raise RuntimeError(f"Expected scripts/sft.py to build one trainer, saw {len(recorders)}.")
    return {**recorders[0].rates(settings.warmup), **_loading(recorders[0].args)}


def _train_stock_trl(workspace: Workspace, settings: Settings, hand_over=None) -> dict[str, float]:
    """A stock TRL `SFTTrainer`: a dataset of `images` + `messages`, no collator, TRL's defaults otherwise."""
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from vlm_recipes.collator import normalize_messages
    from vlm_recipes.data.rows import BadRowReport
    from vlm_recipes.tasks import task_from_args
    from vlm_recipes.trainer import apply_data_loading_defaults

    overrides = _shared_overrides(settings) | {"output_dir": workspace.root / "outputs" / "training-trl"}
    script_args, training_args, model_args = workspace.recipe_args("shapes_qwen2vl", overrides)
    # Equal settings: the data loading (workers, pinned memory) that scripts/sft.py's path gets on this machine; the
    # sampler stays TRL's own.
    apply_data_loading_defaults(training_args, script_args.keys_set)
    data_dir = Path(script_args.dataset_path)
    rows = task_from_args(script_args).load_rows(data_dir, script_args.dataset_train_split, data_dir, BadRowReport())
    records = [{"images": row["images"], "messages": normalize_messages(row["messages"])} for row in rows]
    dataset = datasets.Dataset.from_list(records).cast_column("images", datasets.List(datasets.Image()))
    stock_args = SFTConfig(
        output_dir=training_args.output_dir,
        max_steps=training_args.max_steps,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=training_args.learning_rate,
        lr_scheduler_type=training_args.lr_scheduler_type,
        max_length=training_args.max_length,
        gradient_checkpointing=training_args.gradient_checkpointing,
        bf16=training_args.bf16,
        dataloader_num_workers=training_args.dataloader_num_workers,
        dataloader_pin_memory=training_args.dataloader_pin_memory,
        dataloader_persistent_workers=training_args.dataloader_persistent_workers,
        use_cpu=True,
        seed=training_args.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
    )
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
    trainer = SFTTrainer(model=model, args=stock_args, train_dataset=dataset, processing_class=processor)
    recorder = StepRecorder(trainer, hand_over=hand_over)
    trainer.train()
    return {**recorder.rates(settings.warmup), **_loading(trainer.args)}


def _loading(args) -> dict[str, Any]:
    """How a timed trainer drew its batches: sampler and data-loading workers."""
    strategy = getattr(args, "train_sampling_strategy", "random")
    return {
        "train_sampling_strategy": str(getattr(strategy, "value", strategy)),
        "dataloader_num_workers": args.dataloader_num_workers,
    }


def benchmark_training(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    paths = {
        "ours": partial(_train_ours, workspace, settings, "default"),
        "trl": partial(_train_stock_trl, workspace, settings),
        "ours_random_sampler": partial(_train_ours, workspace, settings, "random"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    names = list(paths)
    orders = list(itertools.permutations(names))
    for repeat in range(settings.repeats):
        # The three runs of a repeat take turns step by step (`take_turns`), so the machine's load changes hit them
        # alike. The order goes through all six in turn, so that whatever going first, or right after a given path,
        # does falls on every path alike.
        order = orders[repeat % len(orders)]
        with contextlib.redirect_stdout(io.StringIO()):  # once for all threads: sys.stdout is the process's
            results = take_turns({name: paths[name] for name in order})
        for name in names:
            steps = settings.warmup + settings.steps
            if results[name]["hand_overs"] != steps:  # a run that kept the turn would run alone, in other load
                raise RuntimeError(f"Part 2: run {name!r} handed over {results[name]['hand_overs']} of {steps} turns.")
            runs[name].append(results[name])
        gc.collect()

    def rates(results: list[dict[str, float]]) -> list[float]:
        return [run["samples_per_second"] for run in results]

    summary = {
        name: {
            key: median([run[key] for run in results])
            for key in ("samples_per_second", "tokens_per_second", "padding_fraction")
        }
        | {key: results[0][key] for key in ("train_sampling_strategy", "dataloader_num_workers")}
        for name, results in runs.items()
    }
    return {
        "model": "tiny Qwen2-VL (vlm_recipes.tiny, own tokenizer), full fine-tuning as the shapes demo recipe",
        "data": "shapes demo data (recipes/demo/shapes_qwen2vl.yaml), train split",
        "batch_size": settings.batch_size,
        "warmup_steps": settings.warmup,
        "timed_steps": settings.steps,
        "repeats": settings.repeats,
        **summary,
        "ratio_samples_per_second": summary["ours"]["samples_per_second"] / summary["trl"]["samples_per_second"],
        "ratio_tokens_per_second": summary["ours"]["tokens_per_second"] / summary["trl"]["tokens_per_second"],
        "ratio_samples_per_second_random_sampler": summary["ours_random_sampler"]["samples_per_second"]
        / summary["trl"]["samples_per_second"],
        "paired_ratio_samples_per_second": paired_ratios(*(rates(runs[name]) for name in ("ours", "trl"))),
        "paired_ratio_samples_per_second_random_sampler": paired_ratios(
            *(rates(runs[name]) for name in ("ours_random_sampler", "trl"))
        ),
        # Each path's fastest repeat against the other's (informational; the target is the paired median). On a shared
        # machine single runs fall into a fast and a slow mode (1.5 against 2.3 s for the same run), whatever their
        # order; the fastest run is the one least slowed by other load, as `timeit` reasons for its minimum.
        "ratio_best_samples_per_second": max(rates(runs["ours"])) / max(rates(runs["trl"])),
        "ratio_best_samples_per_second_random_sampler": max(rates(runs["ours_random_sampler"]))
        / max(rates(runs["trl"])),
        "runs": runs,
        "note": "tokens are non-padding tokens (image tokens included); the stock TRL path computes the loss on every "
        "token, ours on assistant turns only (same model compute).",
    }


# --------------------------------------------------------------------------------------------------------------------
# Part 3: padding and supervised tokens per batch
# --------------------------------------------------------------------------------------------------------------------
def benchmark_padding(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from vlm_recipes.collator import IGNORE_INDEX, VisionChatCollator
    from vlm_recipes.data.splits import load_splits
    from vlm_recipes.lengths import sample_lengths
    from vlm_recipes.models.loading import load_processor

    results: dict[str, Any] = {}
    for name in settings.padding_recipes:
        script_args, training_args, model_args = workspace.recipe_args(name)
        processor = load_processor(model_args, script_args.min_pixels, script_args.max_pixels)
        collator = VisionChatCollator(processor, max_length=training_args.max_length, too_long=script_args.too_long)
        (dataset,), _ = load_splits(script_args, [script_args.dataset_train_split])
        lengths, _ = sample_lengths(dataset, collator, progress=False)
        examples = [dataset[index] for index in range(len(dataset))]
        batch_size = training_args.per_device_train_batch_size
        group_size = batch_size * training_args.gradient_accumulation_steps  # what the Trainer's sampler groups by
        per_strategy: dict[str, Any] = {}
        lengths_exact = True
        for strategy in ("random", "group_by_length"):
            totals = {"positions": 0, "tokens": 0, "supervised": 0}
            batch_padding: list[float] = []
            for seed in range(settings.padding_seeds):
                generator = torch.Generator().manual_seed(seed)
                if strategy == "random":
                    order = torch.randperm(len(examples), generator=generator).tolist()
                else:  # exactly what transformers' LengthGroupedSampler yields
                    order = get_length_grouped_indices(lengths, group_size, generator=generator)
                for start in range(0, len(order), batch_size):
                    indices = order[start : start + batch_size]
                    batch = collator([examples[i] for i in indices])
                    mask = batch["attention_mask"]
                    tokens, positions = int(mask.sum()), mask.numel()
                    lengths_exact &= mask.sum(dim=1).tolist() == [lengths[i] for i in indices]
                    totals["positions"] += positions
                    totals["tokens"] += tokens
                    totals["supervised"] += int((batch["labels"] != IGNORE_INDEX).sum())
                    batch_padding.append(1 - tokens / positions)
            per_strategy[strategy] = {
                "padding_fraction": 1 - totals["tokens"] / totals["positions"],
                "max_batch_padding_fraction": max(batch_padding),
                "supervised_fraction_of_positions": totals["supervised"] / totals["positions"],
                "supervised_fraction_of_tokens": totals["supervised"] / totals["tokens"],
            }
        results[name] = {
            "task": script_args.task,
            "samples": len(examples),
            "batch_size": batch_size,
            "length_min": min(lengths),
            "length_max": max(lengths),
            "cheap_lengths_equal_collated": lengths_exact,
            **per_strategy,
        }
    return {
        "seeds": settings.padding_seeds,
        "definitions": {
            "padding_fraction": "padding positions / all positions of the epoch's batches",
            "supervised_fraction_of_positions": "positions with a label (assistant tokens) / all positions",
            "supervised_fraction_of_tokens": "positions with a label / non-padding tokens",
        },
        "recipes": results,
        "max_padding_fraction_grouped": max(r["group_by_length"]["padding_fraction"] for r in results.values()),
        "max_padding_fraction_random": max(r["random"]["padding_fraction"] for r in results.values()),
    }


# --------------------------------------------------------------------------------------------------------------------
# Part 4: peak memory, bf16 LoRA vs 4-bit QLoRA
# --------------------------------------------------------------------------------------------------------------------
def build_medium_model(workspace: Workspace, settings: Settings) -> Path:
    """A random Qwen2-VL with a language model of a few hundred MB, the tiny model's processor, saved in bf16."""
    from transformers import AutoProcessor, GenerationConfig, Qwen2VLConfig

    size = (settings.memory_hidden_size, settings.memory_intermediate_size, settings.memory_layers)
    name = "qwen2_vl-{}x{}x{}".format(*size)
    if (workspace.root / "models" / name / "config.json").is_file():
        return workspace.root / "models" / name
    tiny = workspace.tiny_model("qwen2_vl")
    processor = AutoProcessor.from_pretrained(tiny)
    tiny_config = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    hidden, intermediate, layers = size
    heads = hidden // 128
    text_config = {
        **tiny_config["text_config"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "layer_types": ["full_attention"] * layers,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    }
    vision_config = {**tiny_config["vision_config"], "hidden_size": hidden}
    token_ids = {key: value for key, value in tiny_config.items() if key.endswith("_token_id")}
    config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)
    generation_config = GenerationConfig.from_pretrained(tiny)
    return workspace.random_model(name, config, processor=processor, generation_config=generation_config)


# glibc's allocator in the memory workers: blocks of 1 MiB and more are mapped and unmapped on their own, so that the
# resident set follows the memory that training holds, as CUDA's max_memory_allocated does. With glibc's default
# (a threshold that rises as blocks are freed) freed blocks stay in the heap or not depending on allocation order:
# five runs of the same QLoRA training peaked at 0.28, 0.45, 0.45, 0.28 and 0.28 GiB above start.
MEMORY_WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def benchmark_memory(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    import yaml

    model_dir = build_medium_model(workspace, settings)
    data_dir = workspace.demo_data("shapes_qwen2vl")
    common = {
        **workspace.recipe("shapes_qwen2vl"),
        "model_name_or_path": str(model_dir),
        "dataset_path": str(data_dir),
        "dtype": "bfloat16",
        "bf16": True,
        "use_peft": True,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "max_steps": settings.memory_steps,
        "per_device_train_batch_size": settings.memory_batch_size,
        "gradient_checkpointing": True,
        "learning_rate": 1.0e-4,
        "verify_saved_model": False,
        "eval_after_train": False,
        "report_to": "none",
        "logging_steps": 1000,
    }
    common.pop("num_train_epochs", None)
    variants = {
        "bf16_lora": {},
        "qlora_4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True},
    }
    results: dict[str, Any] = {}
    for name, extra in variants.items():
        recipe = {**common, **extra, "output_dir": str(workspace.root / "outputs" / f"memory-{name}")}
        recipe_path = workspace.root / f"memory-{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        results[name] = run_worker("--memory_worker", recipe_path, MEMORY_MARKER, f"Memory run {name!r}", 1800)
    lora, qlora = results["bf16_lora"]["peak_bytes_above_start"], results["qlora_4bit"]["peak_bytes_above_start"]
    return {
        "model": f"random Qwen2-VL, language model {settings.memory_layers} layers x hidden "
        f"{settings.memory_hidden_size} x MLP {settings.memory_intermediate_size}, tiny vision tower and vocabulary",
        "data": "shapes demo data",
        "batch_size": settings.memory_batch_size,
        "steps": settings.memory_steps,
        **results,
        "ratio_qlora_to_lora_peak": qlora / lora,
        "ratio_qlora_to_lora_weights": results["qlora_4bit"]["weights_bytes"] / results["bf16_lora"]["weights_bytes"],
        "worker_environment": MEMORY_WORKER_MALLOC,
        "definitions": {
            "peak_bytes_above_start": "CPU: the highest resident set sampled while trainer.train() ran (freed heap "
            "returned to the OS with malloc_trim when training starts; blocks of 1 MiB and more mapped on their own, "
            "MALLOC_MMAP_THRESHOLD_), minus the resident set right before scripts/sft.py's main() (imports done); "
            "CUDA: max_memory_allocated",
            "process_peak_bytes_above_start": "the process's lifetime peak resident set (ru_maxrss) minus the same "
            "start: it also holds loading, where 4-bit quantisation on a CPU holds the bf16 and 4-bit copies at once",
            "weights_bytes": "bytes of the trained model's parameters and buffers (4-bit weights packed, LoRA "
            "adapters included)",
        },
    }


def run_worker(flag: str, path: Path, marker: str, what: str, timeout: int) -> dict[str, Any]:
    """Run this script as a worker (`flag path`) in a fresh process, with the memory workers' allocator setting, and
    return the JSON of its last `marker` line; its stderr's end is in the error if it fails."""
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), flag, str(path)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **MEMORY_WORKER_MALLOC},
        timeout=timeout,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(marker)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(marker) :])


def memory_worker(recipe_path: str) -> None:
    """Run `scripts/sft.py` on a recipe in this fresh process and print its memory figures as one JSON line.

    CPU: the resident set is sampled every few milliseconds while `trainer.train()` runs (the training peak), beside
    the process's lifetime peak (`ru_maxrss`, which also holds the transient of loading and quantising the weights).
    CUDA: `torch.cuda.max_memory_allocated`.
    """
    import ctypes
    import threading

    import torch

    from vlm_recipes.configs import parse_recipe
    from vlm_recipes.sft import main

    trainers: list[Any] = []
    training_peak_parts = {"RssAnon": 0, "RssFile": 0}
    training_start = [0]

    def sample_while_training(trainer) -> None:
        trainers.append(trainer)
        original_train = trainer.train

        def train(*args, **kwargs):
            # What loading freed goes back to the OS first, so that the resident set measures what training holds
            # (glibc keeps freed heap pages otherwise: on a CPU, quantising leaves the bf16 copy's pages behind).
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            training_start[0] = _current_rss()
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    parts = _rss_parts()
                    if parts["RssAnon"] + parts["RssFile"] > sum(training_peak_parts.values()):
                        training_peak_parts.update(parts)
                    done.wait(0.002)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                return original_train(*args, **kwargs)
            finally:
                done.set()
                sampler.join()

        trainer.train = train

    start = _current_rss()
    main(*parse_recipe([recipe_path]), on_trainer=sample_while_training)
    model = trainers[0].model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    report = {
        "kind": "cpu_rss_during_training",
        "start_rss_bytes": start,
        "weights_bytes": weights,
        "peak_bytes_above_start": sum(training_peak_parts.values()) - start,
        "peak_anonymous_bytes": training_peak_parts["RssAnon"],
        "peak_file_backed_bytes": training_peak_parts["RssFile"],
        "training_start_bytes_above_start": training_start[0] - start,
        "process_peak_bytes_above_start": lifetime_peak - start,
    }
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:  # the recipe trained on the GPU
        report["kind"] = "cuda_max_memory_allocated"
        report["peak_bytes_above_start"] = torch.cuda.max_memory_allocated()
    report["peak_gib_above_start"] = report["peak_bytes_above_start"] / 2**30
    print(MEMORY_MARKER + json.dumps(report), flush=True)


def _current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_sizes(*keys: str) -> dict[str, int]:
    """Size fields of /proc/self/status (kB there), in bytes, for those of `keys` it has."""
    sizes = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in keys:
                sizes[key] = int(value.split()[0]) * 1024
    return sizes


def _status_bytes(key: str) -> int:
    """One size field of /proc/self/status (`VmHWM`, the peak resident set), in bytes."""
    sizes = _status_sizes(key)
    if key not in sizes:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return sizes[key]


def _rss_parts() -> dict[str, int]:
    """Anonymous and file-backed resident bytes (`RssAnon`, `RssFile` of /proc/self/status)."""
    return _status_sizes("RssAnon", "RssFile")


# --------------------------------------------------------------------------------------------------------------------
# Part 5: full-size Qwen2-VL-2B on a GPU
# --------------------------------------------------------------------------------------------------------------------
def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "--gpu needs a CUDA GPU (torch.cuda.is_available() is False here). Run parts 1-4 without --gpu on this "
            "machine, and `python scripts/benchmark.py --gpu` on a machine with an NVIDIA GPU."
        )


def qwen2_vl_2b_config():
    """Qwen2-VL-2B's architecture: the real config.json when at hand, else the built-in copy of it."""
    from transformers import AutoConfig, Qwen2VLConfig

    real = REAL_PROCESSORS / "qwen2-vl" / "config.json"
    if real.is_file():
        return AutoConfig.from_pretrained(real.parent), f"{real}"
    return Qwen2VLConfig(**QWEN2_VL_2B_CONFIG), "built-in copy of Qwen2-VL-2B's config.json"


def qwen2_vl_2b_config_cut(language_layers: int, vision_blocks: int | None = None):
    """Qwen2-VL-2B's config with fewer language layers (and vision blocks): full width, for what scales per layer."""
    full, _ = qwen2_vl_2b_config()
    values = full.to_dict()
    for section in (values, values["text_config"]):
        if "num_hidden_layers" in section:
            section["num_hidden_layers"] = language_layers
        if section.get("layer_types"):
            section["layer_types"] = section["layer_types"][:language_layers]
    if vision_blocks is not None:
        values["vision_config"]["depth"] = vision_blocks
    return type(full)(**values)


def align_config_to_processor(config, processor) -> None:
    """Special-token ids and vocabulary of `config` made to fit `processor`'s tokenizer (a tiny one, if need be)."""
    tokenizer = processor.tokenizer
    for key, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))
    text_config = config.get_text_config()
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    text_config.pad_token_id = tokenizer.pad_token_id
    text_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)


def parameter_counts(config) -> dict[str, int]:
    """Parameters that each token passes through: language model (with the LM head's matmul) and vision tower."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    vision = sum(p.numel() for name, p in model.named_parameters() if name.startswith("model.visual."))
    embeddings = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    # The input embedding is a lookup (no FLOPs); the LM head is a matmul whether or not it is tied to it.
    language = total - vision - embeddings + model.get_output_embeddings().weight.numel()
    return {"total": total, "language_model_compute": language, "vision_tower": vision}


def peak_bf16_flops(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"--peak_tflops {override_tflops}"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"{key}: {tflops} TFLOP/s dense bf16"
    return None, f"unknown GPU {device_name!r}: pass --peak_tflops"


def write_synthetic_screens(directory: Path, count: int, height: int, width: int, seed: int = 0) -> Path:
    """A `messages`-task dataset of UI-action-like samples: one noise screenshot (resized to the pixel budget by the
    processor) and a short conversation, all of one size, so that every batch size sees the same tokens per sample."""
    import numpy as np
    from PIL import Image

    from vlm_recipes.files import write_text_atomically

    directory = Path(directory)
    if (directory / "train.jsonl").is_file():
        return directory
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prompt = (
        "You are operating a desktop application. The task is to open the settings page, switch the theme to dark "
        "mode and save the change. Look at the screenshot and answer with the next action only."
    )
    answer = 'click(x=0.412, y=0.127) # the "Settings" entry in the top menu bar, then wait for the page to load'
    lines = []
    for index in range(count):
        relative = f"images/screen-{index:04d}.jpg"
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / relative, quality=90)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"id": f"screen-{index}", "images": [relative], "messages": messages}))
    write_text_atomically(directory / "train.jsonl", "\n".join(lines) + "\n")
    return directory


# Keys of the Qwen2-VL recipe that part 5 keeps: how it trains, not what data it reads.
RECIPE_TRAINING_KEYS = (
    "dtype",
    "attn_implementation",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
    "max_length",
    "min_pixels",
    "max_pixels",
    "learning_rate",
    "lr_scheduler_type",
    "bf16",
    "gradient_checkpointing",
)


def benchmark_full_size(workspace: Workspace, settings: Settings, device: str = "cuda", config=None) -> dict[str, Any]:
    """Part 5: `scripts/sft.py` with the Qwen2-VL recipe's training keys on a random full-size Qwen2-VL-2B.

    `device`/`config` exist so that the tests can run this path on CPU with a small config.
    """
    import torch
    import yaml

    from vlm_recipes.configs import parse_recipe
    from vlm_recipes.sft import main

    if device == "cuda":
        require_cuda()
    recipe = yaml.safe_load(QWEN_RECIPE.read_text(encoding="utf-8"))
    # The budget reaches training through the recipe's keys; this processor only fits the config and goes with the model.
    processor, processor_name = qwen2_vl_processor(workspace)
    processor_name += f", {qwen_pixel_budget()}"
    config, config_source = qwen2_vl_2b_config() if config is None else (config, "given")
    align_config_to_processor(config, processor)
    counts = parameter_counts(config)
    # Initialised where it trains: seconds on a GPU, no host copy.
    model_dir = workspace.random_model(f"qwen2_vl-random-{device}", config, processor=processor, device=device)
    height, width = settings.gpu_image_size
    data_dir = write_synthetic_screens(workspace.root / "data" / "screens", settings.gpu_samples, height, width)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak_flops, peak_source = peak_bf16_flops(device_name, settings.peak_tflops) if device == "cuda" else (None, "")
    results: dict[str, Any] = {"lora": {}, "qlora": {}}
    for mode in ("lora", "qlora"):
        for batch_size in settings.gpu_batch_sizes:
            values = {key: recipe[key] for key in RECIPE_TRAINING_KEYS if key in recipe}
            values.update(
                model_name_or_path=model_dir,
                task="messages",
                dataset_path=data_dir,
                output_dir=workspace.root / "outputs" / f"full-size-{mode}-{batch_size}",
                load_in_4bit=mode == "qlora",
                use_bnb_nested_quant=mode == "qlora",
                max_steps=settings.gpu_warmup + settings.gpu_steps,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=1,
                eval_strategy="no",
                save_strategy="no",
                eval_after_train=False,
                report_to="none",
                logging_steps=1000,
                use_cpu=device == "cpu",
            )
            arguments = [item for key, value in values.items() for item in (f"--{key}", str(value))]
            recorders: list[StepRecorder] = []
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    main(*parse_recipe(arguments), on_trainer=partial(_record_steps, recorders, vision_patches=True))
            except torch.OutOfMemoryError:
                results[mode][str(batch_size)] = {"out_of_memory": True}
            else:
                rates = recorders[0].rates(settings.gpu_warmup)
                vision_factor = recorders[0].vision_flops_factor
                language_flops = 6 * counts["language_model_compute"] * rates["tokens_per_second"]
                vision_flops = vision_factor * counts["vision_tower"] * rates.get("patches_per_second", 0.0)
                flops = language_flops + vision_flops
                results[mode][str(batch_size)] = {
                    **rates,
                    "tokens_per_sample": rates["tokens_per_second"] / rates["samples_per_second"],
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                    "model_flops_per_second": flops,
                    "vision_flops_factor": vision_factor,
                    "mfu": flops / peak_flops if peak_flops else None,
                }
            # One line per run as it ends: a run cut short by a time limit still shows what it measured.
            print(
                f"[benchmark] part 5: {mode} batch {batch_size}: {json.dumps(results[mode][str(batch_size)])}",
                file=sys.stderr,
                flush=True,
            )
            recorders.clear()  # the trainer (and its model) go with it
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return {
        "device": device_name,
        "config": config_source,
        "processor": processor_name,
        "recipe": str(QWEN_RECIPE.relative_to(REPO_ROOT)),
        "parameters": counts,
        "image_size": {"height": height, "width": width},
        "warmup_steps": settings.gpu_warmup,
        "timed_steps": settings.gpu_steps,
        "peak_bf16_flops": peak_flops,
        "peak_bf16_flops_source": peak_source,
        **results,
        "mfu_formula": "(6 * language_model_compute_params * tokens/s + vision_flops_factor * vision_tower_params * "
        "patches/s) / peak, vision_flops_factor 2 for a frozen vision tower (forward only), else 6; "
        "tokens are non-padding tokens, patches the vision tower's input patches (image_grid_thw)",
    }


# --------------------------------------------------------------------------------------------------------------------
# Part 6: a frozen vision tower, recorded by autograd or detached
# --------------------------------------------------------------------------------------------------------------------
VISION_MODES = ("recorded", "detached")


def benchmark_frozen_vision(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    """Part 6: each mode in a fresh process (`--vision_worker`), so that one's memory does not hide the other's."""
    spec = {
        "height": settings.vision_image_size[0],
        "width": settings.vision_image_size[1],
        "language_layers": settings.vision_language_layers,
        "steps": settings.vision_steps,
        # --quick: the tiny Qwen2-VL's config and processor instead of Qwen2-VL-2B's
        "tiny_model": str(workspace.tiny_model("qwen2_vl")) if settings.quick else None,
    }
    results: dict[str, Any] = {}
    for mode in VISION_MODES:
        spec_path = workspace.root / f"vision-{mode}.json"
        spec_path.write_text(json.dumps({**spec, "mode": mode}), encoding="utf-8")
        results[mode] = run_worker("--vision_worker", spec_path, VISION_MARKER, f"Part 6 run {mode!r}", 3600)
        print(f"[benchmark] part 6: {mode}: {json.dumps(results[mode])}", file=sys.stderr, flush=True)
    recorded, detached = results["recorded"], results["detached"]
    return {
        **results,
        "model": recorded["model"],
        "speedup_detached": recorded["median_step_seconds"] / detached["median_step_seconds"],
        "ratio_peak_detached_to_recorded": detached["peak_bytes_above_start"] / recorded["peak_bytes_above_start"],
        "worker_environment": MEMORY_WORKER_MALLOC,
        "definitions": {
            "recorded": "transformers' enable_input_require_grads hook on the vision tower's patch embedding (what TRL "
            "and the Trainer set up): autograd records the frozen tower, keeps its checkpointed inputs and "
            "back-propagates through it",
            "detached": "the same, plus detach_frozen_vision_inputs, as VLMSFTTrainer does at the start of training",
            "peak_bytes_above_start": "CPU: the highest resident set during the steps (read as VmHWM after resetting "
            "it) minus the resident set before them, the lowest over the steps; CUDA: max_memory_allocated minus the "
            "memory allocated before each step, the lowest over the steps",
        },
    }


def vision_worker(spec_path: str) -> None:
    """One mode of part 6 in this fresh process; prints its figures as one JSON line."""
    import numpy as np
    import torch
    from peft import get_peft_model
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlm_recipes.collator import VisionChatCollator
    from vlm_recipes.configs import VLMModelConfig
    from vlm_recipes.models.lora import peft_config_for
    from vlm_recipes.trainer import detach_frozen_vision_inputs

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec["tiny_model"]:
        processor = processor_with_pad_token(spec["tiny_model"])
        config, model_name = AutoConfig.from_pretrained(spec["tiny_model"]), "tiny Qwen2-VL"
    else:
        processor, _ = qwen2_vl_processor(Workspace(Path(spec_path).parent), **qwen_pixel_budget())
        layers = spec["language_layers"]
        config = qwen2_vl_2b_config_cut(layers)
        model_name = f"Qwen2-VL-2B's vision tower ({config.vision_config.depth} blocks) + {layers} language layer(s)"
    align_config_to_processor(config, processor)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model_args = VLMModelConfig(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    model = get_peft_model(model, peft_config_for(model, model_args))
    model.enable_input_require_grads()  # as TRL (PEFT) and the Trainer (checkpointing) do
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if spec["mode"] == "detached" and not detach_frozen_vision_inputs(model):
        raise RuntimeError("detach_frozen_vision_inputs found no frozen vision tower to detach")
    pixels = np.random.default_rng(0).integers(0, 256, (spec["height"], spec["width"], 3), dtype=np.uint8)
    row = {
        "images": [Image.fromarray(pixels)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Open the settings menu."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "click(0.91, 0.05)"}]},
        ],
    }
    inputs = VisionChatCollator(processor, max_length=4096)([row])
    inputs = {key: value.to(device) for key, value in inputs.items()}

    def memory_now() -> int:
        if device == "cuda":
            return torch.cuda.memory_allocated()
        return _current_rss()

    seconds, peaks = [], []
    for _ in range(spec["steps"]):
        model.zero_grad(set_to_none=True)
        gc.collect()
        start = memory_now()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        began = time.perf_counter()
        model(**inputs).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")
        peaks.append(peak - start)
    figures = {
        "mode": spec["mode"],
        "model": model_name,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "image_patches": int(inputs["image_grid_thw"].prod(dim=-1).sum()),
        "tokens": int(inputs["attention_mask"].sum()),
        "step_seconds": seconds,
        "median_step_seconds": statistics.median(seconds),
        "peak_bytes_above_start": min(peaks),
    }
    print(VISION_MARKER + json.dumps(figures), flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Part 7: 4-bit linears under autocast
# --------------------------------------------------------------------------------------------------------------------
AUTOCAST_MODES = {
    "bf16_lora": "bf16 LoRA",
    "qlora_bitsandbytes": "QLoRA, bitsandbytes alone",
    "qlora_ours": "QLoRA, load_model",
}


@contextlib.contextmanager
def cuda_layer_norm_policy(device_type: str):
    """On a CPU, give `layer_norm` CUDA's autocast policy: run and returned in float32 (PyTorch's autocast op reference
    lists `layer_norm` among CUDA's float32 ops; CPU autocast keeps bfloat16). Yields whether it emulates; on CUDA
    nothing is changed."""
    import torch
    import torch.nn.functional as F

    if device_type == "cuda":
        yield False
        return
    layer_norm = F.layer_norm

    def float32_under_autocast(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled(x.device.type):
            return layer_norm(x, shape, weight, bias, eps)
        with torch.autocast(x.device.type, enabled=False):
            return layer_norm(x.float(), shape, *[None if t is None else t.float() for t in (weight, bias)], eps)

    F.layer_norm = float32_under_autocast  # `nn.LayerNorm` looks it up on each call
    try:
        yield True
    finally:
        F.layer_norm = layer_norm


def _recorded_tower_figures(model, pixel_values, grid, device: str) -> dict[str, Any]:
    """Part 7, one model: its vision tower's forward under bf16 autocast, recorded by autograd (see the docstring)."""
    import torch

    # Frozen weights, as under LoRA on the language model (the recipe's): only what the input gradient needs is kept.
    model.requires_grad_(False)
    model.enable_input_require_grads()  # what TRL and the Trainer do; it hooks the tower's patch embedding too
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    owned = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    saved: dict[str, int] = {}
    block_inputs: list[dict[str, Any]] = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in owned:  # activations, not the weights
            key = str(tensor.dtype).removeprefix("torch.")
            saved[key] = saved.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        dtype = str(hidden.dtype).removeprefix("torch.")
        block_inputs.append({"dtype": dtype, "bytes": hidden.numel() * hidden.element_size()})

    visual = model.model.visual
    for block in visual.blocks:
        block.register_forward_pre_hook(record, with_kwargs=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with (
        cuda_layer_norm_policy(device),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast(device, dtype=torch.bfloat16),
    ):
        output = visual(pixel_values, grid_thw=grid)
    output = getattr(output, "pooler_output", output)
    figures: dict[str, Any] = {
        "block_inputs": list(block_inputs),  # before a backward whose recomputation could call the blocks again
        "saved_bytes": sum(saved.values()),
        "saved_bytes_by_dtype": saved,
        "output_dtype": str(output.dtype).removeprefix("torch."),
    }
    if device == "cuda":  # the tower's forward and backward, as one step of a trainable tower has them
        output.float().sum().backward()
        torch.cuda.synchronize()
        figures["peak_bytes_above_start"] = torch.cuda.max_memory_allocated() - start
    return figures


def benchmark_autocast_4bit(workspace: Workspace, settings: Settings) -> dict[str, Any]:
    """Part 7: what a vision tower recorded by autograd keeps for backward under bf16 autocast, with bf16 LoRA and
    with 4-bit QLoRA, loaded by bitsandbytes alone and by `load_model` (`keep_4bit_outputs_in_autocast_dtype`)."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlm_recipes.configs import VLMModelConfig
    from vlm_recipes.models.loading import load_model
    from vlm_recipes.models.quantization import quantization_config_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    blocks = settings.autocast_vision_blocks
    if settings.quick:  # the tiny Qwen2-VL with more than one block: float32 shows from the second block's input on
        tiny = workspace.tiny_model("qwen2_vl")
        processor, config = processor_with_pad_token(tiny), AutoConfig.from_pretrained(tiny)
        config.vision_config.depth = blocks
        model_name = f"tiny Qwen2-VL, {blocks} vision blocks"
    else:
        processor, _ = qwen2_vl_processor(workspace, **qwen_pixel_budget())
        config = qwen2_vl_2b_config_cut(1, blocks)
        align_config_to_processor(config, processor)
        model_name = f"Qwen2-VL-2B's vision tower, {blocks} of its 32 blocks"
    model_dir = workspace.random_model(
        f"qwen2_vl-autocast-{'tiny' if settings.quick else '2b'}-{blocks}-blocks", config
    )
    pixels = np.random.default_rng(0).integers(0, 256, (*settings.autocast_image_size, 3), dtype=np.uint8)
    image = processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    pixel_values = image["pixel_values"].to(device, torch.bfloat16)
    grid = image["image_grid_thw"].to(device)
    results: dict[str, Any] = {}
    for mode, label in AUTOCAST_MODES.items():
        model_args = VLMModelConfig(
            model_name_or_path=str(model_dir), dtype="bfloat16", use_peft=True, load_in_4bit=mode != "bf16_lora"
        )
        if mode == "qlora_bitsandbytes":
            model = AutoModelForImageTextToText.from_pretrained(
                model_dir,
                dtype=torch.bfloat16,
                quantization_config=quantization_config_for(model_args),
                device_map={"": torch.cuda.current_device()} if device == "cuda" else None,
            )
        else:
            model = load_model(model_args)
        if mode == "bf16_lora":
            model.to(device)
        results[mode] = {"label": label, **_recorded_tower_figures(model, pixel_values, grid, device)}
        print(f"[benchmark] part 7: {mode}: {json.dumps(results[mode])}", file=sys.stderr, flush=True)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    lora = results["bf16_lora"]["saved_bytes"]
    return {
        **results,
        "model": model_name,
        "device": device,
        "layer_norm_policy": "CUDA's own" if device == "cuda" else "CUDA's (float32), emulated on CPU",
        "vision_blocks": len(results["bf16_lora"]["block_inputs"]),
        "image_patches": int(grid.prod(dim=-1).sum()),
        "ratio_saved_qlora_bitsandbytes_to_lora": results["qlora_bitsandbytes"]["saved_bytes"] / lora,
        "ratio_saved_qlora_ours_to_lora": results["qlora_ours"]["saved_bytes"] / lora,
        "definitions": {
            "saved_bytes": "activations autograd keeps for backward during the tower's forward under bf16 autocast "
            "(torch.autograd.graph.saved_tensors_hooks, weights and buffers left out), every weight frozen, with "
            "transformers' enable_input_require_grads and non-reentrant gradient checkpointing: a frozen tower "
            "recorded by autograd, as before detach_frozen_vision_inputs (LoRA on the tower keeps this and more)",
            "block_inputs": "the hidden states entering each vision block, in order: what checkpointing keeps per "
            "block",
        },
    }


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch

    from vlm_recipes.reporting import hardware_info, package_versions

    cpu_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_name,
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        **hardware_info(),
        "versions": package_versions(),
    }


def _ratio_check(paired: dict[str, Any], measured: str) -> dict[str, Any]:
    """A timing target "ours / TRL >= 1.0" from `paired_ratios`: passed only on a `met` verdict."""
    verdict = ratio_verdict(paired)
    return {
        "value": paired["median"],
        "threshold": ">= 1.0",
        "passed": verdict == "met",
        "interval_90": paired.get("median_interval_90"),
        "verdict": verdict,
        "measured": measured,
    }


def target_checks(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with its figure, threshold and pass/fail (absent where its part did not run).

    The timing ratios also get their median's 90% interval and a verdict (`ratio_verdict`); they pass only when
    the verdict is `met`, not when the median alone clears the threshold."""
    checks: dict[str, Any] = {}
    if "collator" in results:
        checks["collator_at_least_as_fast_as_trl"] = _ratio_check(
            results["collator"]["paired_ratio_ours_to_trl"],
            "median over repeats of ours / TRL examples/s, timed side by side in each repeat",
        )
    if "training" in results:
        checks["training_throughput_at_least_trl"] = _ratio_check(
            results["training"]["paired_ratio_samples_per_second"],
            "median over repeats of ours / TRL samples/s, taking turns step by step in each repeat",
        )
    if "padding" in results:
        value = results["padding"]["max_padding_fraction_grouped"]
        checks["padding_under_10_percent_with_grouping"] = {
            "value": value,
            "threshold": "< 0.10",
            "passed": value < 0.1,
        }
    full_size = results.get("full_size", {})
    both = [
        size
        for size in full_size.get("lora", {})
        if "peak_memory_gib" in full_size["lora"][size] and "peak_memory_gib" in full_size["qlora"].get(size, {})
    ]
    if both:  # the GPU figure is the one that matters: take the largest batch size both modes ran
        size = max(both, key=int)
        ratio = full_size["qlora"][size]["peak_memory_gib"] / full_size["lora"][size]["peak_memory_gib"]
        checks["qlora_peak_memory_well_under_lora"] = {
            "value": ratio,
            "threshold": "<= 0.75",
            "passed": ratio <= 0.75,
            "measured": f"part 5, CUDA max_memory_allocated, batch size {size}",
        }
    elif "memory" in results:
        ratio = results["memory"]["ratio_qlora_to_lora_peak"]
        checks["qlora_peak_memory_well_under_lora"] = {
            "value": ratio,
            "threshold": "<= 0.75",
            "passed": ratio <= 0.75,
            "measured": "part 4, CPU resident memory during training",
            "note": "On a CPU, bitsandbytes dequantises the 4-bit weights for every matmul, so resident memory shows "
            "less than the weights' own saving (ratio_qlora_to_lora_weights). Run with --gpu for the GPU figure.",
        }
    return checks


def _paired(ratios: dict[str, Any]) -> str:
    return f"{ratios['median']:.2f} ({ratios['min']:.2f}-{ratios['max']:.2f})"


def format_table(report: dict[str, Any]) -> str:
    results = report["results"]
    lines = []

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<58} {value}")

    if "collator" in results:
        part = results["collator"]
        lines.append(f"1. Collator throughput ({part['processor']}; batch {part['batch_size']}, one thread)")
        row("ours, examples/s", f"{part['ours_examples_per_second']:.1f}")
        row("TRL DataCollatorForVisionLanguageModeling, examples/s", f"{part['trl_examples_per_second']:.1f}")
        row(
            "TRL, assistant_only_loss (the same work as ours), examples/s",
            f"{part['trl_assistant_only_examples_per_second']:.1f}",
        )
        row("ratio ours / TRL, paired repeats: median (range)", _paired(part["paired_ratio_ours_to_trl"]))
        row("ratio ours / TRL assistant-only, paired", _paired(part["paired_ratio_ours_to_trl_assistant_only"]))
        row(
            "ratio of the medians: ours / TRL; ours / TRL assistant-only",
            f"{part['ratio_ours_to_trl']:.2f}; {part['ratio_ours_to_trl_assistant_only']:.2f}",
        )
    if "training" in results:
        part = results["training"]
        lines.append(
            f"2. Training throughput (tiny Qwen2-VL, batch {part['batch_size']}, {part['timed_steps']} steps)"
        )
        for name, label in (
            ("ours", "scripts/sft.py path"),
            ("ours_random_sampler", "scripts/sft.py path, random sampler"),
            ("trl", "stock TRL SFTTrainer"),
        ):
            figures = part[name]
            row(
                f"{label} ({figures['train_sampling_strategy']})",
                f"{figures['samples_per_second']:.1f} samples/s, {figures['tokens_per_second']:.0f} tokens/s, "
                f"padding {figures['padding_fraction']:.1%}",
            )
        row(
            "ratio ours / TRL samples/s, paired repeats: median (range)",
            _paired(part["paired_ratio_samples_per_second"]),
        )
        row(
            "same, ours with random sampler",
            _paired(part["paired_ratio_samples_per_second_random_sampler"]),
        )
        row(
            "ratio of the medians (samples/s; tokens/s)",
            f"{part['ratio_samples_per_second']:.2f}; {part['ratio_tokens_per_second']:.2f}",
        )
        row(
            "ratio of the best runs (ours; ours with random sampler)",
            f"{part['ratio_best_samples_per_second']:.2f}; {part['ratio_best_samples_per_second_random_sampler']:.2f}",
        )
    if "padding" in results:
        part = results["padding"]
        lines.append("3. Padding / supervised tokens per epoch (random -> grouped by length)")
        for name, figures in part["recipes"].items():
            random_, grouped = figures["random"], figures["group_by_length"]
            row(
                f"{name} ({figures['samples']} samples, batch {figures['batch_size']})",
                f"padding {random_['padding_fraction']:.1%} -> {grouped['padding_fraction']:.1%}; supervised "
                f"{random_['supervised_fraction_of_positions']:.1%} -> "
                f"{grouped['supervised_fraction_of_positions']:.1%} of positions",
            )
    if "memory" in results:
        part = results["memory"]
        lines.append(f"4. Peak memory ({part['model']})")
        for name in ("bf16_lora", "qlora_4bit"):
            figures = part[name]
            row(
                name,
                f"peak {figures['peak_gib_above_start']:.2f} GiB ({figures['kind']}), weights "
                f"{figures['weights_bytes'] / 2**20:.0f} MiB",
            )
        row(
            "ratio QLoRA / LoRA (peak; weights)",
            f"{part['ratio_qlora_to_lora_peak']:.2f}; {part['ratio_qlora_to_lora_weights']:.2f}",
        )
    if "full_size" in results:
        part = results["full_size"]
        lines.append(f"5. Qwen2-VL-2B, random weights, {part['device']} (recipe {part['recipe']})")
        for mode in ("lora", "qlora"):
            for batch_size, figures in part[mode].items():
                if figures.get("out_of_memory"):
                    row(f"{mode} batch {batch_size}", "out of memory")
                    continue
                text = (
                    f"{figures['samples_per_second']:.2f} samples/s, {figures['tokens_per_second']:.0f} tokens/s "
                    f"({figures['tokens_per_sample']:.0f}/sample)"
                )
                if figures.get("peak_memory_gib") is not None:
                    text += f", peak {figures['peak_memory_gib']:.1f} GiB"
                if figures.get("mfu") is not None:
                    text += f", MFU {figures['mfu']:.1%}"
                row(f"{mode} batch {batch_size}", text)
    if "frozen_vision" in results:
        part = results["frozen_vision"]
        lines.append(f"6. Frozen vision tower, one LoRA step ({part['model']}, {part['recorded']['device']})")
        for mode in VISION_MODES:
            figures = part[mode]
            row(
                f"{mode} ({figures['image_patches']} patches, {figures['tokens']} tokens)",
                f"{figures['median_step_seconds']:.1f} s/step, peak {figures['peak_bytes_above_start'] / 2**20:.0f} MiB "
                "above start",
            )
        row(
            "detached: speed-up; peak / recorded peak",
            f"{part['speedup_detached']:.2f}x; {part['ratio_peak_detached_to_recorded']:.2f}",
        )
    if "autocast_4bit" in results:
        part = results["autocast_4bit"]
        lines.append(
            f"7. 4-bit linears under bf16 autocast, vision tower recorded ({part['model']}, {part['image_patches']} "
            f"patches, {part['device']}; layer_norm: {part['layer_norm_policy']})"
        )
        for mode, label in AUTOCAST_MODES.items():
            figures = part[mode]
            kinds = [(block["dtype"], block["bytes"]) for block in figures["block_inputs"]]
            blocks = ", ".join(
                f"{kinds.count(kind)} {kind[0]} {kind[1] / 2**20:.2f} MiB" for kind in dict.fromkeys(kinds)
            )
            by_dtype = ", ".join(
                f"{dtype} {size / 2**20:.1f}" for dtype, size in figures["saved_bytes_by_dtype"].items()
            )
            row(
                label,
                f"block inputs: {blocks}; kept for backward {figures['saved_bytes'] / 2**20:.1f} MiB ({by_dtype})",
            )
        row(
            "kept for backward, QLoRA / LoRA: bitsandbytes alone; load_model",
            f"{part['ratio_saved_qlora_bitsandbytes_to_lora']:.2f}; {part['ratio_saved_qlora_ours_to_lora']:.2f}",
        )
    lines.append("Targets")
    for name, check in report["targets"].items():
        verdict = "PASS" if check["passed"] else "FAIL"
        figure = f"{check['value']:.3f}"
        if "verdict" in check:  # a ratio of timings: the verdict weighs the repeats' spread
            verdict = check["verdict"].upper()
            if check["interval_90"]:
                figure += f", 90% interval {check['interval_90'][0]:.2f}-{check['interval_90'][1]:.2f}"
        row(name, f"{verdict} ({figure}, target {check['threshold']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmark.json", help="JSON file for every figure (written atomically).")
    parser.add_argument("--quick", action="store_true", help="Smallest sizes everywhere (for tests; noisy figures).")
    parser.add_argument("--gpu", action="store_true", help="Also run part 5 (full-size Qwen2-VL-2B) on CUDA.")
    parser.add_argument(
        "--parts",
        default=None,
        help="Comma-separated parts to run (default 1,2,3,4; 5 and 7 with --gpu; 6, 7 on request).",
    )
    parser.add_argument("--steps", type=int, default=None, help="Timed training steps of part 2.")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed warm-up steps before them.")
    parser.add_argument("--repeats", type=int, default=None, help="Repeats of part 2 (median reported).")
    parser.add_argument("--collator_repeats", type=int, default=None, help="Repeats of part 1 (median reported).")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads for parts 1-4 (default 1).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Peak bf16 TFLOP/s of the GPU, for MFU.")
    parser.add_argument("--workdir", default=None, help="Keep tiny models and data here (default: a temp dir).")
    parser.add_argument("--memory_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vision_worker", default=None, help=argparse.SUPPRESS)
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
    for key in ("steps", "warmup", "repeats", "collator_repeats", "peak_tflops", "threads"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    if settings.warmup < 1:
        parser.error("--warmup must be at least 1 (the clock starts at the end of the last warm-up step)")
    return args, settings


def main(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from vlm_recipes.files import write_text_atomically

    if 5 in settings.parts:
        require_cuda()  # before anything is built
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlm-benchmark-"))
    workspace = Workspace(workdir)
    started = time.perf_counter()
    report: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(), "results": {}}
    parts = {
        1: ("collator", benchmark_collators),
        2: ("training", benchmark_training),
        3: ("padding", benchmark_padding),
        4: ("memory", benchmark_memory),
        5: ("full_size", benchmark_full_size),
        6: ("frozen_vision", benchmark_frozen_vision),
        7: ("autocast_4bit", benchmark_autocast_4bit),
    }
    try:
        for number in settings.parts:
            name, run = parts[number]
            print(f"[benchmark] part {number}: {name} ...", file=sys.stderr, flush=True)
            part_started = time.perf_counter()
            with torch_threads(settings.threads) if number != 5 else contextlib.nullcontext():
                report["results"][name] = run(workspace, settings)
            report["results"][name]["wall_seconds"] = time.perf_counter() - part_started
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["targets"] = target_checks(report["results"])
    report["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_seconds"] = time.perf_counter() - started
    report["command"] = " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]])
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output, json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(report))
    print(f"written: {output} ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    cli_args, cli_settings = parse_args()
    if cli_args.memory_worker:
        memory_worker(cli_args.memory_worker)
    elif cli_args.vision_worker:
        vision_worker(cli_args.vision_worker)
    else:
        main(cli_args, cli_settings)
