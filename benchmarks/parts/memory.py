"""Part 4, peak memory of `scripts/sft.py` training a random Qwen2-VL of a few hundred MB with bf16 LoRA against
4-bit QLoRA, each in a fresh process (`--memory_worker`): on CPU the resident memory sampled while `trainer.train()`
runs, above the process's footprint before `main()`; on CUDA `max_memory_allocated`. The weights' own bytes are
reported beside it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import sys
from pathlib import Path
from typing import Any

from ..settings import Settings
from ..workers import MEMORY_WORKER_MALLOC, current_rss, rss_parts, run_worker
from ..workspace import Workspace

MEMORY_MARKER = "BENCHMARK_MEMORY "


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
            training_start[0] = current_rss()
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    parts = rss_parts()
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

    start = current_rss()
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
