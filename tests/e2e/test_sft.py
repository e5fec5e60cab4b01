"""`scripts/sft.py` end to end on tiny models, in a subprocess, on CPU."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.tasks import get_task

from conftest import REPO_ROOT, run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    get_task("shapes").make_data(directory, num=40, seed=1)
    return directory


def write_recipe(path, model_dir, data_dir, output_dir, **overrides):
    values = {
        "model_name_or_path": model_dir,
        "dtype": "float32",
        "task": "shapes",
        "dataset_path": data_dir,
        "max_length": 256,
        "output_dir": output_dir,
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        **overrides,
    }
    path.write_text(yaml.safe_dump({key: str(v) if hasattr(v, "is_dir") else v for key, v in values.items()}))
    return path


def final_loss(stdout):
    match = re.search(r"final loss: (\S+)", stdout)
    assert match, stdout[-2000:]
    return float(match.group(1))


def test_full_finetune_trains_saves_and_reloads(tmp_path, tiny_model_dirs, shapes_data):
    model_dir = tiny_model_dirs["qwen2_vl"]
    output = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, shapes_data, output)
    result = run_script(["scripts/sft.py", str(recipe), "--max_steps", "8"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert math.isfinite(final_loss(result.stdout))
    assert "(steps: 8)" in result.stdout  # the command line overrode the recipe's 6 steps

    before, after = load_file(model_dir / "model.safetensors"), load_file(output / "model.safetensors")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    # Qwen2-VL checkpoints keep the original key layout: `model.layers.*` (language model), `visual.*` (vision).
    assert any(name.startswith("model.layers.") for name in changed)
    assert any(name.startswith("visual.") for name in changed)

    files = ("config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json", "recipe.yaml")
    for name in files + ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        assert (output / name).is_file(), name
    processor = AutoProcessor.from_pretrained(output)
    model = AutoModelForImageTextToText.from_pretrained(output)
    assert processor.chat_template == AutoProcessor.from_pretrained(model_dir).chat_template
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "task: shapes" in (output / "recipe.yaml").read_text()


def logged_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def test_killed_run_resumes_exactly(tmp_path, tiny_model_dirs, shapes_data):
    """A full fine-tuning run SIGKILLed after a checkpoint (possibly in the middle of the next save), resumed with
    `--resume_from_checkpoint true`, logs the same losses as an uninterrupted run, bit for bit; the killed run left
    nothing that passes for a finished model."""
    model_dir = tiny_model_dirs["qwen2_vl"]
    keys = {"max_steps": 40, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2}
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, shapes_data, tmp_path / "full", **keys)
    result = run_script(["scripts/sft.py", str(recipe)])
    assert result.returncode == 0, result.stderr[-4000:]
    uninterrupted = logged_losses(tmp_path / "full")
    assert len(uninterrupted) == 40

    killed = tmp_path / "killed"
    command = [sys.executable, "scripts/sft.py", str(recipe), "--output_dir", str(killed)]
    environment = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600
    while not (killed / "checkpoint-4").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr[-3000:]}"
    assert not (killed / "config.json").exists() and not (killed / "trainer_state.json").exists()
    steps = sorted(int(path.name.split("-")[1]) for path in killed.glob("checkpoint-*"))
    assert steps and steps[-1] < 40

    result = run_script(
        ["scripts/sft.py", str(recipe), "--output_dir", str(killed), "--resume_from_checkpoint", "true"]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert logged_losses(killed) == uninterrupted
    AutoModelForImageTextToText.from_pretrained(killed)


def test_a_resume_that_cannot_load_stops_in_one_line(tmp_path, tiny_model_dirs, shapes_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dirs["qwen2_vl"], shapes_data, tmp_path / "o")
    (tmp_path / "o" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "o" / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    result = run_script(["scripts/sft.py", str(recipe), "--resume_from_checkpoint", "true"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: `resume_from_checkpoint: true` found no complete checkpoint in {tmp_path / 'o'} (incomplete: "
        "checkpoint-2: empty file(s): optimizer.pt); drop the key to train from the start, or give a checkpoint path."
    )
    assert "Traceback" not in result.stderr


def test_lora_trains_language_model_only(tmp_path, tiny_model_dirs, shapes_data):
    model_dir = tiny_model_dirs["smolvlm"]
    output = tmp_path / "lora"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, shapes_data, output, use_peft=True, lora_r=4, lora_alpha=8)
    result = run_script(["scripts/sft.py", "--config", str(recipe), "--verify_saved_model", "true"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "reloaded:" in result.stdout
    adapter = load_file(output / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
    assert lora_b and all("text_model" in name for name in adapter)
    assert any(tensor.abs().sum() > 0 for tensor in lora_b.values())  # B starts at zero: it trained
    AutoProcessor.from_pretrained(output)

    # evaluate.py on the adapter directory: the base model is read from adapter_config.json.
    evaluation = tmp_path / "eval"
    result = run_script(
        [
            "scripts/evaluate.py",
            "--model_path",
            str(output),
            "--recipe",
            str(recipe),
            "--split",
            "test",
            "--max_samples",
            "3",
            "--batch_size",
            "2",
            "--output_dir",
            str(evaluation),
            "--baseline",
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = (evaluation / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,target,prediction,exact_match" and len(lines) == 4
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["task"] == "shapes" and metrics["metrics"]["num_examples"] == 3
    assert "exact_match" in result.stdout
    # --baseline: the adapter's base model, un-tuned, evaluated the same way beside it.
    baseline = json.loads((evaluation / "baseline" / "metrics.json").read_text())
    assert baseline["metrics"]["num_examples"] == 3
    assert f"baseline ({model_dir})" in result.stdout


def test_qlora_evaluation_after_training_and_evaluate_py_agree(tmp_path, tiny_model_dirs, shapes_data):
    """Both evaluate the adapter on the base as it trained (4-bit), and say so: the same metrics."""
    output = tmp_path / "qlora"
    keys = {"use_peft": True, "load_in_4bit": True, "lora_r": 4, "eval_after_train": True}
    keys |= {"generation_max_samples": 4, "max_new_tokens": 4, "per_device_eval_batch_size": 2}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dirs["qwen2_vl"], shapes_data, output, **keys)
    result = run_script(["scripts/sft.py", str(recipe)])
    assert result.returncode == 0, result.stderr[-4000:]
    after_training = json.loads((output / "metrics.json").read_text())["metrics"]

    evaluation = tmp_path / "eval"
    arguments = ["--model_path", str(output), "--recipe", str(recipe), "--max_samples", "4", "--batch_size", "2"]
    result = run_script(["scripts/evaluate.py", *arguments, "--output_dir", str(evaluation)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"model {output}, on its 4-bit nf4 base:" in result.stdout
    assert json.loads((evaluation / "metrics.json").read_text())["metrics"] == after_training


def test_too_long_drop_is_counted_and_reported(tmp_path, tiny_model_dirs, shapes_data):
    from vlm_recipes.collator import VisionChatCollator
    from vlm_recipes.configs import VLMScriptArguments
    from vlm_recipes.data.splits import load_splits

    processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"])
    (train,), _ = load_splits(VLMScriptArguments(task="shapes", dataset_path=str(shapes_data)), ["train"])
    collator = VisionChatCollator(processor)
    lengths = sorted(collator.sample_length(train[i], i) for i in range(len(train)))
    limit = lengths[len(lengths) // 2]
    expected_dropped = sum(length > limit for length in lengths)
    assert 0 < expected_dropped < len(lengths)

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dirs["qwen2_vl"], shapes_data, tmp_path / "o", max_steps=2)
    result = run_script(["scripts/sft.py", str(recipe), "--max_length", str(limit), "--too_long", "drop"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"too-long samples dropped: {expected_dropped} (max_length={limit})" in result.stdout

    result = run_script(["scripts/sft.py", str(recipe), "--max_length", str(limit), "--too_long", "error"])
    assert result.returncode != 0
    assert f"over max_length={limit}" in result.stderr


def test_inspect_batch_script(tmp_path, tiny_model_dirs, shapes_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dirs["qwen2_vl"], shapes_data, tmp_path / "o")
    result = run_script(["scripts/inspect_batch.py", str(recipe), "--index", "0"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "supervised: assistant turn" in result.stdout and "masked: image token" in result.stdout
    assert "masked: user turn" in result.stdout
    supervised = [
        line
        for line in result.stdout.splitlines()
        if not line.startswith("summary") and line.endswith("supervised: assistant turn")
    ]
    assert "'<|im_end|>'" in supervised[-2]  # the end-of-turn token is learned (then the template's newline)


def readme_commands(section):
    """The commands in README.md's fenced block under a heading containing `section`."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(rf"#+ [^\n]*{section}[^\n]*\n.*?```(?:bash)?\n(.*?)```", text, re.S)
    assert block, f"no command block under a '{section}' heading in README.md"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_demo_command_runs(tmp_path):
    (command,) = readme_commands("Demo")
    assert command.startswith("python scripts/sft.py recipes/demo/")
    # The recipe's model, data and output paths are relative to the checkout: the test's go under tmp_path.
    args = command.split()[1:] + ["--output_dir", str(tmp_path / "demo")]
    args += ["--model_name_or_path", str(tmp_path / "tiny"), "--dataset_path", str(tmp_path / "data")]
    result = run_script(args, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert math.isfinite(final_loss(result.stdout))
    assert "reloaded: " in result.stdout
    AutoModelForImageTextToText.from_pretrained(tmp_path / "demo")


def test_dataset_name_trains_as_the_native_task(tmp_path, tiny_model_dirs):
    """The committed messages example read through `datasets` (`--dataset_name examples/messages`, a local folder in
    hub layout) trains exactly as the same files read by the native task: the same batches give the same losses."""
    model_dir = tiny_model_dirs["qwen2_vl"]
    common = ["--model_name_or_path", str(model_dir), "--max_steps", "3", "--logging_steps", "1"]
    common += ["--eval_after_train", "false", "--tiny_model_family", "qwen2_vl"]
    losses = {}
    for source, flag in (("native", "--dataset_path"), ("datasets", "--dataset_name")):
        output = tmp_path / source
        result = run_script(
            ["scripts/sft.py", "recipes/demo/messages.yaml", flag, "examples/messages", "--output_dir", str(output)]
            + common,
            env={"HF_DATASETS_CACHE": str(tmp_path / "cache")},
        )
        assert result.returncode == 0, result.stderr[-4000:]
        losses[source] = logged_losses(output)
    assert len(losses["native"]) == 3
    assert [step for step, _ in losses["datasets"]] == [step for step, _ in losses["native"]]
    assert [loss for _, loss in losses["datasets"]] == pytest.approx([loss for _, loss in losses["native"]], rel=1e-5)


def test_streamed_dataset_trains_and_evaluates(tmp_path, tiny_model_dirs):
    """`dataset_streaming: true`: no length pass, `max_steps` steps from the stream, a bad row skipped and counted by
    the collator, and evaluation by generation on the streamed test split."""
    model_dir = tiny_model_dirs["qwen2_vl"]
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (REPO_ROOT / "examples/messages/train.jsonl").read_text().splitlines()]
    for row in rows:
        row["images"] = [str(REPO_ROOT / "examples/messages" / path) for path in row["images"]]
    rows[1]["messages"] = rows[1]["messages"][:1]  # no assistant turn
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:24]))
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[24:30]))
    output = tmp_path / "out"
    result = run_script(
        ["scripts/sft.py", "recipes/demo/messages.yaml", "--dataset_name", str(data), "--output_dir", str(output)]
        + ["--model_name_or_path", str(model_dir), "--tiny_model_family", "qwen2_vl", "--dataset_streaming", "true"]
        + ["--max_steps", "3", "--on_bad_row", "skip", "--generation_max_samples", "4"],
        env={"HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(steps: 3)" in result.stdout
    assert "Measuring" not in result.stderr  # no length pass over a stream
    assert "Streaming defaults: train_sampling_strategy=random, dispatch_batches=False" in result.stderr
    assert "data [train], row 1 (id train-01): no assistant turn to learn from" in result.stdout
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    assert metrics["num_examples"] == 4


def test_stream_shorter_than_one_step_stops_naming_why(tmp_path, tiny_model_dirs):
    """Six streamed rows and eight rows per optimizer step: the Trainer would read the stream again and again without
    ever stepping; the run stops with the numbers instead."""
    rows = (REPO_ROOT / "examples/messages/train.jsonl").read_text().splitlines()[:6]
    data = tmp_path / "six.jsonl"
    data.write_text("\n".join(rows).replace('"images/', f'"{REPO_ROOT}/examples/messages/images/') + "\n")
    result = run_script(
        [
            "scripts/sft.py",
            "recipes/demo/messages.yaml",
            "--dataset_name",
            str(data),
            "--output_dir",
            str(tmp_path / "o"),
        ]
        + ["--model_name_or_path", str(tiny_model_dirs["qwen2_vl"]), "--tiny_model_family", "qwen2_vl"]
        + ["--dataset_streaming", "true", "--max_steps", "1", "--per_device_train_batch_size", "2"]
        + ["--gradient_accumulation_steps", "4", "--eval_after_train", "false"],
        timeout=600,
        env={"HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "ended before one optimizer step (8 rows" in result.stderr
    assert not (tmp_path / "o" / "config.json").exists()
