"""Multi-process training: the shipped accelerate/DeepSpeed configs, the launch checks, the dummy image that keeps
every process on the vision tower, and real `accelerate launch` runs on CPU.

The slow tests spawn `accelerate launch` with 2 CPU processes through `scripts/sft.py` (DDP over gloo; DeepSpeed
ZeRO-2 and ZeRO-3, which pick DeepSpeed's CPU accelerator by themselves; two "nodes" on one machine through
`scripts/slurm/train.slurm`). The GPU configs are used as shipped; the CPU switches are command-line overrides:
`--use_cpu true` (the demo recipe's) for DDP, `--use_cpu false --ddp_backend gloo` for DeepSpeed. Every run trains
on a data set whose even rows are text-only and odd rows hold an image, one row per process and step, unshuffled:
process 0 gets only text-only batches and process 1 only image batches. Without
`vlm_recipes.distributed.ImageInEveryBatch` that crashes ZeRO-2 and ZeRO-3 (collective mismatch) and hangs DDP
without `find_unused_parameters` (checked by hand: these tests then fail, by crash or by their timeout).
"""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO_ROOT / "accelerate_configs"
DEEPSPEED_CONFIGS = REPO_ROOT / "deepspeed"
SLURM_SCRIPT = REPO_ROOT / "scripts" / "slurm" / "train.slurm"
DEMO_RECIPE = "recipes/demo/shapes_qwen2vl.yaml"
RUN_TIMEOUT = 300  # seconds; a hang fails the test instead of blocking the suite
DEEPSPEED_ON_CPU = ["--use_cpu", "false", "--ddp_backend", "gloo"]
QLORA = ["--use_peft", "true", "--load_in_4bit", "true"]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_environment(**extra: str) -> dict[str, str]:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        # CPU runs even on a machine with GPUs: DeepSpeed would otherwise pick CUDA and rank 1 would ask for cuda:1.
        "CUDA_VISIBLE_DEVICES": "",
        # `accelerate` and `python` of this interpreter first, for the scripts that call them by name.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }
    environment.pop("ACCELERATE_CONFIG_FILE", None)
    return environment


def run_processes(command: list[str], timeout: int = RUN_TIMEOUT, env: dict | None = None) -> tuple[int, str]:
    """Run a command in its own process group; on timeout kill that whole group (the launcher and its workers)."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env or launch_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"{' '.join(command[:6])} ... did not finish in {timeout} s (hang?); output tail:\n{output[-4000:]}"
        )
    return process.returncode, output


def accelerate_launch(config: str, *sft_args: str, num_processes: int = 2, launch_args: tuple = ()):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
        *launch_args,
        "scripts/sft.py",
        DEMO_RECIPE,
        *sft_args,
    ]
    return run_processes(command)


def assert_finished(returncode: int, output: str, engine: str, machines: int = 1) -> None:
    assert returncode == 0, output[-6000:]
    assert re.search(r"final loss: \d+\.\d+ \(steps: 2\)", output), output[-3000:]
    plural = "s" if machines > 1 else ""
    assert f"processes: {engine}, 2 processes on {machines} machine{plural}" in output, output[-3000:]
    # Process 0 had text-only batches only: they got the masked dummy image (else the run would not have finished).
    assert "got a masked dummy image" in output, output[-3000:]
    # Every process closed its process group after saving (not at interpreter exit, where gloo sometimes aborts).
    for rank in range(2):
        assert f"Process {rank} of 2: process group closed." in output, output[-3000:]


def image_tokens_per_image(model_dir: Path) -> int:
    """Image tokens the tiny model's processor makes of one 56 x 56 data-set image."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}], tokenize=False
    )
    input_ids = processor(text=[text], images=[Image.new("RGB", (56, 56))], return_tensors="pt")["input_ids"]
    return int((input_ids == processor.image_token_id).sum())


def safetensors_of(directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob(f"{prefix}*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no {prefix}*.safetensors in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return tensors


def assert_complete_model(output_dir: Path, base_dir: Path) -> None:
    """Every weight of the base model is saved whole (no empty ZeRO-3 placeholder), some trained, and it reloads."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    saved, base = safetensors_of(output_dir, "model"), safetensors_of(base_dir, "model")
    for name, tensor in base.items():
        assert name in saved, f"{name} missing from the saved model"
        assert saved[name].shape == tensor.shape and saved[name].numel() > 0, (name, saved[name].shape, tensor.shape)
    assert any(not torch.equal(saved[name].float(), base[name].float()) for name in base), "no weight was trained"
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir)
    original = AutoModelForImageTextToText.from_pretrained(base_dir)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in original.parameters())
    AutoProcessor.from_pretrained(output_dir)


def assert_complete_adapter(output_dir: Path, base_dir: Path) -> None:
    """An A and a B matrix for every targeted module, none empty, B trained (it starts at zero), and it reloads."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = json.loads((output_dir / "adapter_config.json").read_text())
    adapter = safetensors_of(output_dir, "adapter_model")
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    targets = [
        name
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and re.fullmatch(config["target_modules"], name)
    ]
    assert targets, config["target_modules"]
    assert len(adapter) == 2 * len(targets), (len(adapter), len(targets))
    rank = config["r"]
    for name, tensor in adapter.items():
        assert tensor.numel() > 0 and rank in tensor.shape, (name, tensor.shape)
    assert any(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name), "LoRA B not trained"
    model = PeftModel.from_pretrained(base, output_dir)
    loaded = {name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name}
    assert loaded.keys() == adapter.keys()
    for name, tensor in adapter.items():  # every saved value reached the model
        torch.testing.assert_close(loaded[name].detach().float(), tensor.float())
    AutoProcessor.from_pretrained(output_dir)


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny model and one mixed text-only / image data set for the whole module
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """(model_dir, data_dir): a tiny Qwen2-VL and a messages data set alternating text-only and image rows."""
    from PIL import Image

    from vlm_recipes.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("distributed")
    model_dir = build_tiny_model("qwen2_vl", root / "model")
    data_dir = root / "data"
    (data_dir / "images").mkdir(parents=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    rows = []
    for index in range(8):
        colour = list(colours)[index % 3]
        if index % 2 == 0:
            rows.append(
                {
                    "id": f"text-{index}",
                    "images": [],
                    "messages": [
                        {"role": "user", "content": f"Say the word {colour}."},
                        {"role": "assistant", "content": colour},
                    ],
                }
            )
        else:
            image = f"images/{index}.png"
            Image.new("RGB", (56, 56), colours[colour]).save(data_dir / image)
            rows.append(
                {
                    "id": f"image-{index}",
                    "images": [image],
                    "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                        {"role": "assistant", "content": colour},
                    ],
                }
            )
    (data_dir / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data_dir / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    return Path(model_dir), data_dir


def tiny_recipe_args(model_dir: Path, data_dir: Path, output_dir: Path) -> list[str]:
    """Overrides of the demo recipe: our data, 2 steps of one row per process, in order (no shuffling)."""
    return [
        "--task",
        "messages",
        "--model_name_or_path",
        str(model_dir),
        "--dataset_path",
        str(data_dir),
        "--generate_data_if_missing",
        "false",
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "1",
        "--train_sampling_strategy",
        "sequential",
        "--logging_steps",
        "1",
        "--dataloader_num_workers",
        "0",
    ]


# --------------------------------------------------------------------------------------------------------------------
# The shipped configs (fast)
# --------------------------------------------------------------------------------------------------------------------
ENGINE_OF_CONFIG = {
    "single_gpu.yaml": "NO",
    "multi_gpu.yaml": "MULTI_GPU",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    "fsdp.yaml": "FSDP",
}


class TestShippedConfigs:
    def test_every_shipped_config_is_tested(self):
        assert sorted(path.name for path in ACCELERATE_CONFIGS.glob("*.yaml")) == sorted(ENGINE_OF_CONFIG)

    @pytest.mark.parametrize("name", sorted(ENGINE_OF_CONFIG))
    def test_accelerate_config_is_a_gpu_config(self, name):
        from accelerate.commands.config.config_args import load_config_from_file

        raw = yaml.safe_load((ACCELERATE_CONFIGS / name).read_text())
        config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
        assert str(config.distributed_type).rsplit(".", 1)[-1] == ENGINE_OF_CONFIG[name]
        # GPU configs: the CPU switches are command-line overrides of the tests, never shipped.
        assert not raw.get("use_cpu", False)
        # Precision is the recipe's (`bf16: true`); with a DeepSpeed config file accelerate refuses it here anyway.
        assert "mixed_precision" not in raw
        assert raw["num_machines"] == 1 and raw["machine_rank"] == 0

    @pytest.mark.parametrize("stage", [2, 3])
    def test_deepspeed_accelerate_configs(self, stage):
        raw = yaml.safe_load((ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml").read_text())
        deepspeed = raw["deepspeed_config"]
        config_file = REPO_ROOT / deepspeed["deepspeed_config_file"]
        assert config_file.is_file()
        assert json.loads(config_file.read_text())["zero_optimization"]["stage"] == stage
        assert deepspeed["deepspeed_multinode_launcher"] == "standard"
        assert deepspeed.get("zero3_init_flag", False) == (stage == 3)

    @pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
    def test_deepspeed_json_leaves_the_trainer_settings_auto(self, name):
        config = json.loads((DEEPSPEED_CONFIGS / name).read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert config[key] == "auto", key
        assert config["gradient_clipping"] == "auto"
        assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
        # No optimizer/scheduler: the Trainer's optimizer (with its per-part parameter groups) is used.
        assert "optimizer" not in config and "scheduler" not in config
        zero = config["zero_optimization"]
        assert zero["reduce_bucket_size"] == "auto"
        if zero["stage"] == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        offloaded = {zero.get(key, {}).get("device") for key in ("offload_optimizer", "offload_param")}
        assert offloaded == ({"cpu"} if "offload" in name else {None})

    def test_documented_commands_parse(self):
        """The documented multi-GPU commands (GPU-only, not run here) name existing files and flags accelerate knows."""
        import shlex

        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        text = (REPO_ROOT / "docs" / "distributed-training.md").read_text()
        block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
        assert block, "no command block in docs/distributed-training.md"
        commands = [
            line for line in block.group(1).replace("\\\n", " ").splitlines() if line and not line.startswith("#")
        ]
        assert len(commands) == 8
        for command in commands:
            words = shlex.split(command)
            if words[0] == "sbatch":
                script = words.index("scripts/slurm/train.slurm")  # then RECIPE ACCELERATE_CONFIG
                assert (REPO_ROOT / words[script]).is_file() and (REPO_ROOT / words[script + 2]).is_file(), command
                continue
            assert words[:2] == ["accelerate", "launch"], command
            arguments = launch_command_parser().parse_args(words[2:])
            assert (REPO_ROOT / arguments.config_file).is_file(), command
            assert arguments.training_script == "scripts/sft.py", command
            if arguments.deepspeed_config_file:
                assert (REPO_ROOT / arguments.deepspeed_config_file).is_file(), command
            _validate_launch_command(arguments)  # reads the config with the command-line values on top

    def test_fsdp_config_builds_the_plugin_and_wraps_decoder_and_vision_blocks(self, tiny_model_dirs, monkeypatch):
        """FSDP does not run on CPU (accelerate runs it on GPU-type devices only): check what accelerate makes of
        the config, as `accelerate launch` hands it over, and that the shard units are found in a real VLM."""
        from unittest import mock

        from accelerate.commands.launch import _validate_launch_command, launch_command_parser
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env
        from transformers import AutoModelForImageTextToText

        arguments = launch_command_parser().parse_args(
            ["--config_file", str(ACCELERATE_CONFIGS / "fsdp.yaml"), "--num_processes", "16", "--num_machines", "2"]
            + ["--machine_rank", "1", "--main_process_ip", "10.1.2.3", "--main_process_port", "29555", "x.py"]
        )
        arguments, _, _ = _validate_launch_command(arguments)
        environment = prepare_multi_gpu_env(arguments)
        assert (arguments.nnodes, arguments.node_rank, arguments.nproc_per_node) == ("2", 1, "8")
        assert arguments.rdzv_endpoint == "10.1.2.3:29555"
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        # The plugin asks for the GPU when `sync_module_states` is on; there is none here. accelerate 1.16 asks
        # `get_torch_accelerator_backend`, earlier versions `is_cuda_available`.
        import accelerate.utils.dataclasses as accelerate_dataclasses

        if hasattr(accelerate_dataclasses, "get_torch_accelerator_backend"):
            gpu = mock.patch.object(
                accelerate_dataclasses, "get_torch_accelerator_backend", return_value=("cuda", None)
            )
        else:
            gpu = mock.patch.object(accelerate_dataclasses, "is_cuda_available", return_value=True)
        with gpu, mock.patch("torch.cuda.current_device", return_value=0):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 1
        assert plugin.sharding_strategy.name == "FULL_SHARD"
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
        assert plugin.use_orig_params and plugin.sync_module_states and plugin.cpu_ram_efficient_loading
        assert plugin.transformer_cls_names_to_wrap is None  # from the model's `_no_split_modules`
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs["qwen2_vl"])
        plugin.set_auto_wrap_policy(model)
        wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
        assert wrapped == {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"}


# --------------------------------------------------------------------------------------------------------------------
# Launch checks (fast)
# --------------------------------------------------------------------------------------------------------------------
class TestCheckLaunch:
    @staticmethod
    def arguments(distributed_type: str, world_size: int, use_cpu: bool = False):
        from accelerate.utils import DistributedType

        state = SimpleNamespace(distributed_type=DistributedType[distributed_type])
        return SimpleNamespace(distributed_state=state, world_size=world_size, use_cpu=use_cpu)

    @pytest.fixture(autouse=True)
    def clean_environment(self, monkeypatch):
        for name in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def test_single_process_and_matching_worlds_pass(self, monkeypatch):
        from vlm_recipes.distributed import check_launch

        check_launch(self.arguments("NO", 1))
        monkeypatch.setenv("WORLD_SIZE", "2")
        check_launch(self.arguments("MULTI_CPU", 2))
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        check_launch(self.arguments("DEEPSPEED", 2))

    def test_deepspeed_turned_off_by_use_cpu(self, monkeypatch):
        from vlm_recipes.configs import RecipeError
        from vlm_recipes.distributed import check_launch

        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        with pytest.raises(RecipeError, match=r"use_cpu: true` turns it off.*--use_cpu false.*--ddp_backend gloo"):
            check_launch(self.arguments("MULTI_CPU", 2, use_cpu=True))

    @pytest.mark.parametrize(
        "deepspeed, expected",
        [("true", r"--ddp_backend gloo"), ("false", r"--use_cpu true")],
    )
    def test_processes_that_would_train_alone(self, monkeypatch, deepspeed, expected):
        from vlm_recipes.configs import RecipeError
        from vlm_recipes.distributed import check_launch

        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", deepspeed)
        kind = "DEEPSPEED" if deepspeed == "true" else "NO"
        with pytest.raises(RecipeError, match=rf"started 2 processes, but each sees a world of 1.*{expected}"):
            check_launch(self.arguments(kind, 1))

    def test_fsdp_without_gpus(self, monkeypatch):
        from vlm_recipes.configs import RecipeError
        from vlm_recipes.distributed import check_launch

        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.raises(RecipeError, match="FSDP on GPUs only"):
            check_launch(self.arguments("MULTI_CPU", 2))


# --------------------------------------------------------------------------------------------------------------------
# The dummy image of text-only batches (fast)
# --------------------------------------------------------------------------------------------------------------------
TEXT_ONLY = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]},
    {"messages": [{"role": "user", "content": "Name two colours, please."}, {"role": "assistant", "content": "blue"}]},
]


def _image_example():
    from PIL import Image

    return {
        "images": [Image.new("RGB", (56, 56), (10, 200, 10))],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "green"},
        ],
    }


class TestImageInEveryBatch:
    # PaliGemma and Florence-2 take exactly one image per sample: they have no text-only batches.
    @pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "idefics2", "llava"])
    def test_text_only_batch_runs_the_vision_tower_invisibly(self, tiny_model_dirs, family):
        """Same loss and same logits on every real token as without the dummy; the vision tower ran (its weights
        get a gradient) and that gradient is zero."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from vlm_recipes.collator import IGNORE_INDEX, VisionChatCollator
        from vlm_recipes.distributed import ImageInEveryBatch
        from vlm_recipes.families import family_of_model

        processor = AutoProcessor.from_pretrained(tiny_model_dirs[family])
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[family], dtype=torch.float32).eval()
        collator = VisionChatCollator(processor)
        wrapped = ImageInEveryBatch(collator)
        plain, with_dummy = collator(TEXT_ONLY), wrapped(TEXT_ONLY)

        assert "pixel_values" not in plain and "pixel_values" in with_dummy
        assert wrapped.num_dummy_images == 1
        length = plain["input_ids"].shape[1]
        assert torch.equal(with_dummy["input_ids"][:, :length], plain["input_ids"])
        assert torch.equal(with_dummy["attention_mask"].sum(), plain["attention_mask"].sum())  # dummy is masked
        assert torch.equal(with_dummy["labels"][:, :length], plain["labels"])
        assert (with_dummy["labels"][:, length:] == IGNORE_INDEX).all()
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        assert (with_dummy["input_ids"][0, length:] == image_token).any()

        expected = model(**plain)
        model.zero_grad()
        output = model(**with_dummy)
        torch.testing.assert_close(output.loss, expected.loss)
        real = plain["attention_mask"].bool()
        torch.testing.assert_close(output.logits[:, :length][real], expected.logits[real], atol=1e-5, rtol=1e-4)
        output.loss.backward()
        vision = {name: p for name, p in model.named_parameters() if family_of_model(model).part_of(name) == "vision"}
        reached = {name for name, p in vision.items() if p.grad is not None}
        assert all(torch.count_nonzero(vision[name].grad) == 0 for name in reached)
        # The same vision weights take part as in a batch with a real image (LLaVA never uses its last layer).
        model.zero_grad(set_to_none=True)
        model(**collator([_image_example()])).loss.backward()
        assert reached and reached == {name for name, p in vision.items() if p.grad is not None}

    def test_batches_with_images_are_left_alone(self, tiny_model_dirs):
        from transformers import AutoProcessor

        from vlm_recipes.collator import VisionChatCollator
        from vlm_recipes.distributed import ImageInEveryBatch

        processor = AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"])
        collator = VisionChatCollator(processor)
        example = _image_example()
        wrapped = ImageInEveryBatch(collator)
        batch = wrapped([example, TEXT_ONLY[0]])
        expected = collator([example, TEXT_ONLY[0]])
        assert wrapped.num_dummy_images == 0
        assert batch.keys() == expected.keys()
        assert all(torch.equal(batch[key], expected[key]) for key in batch)
        assert wrapped.max_length is collator.max_length  # the wrapped collator's attributes stay reachable

    def test_only_multi_process_runs_get_the_wrapper(self, tiny_model_dirs):
        from transformers import AutoProcessor

        from vlm_recipes.collator import VisionChatCollator
        from vlm_recipes.distributed import ImageInEveryBatch, with_image_in_every_batch

        collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"]))
        assert with_image_in_every_batch(collator, SimpleNamespace(world_size=1)) is collator
        wrapped = with_image_in_every_batch(collator, SimpleNamespace(world_size=2))
        assert isinstance(wrapped, ImageInEveryBatch)
        assert with_image_in_every_batch(wrapped, SimpleNamespace(world_size=2)) is wrapped  # never twice


class TestWithoutZero3Sharding:
    def test_unsets_and_restores_the_zero3_switch_of_transformers(self):
        from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from vlm_recipes.distributed import without_zero3_sharding

        config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
        try:
            assert is_deepspeed_zero3_enabled()
            with without_zero3_sharding():
                assert not is_deepspeed_zero3_enabled()
            assert is_deepspeed_zero3_enabled()
        finally:
            unset_hf_deepspeed_config()
        del config


# --------------------------------------------------------------------------------------------------------------------
# Global batch and the Slurm script (fast)
# --------------------------------------------------------------------------------------------------------------------
def fake_slurm_bin(directory: Path, hosts: list[str]) -> Path:
    """`scontrol` that lists `hosts`, and `srun` that starts its command once per node here, concurrently, with
    SLURM_NODEID set: the Slurm commands the script uses, enough to run it on one machine."""
    directory.mkdir(parents=True, exist_ok=True)
    scontrol = directory / "scontrol"
    scontrol.write_text("#!/bin/bash\n" + "".join(f"echo {host}\n" for host in hosts))
    srun = directory / "srun"
    srun.write_text(
        "#!/bin/bash\n"
        "nodes=$SLURM_NNODES\nwhile [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done\n"
        'pids=()\nfor ((id = 0; id < nodes; id++)); do SLURM_NODEID=$id "$@" & pids+=($!); done\n'
        'status=0\nfor pid in "${pids[@]}"; do wait "$pid" || status=$?; done\nexit $status\n'
    )
    for tool in (scontrol, srun):
        tool.chmod(0o755)
    return directory


class TestGlobalBatch:
    def test_recipe_values_overrides_and_defaults(self, tmp_path):
        from trl import SFTConfig

        from vlm_recipes.distributed import global_batch

        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("per_device_train_batch_size: 4\ngradient_accumulation_steps: 4\n")
        assert global_batch(recipe, 16)["global_batch_size"] == 256
        assert global_batch(recipe, 16, ["--gradient_accumulation_steps", "2"])["global_batch_size"] == 128
        assert global_batch(recipe, 2, ["--per_device_train_batch_size=1"])["global_batch_size"] == 8
        recipe.write_text("learning_rate: 1.0e-4\n")
        defaults = SFTConfig.__dataclass_fields__
        expected = defaults["per_device_train_batch_size"].default * defaults["gradient_accumulation_steps"].default
        assert global_batch(recipe, 3)["global_batch_size"] == 3 * expected

    def test_slurm_dry_run_prints_one_launch_per_node(self, tmp_path):
        bin_dir = fake_slurm_bin(tmp_path / "bin", ["gpu-a17", "gpu-a18", "gpu-b02"])
        environment = launch_environment(
            PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHON=sys.executable,
            DRY_RUN="1",
            SLURM_NNODES="3",
            SLURM_JOB_NODELIST="gpu-a[17-18],gpu-b02",
            SLURM_GPUS_PER_NODE="h100:8",
            SLURM_JOB_ID="4242",
        )
        command = ["bash", str(SLURM_SCRIPT), "recipes/chess_qwen2vl.yaml", "accelerate_configs/deepspeed_zero3.yaml"]
        returncode, output = run_processes(
            [*command, "--output_dir", "/shared/runs/a b"], timeout=120, env=environment
        )
        assert returncode == 0, output
        # recipes/chess_qwen2vl.yaml: 4 per device x 4 accumulation; 3 nodes x 8 GPUs.
        assert (
            "global batch 384 = per_device_train_batch_size 4 x gradient_accumulation_steps 4 x 24 processes" in output
        )
        assert "rendezvous at gpu-a17:29742" in output
        launches = [line for line in output.splitlines() if line.startswith("node ")]
        assert len(launches) == 3
        for rank, (line, host) in enumerate(zip(launches, ["gpu-a17", "gpu-a18", "gpu-b02"])):
            assert line.startswith(f"node {rank} ({host}): accelerate launch ")
            assert f"--machine_rank {rank} " in line
            for flag in ("--num_machines 3", "--num_processes 24", "--main_process_ip gpu-a17"):
                assert flag in line
            assert "--config_file accelerate_configs/deepspeed_zero3.yaml" in line
            assert line.rstrip().endswith("scripts/sft.py recipes/chess_qwen2vl.yaml --output_dir /shared/runs/a\\ b")

    def test_slurm_script_refuses_missing_files(self, tmp_path):
        returncode, output = run_processes(
            ["bash", str(SLURM_SCRIPT), "recipes/none.yaml", "accelerate_configs/multi_gpu.yaml"], timeout=60
        )
        assert returncode == 2 and "recipes/none.yaml not found" in output


# --------------------------------------------------------------------------------------------------------------------
# Real multi-process runs (slow): DDP, ZeRO-2 (QLoRA), ZeRO-3 (full, QLoRA), two nodes
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
class TestMultiProcessRuns:
    def test_ddp(self, tiny_run_inputs, tmp_path):
        """DDP without `find_unused_parameters` (the setting that makes DDP fast) hangs here when process 0 skips
        the vision tower; with the dummy image it finishes."""
        model_dir, data_dir = tiny_run_inputs
        output_dir = tmp_path / "ddp"
        returncode, output = accelerate_launch(
            "multi_gpu.yaml",
            *tiny_recipe_args(model_dir, data_dir, output_dir),
            "--ddp_find_unused_parameters",
            "false",
        )
        assert_finished(returncode, output, "DDP (CPU, gloo)")
        assert_complete_model(output_dir, model_dir)
        # The compute report sums both processes: rows 0-3 (2 steps x 1 row x 2 processes), of which 1 and 3 have an
        # image; process 0's dummy images are computed but are not data (padding, not image tokens).
        report = json.loads((output_dir / "compute_report.json").read_text())
        assert report["num_processes"] == 2 and report["samples_seen"] == 4 and report["global_step"] == 2
        assert report["image_tokens"] == 2 * image_tokens_per_image(model_dir)
        assert report["tokens_seen"] == report["trainer"]["num_tokens"]  # SFTTrainer's count over both processes
        assert report["padded_tokens"] > report["tokens_seen"] and report["supervised_tokens"] > 0

    @pytest.mark.parametrize("layout", ["one_file", "two_shards"])
    def test_ddp_streaming_gives_each_process_its_rows(self, tiny_run_inputs, tmp_path, layout):
        """A streamed `dataset_name` under DDP: each process trains on its own rows, not every process on the first
        rows of the stream. One file: each process takes its part of every batch (rank 0 rows 0 and 2, rank 1 rows 1
        and 3); two parquet shards: each process one shard (rank 0 rows 0-1, rank 1 rows 2-3). Row 3 has no assistant
        turn: only the process that reads it skips it, and only if the stream is shared out."""
        import datasets

        model_dir, data_dir = tiny_run_inputs
        rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
        rows[3]["messages"] = rows[3]["messages"][:1]
        stream = tmp_path / "stream.jsonl"
        stream.write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
        if layout == "two_shards":
            table = datasets.load_dataset("json", data_files=str(stream), cache_dir=str(tmp_path / "cache"))["train"]
            (tmp_path / "sharded" / "data").mkdir(parents=True)
            for index in range(2):
                table.shard(2, index, contiguous=True).to_parquet(
                    str(tmp_path / "sharded" / "data" / f"train-0000{index}-of-00002.parquet")
                )
            stream = tmp_path / "sharded"
        output_dir = tmp_path / "ddp-stream"
        args = tiny_recipe_args(model_dir, data_dir, output_dir)
        args[args.index("--dataset_path") : args.index("--dataset_path") + 2] = [
            "--dataset_name",
            str(stream),
            "--image_base_dir",
            str(data_dir),
            "--dataset_streaming",
            "true",
            "--on_bad_row",
            "skip",
        ]
        returncode, output = accelerate_launch("multi_gpu.yaml", *args, "--ddp_find_unused_parameters", "false")
        assert_finished(returncode, output, "DDP (CPU, gloo)")
        assert "Measuring" not in output
        where = "row 3 (id image-3)" if layout == "one_file" else "row 1 of a shard (id image-3)"
        assert "malformed streamed rows skipped: 1\n" in output and f"[train], {where}" in output, output[-3000:]
        report = json.loads((output_dir / "compute_report.json").read_text())
        assert report["num_processes"] == 2 and report["samples_seen"] == 4 and report["global_step"] == 2

    def test_ddp_qlora(self, tiny_run_inputs, tmp_path):
        """QLoRA under plain DDP: each process holds its own 4-bit copy; the saved adapter is complete."""
        model_dir, data_dir = tiny_run_inputs
        output_dir = tmp_path / "ddp-qlora"
        qlora = [*QLORA, "--lora_r", "4", "--verify_saved_model", "false"]
        returncode, output = accelerate_launch(
            "multi_gpu.yaml",
            *tiny_recipe_args(model_dir, data_dir, output_dir),
            "--ddp_find_unused_parameters",
            "false",
            *qlora,
        )
        assert_finished(returncode, output, "DDP (CPU, gloo)")
        assert "Loaded Qwen2VLForConditionalGeneration quantised: 4-bit nf4" in output
        assert_complete_adapter(output_dir, model_dir)

    def test_zero2_qlora_and_its_exact_resume(self, tiny_run_inputs, tmp_path):
        """QLoRA under ZeRO-2, saving after step 1; then a run that has only that checkpoint (what a run killed
        right after the save leaves) resumes from it and logs step 2's loss exactly as the uninterrupted run."""
        model_dir, data_dir = tiny_run_inputs
        output_dir = tmp_path / "zero2-qlora"
        qlora = [*QLORA, "--lora_r", "4", "--save_strategy", "steps", "--save_steps", "1"]
        returncode, output = accelerate_launch(
            "deepspeed_zero2.yaml", *tiny_recipe_args(model_dir, data_dir, output_dir), *DEEPSPEED_ON_CPU, *qlora
        )
        assert_finished(returncode, output, "DeepSpeed ZeRO-2")
        assert "Loaded Qwen2VLForConditionalGeneration quantised: 4-bit nf4" in output
        assert_complete_adapter(output_dir, model_dir)

        resumed_dir = tmp_path / "zero2-qlora-resumed"
        shutil.copytree(output_dir / "checkpoint-1", resumed_dir / "checkpoint-1")
        returncode, output = accelerate_launch(
            "deepspeed_zero2.yaml",
            *tiny_recipe_args(model_dir, data_dir, resumed_dir),
            *DEEPSPEED_ON_CPU,
            *qlora,
            "--resume_from_checkpoint",
            "true",
        )
        assert_finished(returncode, output, "DeepSpeed ZeRO-2")

        def losses(directory):
            state = json.loads((directory / "trainer_state.json").read_text())
            return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]

        assert len(losses(output_dir)) == 2
        assert losses(resumed_dir) == losses(output_dir)

    def test_zero3_full_model_is_gathered_whole(self, tiny_run_inputs, tmp_path):
        model_dir, data_dir = tiny_run_inputs
        output_dir = tmp_path / "zero3"
        returncode, output = accelerate_launch(
            "deepspeed_zero3.yaml", *tiny_recipe_args(model_dir, data_dir, output_dir), *DEEPSPEED_ON_CPU
        )
        assert_finished(returncode, output, "DeepSpeed ZeRO-3")
        assert "reloaded: Qwen2VLForConditionalGeneration" in output  # verify_saved_model on rank 0 alone
        assert_complete_model(output_dir, model_dir)

    def test_zero3_qlora_with_evaluation_after_training(self, tiny_run_inputs, tmp_path):
        """QLoRA under ZeRO-3 with the storage dtype left unset (it becomes the compute dtype) and gradient
        checkpointing; evaluation by generation after training reloads the saved adapter on rank 0, outside ZeRO-3."""
        model_dir, data_dir = tiny_run_inputs
        output_dir = tmp_path / "zero3-qlora"
        qlora = [*QLORA, "--lora_r", "4"]
        evaluation = ["--eval_after_train", "true", "--max_new_tokens", "3", "--verify_saved_model", "false"]
        # As the real recipes train: gradient checkpointing on (reentrant under ZeRO-3 with a frozen base).
        checkpointing = ["--gradient_checkpointing", "true"]
        returncode, output = accelerate_launch(
            "deepspeed_zero3.yaml",
            *tiny_recipe_args(model_dir, data_dir, output_dir),
            *DEEPSPEED_ON_CPU,
            *qlora,
            *checkpointing,
            *evaluation,
        )
        assert_finished(returncode, output, "DeepSpeed ZeRO-3")
        # `bnb_4bit_quant_storage` became the compute dtype (float32 in this recipe), as ZeRO-3 needs.
        assert re.search(r"quantised: 4-bit nf4.*storage (torch\.)?float32", output), output[-3000:]
        assert_complete_adapter(output_dir, model_dir)
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert metrics["task"] == "messages" and "exact_match" in metrics["metrics"]
        with (output_dir / "predictions.csv").open(newline="") as handle:
            assert [row["id"] for row in csv.DictReader(handle)] == ["text-0", "image-1"]  # the 2 test rows

    def test_zero3_qlora_with_wrong_quant_storage_stops_before_training(self, tiny_run_inputs, tmp_path):
        model_dir, data_dir = tiny_run_inputs
        output_dir = tmp_path / "zero3-qlora-bf16-storage"
        qlora = [*QLORA, "--bnb_4bit_quant_storage", "bfloat16"]
        returncode, output = accelerate_launch(
            "deepspeed_zero3.yaml", *tiny_recipe_args(model_dir, data_dir, output_dir), *DEEPSPEED_ON_CPU, *qlora
        )
        assert returncode != 0
        assert "needs `bnb_4bit_quant_storage` equal to the compute dtype" in output
        assert "set `bnb_4bit_quant_storage: float32`" in output
        assert "final loss" not in output and "Loaded Qwen2VL" not in output  # stopped before loading and training
        assert not (output_dir / "adapter_model.safetensors").exists()

    def test_two_nodes_through_the_slurm_script(self, tiny_run_inputs, tmp_path):
        """Two `accelerate launch` processes with --num_machines 2 (one process each) meeting at 127.0.0.1,
        started by scripts/slurm/train.slurm under a stand-in `srun`, train with DeepSpeed ZeRO-2 to the end."""
        model_dir, data_dir = tiny_run_inputs
        output_dir = tmp_path / "two-nodes"
        bin_dir = fake_slurm_bin(tmp_path / "bin", ["127.0.0.1", "127.0.0.1"])
        environment = launch_environment(
            PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHON=sys.executable,
            SLURM_NNODES="2",
            SLURM_JOB_NODELIST="127.0.0.1",
            GPUS_PER_NODE="1",
            MAIN_PROCESS_PORT=str(free_port()),
        )
        command = ["bash", str(SLURM_SCRIPT), DEMO_RECIPE, "accelerate_configs/deepspeed_zero2.yaml"]
        arguments = [
            *tiny_recipe_args(model_dir, data_dir, output_dir),
            *DEEPSPEED_ON_CPU,
            "--verify_saved_model",
            "false",
        ]
        returncode, output = run_processes([*command, *arguments], env=environment)
        assert "global batch 2 = per_device_train_batch_size 1 x gradient_accumulation_steps 1 x 2 processes" in output
        assert_finished(returncode, output, "DeepSpeed ZeRO-2", machines=2)
        assert_complete_model(output_dir, model_dir)
