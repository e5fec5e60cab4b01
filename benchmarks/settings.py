"""What a benchmark run measures and at which sizes (`Settings`), and the repository paths it reads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_PROCESSORS = Path(os.environ.get("VLM_REAL_PROCESSORS", REPO_ROOT.parent / "shared" / "processors"))
DEMO_RECIPES = ("shapes_qwen2vl", "element", "chess", "ui_actions", "medical_steps")


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
    # Part 8: rows of the datasets read (the 10k, 50k and 200k; its targets are for the middle one)
    data_loading_rows: list[int] = field(default_factory=lambda: [10_000, 50_000, 200_000])
    # Each case at each size runs this many times, in turn (the median reported): one process's import phase alone
    # varied from 6 to 15 s on a shared 2-core machine.
    data_loading_repeats: int = 3

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
        self.data_loading_rows = [200, 500, 1000]
        self.data_loading_repeats = 1
