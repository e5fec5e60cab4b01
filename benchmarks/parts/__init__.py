"""The benchmark's parts, one module each, by the number `--parts` takes: the report's key for it and the function
that measures it (`function(workspace, settings)` returns the part's figures)."""

from .autocast_4bit import benchmark_autocast_4bit
from .collator import benchmark_collators
from .data_loading import benchmark_data_loading
from .frozen_vision import benchmark_frozen_vision
from .full_size import benchmark_full_size
from .memory import benchmark_memory
from .padding import benchmark_padding
from .training import benchmark_training

PARTS = {
    1: ("collator", benchmark_collators),
    2: ("training", benchmark_training),
    3: ("padding", benchmark_padding),
    4: ("memory", benchmark_memory),
    5: ("full_size", benchmark_full_size),
    6: ("frozen_vision", benchmark_frozen_vision),
    7: ("autocast_4bit", benchmark_autocast_4bit),
    8: ("data_loading", benchmark_data_loading),
}

__all__ = [
    "PARTS",
    "benchmark_autocast_4bit",
    "benchmark_collators",
    "benchmark_data_loading",
    "benchmark_frozen_vision",
    "benchmark_full_size",
    "benchmark_memory",
    "benchmark_padding",
    "benchmark_training",
]
