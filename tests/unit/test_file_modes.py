"""What we publish gets the file modes of the user's umask (`vlm_recipes.files`): the demos' tiny model and data
(built in a `mkdtemp` directory), a run's checkpoints and final output (safetensors writes its files 0o600). The
merged model's modes are tested in tests/e2e/test_checkpoints.py."""

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlm_recipes.configs import VLMScriptArguments
from vlm_recipes.demo_inputs import ensure_demo_inputs
from vlm_recipes.files import apply_user_modes, current_umask
from vlm_recipes.resume import publish_directory, replace_directory

UMASKS = [0o022, 0o027]


@pytest.fixture(params=UMASKS, ids=lambda mask: f"umask-{mask:03o}")
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """{path relative to root: permission bits} of root and everything under it."""
    entries = [root, *sorted(root.rglob("*"))]
    return {str(entry.relative_to(root)): stat.S_IMODE(entry.lstat().st_mode) for entry in entries}


def assert_user_modes(root: Path, mask: int) -> None:
    found = modes(root)
    expected = {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in found}
    assert found == expected


class TestApplyUserModes:
    def test_current_umask_reads_and_keeps_it(self, umask):
        assert current_umask() == umask
        assert current_umask() == umask

    def test_private_tree_gets_the_umask_modes_and_executables_stay_executable(self, umask, tmp_path):
        root = tmp_path / "tree"
        (root / "sub").mkdir(parents=True)
        save_file({"weight": torch.zeros(2)}, str(root / "sub" / "model.safetensors"))
        (root / "script.sh").write_text("#!/bin/sh\n")
        os.chmod(root / "script.sh", 0o700)
        os.chmod(root, 0o700)
        (root / "link").symlink_to("sub/model.safetensors")
        # safetensors >= 0.8 writes 0o600 whatever the umask (safetensors#782): the reason this module exists.
        assert stat.S_IMODE((root / "sub" / "model.safetensors").stat().st_mode) == 0o600
        apply_user_modes(root)
        found = modes(root)
        assert found["."] == found["sub"] == 0o777 & ~umask
        assert found["sub/model.safetensors"] == 0o666 & ~umask
        assert found["script.sh"] == 0o777 & ~umask


class TestPublishedSaves:
    def test_final_output_files(self, umask, tmp_path):
        output, staging = tmp_path / "out", tmp_path / "out" / ".tmp-final"
        staging.mkdir(parents=True)
        save_file({"weight": torch.zeros(2)}, str(staging / "model.safetensors"))
        (staging / "config.json").write_text("{}")
        publish_directory(staging, output)
        assert_user_modes(output, umask)

    def test_checkpoint_directory(self, umask, tmp_path):
        staged = tmp_path / ".tmp-checkpoint-2" / "checkpoint-2"
        staged.mkdir(parents=True)
        save_file({"weight": torch.zeros(2)}, str(staged / "adapter_model.safetensors"))
        os.chmod(staged, 0o700)
        replace_directory(staged, tmp_path / "checkpoint-2")
        assert_user_modes(tmp_path / "checkpoint-2", umask)


@pytest.mark.slow  # builds a tiny model (a few seconds)
def test_demo_model_and_data_built_for_a_recipe(umask, tmp_path):
    script_args = VLMScriptArguments(
        task="shapes",
        dataset_path=str(tmp_path / "data" / "demo" / "shapes"),
        tiny_model_family="qwen2_vl",
        generate_data_if_missing=True,
        demo_data_size=8,
    )
    model_dir = tmp_path / "outputs" / "tiny-models" / "qwen2_vl"
    ensure_demo_inputs(script_args, str(model_dir))
    assert (model_dir / "model.safetensors").is_file()
    assert_user_modes(model_dir, umask)
    assert_user_modes(Path(script_args.dataset_path), umask)
