"""Part 6 (`--parts 6`, not in the default set: about 7 minutes on 2 cores): what a frozen vision tower costs when
autograd records it, as transformers' `enable_input_require_grads` has it do, against `VLMSFTTrainer`'s detached tower
(`detach_frozen_vision_inputs`). One LoRA step (forward + backward, non-reentrant gradient checkpointing, fp32) of
Qwen2-VL-2B's full vision tower and a one-layer language model on one 1280x720 screenshot at the recipe's pixel
budget, each mode in a fresh process (`--vision_worker`): seconds per step and resident memory above the start (CPU),
or `max_memory_allocated` (CUDA).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..qwen2_vl import (
    align_config_to_processor,
    processor_with_pad_token,
    qwen2_vl_2b_config_cut,
    qwen2_vl_processor,
    qwen_pixel_budget,
)
from ..settings import Settings
from ..workers import MEMORY_WORKER_MALLOC, current_rss, run_worker, status_bytes
from ..workspace import Workspace

VISION_MARKER = "BENCHMARK_VISION "
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
        return current_rss()

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
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else status_bytes("VmHWM")
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
