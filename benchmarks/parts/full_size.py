"""Part 5 (`--gpu`): the full-size Qwen2-VL-2B architecture from its config, random weights (no download), trained
through `scripts/sft.py` with the Qwen2-VL recipe's training keys (pixel budget, gradient checkpointing, bf16), LoRA
and 4-bit QLoRA at batch sizes 1, 2, 4, 8 on 1280x720 screenshots: tokens/s, samples/s, peak GPU memory and model
FLOPs utilisation, MFU = (6 x language-model parameters x tokens + f x vision-tower parameters x image patches) per
second over the GPU's peak dense bf16 FLOP/s (`PEAK_BF16_TFLOPS`, or `--peak_tflops`); f = 2 for a frozen vision
tower, which runs forward only (`detach_frozen_vision_inputs`), else 6. The factor 6 is the usual forward + backward
count per parameter and token (Kaplan et al. 2020; PaLM's MFU); it leaves out attention's sequence-length term (~4%
here), the recomputation of gradient checkpointing, and counts LoRA's frozen weights as if they had weight gradients,
as MFU does.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from ..harness import StepRecorder, record_steps
from ..qwen2_vl import (
    QWEN_RECIPE,
    align_config_to_processor,
    qwen2_vl_2b_config,
    qwen2_vl_processor,
    qwen_pixel_budget,
)
from ..settings import REPO_ROOT, Settings
from ..workspace import Workspace

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


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "--gpu needs a CUDA GPU (torch.cuda.is_available() is False here). Run parts 1-4 without --gpu on this "
            "machine, and `python scripts/benchmark.py --gpu` on a machine with an NVIDIA GPU."
        )


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
                    main(*parse_recipe(arguments), on_trainer=partial(record_steps, recorders, vision_patches=True))
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
