"""Self-contained checkpoints (`vlm_recipes.checkpoints`) and the three tools: fix_checkpoints.py, merge_adapter.py,
check_models.py. The end-to-end tests train two 4-step runs of `scripts/sft.py` (LoRA and full) once per module."""

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from vlm_recipes.checkpoints.merge import merge_adapter
from vlm_recipes.checkpoints.processor_files import save_processor_files
from vlm_recipes.checkpoints.repair import diagnose_checkpoint, is_base_model, repair_checkpoint
from vlm_recipes.checkpoints.smoke_test import demo_image, discover_model_dirs
from vlm_recipes.collator import normalize_messages
from vlm_recipes.tasks import get_task
from vlm_recipes.tiny import build_tiny_model

from conftest import REPO_ROOT, run_script

RUN_DIRS = ("checkpoint-2", "checkpoint-4", ".")
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]


# --------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny Qwen2-VL of this module's own, so that tests may hide it ("no base model at hand")."""
    return build_tiny_model("qwen2_vl", tmp_path_factory.mktemp("checkpoints") / "base")


@pytest.fixture(scope="module")
def smolvlm_model(tmp_path_factory):
    return build_tiny_model("smolvlm", tmp_path_factory.mktemp("smolvlm") / "smolvlm")


def train(tmp_path_factory, base_model, name, *extra):
    root = tmp_path_factory.mktemp(name)
    get_task("shapes").make_data(root / "data", num=16, seed=1)
    output = root / "run"
    result = run_script(
        [
            "scripts/sft.py",
            "recipes/demo/shapes_qwen2vl.yaml",
            "--model_name_or_path",
            str(base_model),
            "--dataset_path",
            str(root / "data"),
            "--output_dir",
            str(output),
            "--max_steps",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--verify_saved_model",
            "false",
            *extra,
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return output


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model):
    return train(tmp_path_factory, base_model, "lora-run", "--use_peft", "true")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, base_model):
    return train(tmp_path_factory, base_model, "full-run")


@contextlib.contextmanager
def base_hidden(base_model: Path):
    """Move the base model away, so that anything that would read it fails."""
    hidden = base_model.with_name(base_model.name + "-hidden")
    base_model.rename(hidden)
    try:
        yield
    finally:
        hidden.rename(base_model)


def encode(processor):
    """What the processor makes of a fixed prompt and image: equal encodings mean an equal processor in practice."""
    text = processor.apply_chat_template(normalize_messages(PROMPT), add_generation_prompt=True)
    return processor(text=[text, text], images=[[demo_image()], [demo_image().rotate(90)]], return_tensors="pt")


def assert_same_processor(directory, reference):
    processor = AutoProcessor.from_pretrained(directory)
    assert isinstance(processor, ProcessorMixin), type(processor)
    assert processor.chat_template == reference.chat_template
    assert processor.tokenizer.eos_token == reference.tokenizer.eos_token
    ours, theirs = encode(processor), encode(reference)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


def break_checkpoint(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).unlink()


def fake_run(base_model: Path, run_dir: Path) -> Path:
    """A run's final output as far as the tools can tell, without training: the base's weights and processor, the
    files a save adds (`preprocessor_config.json`, generation config), `recipe.yaml` and `trainer_state.json`."""
    shutil.copytree(base_model, run_dir)
    save_processor_files(run_dir, AutoProcessor.from_pretrained(base_model), only_missing=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(base_model), "task": "shapes"}))
    (run_dir / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    return run_dir


# --------------------------------------------------------------------------------------------------------------------
# Every saved directory reloads its processor alone
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_every_checkpoint_reloads_its_processor_without_the_base(run, request, base_model):
    output = request.getfixturevalue(run)
    reference = AutoProcessor.from_pretrained(base_model)
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    with base_hidden(base_model):
        for name in RUN_DIRS:
            directory = output / name
            for file in ("tokenizer.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json"):
                assert (directory / file).is_file(), f"{directory / file}"
            # The generation config too, also beside a LoRA adapter (PeftModel.save_pretrained does not write it).
            generation = json.loads((directory / "generation_config.json").read_text())
            assert generation["eos_token_id"] == reference.tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert_same_processor(directory, reference)
            assert diagnose_checkpoint(directory).ok
            assert not list(directory.glob(".processor-files-*"))  # no staging left behind


# --------------------------------------------------------------------------------------------------------------------
# save_processor_files
# --------------------------------------------------------------------------------------------------------------------
class TestSaveProcessorFiles:
    def test_only_missing_keeps_existing_files(self, base_model, tmp_path):
        processor = AutoProcessor.from_pretrained(base_model)
        (tmp_path / "tokenizer_config.json").write_text("{}")
        written = save_processor_files(tmp_path, processor, only_missing=True)
        assert (tmp_path / "tokenizer_config.json").read_text() == "{}"
        assert "tokenizer_config.json" not in written
        assert {"tokenizer.json", "chat_template.jinja", "preprocessor_config.json"} <= set(written)
        assert written[-2:] == ["preprocessor_config.json", "processor_config.json"]  # moved last

    def test_a_failed_save_leaves_nothing(self, base_model, tmp_path):
        processor = AutoProcessor.from_pretrained(base_model)

        class FailingGenerationConfig:
            def save_pretrained(self, directory):
                raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            save_processor_files(tmp_path, processor, FailingGenerationConfig())
        assert list(tmp_path.iterdir()) == []  # no file under its real name, no staging directory


# --------------------------------------------------------------------------------------------------------------------
# fix_checkpoints.py
# --------------------------------------------------------------------------------------------------------------------
def statuses(stdout: str) -> dict[str, str]:
    """{checkpoint path: status} from fix_checkpoints.py's report lines (`STATUS  PATH`)."""
    lines = [
        line for line in stdout.splitlines() if line and not line.startswith(" ") and "checkpoint(s):" not in line
    ]
    return {line[16:].strip(): line[:16].strip() for line in lines}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_list_broken_then_auto_fix(lora_run, full_run, base_model, tmp_path):
    runs = tmp_path / "outputs"
    shutil.copytree(lora_run, runs / "lora")
    shutil.copytree(full_run, runs / "full")
    # An adapter checkpoint without chat template, processor configs and generation config (base from
    # adapter_config.json); a full checkpoint without tokenizer (base from the run's recipe.yaml: transformers 5
    # writes no `_name_or_path` into config.json). With config.json beside it, that one still "loads", with an empty
    # tokenizer.
    break_checkpoint(
        runs / "lora" / "checkpoint-2",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    )
    break_checkpoint(runs / "full" / "checkpoint-4", "tokenizer.json", "tokenizer_config.json")
    before = snapshot(runs)

    listed = run_script(["scripts/fix_checkpoints.py", "--list-broken", str(runs)])
    assert listed.returncode == 1, listed.stdout + listed.stderr[-2000:]
    found = statuses(listed.stdout)
    assert len(found) == 6, listed.stdout  # each run: checkpoint-2, checkpoint-4 and the final directory
    assert {path for path, status in found.items() if status != "OK"} == {
        str(runs / "lora" / "checkpoint-2"),
        str(runs / "full" / "checkpoint-4"),
    }, listed.stdout
    assert set(found.values()) == {"OK", "BROKEN"}
    assert snapshot(runs) == before  # listing changes nothing

    fixed = run_script(["scripts/fix_checkpoints.py", "--auto-fix", str(runs)])
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr[-2000:]
    assert "adapter_config.json `base_model_name_or_path`" in fixed.stdout
    assert "recipe.yaml `model_name_or_path`" in fixed.stdout
    assert "6 checkpoint(s): 4 ok, 2 fixed" in fixed.stdout, fixed.stdout
    reference = AutoProcessor.from_pretrained(base_model)
    with base_hidden(base_model):
        for directory in (runs / "lora" / "checkpoint-2", runs / "full" / "checkpoint-4"):
            assert_same_processor(directory, reference)
            assert diagnose_checkpoint(directory).ok
    # The trained weights and the files that were there are untouched.
    after = snapshot(runs)
    assert all(after[name] == content for name, content in before.items())


@pytest.mark.slow
def test_list_broken_reports_unfinished_saves(full_run, tmp_path):
    run = tmp_path / "outputs" / "full"
    shutil.copytree(full_run, run)
    (run / "checkpoint-4" / "trainer_state.json").unlink()  # as a kill during an unstaged save left it
    shutil.copytree(run / "checkpoint-2", run / ".tmp-checkpoint-6" / "checkpoint-6")  # a kill while staging
    (run / ".tmp-final").mkdir()  # a kill during the final save
    listed = run_script(["scripts/fix_checkpoints.py", "--list-broken", str(tmp_path / "outputs")])
    assert listed.returncode == 1, listed.stdout + listed.stderr[-2000:]
    found = statuses(listed.stdout)
    assert {path for path, status in found.items() if status == "UNFINISHED"} == {
        str(run / "checkpoint-4"),
        str(run / ".tmp-checkpoint-6"),
        str(run),
    }, listed.stdout
    assert "found: no trainer_state.json; resuming skips it" in listed.stdout
    assert "found: an interrupted save (staging directory); resuming skips it" in listed.stdout
    assert found[str(run / "checkpoint-2")] == "OK"


@pytest.mark.slow
def test_fix_one_checkpoint_from_config_name_or_path(full_run, base_model, tmp_path):
    # A full checkpoint on its own (no recipe.yaml near it) whose config.json names its base, as transformers 4 wrote.
    directory = tmp_path / "checkpoint-2"
    shutil.copytree(full_run / "checkpoint-2", directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "_name_or_path": str(base_model)}))
    break_checkpoint(directory, "chat_template.jinja", "processor_config.json", "tokenizer_config.json")

    result = run_script(["scripts/fix_checkpoints.py", "--checkpoint", str(directory)])
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "FIXED" in result.stdout and "config.json `_name_or_path`" in result.stdout, result.stdout
    assert_same_processor(directory, AutoProcessor.from_pretrained(base_model))


def test_base_models_are_skipped_and_runs_still_checked(base_model, tmp_path):
    """After the demos, `outputs/` holds their tiny base models beside the runs: the base models are no checkpoints
    (`build_tiny_model` writes no `preprocessor_config.json`, and nothing records a base for them)."""
    outputs = tmp_path / "outputs"
    tiny = outputs / "tiny-models" / "qwen2_vl"
    shutil.copytree(base_model, tiny)
    assert not (tiny / "preprocessor_config.json").exists()
    run = fake_run(base_model, outputs / "demo" / "shapes_qwen2vl")

    listed = run_script(["scripts/fix_checkpoints.py", "--list-broken", str(outputs)])
    assert listed.returncode == 0, listed.stdout + listed.stderr[-2000:]
    assert statuses(listed.stdout) == {str(tiny): "BASE (skipped)", str(run): "OK"}, listed.stdout
    assert "1 checkpoint(s): 1 ok (1 base model(s) skipped)" in listed.stdout

    # A run's output is judged as before: without preprocessor_config.json it is incomplete.
    break_checkpoint(run, "preprocessor_config.json")
    listed = run_script(["scripts/fix_checkpoints.py", "--list-broken", str(outputs)])
    assert listed.returncode == 1, listed.stdout + listed.stderr[-2000:]
    assert statuses(listed.stdout) == {str(tiny): "BASE (skipped)", str(run): "INCOMPLETE"}, listed.stdout


class TestIsBaseModel:
    @pytest.mark.parametrize(
        ("files", "directory", "expected"),
        [
            ({"tiny/config.json"}, "tiny", True),
            ({"run/config.json", "run/recipe.yaml"}, "run", False),
            ({"run/config.json", "run/run_info.json"}, "run", False),
            ({"run/config.json", "run/trainer_state.json", "run/training_args.bin"}, "run", False),
            ({"run/checkpoint-2/config.json"}, "run/checkpoint-2", False),
            ({"run/run_info.json", "run/extra/config.json"}, "run/extra", False),
            ({"adapter/adapter_config.json"}, "adapter", False),
            ({"merged/config.json", "merged/merge_info.json"}, "merged", False),
        ],
    )
    def test_only_what_training_or_merging_did_not_write(self, files, directory, expected, tmp_path):
        for name in files:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("{}")
        assert is_base_model(tmp_path / directory) is expected


class TestRepairCheckpoint:
    def test_without_a_base_it_stays_broken_and_says_why(self, base_model, tmp_path):
        directory = tmp_path / "adapter"
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nowhere/base"}))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(base_model / name, directory / name)
        report = repair_checkpoint(directory)
        assert report.status == "still broken"
        assert "'/nowhere/base'" in report.base_error and "--base_model" in report.base_error
        # An explicit --base_model repairs it.
        report = repair_checkpoint(directory, base_model=str(base_model))
        assert report.status == "fixed", report.after.describe()
        assert_same_processor(directory, AutoProcessor.from_pretrained(base_model))

    def test_base_from_run_info_of_a_run_that_stopped_early(self, base_model, tmp_path):
        # recipe.yaml is written at the end of training; run_info.json, holding the same recipe, at its start.
        directory = tmp_path / "run" / "checkpoint-2"
        shutil.copytree(base_model, directory)
        (tmp_path / "run" / "run_info.json").write_text(
            json.dumps({"recipe": {"model_name_or_path": str(base_model)}})
        )
        break_checkpoint(directory, "tokenizer.json", "chat_template.jinja")
        report = repair_checkpoint(directory)
        assert report.status == "fixed", report.after.describe()
        assert report.base.source.startswith(str(tmp_path / "run" / "run_info.json"))
        assert_same_processor(directory, AutoProcessor.from_pretrained(base_model))

    def test_base_from_the_hf_cache(self, base_model, tmp_path, monkeypatch):
        """An adapter of a hub model (`org/name`) is repaired from that model's snapshot in the HF cache, offline."""
        from huggingface_hub import constants

        revision = "0123456789abcdef0123456789abcdef01234567"
        repo = tmp_path / "hub" / "models--someorg--tiny-qwen2-vl"
        shutil.copytree(base_model, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        directory = tmp_path / "adapter"
        directory.mkdir()
        (directory / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": "someorg/tiny-qwen2-vl"})
        )
        report = repair_checkpoint(directory)
        assert report.status == "fixed", report.after.describe()
        assert report.base.path == repo / "snapshots" / revision
        assert_same_processor(directory, AutoProcessor.from_pretrained(base_model))

    def test_reapplies_the_runs_max_pixels(self, base_model, tmp_path):
        directory = tmp_path / "run" / "checkpoint-2"
        shutil.copytree(base_model, directory)
        recipe = {"model_name_or_path": str(base_model), "max_pixels": 112 * 112}
        (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        break_checkpoint(directory, "processor_config.json")
        report = repair_checkpoint(directory)
        assert report.status == "fixed", report.after.describe()
        assert AutoProcessor.from_pretrained(directory).image_processor.size["longest_edge"] == 112 * 112


# --------------------------------------------------------------------------------------------------------------------
# merge_adapter.py
# --------------------------------------------------------------------------------------------------------------------
def logits(model, processor):
    batch = encode(processor)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
def test_merged_logits_equal_adapter_logits(lora_run, base_model, tmp_path):
    from peft import PeftModel

    merged_dir = merge_adapter(lora_run, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    processor = AutoProcessor.from_pretrained(base_model)
    base = AutoModelForImageTextToText.from_pretrained(base_model).eval()
    base_logits = logits(base, processor)
    adapted = PeftModel.from_pretrained(base, lora_run).eval()
    with base_hidden(base_model):
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
        assert_same_processor(merged_dir, processor)
    assert next(merged.parameters()).dtype == torch.float32  # the run's dtype (recipe.yaml)
    expected = logits(adapted, processor)
    assert (expected - base_logits).abs().max() > 1e-4  # the adapter changes the output, so the check can fail
    torch.testing.assert_close(logits(merged, processor), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_unquantised_base(base_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BitsAndBytesConfig

    quantised = AutoModelForImageTextToText.from_pretrained(
        base_model, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    # Random non-zero A and B (PEFT's init_lora_weights=False), saved as a QLoRA run saves its adapter.
    targets = r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    lora = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    get_peft_model(quantised, lora).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_model
    )

    result = run_script(
        ["scripts/merge_adapter.py", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.float32}
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")  # the adapter had none: the base's
    base = AutoModelForImageTextToText.from_pretrained(base_model).eval()
    base_logits = logits(base, processor)
    expected = logits(PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), processor)
    assert (expected - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged, processor), expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=lambda mask: f"umask-{mask:03o}")
def test_merged_model_has_the_users_file_modes(umask, base_model, tmp_path):
    """Not mkdtemp's 0o700 staging directory nor safetensors' 0o600 weights: what `open` would create."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForImageTextToText.from_pretrained(base_model)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    previous = os.umask(umask)
    try:
        merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    finally:
        os.umask(previous)
    entries = [merged, *merged.rglob("*")]
    assert {entry.name: stat.S_IMODE(entry.stat().st_mode) for entry in entries} == {
        entry.name: (0o777 if entry.is_dir() else 0o666) & ~umask for entry in entries
    }
    assert "model.safetensors" in {entry.name for entry in entries}
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["base_model"] == str(base_model) and info["dtype"] == "float32"
    assert not is_base_model(merged)  # check_models.py finds it under outputs/


# --------------------------------------------------------------------------------------------------------------------
# check_models.py
# --------------------------------------------------------------------------------------------------------------------
class TestDiscoverModelDirs:
    def test_finds_models_and_adapters_but_not_checkpoints_or_hidden(self, tmp_path):
        for name, file in [
            ("a", "config.json"),
            ("a", "recipe.yaml"),
            ("group/b", "adapter_config.json"),
            ("a/checkpoint-2", "config.json"),
            (".staging/c", "config.json"),
            ("data", "train.jsonl"),
        ]:
            (tmp_path / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("{}")
        assert discover_model_dirs([tmp_path]) == [tmp_path / "a", tmp_path / "group" / "b"]
        assert tmp_path / "a" / "checkpoint-2" in discover_model_dirs([tmp_path], include_checkpoints=True)

    def test_base_models_only_when_asked_or_named(self, tmp_path):
        for name, file in [("tiny-models/qwen2_vl", "config.json"), ("run", "config.json"), ("run", "recipe.yaml")]:
            (tmp_path / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("{}")
        tiny = tmp_path / "tiny-models" / "qwen2_vl"
        assert discover_model_dirs([tmp_path]) == [tmp_path / "run"]
        assert discover_model_dirs([tmp_path], include_base_models=True) == [tmp_path / "run", tiny]
        assert discover_model_dirs([tiny]) == [tiny]  # a model directory named is always checked


@pytest.mark.slow
def test_check_models_defaults_to_the_trained_models_under_outputs(base_model, tmp_path):
    tiny = tmp_path / "outputs" / "tiny-models" / "qwen2_vl"
    shutil.copytree(base_model, tiny)
    fake_run(base_model, tmp_path / "outputs" / "demo" / "shapes_qwen2vl")
    script = str(REPO_ROOT / "scripts" / "check_models.py")
    result = run_script([script, "--max_new_tokens", "4"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("outputs/")]
    assert rows == ["outputs/demo/shapes_qwen2vl"], result.stdout
    assert "1 model(s): 1 ok, 0 failed" in result.stdout

    shutil.rmtree(tmp_path / "outputs" / "demo")
    result = run_script([script], cwd=tmp_path)
    assert result.returncode == 2 and "1 base model(s) skipped (--include_base_models" in result.stderr, result.stderr


@pytest.mark.slow
def test_check_models_prints_a_row_per_model(lora_run, smolvlm_model, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))  # no weights, no processor
    paths = [str(lora_run), str(smolvlm_model), str(broken)]
    result = run_script(["scripts/check_models.py", *paths, "--max_new_tokens", "8"])
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]  # one failed, the others still ran
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("/")}
    assert rows[str(lora_run)][1] == "qwen2_vl"
    assert rows[str(smolvlm_model)][1] == "idefics3"
    for path in (lora_run, smolvlm_model):
        load_seconds, generate_seconds = rows[str(path)][2:4]
        assert float(load_seconds) > 0 and float(generate_seconds) > 0, result.stdout
        assert rows[str(path)][-1] == "-"  # no error
    assert rows[str(broken)][2:4] == ["-", "-"] and "Error" in " ".join(rows[str(broken)][4:]), result.stdout
    assert "3 model(s): 2 ok, 1 failed" in result.stdout
