"""Recipe parsing: positional and --config recipes, overrides, and one-line errors for bad recipes."""

import enum
from typing import Literal

import pytest
import yaml

from vlm_recipes.configs import (
    RANGE_RULES,
    RecipeError,
    _fits,
    parse_recipe,
    read_recipe_file,
    recipe_key_specs,
    resolved_recipe,
    valid_recipe_keys,
)

from conftest import REPO_ROOT, run_script

SHIPPED_RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
# bitsandbytes logs this on import on a machine without the `kernels` package: not a line of ours.
IMPORT_NOISE = ("Failed to load CPU gemm_4bit_forward",)

RECIPE = """\
# Model
model_name_or_path: some/model
# Data
task: shapes
dataset_path: data/x
max_length: 300
# Training
output_dir: {output_dir}
learning_rate: 1.0e-4
use_cpu: true
bf16: false
lora_r: 8
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(output_dir=tmp_path / "out"))
    return path


class TestParseRecipe:
    def test_positional_and_config_forms_agree(self, recipe):
        positional = parse_recipe([str(recipe)])
        flagged = parse_recipe(["--config", str(recipe)])
        for a, b in zip(positional, flagged):
            assert a == b
        script_args, training_args, model_args = positional
        assert (script_args.task, script_args.dataset_path) == ("shapes", "data/x")
        assert (training_args.max_length, training_args.learning_rate) == (300, 1e-4)
        assert (model_args.model_name_or_path, model_args.lora_r) == ("some/model", 8)

    def test_command_line_overrides_file(self, recipe):
        script_args, training_args, model_args = parse_recipe(
            [str(recipe), "--learning_rate", "0.5", "--lora_r", "4", "--too_long", "drop"]
        )
        assert training_args.learning_rate == 0.5
        assert model_args.lora_r == 4
        assert script_args.too_long == "drop"
        assert training_args.max_length == 300  # untouched keys keep the file's value

    def test_unknown_recipe_key_names_closest(self, tmp_path):
        path = tmp_path / "bad.yaml"
        path.write_text("model_name_or_path: x\nlora_rank: 8\n")
        with pytest.raises(
            RecipeError, match=r"Unknown key `lora_rank` in recipe .*bad.yaml; did you mean `lora_r`\?"
        ):
            parse_recipe([str(path)])

    def test_unknown_command_line_key_names_closest(self, recipe):
        with pytest.raises(RecipeError, match=r"Unknown key `learning_rat` in the command line; did you mean"):
            parse_recipe([str(recipe), "--learning_rat", "1"])

    def test_missing_file(self, tmp_path):
        with pytest.raises(RecipeError, match=r"Recipe file .*nope.yaml not found"):
            parse_recipe([str(tmp_path / "nope.yaml")])

    def test_yaml_syntax_error_names_file_and_line(self, tmp_path):
        path = tmp_path / "broken.yaml"
        path.write_text("task: shapes\nlearning_rate: [1, 2\nmax_length: 3\n")
        with pytest.raises(RecipeError, match=r"broken.yaml:\d+:\d+: YAML syntax error"):
            read_recipe_file(path)

    def test_bare_no_strategy_asks_for_quotes(self, tmp_path):
        path = tmp_path / "r.yaml"
        path.write_text("eval_strategy: no\n")
        with pytest.raises(RecipeError, match=r'quote it: eval_strategy: "no"'):
            read_recipe_file(path)

    def test_bad_policy_value(self, recipe):
        with pytest.raises((RecipeError, SystemExit)):
            parse_recipe([str(recipe), "--too_long", "truncate"])

    def test_resolved_recipe_reparses_to_the_same_run(self, recipe, tmp_path):
        import yaml

        parsed = parse_recipe([str(recipe), "--lora_alpha", "7"])
        resolved = resolved_recipe(*parsed)
        assert resolved["lora_alpha"] == 7 and resolved["task"] == "shapes" and resolved["max_length"] == 300
        again_path = tmp_path / "again.yaml"
        again_path.write_text(yaml.safe_dump(resolved))
        again = parse_recipe([str(again_path)])
        assert again[0] == parsed[0] and again[2] == parsed[2]
        assert again[1].to_dict() == parsed[1].to_dict()


class TestRecipeValues:
    """Values of the wrong type or out of range, from the file or the command line, fail at parse time as one line."""

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            ("max_steps: 2.5", "expected an integer (-1 for no limit, or > 0)"),
            ("max_steps: 0", "expected an integer (-1 for no limit, or > 0)"),
            ("learning_rate: [0.001]", "expected a number > 0"),
            ("learning_rate: -1.0e-4", "expected a number > 0"),
            ("per_device_train_batch_size: 2.5", "expected an integer > 0"),
            ("gradient_accumulation_steps: 0", "expected an integer > 0"),
            ("num_train_epochs: 0", "expected a number > 0"),
            ("max_length: 0", "expected an integer > 0, or null"),
            ("max_length: 1e3", "expected an integer > 0, or null"),  # PyYAML reads `1e3` as a string
            ("lora_r: 0", "expected an integer > 0"),
            ("lora_dropout: 1", "expected a number in [0, 1)"),
            ("weight_decay: -0.1", "expected a number >= 0"),
            ("vision_tower_lr: 0", "expected a number > 0, or null"),
            ("save_steps: 0", "expected a number > 0"),
            ("temperature: 0", "expected a number > 0"),
            ("max_image_pixels: -1", "expected an integer > 0"),
            ("bf16: 1", "expected true or false, or null"),
            ('bf16: "true"', "expected true or false, or null"),
            ("run_name: 2024", "expected a string, or null"),
            ("eval_strategy: sometimes", "expected one of `no`, `steps`, `epoch`"),
            ("lr_scheduler_type: sometimes", "expected one of `linear`, `cosine`"),
            ("too_long: truncate", "expected one of `error`, `drop`"),
            ("dtype: bf16", "expected one of `auto`, `bfloat16`, `float16`, `float32`, or null"),
            ("wandb_tags: [a, 1]", "expected a list of strings, or null"),
            ("model_init_kwargs: 3", "expected a mapping or a string, or null"),
        ],
    )
    def test_bad_recipe_value(self, recipe, line, expected):
        key = line.split(":")[0]
        recipe.write_text(recipe.read_text() + line + "\n")
        with pytest.raises(RecipeError) as raised:
            parse_recipe([str(recipe)])
        message = str(raised.value)
        assert message.startswith(f"`{key}: ") and f" in {recipe}: {expected}" in message
        assert "\n" not in message

    def test_message_names_key_value_file_and_expectation(self, recipe):
        recipe.write_text(recipe.read_text() + "max_steps: 2.5\n")
        with pytest.raises(RecipeError) as raised:
            parse_recipe([str(recipe)])
        assert str(raised.value) == f"`max_steps: 2.5` in {recipe}: expected an integer (-1 for no limit, or > 0)."

    def test_task_option_value(self, recipe):
        recipe.write_text(recipe.read_text().replace("task: shapes", "task: medical_steps") + "val_split: half\n")
        with pytest.raises(RecipeError, match=r'^`val_split: "half"` in .*: expected a number\.$'):
            parse_recipe([str(recipe)])

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (["--max_steps", "abc"], "`--max_steps abc` on the command line: expected an integer (-1 for no limit"),
            (["--max_steps", "2.5"], "`--max_steps 2.5` on the command line: expected an integer"),
            (["--max_steps=0"], "`--max_steps 0` on the command line: expected an integer"),
            (["--max_steps"], "`--max_steps` on the command line needs a value: expected an integer"),
            (["--learning_rate", "-1"], "`--learning_rate -1` on the command line: expected a number > 0"),
            (["--per_device_train_batch_size", "0"], "`--per_device_train_batch_size 0` on the command line"),
            (["--bf16", "maybe"], "`--bf16 maybe` on the command line: expected true or false"),
            (["--too_long", "truncate"], "`--too_long truncate` on the command line: expected one of `error`, `drop`"),
            (
                ["--eval_strategy", "sometimes"],
                "`--eval_strategy sometimes` on the command line: expected one of `no`",
            ),
            (["--lora_dropout", "1.5"], "`--lora_dropout 1.5` on the command line: expected a number in [0, 1)"),
        ],
    )
    def test_bad_command_line_value(self, recipe, capsys, args, expected):
        with pytest.raises(RecipeError) as raised:
            parse_recipe([str(recipe), *args])
        assert str(raised.value).startswith(expected)
        assert "usage:" not in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("line", "args", "key", "value"),
        [
            ("learning_rate: 1", [], "learning_rate", 1.0),  # a YAML int for a float key
            ("learning_rate: 1e-4", [], "learning_rate", 1e-4),  # a YAML string that reads as a number
            ("max_steps: -1", [], "max_steps", -1),
            ("max_length: null", [], "max_length", None),
            ("eval_strategy: epoch", [], "eval_strategy", "epoch"),
            ("warmup_steps: 0.1", [], "warmup_steps", 0.1),
            ("", ["--learning_rate", "1"], "learning_rate", 1.0),
            ("", ["--max_steps", "-1"], "max_steps", -1),
            ("", ["--max_steps=5"], "max_steps", 5),
            ("", ["--bf16", "false"], "bf16", False),
            ("resume_from_checkpoint: true", [], "resume_from_checkpoint", True),  # the newest complete checkpoint
            ("fsdp: true", [], "fsdp", True),  # transformers' documented form; its annotation says a string
            ("", ["--resume_from_checkpoint", "true"], "resume_from_checkpoint", "true"),
            ("", ["--resume_from_checkpoint", "out/checkpoint-4"], "resume_from_checkpoint", "out/checkpoint-4"),
        ],
    )
    def test_accepted_edge_cases(self, recipe, line, args, key, value):
        recipe.write_text(recipe.read_text() + line + "\n")
        training_args = parse_recipe([str(recipe), *args])[1]
        assert getattr(training_args, key) == value

    @pytest.mark.parametrize("value", ["all-linear", ".*language_model.*proj", ["q_proj", "v_proj"]])
    def test_lora_target_modules_as_a_string_or_names(self, recipe, value):
        recipe.write_text(recipe.read_text() + yaml.safe_dump({"lora_target_modules": value}))
        assert parse_recipe([str(recipe)])[2].lora_target_modules == value

    def test_null_for_optional_keys(self, recipe):
        recipe.write_text(recipe.read_text() + "vision_tower_lr: null\nmax_train_samples: null\n")
        script_args, _, model_args = parse_recipe([str(recipe)])
        assert model_args.vision_tower_lr is None and script_args.max_train_samples is None

    def test_help_still_prints(self, recipe, capsys):
        with pytest.raises(SystemExit) as raised:
            parse_recipe([str(recipe), "--help"])
        assert raised.value.code == 0
        assert "--max_steps" in capsys.readouterr().out

    def test_range_rules_name_numeric_recipe_keys(self):
        specs = recipe_key_specs()
        assert set(RANGE_RULES) <= valid_recipe_keys()
        for key in RANGE_RULES:
            assert _fits(1, specs[key].annotation) and not _fits("x", specs[key].annotation), key

    class Color(enum.Enum):
        RED = "red"

    @pytest.mark.parametrize(
        ("annotation", "accepted", "rejected"),
        [
            (int, [3, -1, "3"], [2.5, True, "2.5", None, [3]]),
            (float, [1, 2.5, "1e-4"], [True, "abc", [0.1], None]),
            (bool, [True, False], [0, 1, "true", None]),
            (str, ["x", ""], [1, None, ["x"]]),
            (int | None, [None, 3], [2.5]),
            (list[str], [[], ["a"]], ["a", [1]]),
            (dict | str | None, [{}, "x", None], [3, [1]]),
            (Literal["a", False], ["a", False], [0, "b", None]),
            (Color, ["red", Color.RED], ["blue", None]),
            (Color | str, ["red"], ["blue"]),  # transformers' `IntervalStrategy | str`: the enum's values only
            (str | bool, ["all", True], [1, None]),
            (complex, [1j, "anything"], []),  # an annotation not handled is left to the dataclass
        ],
    )
    def test_annotations(self, annotation, accepted, rejected):
        assert all(_fits(value, annotation) for value in accepted)
        assert not any(_fits(value, annotation) for value in rejected)


class TestTaskNames:
    def test_unknown_task_on_command_line_names_closest(self, recipe):
        with pytest.raises(RecipeError) as raised:
            parse_recipe([str(recipe), "--task", "chesss"])
        message = str(raised.value)
        assert message.startswith("Unknown task `chesss` on the command line; registered tasks: `chess`, ")
        assert "`shapes`" in message and message.endswith("did you mean `chess`?")

    def test_unknown_task_in_recipe_file(self, recipe):
        recipe.write_text(recipe.read_text().replace("task: shapes", "task: ui_action"))
        with pytest.raises(
            RecipeError, match=rf"^Unknown task `ui_action` in {recipe}; .*did you mean `ui_actions`\?$"
        ):
            parse_recipe([str(recipe)])

    def test_command_line_task_wins_over_file(self, recipe):
        recipe.write_text(recipe.read_text().replace("task: shapes", "task: nonsense"))
        assert parse_recipe([str(recipe), "--task", "chess"])[0].task == "chess"


class TestSftErrorsAreOneLine:
    """The entry point reports recipe problems as one line on stderr, before any model loads."""

    def test_bad_command_line_value_is_one_line(self):
        result = run_script(["scripts/sft.py", "recipes/demo/element.yaml", "--max_steps", "abc"])
        lines = [line for line in result.stderr.splitlines() if not line.startswith(IMPORT_NOISE)]
        assert result.returncode == 2
        assert lines == [
            "error: `--max_steps abc` on the command line: expected an integer (-1 for no limit, or > 0)."
        ]

    @pytest.mark.parametrize(
        ("write", "expected"),
        [
            ("model_name_or_path: x\nper_device_batch_size: 2\n", "did you mean `per_device_"),
            ("task: [unclosed\n", "YAML syntax error"),
            (None, "not found"),
        ],
    )
    def test_recipe_problems(self, tmp_path, write, expected):
        path = tmp_path / "r.yaml"
        if write is not None:
            path.write_text(write)
        result = run_script(["scripts/sft.py", str(path)])
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and expected in lines[-1]
        assert "Traceback" not in result.stderr

    def test_missing_dataset_path(self, tmp_path, tiny_model_dirs):
        path = tmp_path / "r.yaml"
        path.write_text(
            f"model_name_or_path: {tiny_model_dirs['qwen2_vl']}\ntask: shapes\ndataset_path: {tmp_path / 'no-data'}\n"
            f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nbf16: false\n"
        )
        result = run_script(["scripts/sft.py", str(path)])
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: Dataset path") and "no-data" in last and "make_data.py" in last
        assert not (tmp_path / "out").exists()


def test_recipes_are_shipped():
    assert len(SHIPPED_RECIPES) >= 10


@pytest.mark.parametrize("recipe", SHIPPED_RECIPES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_shipped_recipe_parses(recipe):
    """Every key and value of every recipe is valid, as shipped. Without a bf16 GPU, transformers refuses `bf16: true`
    (after our checks have passed the file's values), so the GPU recipes are parsed with bf16 off there."""
    import torch

    bf16_machine = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if bf16_machine or read_recipe_file(recipe).get("bf16") is not True:
        script_args, _, _ = parse_recipe([str(recipe)])
    else:
        script_args, _, _ = parse_recipe([str(recipe), "--bf16", "false", "--use_cpu", "true"])
    assert script_args.task == read_recipe_file(recipe)["task"], recipe  # the recipe's own task, not the default
