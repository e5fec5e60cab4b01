"""Part 7 (`--parts 7`, 2-4 minutes on 2 cores; in the `--gpu` set): what a vision tower recorded by autograd (LoRA
on the tower, or no `detach_frozen_vision_inputs`) keeps for backward under bf16 autocast, with bf16 LoRA and with
4-bit QLoRA loaded by bitsandbytes alone and by `load_model`, whose 4-bit linears return autocast's dtype
(`keep_4bit_outputs_in_autocast_dtype`). Qwen2-VL-2B's vision tower cut to 4 blocks, one 1280x720 screenshot at the
recipe's pixel budget: the dtype and size of each block's input (what checkpointing keeps) and every activation saved
for backward. CUDA's autocast runs `layer_norm` in float32; CPU's does not, so on a CPU that policy is emulated
(`vlm_recipes.testing.cuda_layer_norm_policy`). On CUDA it also reports the peak memory of the tower's forward and
backward.
"""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

from ..qwen2_vl import (
    align_config_to_processor,
    processor_with_pad_token,
    qwen2_vl_2b_config_cut,
    qwen2_vl_processor,
    qwen_pixel_budget,
)
from ..settings import Settings
from ..workspace import Workspace

AUTOCAST_MODES = {
    "bf16_lora": "bf16 LoRA",
    "qlora_bitsandbytes": "QLoRA, bitsandbytes alone",
    "qlora_ours": "QLoRA, load_model",
}


def _recorded_tower_figures(model, pixel_values, grid, device: str) -> dict[str, Any]:
    """Part 7, one model: its vision tower's forward under bf16 autocast, recorded by autograd (see the docstring)."""
    import torch

    from vlm_recipes.testing import cuda_layer_norm_policy

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
