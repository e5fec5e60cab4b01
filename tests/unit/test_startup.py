"""What stops a run before anything loads, in seconds and in one line (no GPU for a GPU recipe, a model that cannot
be loaded, W&B without a login), and the library noise a run no longer prints."""

import http.server
import json
import logging
import os
import re
import sys
import threading
import warnings

import pytest

from vlm_recipes.configs import RecipeError, parse_recipe
from vlm_recipes.models.loading import ModelNotAvailableError, check_model_available
from vlm_recipes.quiet import KNOWN_NOISE, configure_logging, silence_known_noise
from vlm_recipes.reporting import fall_back_to_offline_wandb, wandb_credentials_found

from conftest import REPO_ROOT, run_script

NOISE = (
    "Failed to load CPU gemm_4bit_forward",
    "`gradient_checkpointing` is deprecated",
    "`is_gradient_checkpointing` is deprecated",
    "Setting accelerator to CPU",
    "Passing `min_pixels` and `max_pixels`",
)


# --------------------------------------------------------------------------------------------------------------------
# A GPU recipe on a machine without a GPU
# --------------------------------------------------------------------------------------------------------------------
class TestGpuRecipeWithoutGpu:
    @pytest.fixture(autouse=True)
    def no_cuda(self, monkeypatch):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        if hasattr(torch, "accelerator"):
            monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)

    def test_names_the_key_and_the_ways_on(self):
        recipe = str(REPO_ROOT / "recipes" / "chess_qwen2vl.yaml")
        with pytest.raises(RecipeError) as error:
            parse_recipe([recipe])
        message = str(error.value)
        assert message.startswith(f"recipe {recipe} sets `bf16: true`, which needs a GPU, and none is visible")
        assert "--use_cpu true --bf16 false" in message and "recipes/demo/shapes_qwen2vl.yaml" in message

    def test_on_cpu_as_suggested_it_parses(self):
        recipe = str(REPO_ROOT / "recipes" / "chess_qwen2vl.yaml")
        training_args = parse_recipe([recipe, "--use_cpu", "true", "--bf16", "false"])[1]
        assert training_args.use_cpu and not training_args.bf16


# --------------------------------------------------------------------------------------------------------------------
# A model that cannot be loaded
# --------------------------------------------------------------------------------------------------------------------
class _NotFoundHub(http.server.BaseHTTPRequestHandler):
    """A stand-in hub on the loopback address that knows no repository."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository Not Found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFoundHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    yield endpoint
    server.shutdown()


class TestModelAvailable:
    def test_local_directory(self, tiny_model_dirs):
        assert check_model_available(str(tiny_model_dirs["qwen2_vl"])) == "local directory"

    def test_directory_without_config(self, tmp_path):
        with pytest.raises(ModelNotAvailableError, match="the directory has no config.json"):
            check_model_available(str(tmp_path))

    def test_missing_path(self):
        with pytest.raises(ModelNotAvailableError, match="no such directory, and not a hub id"):
            check_model_available("outputs/tiny-models/nothing")

    def test_offline_and_not_cached(self, monkeypatch, tmp_path):
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
        with pytest.raises(ModelNotAvailableError) as error:
            check_model_available("Qwen/Qwen2-VL-2B-Instruct")
        assert str(error.value) == (
            "`model_name_or_path: Qwen/Qwen2-VL-2B-Instruct` is not in the local Hugging Face cache and the hub is "
            "offline (HF_HUB_OFFLINE=1): download it first (`hf download Qwen/Qwen2-VL-2B-Instruct`), or set "
            "`model_name_or_path` to a local directory."
        )

    def test_unknown_id(self, local_hub):
        with pytest.raises(ModelNotAvailableError, match="neither a local directory nor a model on the Hugging Face"):
            check_model_available("Qwen/Qwen2-VL-2B-Instrct")

    def test_hub_unreachable(self, monkeypatch, local_hub):
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
        with pytest.raises(ModelNotAvailableError, match=r"the Hugging Face hub \(http://127.0.0.1:9\) could not be"):
            check_model_available("Qwen/Qwen2-VL-2B-Instruct", timeout=5)

    def test_sft_stops_in_one_line_before_loading(self, tmp_path):
        result = run_script(
            [
                "scripts/sft.py",
                "recipes/chess_qwen2vl.yaml",
                "--use_cpu",
                "true",
                "--bf16",
                "false",
                "--report_to",
                "none",
                "--output_dir",
                str(tmp_path / "out"),
                "--dataset_path",
                str(tmp_path / "data"),
            ],
            env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")},
            timeout=600,
        )
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: `model_name_or_path: Qwen/Qwen2-VL-2B-Instruct` is not in the local")
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "data").exists()  # stopped before the data


# --------------------------------------------------------------------------------------------------------------------
# W&B without a login
# --------------------------------------------------------------------------------------------------------------------
class TestWandbLogin:
    def test_no_login_falls_back_to_offline_with_one_notice(self, tmp_path, caplog):
        environ = {"HOME": str(tmp_path)}
        with caplog.at_level(logging.WARNING, logger="vlm_recipes.reporting"):
            assert fall_back_to_offline_wandb(tmp_path / "out", environ)
        assert environ["WANDB_MODE"] == "offline"
        assert len(caplog.records) == 1 and "no login found" in caplog.text and "wandb sync" in caplog.text

    @pytest.mark.parametrize(
        "environ",
        [{"WANDB_API_KEY": "k"}, {"WANDB_MODE": "offline"}, {"WANDB_MODE": "disabled"}],
        ids=["api-key", "offline", "disabled"],
    )
    def test_left_alone(self, tmp_path, environ):
        environ = {"HOME": str(tmp_path), **environ}
        before = dict(environ)
        assert not fall_back_to_offline_wandb(tmp_path, environ)
        assert environ == before

    def test_netrc_login_of_the_host(self, tmp_path):
        (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
        assert wandb_credentials_found({"HOME": str(tmp_path)})
        assert not wandb_credentials_found({"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.com"})


# --------------------------------------------------------------------------------------------------------------------
# Quiet runs
# --------------------------------------------------------------------------------------------------------------------
class TestQuiet:
    @pytest.mark.parametrize(("name", "start", "_why"), KNOWN_NOISE)
    def test_known_noise_is_dropped_and_the_rest_of_the_logger_kept(self, name, start, _why, caplog):
        silence_known_noise()
        with caplog.at_level(logging.INFO, logger=name):
            logging.getLogger(name).warning(start + ": details")
            logging.getLogger(name).warning("another warning of the same library")
        assert [record.getMessage() for record in caplog.records] == ["another warning of the same library"]

    def test_library_lines_print_once(self):
        configure_logging()
        for name in ("huggingface_hub", "datasets"):
            logger = logging.getLogger(name)
            assert not (logger.handlers and logger.propagate), name

    def test_trl_default_checkpointing_key_does_not_warn_but_a_users_does(self, tmp_path):
        recipe = tmp_path / "r.yaml"
        recipe.write_text("model_name_or_path: x\ntask: shapes\ndataset_path: d\nuse_cpu: true\n")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parse_recipe([str(recipe)])
        assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parse_recipe([str(recipe), "--gradient_checkpointing", "false"])
        assert [w for w in caught if "`gradient_checkpointing` is deprecated" in str(w.message)]

    @pytest.mark.slow
    def test_a_qlora_run_prints_none_of_the_known_noise(self, tmp_path, tiny_model_dirs):
        from vlm_recipes.tasks import get_task

        get_task("shapes").make_data(tmp_path / "data", num=20, seed=0)
        result = run_script(
            [
                "scripts/sft.py",
                "recipes/demo/shapes_qwen2vl.yaml",
                "--model_name_or_path",
                str(tiny_model_dirs["qwen2_vl"]),
                "--dataset_path",
                str(tmp_path / "data"),
                "--output_dir",
                str(tmp_path / "out"),
                "--max_steps",
                "2",
                "--use_peft",
                "true",
                "--load_in_4bit",
                "true",
                "--min_pixels",
                "3136",
                "--max_pixels",
                "50176",
            ],
            env={key: value for key, value in os.environ.items() if not key.startswith("PYTHONWARNINGS")},
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        output = result.stdout + result.stderr
        assert [noise for noise in NOISE if noise in output] == []


# --------------------------------------------------------------------------------------------------------------------
# `--help` and recipe errors before the heavy imports
# --------------------------------------------------------------------------------------------------------------------
# scripts/sft.py run with torch, transformers and TRL made unimportable: whatever it answers, it answered before them.
_WITHOUT_HEAVY_LIBRARIES = (
    "import runpy, sys\n"
    "for name in ('torch', 'transformers', 'trl', 'accelerate', 'datasets', 'peft'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['scripts/sft.py', *sys.argv[1:]]\n"
    "runpy.run_path('scripts/sft.py', run_name='__main__')\n"
)


def _sft_without_heavy_libraries(*args):
    return run_script([sys.executable, "-c", _WITHOUT_HEAVY_LIBRARIES, *args], timeout=120)


class TestAnswersBeforeHeavyImports:
    def test_help_lists_every_group_of_keys(self):
        result = _sft_without_heavy_libraries("--help")
        assert result.returncode == 0, result.stderr[-2000:]
        for key in ("--learning_rate", "--lora_r", "--dataset_path", "--action_format", "--demo_data_size"):
            assert f"\n  {key}  " in result.stdout, key
        assert "usage: sft.py RECIPE.yaml" in result.stdout

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["missing.yaml"], r"error: Recipe file missing.yaml not found\."),
            (["recipes/demo/chess.yaml", "--lora_rank", "3"], r"Unknown key `lora_rank` .*did you mean `lora_r`\?"),
            (["recipes/demo/chess.yaml", "--task", "chesss"], r"Unknown task `chesss` on the command line"),
            (["--config"], r"`--config` needs a recipe path"),
        ],
    )
    def test_recipe_errors_are_one_line(self, args, message):
        result = _sft_without_heavy_libraries(*args)
        assert result.returncode == 2
        assert re.fullmatch(r"error: .*\n", result.stderr) and re.search(message, result.stderr), result.stderr

    def test_unknown_key_in_the_recipe_file(self, tmp_path):
        recipe = tmp_path / "bad.yaml"
        recipe.write_text("task: chess\nlearning_rat: 0.1\n")
        result = _sft_without_heavy_libraries(str(recipe))
        assert result.returncode == 2
        assert "Unknown key `learning_rat` in recipe" in result.stderr and "`learning_rate`" in result.stderr

    def test_a_valid_recipe_goes_on_to_the_full_parse(self):
        # With the heavy libraries blocked, passing the light checks means failing at the first heavy import.
        result = _sft_without_heavy_libraries("recipes/demo/chess.yaml", "--max_steps", "1")
        assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr


def test_key_index_matches_the_installed_libraries():
    """`recipe_keys.json` is what `--help` and the early checks read; a TRL or transformers upgrade that adds,
    removes or changes a key must regenerate it."""
    from vlm_recipes.configs import build_key_index
    from vlm_recipes.recipe_keys import KEY_INDEX_FILE

    stored, live = json.loads(KEY_INDEX_FILE.read_text()), build_key_index()
    if stored["versions"] != live["versions"]:
        pytest.skip(f"index built for {stored['versions']}, installed {live['versions']}: early key checks are off")
    assert stored == live, "stale key index: run `python -m vlm_recipes.configs --write-key-index`"


class TestEarlyChecks:
    def test_last_task_given_wins_as_in_argparse(self):
        from vlm_recipes.recipe_keys import check_command_line

        assert check_command_line(["recipes/demo/chess.yaml", "--task", "chesss", "--task", "shapes"]) is False
        with pytest.raises(RecipeError, match="Unknown task `chesss`"):
            check_command_line(["recipes/demo/chess.yaml", "--task", "shapes", "--task=chesss"])

    def test_other_library_versions_leave_key_names_to_the_full_parse(self, monkeypatch, tmp_path):
        from vlm_recipes import recipe_keys

        index = {**recipe_keys.key_index(), "versions": {"trl": "0.0.1", "transformers": "0.0.1"}}
        monkeypatch.setattr(recipe_keys, "key_index", lambda: index)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("task: chess\nkey_of_a_newer_trl: 1\n")
        assert recipe_keys.check_command_line([str(recipe), "--another_new_key", "2"]) is False
        with pytest.raises(RecipeError, match="not found"):  # the file itself is still checked
            recipe_keys.check_command_line([str(tmp_path / "missing.yaml")])
        assert "(not the versions installed)" in recipe_keys.format_help()
