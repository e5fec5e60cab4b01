"""The benchmark (`benchmarks/`, run as `python -m benchmarks` or `scripts/benchmark.py`): it runs with the smallest
settings and writes a complete report; its FLOPs inputs and target checks are right. Timings are asserted positive
only (they are figures, not tests)."""

import json
import re
import sys
import threading
import time

import pytest
import torch

from benchmarks.harness import StepRecorder, take_turns
from benchmarks.parts import data_loading
from benchmarks.parts.autocast_4bit import benchmark_autocast_4bit
from benchmarks.parts.full_size import benchmark_full_size, parameter_counts, peak_bf16_flops
from benchmarks.qwen2_vl import qwen2_vl_2b_config
from benchmarks.report import data_loading_checks, format_table, target_checks
from benchmarks.settings import Settings
from benchmarks.stats import median_interval, paired_ratios, ratio_verdict
from benchmarks.workspace import Workspace

from conftest import REPO_ROOT, run_script


@pytest.mark.slow
def test_quick_run_writes_every_figure(tmp_path):
    output = tmp_path / "report" / "benchmark.json"
    result = run_script(["scripts/benchmark.py", "--quick", "--output", str(output)], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert not list(output.parent.glob(".*.tmp"))  # written atomically: no temporary left behind
    results = report["results"]

    collator = results["collator"]
    for key in ("ours_examples_per_second", "trl_examples_per_second", "trl_assistant_only_examples_per_second"):
        assert collator[key] > 0
    assert collator["ratio_ours_to_trl"] == pytest.approx(
        collator["ours_examples_per_second"] / collator["trl_examples_per_second"]
    )
    paired = collator["paired_ratio_ours_to_trl"]
    runs = collator["runs_examples_per_second"]
    assert paired["per_repeat"] == pytest.approx([a / b for a, b in zip(runs["ours"], runs["trl"])])
    assert paired["min"] <= paired["median"] <= paired["max"]
    assert report["targets"]["collator_at_least_as_fast_as_trl"]["value"] == paired["median"]

    training = results["training"]
    for name in ("ours", "trl", "ours_random_sampler"):
        assert training[name]["samples_per_second"] > 0 and training[name]["tokens_per_second"] > 0
        assert 0 <= training[name]["padding_fraction"] < 1
    assert training["ours"]["train_sampling_strategy"] == "group_by_length"  # scripts/sft.py's default
    assert training["trl"]["train_sampling_strategy"] == "random"
    per_repeat = [
        ours["samples_per_second"] / trl["samples_per_second"]
        for ours, trl in zip(training["runs"]["ours"], training["runs"]["trl"])
    ]
    assert training["paired_ratio_samples_per_second"]["per_repeat"] == pytest.approx(per_repeat)
    # Every run took turns at each of its steps (warm-up included).
    steps = report["settings"]["warmup"] + report["settings"]["steps"]
    assert all(run["hand_overs"] == steps for runs in training["runs"].values() for run in runs)
    best = {name: max(run["samples_per_second"] for run in training["runs"][name]) for name in training["runs"]}
    assert training["ratio_best_samples_per_second"] == pytest.approx(best["ours"] / best["trl"])
    assert training["ratio_best_samples_per_second_random_sampler"] == pytest.approx(
        best["ours_random_sampler"] / best["trl"]
    )

    padding = results["padding"]["recipes"]["shapes_qwen2vl"]
    assert padding["cheap_lengths_equal_collated"] is True
    for strategy in ("random", "group_by_length"):
        assert 0 <= padding[strategy]["padding_fraction"] < 1
        assert 0 < padding[strategy]["supervised_fraction_of_positions"] <= 1

    memory = results["memory"]
    for name in ("bf16_lora", "qlora_4bit"):
        assert memory[name]["peak_bytes_above_start"] > 0
    assert memory["qlora_4bit"]["weights_bytes"] < 0.5 * memory["bf16_lora"]["weights_bytes"]  # 4-bit weights

    assert set(report["targets"]) == {
        "collator_at_least_as_fast_as_trl",
        "training_throughput_at_least_trl",
        "padding_under_10_percent_with_grouping",
        "qlora_peak_memory_well_under_lora",
    }
    assert all(isinstance(check["passed"], bool) for check in report["targets"].values())
    for name in ("collator_at_least_as_fast_as_trl", "training_throughput_at_least_trl"):
        assert report["targets"][name]["verdict"] in ("met", "not met", "within noise")
    assert report["machine"]["versions"]["trl"] and report["machine"]["usable_cpus"] >= 1
    assert report["settings"]["quick"] is True
    assert "Targets" in result.stdout and "ratio ours / TRL" in result.stdout
    assert report["command"] == f"python scripts/benchmark.py --quick --output {output}"


@pytest.mark.slow
def test_frozen_vision_part_runs_both_modes_in_fresh_processes(tmp_path):
    """Part 6 (on request only): the recorded and the detached tower, each in its own worker, on the same input. The
    detached worker stops if `detach_frozen_vision_inputs` finds nothing to detach, so exit 0 means it did detach."""
    output = tmp_path / "benchmark.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--parts", "6", "--output", str(output)]
    result = run_script(command, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    part = json.loads(output.read_text())["results"]["frozen_vision"]
    recorded, detached = part["recorded"], part["detached"]
    assert (recorded["mode"], detached["mode"]) == ("recorded", "detached")
    assert recorded["image_patches"] == detached["image_patches"] > 0
    assert recorded["tokens"] == detached["tokens"] > 0
    for figures in (recorded, detached):
        assert len(figures["step_seconds"]) == 1 and figures["median_step_seconds"] > 0
        assert figures["peak_bytes_above_start"] > 0
    assert part["speedup_detached"] == pytest.approx(recorded["median_step_seconds"] / detached["median_step_seconds"])
    assert "6. Frozen vision tower" in result.stdout


def test_autocast_part_shows_the_float32_tower_and_its_fix(tmp_path):
    """Part 7 on the tiny Qwen2-VL (two vision blocks), CUDA's layer_norm policy emulated on CPU: bitsandbytes alone
    hands float32 from the first block on; `load_model`'s 4-bit linears keep bf16, as bf16 LoRA does."""
    settings = Settings()
    settings.shrink()
    report = benchmark_autocast_4bit(Workspace(tmp_path), settings)
    assert report["layer_norm_policy"] == "CUDA's (float32), emulated on CPU"
    assert report["vision_blocks"] == 2 and report["image_patches"] == 16
    lora, alone, ours = report["bf16_lora"], report["qlora_bitsandbytes"], report["qlora_ours"]
    size = lora["block_inputs"][0]["bytes"]
    assert lora["block_inputs"] == ours["block_inputs"] == [{"dtype": "bfloat16", "bytes": size}] * 2
    # the patch embedding's bf16 into the first block, float32 from its MLP on
    assert alone["block_inputs"] == [{"dtype": "bfloat16", "bytes": size}, {"dtype": "float32", "bytes": 2 * size}]
    assert (lora["output_dtype"], alone["output_dtype"], ours["output_dtype"]) == ("bfloat16", "float32", "bfloat16")
    assert ours["saved_bytes_by_dtype"] == lora["saved_bytes_by_dtype"]  # what bf16 LoRA keeps, in its dtypes
    assert alone["saved_bytes"] > ours["saved_bytes"]
    assert report["ratio_saved_qlora_ours_to_lora"] == 1.0
    assert "7. 4-bit linears under bf16 autocast" in format_table(
        {"results": {"autocast_4bit": report}, "targets": {}}
    )


@pytest.mark.slow
def test_data_loading_part_runs_every_case_in_fresh_processes(tmp_path):
    """Part 8 (on request only) at two tiny sizes: each case reaches its first optimizer step in its own process, the
    map-style cases with a `Dataset`, the streamed one with an `IterableDataset`, and the phases come in order."""
    output = tmp_path / "benchmark.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--parts", "8", "--data_loading_rows", "20,40"]
    result = run_script([*command, "--workdir", str(tmp_path / "work"), "--output", str(output)], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    part = report["results"]["data_loading"]
    assert part["rows"] == [20, 40]
    assert part["datasets"]["40"]["shards"] == 1 and part["datasets"]["40"]["parquet_bytes"] > 0
    for case in data_loading.CASES:
        for rows in ("20", "40"):
            run = part[case][rows]
            assert (run["case"], run["rows"]) == (case, int(rows))
            assert 0 < run["seconds_to_first_step"] <= run["process_seconds"]
            assert run["peak_rss_bytes"] >= run["peak_anonymous_bytes"] > 0
            assert run["peak_rss_before_training_bytes"] <= run["peak_rss_bytes"]
            assert len(run["runs"]) == 1 and run["seconds_range"] == [run["seconds_to_first_step"]] * 2
            assert run["train_dataset"] == ("IterableDataset" if case == "ours_streaming" else "Dataset")
            ends = list(run["phase_ends"].values())
            assert ends == sorted(ends) and ends[-1] == run["seconds_to_first_step"]
    # The second run read the first run's cache: a cache of each size was written, and removed after its size.
    assert part["datasets"]["40"]["cache_bytes"]["ours"] > 0 and part["datasets"]["40"]["cache_bytes"]["trl"] > 0
    assert not (tmp_path / "work" / "cache" / "data_loading" / "rows-40").exists()
    assert set(report["targets"]) == set(data_loading_checks(part))
    assert "8. Data loading at scale" in result.stdout


class TestDataLoadingData:
    def test_shards_in_hub_layout_with_mixed_image_sizes(self, tmp_path, monkeypatch):
        import datasets

        monkeypatch.setattr(data_loading, "ROWS_PER_SHARD", 10)
        monkeypatch.setattr(data_loading, "ROWS_PER_WRITE", 4)
        path = tmp_path / "rows-25"
        data_loading.write_dataset(path, 25)
        assert sorted(file.name for file in (path / "data").iterdir()) == [
            f"train-0000{shard}-of-00003.parquet" for shard in range(3)
        ]
        assert [file.name for file in tmp_path.iterdir()] == ["rows-25"]  # no scratch folder left
        loaded = datasets.load_dataset(str(path), cache_dir=str(tmp_path / "cache"))
        train = loaded["train"]
        assert list(loaded) == ["train"] and len(train) == 25
        assert train.features == data_loading.dataset_features()
        row = train[17]
        assert row["messages"][0]["content"][0] == {"type": "image", "text": None}
        assert row["messages"][0]["content"][1]["text"].startswith("Sample 17. What colour")
        assert row["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "green"}]}
        sizes = [tuple(image.size for image in images) for images in train.select(range(16))["images"]]
        assert sizes == [(size,) for size in data_loading.IMAGE_SIZES]

    def test_targets_use_50k_rows_and_our_largest_growth(self):
        def run(seconds, peak, anonymous):
            return {"seconds_to_first_step": seconds, "peak_rss_bytes": peak, "peak_anonymous_bytes": anonymous}

        part = {"rows": [10_000, 50_000, 200_000], "memory_growth": {}}
        for case, (seconds, growth) in {
            "ours_first": (59.0, 100e6),
            "ours_cached": (12.0, 350e6),
            "ours_streaming": (20.0, 10e6),
            "trl": (5.0, 900e6),  # TRL's growth is not ours: no target
        }.items():
            part[case] = {"10000": run(1.0, 1e9, 5e8), "50000": run(seconds, 1e9, 5e8), "200000": run(1.0, 1e9, 5e8)}
            part["memory_growth"][case] = {"peak_rss_bytes": growth, "peak_anonymous_bytes": growth / 2}
        checks = data_loading_checks(part)
        assert {name: check["passed"] for name, check in checks.items()} == {
            "data_loading_ours_first_to_first_step_within_60_s": True,
            "data_loading_ours_cached_to_first_step_within_10_s": False,
            "data_loading_ours_streaming_to_first_step_within_30_s": True,
            "data_loading_memory_growth_under_300_mb": False,
        }
        assert checks["data_loading_memory_growth_under_300_mb"]["value"] == pytest.approx(350)
        assert "(ours_cached)" in checks["data_loading_memory_growth_under_300_mb"]["measured"]
        assert "8. Data loading at scale" in format_table(
            {"results": {"data_loading": {**part, "model": "tiny", "batch_size": 2}}, "targets": checks}
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_gpu_part_says_it_needs_a_gpu(tmp_path):
    script = REPO_ROOT / "scripts" / "benchmark.py"
    result = run_script([script, "--gpu", "--output", str(tmp_path / "b.json")], cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "--gpu needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "b.json").exists()


def test_both_commands_take_the_same_flags(tmp_path):
    """`python -m benchmarks` from the repository root, and `scripts/benchmark.py` from any directory."""
    as_module = run_script([sys.executable, "-m", "benchmarks", "--help"], timeout=120)
    as_script = run_script([REPO_ROOT / "scripts" / "benchmark.py", "--help"], cwd=tmp_path, timeout=120)
    assert as_module.returncode == 0, as_module.stderr[-4000:]
    assert as_script.returncode == 0, as_script.stderr[-4000:]
    assert as_module.stdout.startswith("usage: python -m benchmarks ")
    assert as_script.stdout.startswith("usage: python scripts/benchmark.py ")
    flags = set(re.findall(r"--\w+", as_script.stdout))
    assert flags == set(re.findall(r"--\w+", as_module.stdout))
    assert {"--output", "--quick", "--gpu", "--parts", "--steps", "--warmup", "--repeats", "--workdir"} <= flags


@pytest.mark.slow
def test_full_size_path_runs_on_cpu_with_a_small_config(tmp_path, tiny_model_dirs):
    """Part 5's code path (random model saved and reloaded, LoRA and 4-bit QLoRA through scripts/sft.py, MFU inputs)
    with a tiny config on CPU: what the GPU run does, short of CUDA."""
    from transformers import AutoConfig

    settings = Settings()
    settings.shrink()
    settings.gpu_batch_sizes, settings.gpu_warmup, settings.gpu_steps = [2], 1, 1
    settings.gpu_samples, settings.gpu_image_size = 4, [56, 84]
    workspace = Workspace(tmp_path)
    config = AutoConfig.from_pretrained(tiny_model_dirs["qwen2_vl"])
    report = benchmark_full_size(workspace, settings, device="cpu", config=config)
    for mode in ("lora", "qlora"):
        figures = report[mode]["2"]
        assert figures["samples_per_second"] > 0 and figures["tokens_per_second"] > 0
        assert figures["patches_per_second"] > 0  # the vision tower's input counted for the FLOPs
        # The recipe trains LoRA on the language model only: the frozen vision tower runs forward only (factor 2).
        assert figures["vision_flops_factor"] == 2
        expected = (
            6 * report["parameters"]["language_model_compute"] * figures["tokens_per_second"]
            + 2 * report["parameters"]["vision_tower"] * figures["patches_per_second"]
        )
        assert figures["model_flops_per_second"] == pytest.approx(expected)
    assert report["lora"]["2"]["tokens_per_sample"] == pytest.approx(report["qlora"]["2"]["tokens_per_sample"])


def take_turns_within(functions, timeout=60):
    """`take_turns(functions)`, failing instead of hanging when the turns never end."""
    outcome = {}

    def run():
        try:
            outcome["results"] = take_turns(functions)
        except BaseException as error:  # noqa: BLE001 (raised again below, in the test's thread)
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"take_turns did not end within {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["results"]


class TestTakingTurns:
    def test_threads_run_one_at_a_time_in_rotation(self):
        log, running, most_running = [], [0], [0]
        lock = threading.Lock()

        def path(name, steps):
            def run(hand_over):
                for step in range(steps):
                    with lock:
                        running[0] += 1
                        most_running[0] = max(most_running[0], running[0])
                    log.append((name, step))
                    time.sleep(0.002)  # room for another thread to run, were it not waiting
                    with lock:
                        running[0] -= 1
                    hand_over()
                return f"{name} done"

            return run

        results = take_turns_within({"a": path("a", 3), "b": path("b", 1), "c": path("c", 2)})
        assert results == {"a": "a done", "b": "b done", "c": "c done"}
        assert most_running[0] == 1
        # In the order given; b leaves after its one step, and the others go on taking turns.
        assert log == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]

    def test_an_error_is_raised_after_the_others_finish(self):
        finished = []

        def failing(hand_over):
            hand_over()
            raise ValueError("broken path")

        def working(hand_over):
            for _ in range(3):
                hand_over()
            finished.append("working")

        with pytest.raises(ValueError, match="broken path"):
            take_turns_within({"failing": failing, "working": working})
        assert finished == ["working"]

    def test_an_error_before_the_first_hand_over_passes_the_turn_on(self):

        def failing(hand_over):
            raise ValueError("failed while building")

        def working(hand_over):
            hand_over()
            return "done"

        with pytest.raises(ValueError, match="failed while building"):
            take_turns_within({"failing": failing, "working": working})

    def test_the_recorder_hands_over_at_each_step_end_and_leaves_the_wait_out(self):

        class Trainer:  # what StepRecorder uses of a transformers Trainer
            args = type("Args", (), {"device": torch.device("cpu")})()

            def __init__(self):
                self.callbacks = []

            def add_callback(self, callback):
                self.callbacks.append(callback)

            def training_step(self, model, inputs):
                return 0.0

        trainer, waits = Trainer(), []

        def hand_over():  # another run's step
            waits.append(1)
            time.sleep(0.3)

        recorder = StepRecorder(trainer, hand_over=hand_over)
        for _ in range(4):
            time.sleep(0.02)  # this run's own step
            trainer.training_step(None, {"attention_mask": torch.ones(2, 5, dtype=torch.long)})
            trainer.callbacks[0].on_step_end(trainer.args, None, None)
        rates = recorder.rates(warmup=1)
        assert len(waits) == 4 and rates["hand_overs"] == 4
        # 3 timed steps of 0.02 s each; with the other runs' 0.3 s counted it would be over 0.9 s.
        assert 0.06 <= rates["seconds"] < 0.5
        assert rates["samples_per_second"] == pytest.approx(6 / rates["seconds"])

    def test_step_time_is_each_path_s_own(self):
        recorder = StepRecorder.__new__(StepRecorder)
        # Steps end at 1, 3, 6 and 10 s; the path got its turn back at 2, 4 and 8 s (others ran in between).
        recorder.step_ends = [1.0, 3.0, 6.0, 10.0]
        recorder.resumed = [2.0, 4.0, 8.0, 10.5]
        recorder.batches = [{"samples": 8, "tokens": 100, "positions": 120} for _ in range(4)]
        recorder.hand_overs = 4
        rates = recorder.rates(warmup=1)
        # Timed steps 2-4: (3 - 2) + (6 - 4) + (10 - 8) = 5 s of its own, for 24 samples.
        assert rates["seconds"] == pytest.approx(5.0)
        assert rates["samples_per_second"] == pytest.approx(24 / 5)
        assert rates["padding_fraction"] == pytest.approx(1 - 300 / 360)


class TestFigures:
    def test_qwen2_vl_2b_parameter_counts(self):
        config, _ = qwen2_vl_2b_config()
        counts = parameter_counts(config)
        # Qwen2-VL-2B: 2.21B parameters, 0.67B of them in the vision tower (merger included); the tied embedding
        # (151936 x 1536) counts once in the total and once more as the LM head's matmul.
        assert counts["total"] == pytest.approx(2.209e9, rel=0.01)
        assert counts["vision_tower"] == pytest.approx(0.665e9, rel=0.01)
        assert counts["language_model_compute"] == counts["total"] - counts["vision_tower"]

    def test_peak_flops_by_gpu_name(self):
        assert peak_bf16_flops("NVIDIA H100 80GB HBM3", None)[0] == 989e12
        assert peak_bf16_flops("NVIDIA H100 PCIe", None)[0] == 756e12
        assert peak_bf16_flops("NVIDIA H200", None)[0] == 989e12
        assert peak_bf16_flops("NVIDIA A100-SXM4-80GB", None)[0] == 312e12
        assert peak_bf16_flops("Some New GPU", None)[0] is None
        assert peak_bf16_flops("Some New GPU", 500.0)[0] == 500e12

    def test_median_interval_is_the_order_statistics_of_its_level(self):
        # n = 9: P(Binomial(9, 1/2) <= 1) = 10/512, so the 2nd and 8th values cover the median with 1 - 20/512 = 96%;
        # the 3rd and 7th only with 1 - 92/512 = 82%.
        assert median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5]) == [2, 8]
        # n = 11: the 3rd and 9th (1 - 134/2048 = 93%).
        assert median_interval(list(range(11))) == [2, 8]
        # n = 18 (part 2's repeats): the 6th and 13th (1 - 2 x 12 616 / 262 144 = 90.4%); the 7th and 12th only 76%.
        assert median_interval(list(range(18))) == [5, 12]
        assert median_interval([3, 1, 2, 5, 4]) == [1, 5]  # n = 5: only min and max reach 90% (94%)
        assert median_interval([1, 2, 3, 4]) is None  # n = 4: even min-max is 88%

    def test_ratio_verdict_weighs_the_spread(self):
        verdict = ratio_verdict
        assert verdict(paired_ratios([1.05, 1.2, 1.1, 1.3, 1.02], [1.0] * 5)) == "met"
        assert verdict(paired_ratios([0.8, 0.9, 0.95, 0.85, 0.7], [1.0] * 5)) == "not met"
        noisy = paired_ratios([0.83, 0.95, 1.28, 0.91, 0.89, 1.2, 0.93, 1.04, 1.14], [1.0] * 9)
        assert noisy["median"] < 1.0 and noisy["median_interval_90"] == [0.89, 1.2]
        assert verdict(noisy) == "within noise"

    def test_target_checks(self):
        results = {
            "collator": {"paired_ratio_ours_to_trl": paired_ratios([1.0, 1.4, 1.1], [1.0, 1.0, 1.0])},
            "training": {"paired_ratio_samples_per_second": paired_ratios([9.0, 80.0], [10.0, 90.0])},
            "padding": {"max_padding_fraction_grouped": 0.04},
            "memory": {"ratio_qlora_to_lora_peak": 0.5},
        }
        checks = target_checks(results)
        assert checks["collator_at_least_as_fast_as_trl"]["value"] == pytest.approx(1.1)  # the median pair
        assert checks["training_throughput_at_least_trl"]["value"] == pytest.approx((0.9 + 80 / 90) / 2)
        assert {name: check["passed"] for name, check in checks.items()} == {
            "collator_at_least_as_fast_as_trl": True,
            "training_throughput_at_least_trl": False,
            "padding_under_10_percent_with_grouping": True,
            "qlora_peak_memory_well_under_lora": True,
        }
        # Too few repeats for an interval: the median decides the verdict.
        assert checks["collator_at_least_as_fast_as_trl"]["interval_90"] is None
        assert checks["collator_at_least_as_fast_as_trl"]["verdict"] == "met"
        assert checks["training_throughput_at_least_trl"]["verdict"] == "not met"
        # With the GPU part, its memory figure decides (largest batch size both modes ran).
        results["full_size"] = {
            "lora": {"1": {"peak_memory_gib": 10.0}, "2": {"peak_memory_gib": 12.0}, "4": {"out_of_memory": True}},
            "qlora": {"1": {"peak_memory_gib": 5.0}, "2": {"peak_memory_gib": 10.0}, "4": {"peak_memory_gib": 12.0}},
        }
        check = target_checks(results)["qlora_peak_memory_well_under_lora"]
        assert check["value"] == pytest.approx(10.0 / 12.0) and check["passed"] is False
        assert "batch size 2" in check["measured"]
