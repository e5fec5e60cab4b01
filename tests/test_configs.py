"""Recipe parsing: positional and --config recipes, overrides, and one-line errors for bad recipes."""

import pytest

from vlm_recipes.configs import RecipeError, parse_recipe, read_recipe_file, resolved_recipe

from conftest import REPO_ROOT, run_script

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


class TestSftErrorsAreOneLine:
    """The entry point reports recipe problems as one line on stderr, before any model loads."""

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


def test_every_shipped_recipe_parses():
    """Every key of every recipe is valid (the GPU recipes' bf16 is switched off: this machine has no GPU)."""
    recipes = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        script_args, _, _ = parse_recipe([str(recipe), "--bf16", "false", "--use_cpu", "true"])
        assert script_args.task != "messages", recipe
