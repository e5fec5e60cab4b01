"""Saves that are whole or absent, and exact resumes (`vlm_recipes.resume`, `VLMSFTTrainer`)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from trl import SFTConfig

from vlm_recipes import resume
from vlm_recipes.collator import VisionChatCollator
from vlm_recipes.configs import VLMModelConfig, VLMScriptArguments
from vlm_recipes.data.rows import BadRowReport, build_dataset
from vlm_recipes.lengths import prepare_lengths
from vlm_recipes.models.loading import load_model, load_processor
from vlm_recipes.models.lora import peft_config_for
from vlm_recipes.resume import (
    CheckpointError,
    checkpoint_problem,
    find_checkpoints_to_resume,
    publish_directory,
    resolve_resume_checkpoint,
    withdraw_completion_files,
)
from vlm_recipes.tasks import get_task
from vlm_recipes.tiny import TINY_FAMILIES
from vlm_recipes.trainer import SeededLengthGroupedSampler, VLMSFTTrainer


# --------------------------------------------------------------------------------------------------------------------
# Which checkpoints are complete
# --------------------------------------------------------------------------------------------------------------------
def make_checkpoint(directory, step, weights=True, state=True):
    directory.mkdir(parents=True)
    if weights:
        save_file({"w": torch.ones(2)}, str(directory / "model.safetensors"))
    if state:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (directory / "optimizer.pt").write_bytes(b"x" * 8)
    return directory


class TestCheckpointProblem:
    def test_complete(self, tmp_path):
        assert checkpoint_problem(make_checkpoint(tmp_path / "checkpoint-4", 4)) is None

    def test_empty_optimizer_and_no_state(self, tmp_path):
        directory = make_checkpoint(tmp_path / "checkpoint-4", 4, state=False)
        (directory / "optimizer.pt").write_bytes(b"")
        assert checkpoint_problem(directory) == "empty file(s): optimizer.pt"
        (directory / "optimizer.pt").write_bytes(b"x")
        assert checkpoint_problem(directory) == "no trainer_state.json"

    def test_state_not_json(self, tmp_path):
        directory = make_checkpoint(tmp_path / "checkpoint-4", 4)
        (directory / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
        assert checkpoint_problem(directory).startswith("trainer_state.json is not valid JSON")

    def test_truncated_weights(self, tmp_path):
        directory = make_checkpoint(tmp_path / "checkpoint-4", 4)
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[: len(data) - 4])
        assert checkpoint_problem(directory).startswith("model.safetensors is unreadable")

    def test_no_weights_and_missing_shard(self, tmp_path):
        directory = make_checkpoint(tmp_path / "checkpoint-4", 4, weights=False)
        assert checkpoint_problem(directory).startswith("no weights")
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        save_file({"a": torch.ones(1)}, str(directory / "model-00001-of-00002.safetensors"))
        assert checkpoint_problem(directory) == "weight shard(s) missing: model-00002-of-00002.safetensors"

    def test_newest_complete_is_resumed_and_incomplete_ones_named(self, tmp_path, caplog):
        make_checkpoint(tmp_path / "checkpoint-2", 2)
        make_checkpoint(tmp_path / "checkpoint-10", 10)
        make_checkpoint(tmp_path / "checkpoint-12", 12, state=False)
        make_checkpoint(tmp_path / ".tmp-checkpoint-14" / "checkpoint-14", 14)
        complete, incomplete = find_checkpoints_to_resume(tmp_path)
        assert [path.name for path in complete] == ["checkpoint-2", "checkpoint-10"]  # by step, not by name
        assert [(path.name, why) for path, why in incomplete] == [
            ("checkpoint-12", "no trainer_state.json"),
            (".tmp-checkpoint-14", "an interrupted save (staging directory)"),
        ]
        with caplog.at_level("WARNING", logger="vlm_recipes.resume"):
            assert resolve_resume_checkpoint("true", tmp_path) == str(tmp_path / "checkpoint-10")
        assert f"Skipping incomplete checkpoint {tmp_path / 'checkpoint-12'}: no trainer_state.json" in caplog.text

    @pytest.mark.parametrize("value", [None, False, "false", "False", "no", ""])
    def test_no_resume(self, value, tmp_path):
        assert resolve_resume_checkpoint(value, tmp_path) is None

    def test_true_without_a_complete_checkpoint(self, tmp_path):
        make_checkpoint(tmp_path / "checkpoint-3", 3, state=False)
        with pytest.raises(CheckpointError, match=r"found no complete checkpoint .*checkpoint-3: no trainer_state"):
            resolve_resume_checkpoint(True, tmp_path)

    def test_incomplete_path_is_refused(self, tmp_path):
        directory = make_checkpoint(tmp_path / "checkpoint-3", 3, state=False)
        with pytest.raises(CheckpointError, match=r"checkpoint-3 is incomplete \(no trainer_state.json\)"):
            resolve_resume_checkpoint(str(directory), tmp_path)
        with pytest.raises(CheckpointError, match="not found"):
            resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)


class TestPublish:
    @pytest.mark.parametrize("moves_before_kill", range(4))
    def test_kill_during_publish_never_leaves_a_model(self, tmp_path, monkeypatch, moves_before_kill):
        output, staging = tmp_path / "out", tmp_path / "out" / ".tmp-final"
        staging.mkdir(parents=True)
        (output / "config.json").write_text("{}")  # an earlier run's output in the same directory
        for name in ("config.json", "model.safetensors", "trainer_state.json", "recipe.yaml"):
            (staging / name).write_text(name)
        real_replace, moves = os.replace, []

        def replace(source, target):
            if len(moves) == moves_before_kill:
                raise KeyboardInterrupt  # stands for the kill
            moves.append(os.path.basename(target))
            real_replace(source, target)

        monkeypatch.setattr(resume.os, "replace", replace)
        withdraw_completion_files(output)
        with pytest.raises(KeyboardInterrupt):
            publish_directory(staging, output)
        assert not (output / "config.json").exists()
        assert "config.json" not in moves

    def test_a_previous_saves_weights_go_first(self, tmp_path):
        """A single `model.safetensors` left beside a new sharded save would be read instead of the new shards."""
        output = tmp_path / "out"
        output.mkdir()
        old_index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
        for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "run_info.json"):
            (output / name).write_text(name)
        (output / "model.safetensors.index.json").write_text(json.dumps(old_index))
        withdraw_completion_files(output)
        assert sorted(path.name for path in output.iterdir()) == ["run_info.json"]

    def test_config_moves_last(self, tmp_path):
        output, staging = tmp_path / "out", tmp_path / "out" / ".tmp-final"
        staging.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "a.json", "z.json"):
            (staging / name).write_text(name)
        assert publish_directory(staging, output)[-1] == "adapter_config.json"
        assert not staging.exists()


# --------------------------------------------------------------------------------------------------------------------
# Exact resume, in process
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_rows(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume-shapes")
    get_task("shapes").make_data(directory, num=14, seed=3)
    rows = get_task("shapes").load_rows(directory, "train", directory, BadRowReport())
    return [row for row in rows if len(row["images"]) == 1][:8]  # 4 steps per epoch at batch size 2


def tiny_sft_config(output_dir, **keys) -> SFTConfig:
    """The settings every in-process run here shares (CPU, float32, batch size 2, our collator's data path)."""
    shared = {
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-3,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "gradient_checkpointing": False,
        "remove_unused_columns": False,
        "max_length": 512,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "dataloader_num_workers": 0,
    }
    return SFTConfig(output_dir=str(output_dir), **{**shared, **keys})


def train_losses(model_dir, rows, output_dir, max_steps, resume_from=None, **model_keys):
    model_args = VLMModelConfig(model_name_or_path=str(model_dir), dtype="float32", lora_r=4, **model_keys)
    args = tiny_sft_config(
        output_dir,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        eval_strategy="no",
        train_sampling_strategy="group_by_length",
    )
    processor = load_processor(model_args)
    if getattr(processor, "chat_template", None) is None:
        pytest.skip(f"{model_dir.name}: no chat template in its processor")
    collator = VisionChatCollator(processor, max_length=512)
    script_args = VLMScriptArguments(task="shapes", dataset_path="unused")
    dataset, _, _ = prepare_lengths(script_args, args, collator, build_dataset(rows), None)
    model = load_model(model_args, args)
    trainer = VLMSFTTrainer(
        model_args=model_args,
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config_for(model, model_args),
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def interrupted_and_resumed(model_dir, rows, tmp_path, max_steps, checkpoint_step, **model_keys):
    """Losses of an uninterrupted run, and of a run resumed from that run's `checkpoint-<checkpoint_step>/` (what a
    run killed right after that save has on disk) with `resume_from_checkpoint: true`."""
    uninterrupted = train_losses(model_dir, rows, tmp_path / "full", max_steps, **model_keys)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full" / f"checkpoint-{checkpoint_step}", killed / f"checkpoint-{checkpoint_step}")
    resumed = train_losses(model_dir, rows, killed, max_steps, resume_from="true", **model_keys)
    return uninterrupted, resumed


@pytest.mark.slow
class TestExactResume:
    @pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
    def test_full_finetuning_every_family(self, family, tiny_model_dirs, shapes_rows, tmp_path):
        uninterrupted, resumed = interrupted_and_resumed(tiny_model_dirs[family], shapes_rows, tmp_path, 5, 3)
        assert len(uninterrupted) == 5
        assert resumed == uninterrupted  # bit-identical on CPU

    @pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
    def test_lora_and_qlora(self, quantized, tiny_model_dirs, shapes_rows, tmp_path):
        uninterrupted, resumed = interrupted_and_resumed(
            tiny_model_dirs["qwen2_vl"], shapes_rows, tmp_path, 5, 3, use_peft=True, load_in_4bit=quantized
        )
        assert resumed == uninterrupted

    def test_across_an_epoch_boundary(self, tiny_model_dirs, shapes_rows, tmp_path):
        # 4 steps per epoch: checkpoint-6 is in the second epoch, whose order the sampler draws from seed + 1.
        model_dir = tiny_model_dirs["smolvlm"]
        uninterrupted = train_losses(model_dir, shapes_rows, tmp_path / "full", 9)
        shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "killed" / "checkpoint-6")
        resumed = train_losses(model_dir, shapes_rows, tmp_path / "killed", 9, resume_from="true")
        assert resumed == uninterrupted

    def test_weights_that_do_not_load_stop_the_resume(self, tiny_model_dirs, shapes_rows, tmp_path):
        train_losses(tiny_model_dirs["qwen2_vl"], shapes_rows, tmp_path / "full", 3)
        checkpoint = tmp_path / "full" / "checkpoint-3"
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint / "model.safetensors"))
        dropped = sorted(key for key in weights if key.startswith("visual."))[:2]
        save_file({k: v for k, v in weights.items() if k not in dropped}, str(checkpoint / "model.safetensors"))
        with pytest.raises(CheckpointError, match="do not all load") as error:
            train_losses(tiny_model_dirs["qwen2_vl"], shapes_rows, tmp_path / "full", 5, resume_from=str(checkpoint))
        assert "model.visual." in str(error.value)  # named in the model's own layout

    def test_checkpoints_are_whole_and_load_alone(self, tiny_model_dirs, shapes_rows, tmp_path):
        from transformers import AutoProcessor

        train_losses(tiny_model_dirs["qwen2_vl"], shapes_rows, tmp_path / "out", 6)
        entries = sorted(path.name for path in (tmp_path / "out").iterdir())
        assert not [name for name in entries if name.startswith(".")]  # no staging directory left behind
        names = [name for name in entries if name.startswith("checkpoint-")]
        assert names == ["checkpoint-3", "checkpoint-6"]
        for name in names:
            checkpoint = tmp_path / "out" / name
            assert checkpoint_problem(checkpoint) is None
            assert (checkpoint / "preprocessor_config.json").is_file()
            assert (checkpoint / "generation_config.json").is_file()
            AutoProcessor.from_pretrained(checkpoint)


@pytest.mark.slow
def test_load_best_model_at_end_loads_the_best_weights(tiny_model_dirs, shapes_rows, tmp_path):
    """Full fine-tuning: the Trainer's own `_load_best_model` matched none of Qwen2-VL's keys and kept the last
    weights; ours loads the best checkpoint's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    model_dir = tiny_model_dirs["qwen2_vl"]
    model_args = VLMModelConfig(model_name_or_path=str(model_dir), dtype="float32")
    args = tiny_sft_config(
        tmp_path / "out",
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        # The eval loss falls at every step here: "greater is better" makes the first checkpoint the best, so that
        # the best weights are not the last ones.
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    processor = load_processor(model_args)
    collator = VisionChatCollator(processor, max_length=512)
    dataset = build_dataset(shapes_rows)
    trainer = VLMSFTTrainer(
        model_args=model_args,
        model=load_model(model_args, args),
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        eval_dataset=build_dataset(shapes_rows[:2]),
        processing_class=processor,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and (tmp_path / "out").resolve() == Path(best).resolve().parent and ".tmp-" not in best
    expected = AutoModelForImageTextToText.from_pretrained(best).state_dict()
    actual = trainer.model.state_dict()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    if Path(best).name != "checkpoint-4":  # the last weights differ from the best ones: the test can fail
        last = load_file(str(tmp_path / "out" / "checkpoint-4" / "model.safetensors"))
        assert not all(
            torch.equal(last[key], value) for key, value in load_file(str(Path(best) / "model.safetensors")).items()
        )


class TestSeededSampler:
    def test_order_depends_on_seed_and_epoch_only(self):
        lengths = list(range(40))
        sampler = SeededLengthGroupedSampler(4, lengths, seed=7)
        first = list(sampler)
        torch.manual_seed(123)  # the global RNG plays no part
        assert list(sampler) == first
        sampler.set_epoch(1)
        second = list(sampler)
        assert second != first and sorted(second) == lengths
        assert list(SeededLengthGroupedSampler(4, lengths, seed=7)) == first
