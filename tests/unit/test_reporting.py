"""Run tracking and reporting: run names and W&B settings, the W&B run of a training run (offline), the compute
report against the trainer's own log and the collator, and the comparison of runs (table and PNG)."""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from vlm_recipes.comparison import (
    RunRecord,
    differing_config,
    final_metrics,
    format_comparison,
    load_local_run,
    plot_comparison,
    wandb_runs,
)
from vlm_recipes.compute import ComputeReportCallback, image_token_id_of
from vlm_recipes.configs import parse_recipe
from vlm_recipes.reporting import (
    apply_wandb_environment,
    default_run_name,
    log_evaluation,
    recipe_hash,
    start_run_tracking,
)
from vlm_recipes.tasks import get_task
from vlm_recipes.tasks.base import Task
from vlm_recipes.tasks.ui_actions.task import ANNOTATION_COLOURS

from conftest import REPO_ROOT, run_script

RUN_NAME = re.compile(r"^(?P<task>[a-z_]+)-(?P<model>.+)-(?P<hash>[0-9a-f]{8})$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------------------------------------------
# Reading an offline W&B run
# -------------------------------------------------------------------------------------------------------------------
def read_wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's `run-<id>.wandb` file.

    wandb 0.31 ships no Python reader for it (its service is written in Go), so the test reads the framing itself:
    a 7-byte header (`:W&B`, magic, version), then LevelDB-log blocks of 32 KiB whose records carry a 7-byte header
    (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and hold `wandb_internal_pb2.Record`s.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, position, pending, payloads = 32768, 7, b"", []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:  # the rest of a block too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def offline_run(wandb_dir: Path) -> dict:
    """`{"run", "config", "summary", "artifacts"}` of the single offline run under `wandb_dir`."""
    run_files = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    result = {"run": None, "config": {}, "summary": {}, "artifacts": []}

    def items(updates):
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}

    for record in read_wandb_records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run"] = record.run
            result["config"].update(items(record.run.config.update))
        elif kind == "config":
            result["config"].update(items(record.config.update))
        elif kind == "summary":
            result["summary"].update(items(record.summary.update))
        elif kind == "artifact":
            result["artifacts"].append(record.artifact)
    return result


# -------------------------------------------------------------------------------------------------------------------
# Run name and W&B settings (no training)
# -------------------------------------------------------------------------------------------------------------------
class TestRunName:
    def test_format_and_what_the_hash_covers(self):
        resolved = {"task": "ui_actions", "learning_rate": 2e-4, "output_dir": "a", "report_to": ["wandb"]}
        name = default_run_name("ui_actions", "Qwen/Qwen2-VL-2B-Instruct", resolved)
        match = RUN_NAME.match(name)
        assert match and match["task"] == "ui_actions" and match["model"] == "Qwen2-VL-2B-Instruct", name
        assert match["hash"] == recipe_hash(resolved)
        # Where and to whom a run reports leave the hash alone; what it trains changes it.
        assert recipe_hash({**resolved, "output_dir": "b", "report_to": [], "wandb_project": "x"}) == match["hash"]
        assert recipe_hash({**resolved, "learning_rate": 1e-4}) != match["hash"]
        assert default_run_name("chess", "outputs/tiny-models/qwen2_vl/", resolved).startswith("chess-qwen2_vl-")

    def test_same_name_on_every_machine(self, tmp_path, monkeypatch):
        """The data-loading defaults depend on the machine's CPUs; the default run name must not."""
        from vlm_recipes import trainer
        from vlm_recipes.trainer import apply_data_loading_defaults

        recipe = REPO_ROOT / "recipes" / "ui_actions_qwen2vl.yaml"
        names, workers = set(), set()
        for cpus in (2, 16):
            monkeypatch.setattr(trainer, "_usable_cpus", lambda cpus=cpus: cpus)
            arguments = [str(recipe), "--output_dir", str(tmp_path), "--bf16", "false"]
            script_args, training_args, model_args = parse_recipe(arguments)
            apply_data_loading_defaults(training_args, script_args.keys_set)  # as scripts/sft.py does, first
            start_run_tracking(script_args, training_args, model_args, environ={})
            names.add(training_args.run_name)
            workers.add(training_args.dataloader_num_workers)
        assert len(workers) == 2 and len(names) == 1, (workers, names)

    def test_default_unless_set_and_wandb_name_wins(self, tmp_path):
        recipe = REPO_ROOT / "recipes" / "ui_actions_qwen2vl.yaml"  # reports to W&B
        common = ["--output_dir", str(tmp_path / "out"), "--wandb_project", "from-recipe", "--bf16", "false"]

        script_args, training_args, model_args = parse_recipe([str(recipe), *common])
        start_run_tracking(script_args, training_args, model_args, environ={})
        assert RUN_NAME.match(training_args.run_name)["model"] == "Qwen2-VL-2B-Instruct"

        script_args, training_args, model_args = parse_recipe([str(recipe), *common, "--run_name", "mine"])
        start_run_tracking(script_args, training_args, model_args, environ={})
        assert training_args.run_name == "mine"

        script_args, training_args, model_args = parse_recipe([str(recipe), *common, "--run_name", "mine"])
        start_run_tracking(script_args, training_args, model_args, environ={"WANDB_NAME": "from-env"})
        assert training_args.run_name == "from-env"


class TestWandbEnvironment:
    def args(self, **values):
        keys = ("wandb_project", "wandb_entity", "wandb_group", "wandb_tags")
        return SimpleNamespace(**{key: values.get(key) for key in keys})

    def test_recipe_fills_what_the_environment_leaves_unset(self, tmp_path):
        environ = {"WANDB_PROJECT": "env-project", "WANDB_RUN_GROUP": ""}
        script_args = self.args(wandb_project="p", wandb_entity="team", wandb_group="g", wandb_tags=["a", "b"])
        applied = apply_wandb_environment(script_args, tmp_path / "out", environ)
        assert environ == {
            "WANDB_PROJECT": "env-project",  # the environment wins
            "WANDB_ENTITY": "team",
            "WANDB_RUN_GROUP": "g",  # empty counts as unset
            "WANDB_TAGS": "a,b",
            "WANDB_DIR": str((tmp_path / "out").resolve()),
        }
        assert "WANDB_PROJECT" not in applied and (tmp_path / "out").is_dir()

    def test_report_to_none_touches_nothing(self, tmp_path):
        recipe = REPO_ROOT / "recipes" / "demo" / "ui_actions.yaml"  # report_to: none
        script_args, training_args, model_args = parse_recipe(
            [str(recipe), "--output_dir", str(tmp_path / "out"), "--wandb_project", "p"]
        )
        environ = {}
        start_run_tracking(script_args, training_args, model_args, environ=environ)
        assert environ == {} and RUN_NAME.match(training_args.run_name)

    def test_a_tag_with_a_comma_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="wandb_tags"):
            apply_wandb_environment(self.args(wandb_tags=["a,b"]), tmp_path, {})


def test_log_evaluation_without_a_run_does_nothing(monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert log_evaluation(get_task("shapes"), [{"id": "a"}], ["x"], ["y"], [{}], {"exact_match": 0.0}) is False
    assert "wandb" not in sys.modules


# -------------------------------------------------------------------------------------------------------------------
# Drawing predictions for the W&B table
# -------------------------------------------------------------------------------------------------------------------
class TestAnnotateImage:
    def test_ui_actions_draws_target_and_predicted_points(self):
        task = get_task("ui_actions", {"action_format": "text", "coordinate_system": "absolute"})
        image = Image.new("RGB", (200, 100), "white")
        row = {
            "action": {"type": "click", "x": 50, "y": 40},
            "target_bbox": [40, 30, 60, 50],
            "image_size": [200, 100],
        }
        drawn = task.annotate_image(image, row, "click(150, 60)")
        radius = max(3, min(image.size) // 40)
        assert drawn.size == image.size and image.getpixel((40, 40)) == (255, 255, 255)  # the input is untouched
        assert drawn.getpixel((40, 40)) == ANNOTATION_COLOURS["target"]  # box edge
        assert drawn.getpixel((50, 40)) == ANNOTATION_COLOURS["target"]  # target point
        assert drawn.getpixel((150 + radius, 60)) == ANNOTATION_COLOURS["prediction"]  # predicted click's circle
        assert drawn.getpixel((100, 80)) == (255, 255, 255)

    def test_unparsed_prediction_draws_the_target_only(self):
        task = get_task("ui_actions", {"coordinate_system": "normalized"})
        image = Image.new("RGB", (200, 100), "white")
        row = {"action": {"type": "click", "x": 50, "y": 40}, "target_bbox": None, "image_size": [200, 100]}
        drawn = task.annotate_image(image, row, "no idea")
        colours = {colour for _, colour in drawn.getcolors()}
        assert ANNOTATION_COLOURS["target"] in colours and ANNOTATION_COLOURS["prediction"] not in colours

    def test_default_leaves_the_image(self):
        image = Image.new("RGB", (8, 8))
        assert Task().annotate_image(image, {}, "x") is image


# -------------------------------------------------------------------------------------------------------------------
# Compute counters (no training)
# -------------------------------------------------------------------------------------------------------------------
def test_count_batch_counts_tokens_labels_and_image_tokens(tmp_path):
    callback = ComputeReportCallback(accelerator=None, image_token_id=7, output_dir=tmp_path)
    batch = {
        "input_ids": torch.tensor([[1, 7, 7, 3, 4], [1, 7, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 3, 4], [-100, -100, 3, -100, -100]]),
    }
    callback.count_batch(batch)
    callback.count_batch(batch)
    # samples, tokens, padded positions, supervised, image tokens
    assert callback.counts.tolist() == [4, 16, 20, 6, 6]
    assert image_token_id_of(SimpleNamespace(image_token_id=5)) == 5
    assert image_token_id_of(SimpleNamespace(image_token=None, tokenizer=None)) is None


# -------------------------------------------------------------------------------------------------------------------
# Comparison (no training)
# -------------------------------------------------------------------------------------------------------------------
def records():
    return [
        RunRecord(
            name="a",
            config={"learning_rate": 1e-3, "task": "element", "accelerator_config": {"even_batches": True}},
            summary={"train/loss": 1.5, "eval/element/accuracy": 0.5, "compute/wall_seconds": 10.0},
            curves={"train/loss": [(1, 2.0), (2, 1.5)]},
        ),
        RunRecord(
            name="b",
            config={"learning_rate": 5e-3, "task": "element", "accelerator_config": {"even_batches": False}},
            summary={"train/loss": 1.0, "eval/element/accuracy": 0.75, "eval/element/num_examples": 4},
            curves={"train/loss": [(1, 2.0), (2, 1.0)]},
        ),
    ]


class TestComparison:
    def test_table_shows_differing_keys_and_final_metrics(self):
        runs = records()
        assert differing_config(runs) == {
            "accelerator_config.even_batches": [True, False],
            "learning_rate": [1e-3, 5e-3],
        }
        metrics = final_metrics(runs)
        assert metrics["train/loss"] == [1.5, 1.0] and metrics["eval/element/accuracy"] == [0.5, 0.75]
        assert metrics["compute/wall_seconds"] == [10.0, None]
        table = format_comparison(runs)
        assert re.search(r"learning_rate\s+0\.001\s+0\.005", table), table
        assert not re.search(r"^task\s", table, re.MULTILINE)  # keys equal in every run are left out

    def test_keys_left_at_their_default_show_it(self, tmp_path):
        """`recipe.yaml` and `run_info.json` hold only the keys that differ from their defaults: a key one run leaves
        at its default shows that default, and `null` equals an absent key whose default is null."""
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        recipe_a = {"task": "ui_actions", "learning_rate": 1e-3, "lora_r": 8, "coordinate_system": "normalized"}
        recipe_a |= {"few_shot_examples": None, "max_pixels": None}  # null; absent from b, whose default is null
        (tmp_path / "a" / "recipe.yaml").write_text(yaml.safe_dump(recipe_a))
        recipe_b = {"task": "ui_actions", "learning_rate": 5e-3, "action_format": "json"}
        (tmp_path / "b" / "run_info.json").write_text(json.dumps({"run_name": "b", "recipe": recipe_b}))
        runs = [load_local_run(tmp_path / "a"), load_local_run(tmp_path / "b")]
        assert differing_config(runs) == {
            "action_format": ["text", "json"],  # the ui_actions option's default
            "coordinate_system": ["normalized", "absolute"],
            "learning_rate": [1e-3, 5e-3],
            "lora_r": [8, 16],  # TRL's ModelConfig default
        }
        table = format_comparison(runs)
        assert re.search(r"^lora_r\s+8\s+16$", table, re.MULTILINE), table
        assert "few_shot_examples" not in table and "max_pixels" not in table

    def test_null_and_absent_keys_without_a_default(self):
        runs = [
            RunRecord(name="a", config={"task": "element", "custom": None, "max_pixels": 1024}),
            RunRecord(name="b", config={"task": "ui_actions", "few_shot_examples": "shots.json"}),
        ]
        # `custom` is no recipe key and `few_shot_examples` no option of task element: "-", not a default.
        table = format_comparison(runs)
        assert re.search(r"^custom\s+null\s+-$", table, re.MULTILINE), table
        assert re.search(r"^few_shot_examples\s+-\s+shots\.json$", table, re.MULTILINE), table
        assert re.search(r"^max_pixels\s+1024\s+null$", table, re.MULTILINE), table

    def test_plot_writes_a_png(self, tmp_path):
        path = plot_comparison(records(), tmp_path / "plots" / "compare.png")
        assert path.read_bytes()[:8] == PNG_MAGIC and not list(path.parent.glob(".*.tmp"))

    def test_plot_refuses_runs_with_nothing_to_plot(self, tmp_path):
        with pytest.raises(ValueError, match="Nothing to plot"):
            plot_comparison([RunRecord(name="a", config={})], tmp_path / "x.png")

    def test_wandb_adapter(self):
        class FakeRun:
            def __init__(self, name, learning_rate, losses):
                self.name = name
                self.config = {
                    "recipe": {"learning_rate": learning_rate},
                    "learning_rate": learning_rate,
                    "_wandb": {},
                }
                self.summary_metrics = {"train/loss": losses[-1], "eval/element/accuracy": 0.5, "_runtime": 3}
                self.losses = losses

            def history(self, samples, pandas):
                assert pandas is False
                return [{"train/global_step": step, "train/loss": loss, "_step": step} for step, loss in self.losses]

        class FakeApi:
            def runs(self, path, filters=None):
                self.called = (path, filters)
                return [FakeRun("a", 1e-3, [(2, 1.0), (1, 2.0)]), FakeRun("b", 5e-3, [(1, 2.0), (2, 0.5)])]

        api = FakeApi()
        runs = wandb_runs("proj", entity="team", group="sweep", api=api)
        assert api.called == ("team/proj", {"group": "sweep"})
        assert runs[0].config == {"learning_rate": 1e-3} and "_runtime" not in runs[0].summary
        assert runs[0].curves["train/loss"] == [(1, 2.0), (2, 1.0)]
        assert "learning_rate" in differing_config(runs)


# -------------------------------------------------------------------------------------------------------------------
# End to end: two tiny training runs (one to W&B offline with evaluation, one with report_to none)
# -------------------------------------------------------------------------------------------------------------------
TRAIN_SAMPLES, BATCH_SIZE = 6, 2


def train(root: Path, name: str, *extra: str, env: dict | None = None):
    output = root / name
    result = run_script(
        [
            "scripts/sft.py",
            "recipes/demo/ui_actions.yaml",
            "--output_dir", str(output),
            "--model_name_or_path", str(root / "tiny"),
            "--dataset_path", str(root / "data"),
            "--demo_data_size", "20",
            "--max_train_samples", str(TRAIN_SAMPLES),
            "--num_train_epochs", "1",
            "--per_device_train_batch_size", str(BATCH_SIZE),
            "--logging_steps", "1",
            "--generation_max_samples", "2",
            "--max_new_tokens", "8",
            *extra,
        ],
        env={"WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_CACHE_DIR": str(root / "wandb-cache"), **(env or {})},
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    wandb_run = train(
        root,
        "wandb",
        "--report_to", "wandb",
        "--learning_rate", "5e-3",
        "--wandb_project", "from-recipe",
        "--wandb_group", "reporting-test",
        "--wandb_tags", "tiny", "test",
        env={"WANDB_MODE": "offline", "WANDB_PROJECT": "from-env", "WANDB_RUN_GROUP": "", "WANDB_TAGS": "",
             "WANDB_NAME": "", "WANDB_DIR": ""},
    )  # fmt: skip
    plain_run = train(root, "plain", "--report_to", "none", "--learning_rate", "1e-3", "--eval_after_train", "false")
    return {"root": root, "wandb": wandb_run, "plain": plain_run}


@pytest.mark.slow
class TestTrainingRuns:
    def test_offline_wandb_run_holds_recipe_metadata_and_eval_metrics(self, runs):
        output = runs["wandb"]
        info = json.loads((output / "run_info.json").read_text())
        run = offline_run(output)  # WANDB_DIR defaults to the output directory
        # Name and settings: the recipe's where the environment is silent, the environment's where it is not.
        assert run["run"].display_name == info["run_name"]
        assert RUN_NAME.match(info["run_name"])["task"] == "ui_actions"
        assert run["run"].project == "from-env" and run["run"].run_group == "reporting-test"
        assert list(run["run"].tags) == ["tiny", "test"]
        # Config: the resolved recipe (as saved in recipe.yaml), the git commit, versions, hardware.
        config = run["config"]
        recipe = yaml.safe_load((output / "recipe.yaml").read_text())
        assert config["recipe"] == recipe == info["recipe"]
        assert config["recipe"]["learning_rate"] == 5e-3 and config["recipe"]["wandb_group"] == "reporting-test"
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        assert config["git"]["commit"] == head.stdout.strip() and isinstance(config["git"]["dirty"], bool)
        import transformers
        import trl

        assert config["versions"]["transformers"] == transformers.__version__
        assert config["versions"]["trl"] == trl.__version__
        assert config["hardware"]["num_processes"] == 1 and config["hardware"]["cpu_count"] >= 1
        # Summary: the task metrics under eval/<task>/<metric>, the compute report under compute/.
        metrics = json.loads((output / "metrics.json").read_text())["metrics"]
        summary = run["summary"]
        for key, value in metrics.items():
            logged = summary[f"eval/ui_actions/{key}"]
            # metrics.json is strict JSON: a mean over no example (NaN in memory) is null there and in W&B.
            assert (logged is None and value is None) or logged == pytest.approx(value), key
        report = json.loads((output / "compute_report.json").read_text())
        assert summary["compute/tokens_seen"] == report["tokens_seen"]
        # The table of sample predictions, with the screenshots drawn on (the target box in green).
        assert summary["eval/ui_actions/predictions/nrows"] == metrics["num_examples"]
        (artifact,) = [a for a in run["artifacts"] if a.type == "run_table"]
        images = [entry.local_path for entry in artifact.manifest.contents if entry.path.endswith(".png")]
        assert len(images) == metrics["num_examples"]
        colours = {colour for _, colour in Image.open(images[0]).convert("RGB").getcolors(1 << 20)}
        assert ANNOTATION_COLOURS["target"] in colours

    def test_report_to_none_works_without_wandb(self, runs):
        output = runs["plain"]
        assert not (output / "wandb").exists()
        info = json.loads((output / "run_info.json").read_text())
        assert "wandb" not in info and info["recipe"]["learning_rate"] == 1e-3
        assert (output / "compute_report.json").is_file() and (output / "trainer_state.json").is_file()

    @pytest.mark.parametrize("name", ["wandb", "plain"])
    def test_compute_report_agrees_with_the_trainer_and_the_collator(self, runs, name):
        from transformers import AutoProcessor

        from vlm_recipes.collator import VisionChatCollator
        from vlm_recipes.data.splits import load_splits

        output = runs[name]
        report = json.loads((output / "compute_report.json").read_text())
        state = json.loads((output / "trainer_state.json").read_text())
        final = [entry for entry in state["log_history"] if "train_runtime" in entry][-1]
        steps = TRAIN_SAMPLES // BATCH_SIZE
        # Against the trainer's own log.
        assert report["global_step"] == state["global_step"] == steps
        assert report["samples_seen"] == report["trainer"]["full_batch_samples"] == TRAIN_SAMPLES
        assert report["tokens_seen"] == max(entry.get("num_tokens", 0) for entry in state["log_history"])
        assert report["wall_seconds"] == pytest.approx(final["train_runtime"], rel=0.05, abs=0.5)
        assert report["samples_per_second"] == pytest.approx(final["train_samples_per_second"], rel=0.05, abs=0.05)
        assert report["cpu_hours"] == pytest.approx(report["wall_seconds"] / 3600) and report["gpu_hours"] is None
        assert report["device_count"] == report["num_processes"] == 1 and report["device_type"].startswith("cpu")
        assert report["peak_memory_kind"] == "process_peak_rss" and report["peak_memory_bytes"][0] > 100 * 2**20
        # Against the collator over the same training rows (batching changes the padding, not these sums).
        script_args, _, _ = parse_recipe(
            ["recipes/demo/ui_actions.yaml", "--dataset_path", str(runs["root"] / "data")]
        )
        (dataset,), _ = load_splits(script_args, ["train"], limits=[TRAIN_SAMPLES])
        processor = AutoProcessor.from_pretrained(runs["root"] / "tiny")
        batch = VisionChatCollator(processor, max_length=512)([dataset[index] for index in range(len(dataset))])
        assert report["tokens_seen"] == batch["attention_mask"].sum().item()
        assert report["supervised_tokens"] == (batch["labels"] != -100).sum().item() > 0
        assert report["image_tokens"] == (batch["input_ids"] == processor.image_token_id).sum().item() > 0
        assert report["padded_tokens"] >= report["tokens_seen"]
        assert report["padding_fraction"] == pytest.approx(1 - report["tokens_seen"] / report["padded_tokens"])

    def test_compare_runs_script(self, runs, tmp_path):
        png = tmp_path / "compare.png"
        result = run_script(
            ["scripts/compare_runs.py", "--runs", str(runs["wandb"]), str(runs["plain"]), "--output", str(png)]
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert re.search(r"learning_rate\s+0\.005\s+0\.001", result.stdout), result.stdout
        assert re.search(r"train/loss\s+\d", result.stdout) and "eval/ui_actions/parse_rate" in result.stdout
        assert "compute/tokens_per_second" in result.stdout
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
