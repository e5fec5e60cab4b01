"""What tests and measurements on a CPU use to see what a GPU run would do: `cuda_layer_norm_policy` gives CPU
autocast CUDA's float32 `layer_norm` (the tests of 4-bit linears under autocast, and the benchmark's part 7)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def cuda_layer_norm_policy(device_type: str) -> Iterator[bool]:
    """On a CPU, give `layer_norm` CUDA's autocast policy: run and returned in float32 (PyTorch's autocast op reference
    lists `layer_norm` among CUDA's float32 ops; CPU autocast keeps bfloat16). Yields whether it emulates; on CUDA
    nothing is changed."""
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
