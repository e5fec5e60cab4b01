"""The report: the machine it ran on, the issue's targets checked against the figures, and the printed table."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

from .parts.autocast_4bit import AUTOCAST_MODES
from .parts.data_loading import CASE_LABELS, DATA_LOADING_TARGETS
from .parts.frozen_vision import VISION_MODES
from .stats import ratio_verdict


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
    if "data_loading" in results:
        checks.update(data_loading_checks(results["data_loading"]))
    return checks


def data_loading_checks(part: dict[str, Any]) -> dict[str, Any]:
    """Part 8's targets: seconds to the first step at 50,000 rows (the middle size where that was not run), and our
    cases' growth of peak resident memory from the smallest size to the largest."""
    rows = [str(size) for size in part["rows"]]
    middle = "50000" if "50000" in rows else rows[len(rows) // 2]
    checks: dict[str, Any] = {}
    for case, limit in DATA_LOADING_TARGETS.items():
        seconds = part[case][middle]["seconds_to_first_step"]
        checks[f"data_loading_{case}_to_first_step_within_{limit:.0f}_s"] = {
            "value": seconds,
            "threshold": f"<= {limit:.0f}",
            "passed": seconds <= limit,
            "measured": f"part 8, {middle} rows, seconds from process start to the end of the first optimizer step",
        }
    ours = [case for case in CASE_LABELS if case.startswith("ours")]
    growth = part["memory_growth"]
    largest = max(ours, key=lambda case: growth[case]["peak_rss_bytes"])
    value = growth[largest]["peak_rss_bytes"] / 1e6
    checks["data_loading_memory_growth_under_300_mb"] = {
        "value": value,
        "threshold": "< 300",
        "passed": value < 300,
        "measured": f"part 8, peak resident memory (VmHWM) at {rows[-1]} rows minus at {rows[0]} rows, MB, the "
        f"largest of our three cases ({largest}); anonymous memory's growth: "
        + ", ".join(f"{case} {growth[case]['peak_anonymous_bytes'] / 1e6:.0f} MB" for case in ours),
    }
    return checks


def _rows_label(rows: str) -> str:
    return f"{int(rows) // 1000}k" if int(rows) % 1000 == 0 else rows


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
    if "data_loading" in results:
        part = results["data_loading"]
        lines.append(
            f"8. Data loading at scale, to the first step ({part['model']}, batch {part['batch_size']}; "
            "peak RSS, anonymous in brackets)"
        )
        for case, label in CASE_LABELS.items():
            figures = "; ".join(
                f"{_rows_label(rows)}: {run['seconds_to_first_step']:.1f} s, {run['peak_rss_bytes'] / 1e6:.0f} "
                f"({run['peak_anonymous_bytes'] / 1e6:.0f}) MB"
                for rows, run in part[case].items()
            )
            row(label, figures)
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
