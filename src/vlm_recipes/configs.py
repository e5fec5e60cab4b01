"""Recipe configuration: our script arguments on top of TRL's `SFTConfig` and `ModelConfig`, and the recipe parser.

A recipe is a YAML file whose keys are fields of `VLMScriptArguments`, `trl.SFTConfig` and `trl.ModelConfig`
(TRL's and the Trainer's own names wherever those exist). `parse_recipe` reads it the way users type it:
`scripts/sft.py RECIPE.yaml [--key value ...]` or `scripts/sft.py --config RECIPE.yaml [--key value ...]`, with
command-line keys overriding the file, and fails on unknown keys, values of the wrong type or out of range, and
unknown task names before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from . import recipe_keys
from .recipe_keys import RecipeError, split_recipe_path

__all__ = [
    "RecipeError",
    "VLMModelConfig",
    "VLMScriptArguments",
    "parse_recipe",
    "read_recipe_file",
    "resolved_recipe",
]

TOO_LONG_POLICIES = ("error", "drop")
# The formats of `dataset_name` datasets (`vlm_recipes.data.formats.FORMATS`, which this must equal; a test checks).
DATASET_FORMATS = ("messages", "prompt_completion", "llava", "sharegpt")
BAD_ROW_POLICIES = ("error", "skip")


@dataclass
class VLMScriptArguments(ScriptArguments):
    """Arguments of vlm-recipes' scripts beyond TRL's `SFTConfig` and `ModelConfig`.

    Args:
        task (`str`, defaults to `"messages"`):
            Registered task (`vlm_recipes.tasks.TASKS`) that reads the native data format into messages.
        dataset_name (`str`, *optional*):
            TRL's key: a hub dataset id, a local folder in hub layout (parquet/json/jsonl/csv/arrow files), a
            `save_to_disk` folder or one data file, read through `datasets` (with TRL's `dataset_config`,
            `dataset_train_split`, `dataset_test_split` and `dataset_streaming`). Instead of `dataset_path`.
        dataset_format (`str`, defaults to `"auto"`):
            Format of a `dataset_name` dataset: `messages`, `prompt_completion`, `llava` or `sharegpt`; `auto`
            detects it from the columns.
        dataset_path (`str`, *optional*):
            Local directory holding the task's native data files (instead of `dataset_name`).
        image_base_dir (`str`, *optional*):
            Directory that relative image paths are resolved against; defaults to `dataset_path`.
        eval_split (`str`, *optional*, defaults to `"val"`):
            Split used for evaluation during training (`None` to skip). With `dataset_name`, defaults to
            `dataset_test_split`, as in TRL.
        max_train_samples (`int`, *optional*):
            Use at most this many training samples (the first ones).
        max_eval_samples (`int`, *optional*):
            Use at most this many evaluation samples.
        min_pixels (`int`, *optional*):
            Image pixel budget, lower bound, for processors that resize by area (Qwen-VL).
        max_pixels (`int`, *optional*):
            Image pixel budget, upper bound. Caps the image tokens per image.
        too_long (`str`, defaults to `"error"`):
            A sample over `max_length` is never truncated: `error` stops, `drop` leaves it out and reports the count.
        on_bad_row (`str`, defaults to `"error"`):
            A malformed data row: `error` stops before training, `skip` leaves it out, counted and listed. Images
            that cannot be decoded during training follow the same policy (the sample is dropped from its batch).
        max_image_pixels (`int`, defaults to PIL's `Image.MAX_IMAGE_PIXELS`, 89,478,485):
            An image whose header claims more pixels than this is a bad row (a decompression bomb, or a scan too large
            to train on).
        tiny_model_family (`str`, *optional*):
            If set and `model_name_or_path` does not exist, build a tiny random model of this family there first.
        generate_data_if_missing (`bool`, defaults to `False`):
            If `dataset_path` does not exist, generate the task's demo data there first.
        demo_data_size (`int`, defaults to `64`):
            Number of samples of generated demo data.
        eval_after_train (`bool`, defaults to `False`):
            After training, answer the held-out split by generation and write the task metrics to
            `<output_dir>/metrics.json` (and `predictions.csv`).
        generation_split (`str`, defaults to `"test"`):
            Split evaluated by generation.
        generation_max_samples (`int`, *optional*):
            Evaluate at most this many samples by generation.
        max_new_tokens (`int`, defaults to `128`):
            Generation length limit at evaluation.
        do_sample (`bool`, defaults to `False`):
            Sample at evaluation instead of greedy decoding.
        temperature (`float`, defaults to `1.0`):
            Sampling temperature (with `do_sample`).
        verify_saved_model (`bool`, defaults to `False`):
            After saving, reload the output directory with `AutoProcessor` and `AutoModelForImageTextToText`.
        wandb_project (`str`, *optional*):
            W&B project of the run (`WANDB_PROJECT` in the environment wins).
        wandb_entity (`str`, *optional*):
            W&B entity (user or team) of the run (`WANDB_ENTITY` wins).
        wandb_group (`str`, *optional*):
            W&B group, to compare related runs together (`WANDB_RUN_GROUP` wins).
        wandb_tags (`list[str]`, *optional*):
            W&B tags of the run (`WANDB_TAGS`, comma-separated, wins).
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, local hub-layout folder, save_to_disk folder or data file (instead of "
            "`dataset_path`)."
        },
    )
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Format of a `dataset_name` dataset; `auto` detects it from the columns.",
            "choices": ["auto", *DATASET_FORMATS],
        },
    )
    task: str = field(default="messages", metadata={"help": "Registered task that reads the native data format."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local directory of the task's native data."})
    image_base_dir: str | None = field(
        default=None, metadata={"help": "Directory for relative image paths; defaults to `dataset_path`."}
    )
    eval_split: str | None = field(default="val", metadata={"help": "Evaluation split during training, or None."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many train samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval samples."})
    min_pixels: int | None = field(default=None, metadata={"help": "Image pixel budget, lower bound (Qwen-VL)."})
    max_pixels: int | None = field(default=None, metadata={"help": "Image pixel budget, upper bound (Qwen-VL)."})
    too_long: str = field(
        default="error",
        metadata={
            "help": "Sample over `max_length`: `error` or `drop` (counted).",
            "choices": list(TOO_LONG_POLICIES),
        },
    )
    on_bad_row: str = field(
        default="error",
        metadata={"help": "Malformed data row: `error` or `skip` (counted).", "choices": list(BAD_ROW_POLICIES)},
    )
    max_image_pixels: int = field(
        default=89_478_485,  # PIL's Image.MAX_IMAGE_PIXELS (Pillow 11-13)
        metadata={"help": "An image with more pixels than this (read from its header) is a bad row."},
    )
    tiny_model_family: str | None = field(
        default=None, metadata={"help": "Build a tiny model of this family at `model_name_or_path` if missing."}
    )
    generate_data_if_missing: bool = field(
        default=False, metadata={"help": "Generate the task's demo data at `dataset_path` if it is missing."}
    )
    demo_data_size: int = field(default=64, metadata={"help": "Number of generated demo samples."})
    eval_after_train: bool = field(
        default=False, metadata={"help": "Evaluate by generation on `generation_split` after training."}
    )
    generation_split: str = field(default="test", metadata={"help": "Split evaluated by generation."})
    generation_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate at most this many samples by generation."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Generation length limit at evaluation."})
    do_sample: bool = field(default=False, metadata={"help": "Sample at evaluation instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with `do_sample`)."})
    verify_saved_model: bool = field(
        default=False, metadata={"help": "Reload the saved output directory after training, as a check."}
    )
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (`WANDB_PROJECT` wins)."})
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B entity (`WANDB_ENTITY` wins)."})
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group (`WANDB_RUN_GROUP` wins)."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B tags (`WANDB_TAGS` wins)."})
    # Set by `parse_recipe`, not recipe keys: the options of the recipe's task (`Task.options` fields), and the keys
    # the user set (recipe file and command line), so that scripts choose defaults for the others.
    task_options: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    keys_set: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.too_long not in TOO_LONG_POLICIES:
            raise RecipeError(f"`too_long` must be one of {TOO_LONG_POLICIES}, got {self.too_long!r}.")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise RecipeError(f"`on_bad_row` must be one of {BAD_ROW_POLICIES}, got {self.on_bad_row!r}.")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise RecipeError(f"`min_pixels`={self.min_pixels} is above `max_pixels`={self.max_pixels}.")
        if self.dataset_format not in ("auto", *DATASET_FORMATS):
            raise RecipeError(
                f"`dataset_format` must be auto or one of {list(DATASET_FORMATS)}, got {self.dataset_format!r}."
            )


@dataclass
class VLMModelConfig(ModelConfig):
    """TRL's `ModelConfig` plus the parts of a VLM: which get LoRA, which are frozen, and their learning rates.

    Args:
        lora_vision (`bool`, defaults to `False`):
            Also put LoRA on the vision tower and projector. By default LoRA targets the language model only.
        freeze_vision_tower (`bool`, defaults to `False`):
            Freeze the vision tower's weights (full fine-tuning; with LoRA only the adapters train anyway).
        freeze_projector (`bool`, defaults to `False`):
            Freeze the projector (connector / merger) weights.
        vision_tower_lr (`float`, *optional*):
            Learning rate of the vision tower's trainable parameters; defaults to `learning_rate`.
        projector_lr (`float`, *optional*):
            Learning rate of the projector's trainable parameters; defaults to `learning_rate`.
        language_model_lr (`float`, *optional*):
            Learning rate of the language model's trainable parameters; defaults to `learning_rate`.
        use_bnb_nested_quant (`bool`, defaults to `True`):
            TRL's key, default changed: 4-bit QLoRA uses double quantisation (and NF4, TRL's default
            `bnb_4bit_quant_type`), so `--use_peft true --load_in_4bit true` is the QLoRA of the paper.
    """

    lora_vision: bool = field(
        default=False, metadata={"help": "Also put LoRA on the vision tower and projector (default: LM only)."}
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Freeze the vision tower."})
    freeze_projector: bool = field(default=False, metadata={"help": "Freeze the projector (connector)."})
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower; defaults to `learning_rate`."}
    )
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector; defaults to `learning_rate`."}
    )
    language_model_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the language model; defaults to `learning_rate`."}
    )
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "Double quantisation of 4-bit weights (QLoRA default here)."}
    )

    def __post_init__(self):
        from .models.checks import check_model_args  # clearer messages than TRL's; the checks live with the model code

        check_model_args(self)
        super().__post_init__()


RECIPE_DATACLASSES = (VLMScriptArguments, SFTConfig, VLMModelConfig)
# Keys a recipe may hold besides dataclass fields (TrlParser sets environment variables from `env`).
EXTRA_RECIPE_KEYS = ("env",)


def _task_option_classes() -> dict[str, type]:
    """Each registered task's options dataclass (`Task.options`): its fields are recipe keys of that task only."""
    from .tasks import TASKS

    return {name: task.options for name, task in sorted(TASKS.items()) if task.options is not None}


def _recipe_dataclasses() -> tuple[type, ...]:
    return RECIPE_DATACLASSES + tuple(dict.fromkeys(_task_option_classes().values()))


def valid_recipe_keys() -> set[str]:
    fields = {f.name for cls in _recipe_dataclasses() for f in dataclasses.fields(cls) if f.init}
    return fields | set(EXTRA_RECIPE_KEYS)


def _unknown_key_error(key: str, where: str) -> RecipeError:
    return recipe_keys.unknown_key_error(key, where, valid_recipe_keys())


# Values ----------------------------------------------------------------------------------------------------------
# TrlParser hands YAML values to argparse as defaults, which argparse never converts unless they are strings, so a
# recipe's `max_steps: 2.5` or `learning_rate: [0.001]` would reach the Trainer after the data and the model have
# loaded. Every value is checked here first against its field's annotation, its `choices` and the range rules below.


@dataclass(frozen=True)
class Range:
    """A range rule of a numeric key: `test` on its value when set (not null), `expected` words for the message."""

    test: Callable[[float], bool]
    expected: str


POSITIVE = Range(lambda value: value > 0, "> 0")
NON_NEGATIVE = Range(lambda value: value >= 0, ">= 0")
FRACTION = Range(lambda value: 0 <= value < 1, "in [0, 1)")
STEP_LIMIT = Range(lambda value: value == -1 or value > 0, "(-1 for no limit, or > 0)")

# Ranges of numeric recipe keys, checked (when the key is set) before anything loads.
RANGE_RULES: dict[str, Range] = {
    # Data
    "max_train_samples": POSITIVE,
    "max_eval_samples": POSITIVE,
    "min_pixels": POSITIVE,
    "max_pixels": POSITIVE,
    "max_image_pixels": POSITIVE,
    "max_length": POSITIVE,
    "demo_data_size": POSITIVE,
    # LoRA
    "lora_r": POSITIVE,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    # Training
    "per_device_train_batch_size": POSITIVE,
    "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE,
    "num_train_epochs": POSITIVE,
    "max_steps": STEP_LIMIT,
    "learning_rate": POSITIVE,
    "vision_tower_lr": POSITIVE,
    "projector_lr": POSITIVE,
    "language_model_lr": POSITIVE,
    "warmup_steps": NON_NEGATIVE,  # transformers 5 dropped `warmup_ratio`: a value below 1 is the fraction of steps
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "dataloader_num_workers": NON_NEGATIVE,
    # Logging and saving (a value below 1 is a fraction of the training steps)
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    # Evaluation by generation
    "generation_max_samples": POSITIVE,
    "max_new_tokens": POSITIVE,
    "temperature": POSITIVE,
}


@dataclass(frozen=True)
class KeySpec:
    """What a recipe key accepts: its field's resolved annotation and `metadata["choices"]`, if any."""

    annotation: Any
    choices: tuple[Any, ...] = ()


# Keys whose accepted values are wider than their field's annotation.
ANNOTATION_OVERRIDES: dict[str, Any] = {
    # Typed `str | None` by transformers, but `true` (the newest complete checkpoint of `output_dir`) is what
    # users write, and what `VLMSFTTrainer` resolves (`vlm_recipes.resume.resolve_resume_checkpoint`).
    "resume_from_checkpoint": str | bool | None,
    # TRL documents names or one string (`all-linear`, a regex); the annotation says a list only.
    "lora_target_modules": str | list[str] | None,
    "lora_target_parameters": str | list[str] | None,
    # transformers takes `fsdp: true` (its argparse `const`); the annotation says a string.
    "fsdp": str | bool | None,
}


def recipe_key_specs() -> dict[str, KeySpec]:
    specs: dict[str, KeySpec] = {}
    for cls in _recipe_dataclasses():
        hints = typing.get_type_hints(cls)
        for dataclass_field in dataclasses.fields(cls):
            if dataclass_field.init:
                name = dataclass_field.name
                choices = tuple(dataclass_field.metadata.get("choices", ()))
                annotation = ANNOTATION_OVERRIDES.get(name, hints.get(name, Any))
                specs.setdefault(name, KeySpec(annotation, choices))
    return specs


def _is_enum(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, enum.Enum)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return (annotation,)
    members = typing.get_args(annotation)
    # transformers writes `IntervalStrategy | str` for "the enum or its value as a string", not for any string.
    if str in members and any(_is_enum(member) for member in members):
        members = tuple(member for member in members if member is not str)
    return members


def _number(value: Any) -> int | float | None:
    """The number a value stands for: argparse converts string defaults, and PyYAML reads `1e-4` as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
    return None


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a recipe value fits a field annotation; an annotation not handled here accepts anything."""
    members = _union_members(annotation)
    if len(members) > 1:
        return any(_fits(value, member) for member in members)
    annotation = members[0]
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(_number(value), int)
    if annotation is float:
        return _number(value) is not None
    if annotation is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return any(
            value is choice or (type(value) is type(choice) and value == choice)
            for choice in typing.get_args(annotation)
        )
    if annotation is list or origin is list:
        item_types = typing.get_args(annotation)
        return isinstance(value, list) and all(_fits(item, item_types[0]) for item in value if item_types)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if _is_enum(annotation):
        return isinstance(value, annotation) or any(value == member.value for member in annotation)
    return True


_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _describe(annotation: Any) -> str:
    members = _union_members(annotation)
    if len(members) > 1:
        return " or ".join(_describe(member) for member in members if member is not type(None))
    annotation = members[0]
    origin = typing.get_origin(annotation)
    if annotation in (bool, int, float, str):
        return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[annotation]
    if origin is typing.Literal:
        return " or ".join(json.dumps(choice) for choice in typing.get_args(annotation))
    if annotation is list or origin is list:
        item_type = (typing.get_args(annotation) or (Any,))[0]
        if _is_enum(item_type):
            return "a list of " + ", ".join(f"`{member.value}`" for member in item_type)
        return f"a list of {_PLURALS.get(item_type, 'values')}"
    if annotation is dict or origin is dict:
        return "a mapping"
    if _is_enum(annotation):
        return "one of " + ", ".join(f"`{member.value}`" for member in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _expected(key: str, spec: KeySpec) -> str:
    """What a key accepts, in words: "an integer > 0, or null"."""
    if spec.choices:
        expected = "one of " + ", ".join(f"`{choice}`" for choice in spec.choices)
    else:
        expected = _describe(spec.annotation)
    if key in RANGE_RULES:
        expected += f" {RANGE_RULES[key].expected}"
    if type(None) in _union_members(spec.annotation):
        expected += ", or null"
    return expected


def _value_fits(key: str, value: Any, spec: KeySpec) -> bool:
    if not _fits(value, spec.annotation):
        return False
    if value is None:
        return True
    if spec.choices and not any(value == choice for choice in spec.choices):
        return False
    number = _number(value)
    return key not in RANGE_RULES or number is None or RANGE_RULES[key].test(number)


def _check_recipe_values(recipe: dict[str, Any], recipe_path: str | None, specs: dict[str, KeySpec]) -> None:
    for key, value in recipe.items():
        if key in specs and not _value_fits(key, value, specs[key]):
            shown = json.dumps(value, default=str)
            raise RecipeError(f"`{key}: {shown}` in {recipe_path}: expected {_expected(key, specs[key])}.")


def _command_line_values(args: list[str]) -> dict[str, str]:
    """The keys given on the command line and their values as typed (`--key value [value ...]` or `--key=value`)."""
    values: dict[str, str] = {}
    key = None
    for arg in args:
        if arg.startswith("--"):
            key, equals, value = arg[2:].partition("=")
            values[key] = value
            if equals:
                key = None
        elif key is not None:
            values[key] = f"{values[key]} {arg}".lstrip()
    values.pop("help", None)
    return values


class RecipeParser(TrlParser):
    """`TrlParser` whose argparse errors are one-line `RecipeError`s naming the key, the value and what it accepts,
    instead of the usage text of every key followed by argparse's message."""

    def __init__(self, dataclass_types, recipe_path: str | None, recipe: dict[str, Any], args: list[str]):
        super().__init__(dataclass_types)
        self.recipe_path, self.recipe = recipe_path, recipe
        self.command_line = _command_line_values(args)
        self.key_specs = recipe_key_specs()

    def error(self, message: str):
        match = re.match(r"argument --(\w+)", message)
        key = match.group(1) if match else None
        if key not in self.key_specs:
            raise RecipeError(f"Command line: {message}.")
        spec = self.key_specs[key]
        expected = f"expected {_expected(key, spec)}"
        if key in self.command_line:
            value = self.command_line[key]
            if not value or re.search(r"expected (one|at least one) argument", message):
                raise RecipeError(f"`--{key}` on the command line needs a value: {expected}.")
            where = f"`--{key} {value}` on the command line"
        else:
            value = self.recipe.get(key)
            where = f"`{key}: {json.dumps(value, default=str)}` in {self.recipe_path}"
        if _value_fits(key, value, spec):  # a value the field allows that HfArgumentParser's conversion does not
            expected = message.split(": ", 1)[-1].rstrip(".")
        raise RecipeError(f"{where}: {expected}.")

    def check_command_line_values(self, args: list[str]) -> dict[str, Any]:
        """The command-line values as argparse converts them, checked like the recipe file's."""
        if not self.command_line or "--help" in args or "-h" in args:
            return {}
        namespace = self.parse_args(args)
        values = {key: getattr(namespace, key) for key in self.command_line}
        for key, value in values.items():
            if not _value_fits(key, value, self.key_specs[key]):
                raw = self.command_line[key]
                raise RecipeError(
                    f"`--{key} {raw}` on the command line: expected {_expected(key, self.key_specs[key])}."
                )
        return values


def _check_task(task: Any, where: str) -> None:
    from .tasks import TASKS

    recipe_keys.check_task_name(task, where, TASKS)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Load a recipe YAML, with one-line errors for a missing file, bad YAML, or unknown keys."""
    return recipe_keys.read_recipe_file(path, valid_recipe_keys())


def _check_command_line_keys(args: list[str]) -> None:
    recipe_keys.check_command_line_keys(args, valid_recipe_keys())


# transformers 5.24's deprecated names of `activation_checkpointing` and `activation_checkpointing_kwargs`.
CHECKPOINTING_ALIASES = ("gradient_checkpointing", "gradient_checkpointing_kwargs")
_HALF_PRECISION_KEYS = ("bf16", "fp16")


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


def check_precision_hardware(values: dict[str, Any], recipe_path: str | None) -> None:
    """A recipe for a GPU (`bf16: true` or `fp16: true`, no `use_cpu`) on a machine without one stops here.

    transformers would stop later with "Your setup doesn't support bf16/gpu", naming neither the recipe's key nor a
    way on; here the message says which key asks for the GPU and what to run instead.
    """
    import torch

    wanted = [key for key in _HALF_PRECISION_KEYS if _truthy(values.get(key))]
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... as one question
    available = torch.cuda.is_available() or bool(accelerator is not None and accelerator.is_available())
    if not wanted or _truthy(values.get("use_cpu")) or available:
        return
    where = f"recipe {recipe_path}" if recipe_path else "the command line"
    raise RecipeError(
        f"{where} sets `{wanted[0]}: true`, which needs a GPU, and none is visible here: run it on a GPU "
        f"machine, or try it on CPU with `--use_cpu true --{wanted[0]} false` (slow), or run a CPU demo "
        "(`python scripts/sft.py recipes/demo/shapes_qwen2vl.yaml`)."
    )


def parse_recipe(args: list[str] | None = None) -> tuple[VLMScriptArguments, SFTConfig, VLMModelConfig]:
    """Parse `[RECIPE.yaml | --config RECIPE.yaml] [--key value ...]` into our three dataclasses.

    The options of the recipe's task (fields of its `Task.options` dataclass) land in `script_args.task_options`;
    setting another task's option is an error.
    """
    import sys

    args = list(sys.argv[1:] if args is None else args)
    recipe_path, args = split_recipe_path(args)
    # Keys, values and the task name of the file and of the command line are checked before TrlParser builds
    # anything from them.
    recipe = read_recipe_file(recipe_path) if recipe_path is not None else {}
    _check_command_line_keys(args)
    option_classes = _task_option_classes()
    dataclass_types = _recipe_dataclasses()
    parser = RecipeParser(dataclass_types, recipe_path, recipe, args)
    _check_recipe_values(recipe, recipe_path, parser.key_specs)
    command_line_values = parser.check_command_line_values(args)
    keys_set = set(recipe) | set(parser.command_line)
    if "task" in command_line_values:
        _check_task(command_line_values["task"], "on the command line")
    elif "task" in recipe:
        _check_task(recipe["task"], f"in {recipe_path}")
    check_precision_hardware({**recipe, **command_line_values}, recipe_path)
    if recipe_path is not None:
        args = ["--config", recipe_path, *args]
    try:
        with warnings.catch_warnings():
            if not keys_set & set(CHECKPOINTING_ALIASES):
                # TRL's `SFTConfig` sets `gradient_checkpointing=True` by default, which transformers 5.24 has
                # renamed: the warning would name a key the user never wrote. Written by the user, it still shows.
                for alias in CHECKPOINTING_ALIASES:
                    warnings.filterwarnings("ignore", message=f"`{alias}` is deprecated", category=FutureWarning)
            parsed = parser.parse_args_and_config(args)
    except RecipeError:
        raise
    except ValueError as error:  # dataclass validation from TRL/transformers
        raise RecipeError(str(error).splitlines()[0]) from None
    script_args, training_args, model_args = parsed[:3]
    by_class = dict(zip(dataclass_types, parsed))
    own_class = option_classes.get(script_args.task)
    for task_name, option_class in option_classes.items():
        if option_class is own_class:
            continue
        for option in sorted({f.name for f in dataclasses.fields(option_class)} & keys_set):
            raise RecipeError(f"`{option}` is an option of task `{task_name}`, not of task `{script_args.task}`.")
    script_args.task_options = dataclasses.asdict(by_class[own_class]) if own_class is not None else {}
    # The keys the user set (recipe file and command line), so that scripts can pick defaults for the others.
    script_args.keys_set = keys_set
    choose_data_source(script_args, recipe, set(parser.command_line))
    check_streaming(script_args, training_args, keys_set)
    return script_args, training_args, model_args


def choose_data_source(script_args, recipe: dict[str, Any], command_line: set[str]) -> None:
    """One of `dataset_name` and `dataset_path`. Where the recipe file sets one and the command line the other, the
    command line wins (`scripts/sft.py recipes/demo/messages.yaml --dataset_name my/data` trains on `my/data`)."""
    if not (script_args.dataset_name and script_args.dataset_path):
        return
    for given, other in (("dataset_name", "dataset_path"), ("dataset_path", "dataset_name")):
        if given in command_line and other not in command_line and other in recipe:
            setattr(script_args, other, None)
            script_args.keys_set.discard(other)
            return
    raise RecipeError(
        "Set one of `dataset_name` (a dataset read through `datasets`) and `dataset_path` (a task's native files), "
        "not both."
    )


def check_streaming(script_args, training_args, keys_set: set[str]) -> None:
    """`dataset_streaming: true` trains from a stream without a length: it needs `dataset_name`, a step count, and
    no length grouping (which needs every sample's length up front); the stream's order is kept."""
    if not script_args.dataset_streaming:
        return
    if not script_args.dataset_name:
        raise RecipeError("`dataset_streaming: true` streams a `dataset_name` dataset; set `dataset_name`.")
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise RecipeError("`dataset_streaming: true` has no dataset length to count epochs by: set `max_steps` (> 0).")
    if script_args.eval_after_train and script_args.generation_max_samples is None:
        raise RecipeError(
            "`eval_after_train` with `dataset_streaming: true` reads the streamed generation split into memory: set "
            "`generation_max_samples` to how many of its rows to evaluate."
        )
    strategy = getattr(training_args.train_sampling_strategy, "value", training_args.train_sampling_strategy)
    if "train_sampling_strategy" in keys_set and strategy not in ("random", "sequential"):
        raise RecipeError(
            f"`train_sampling_strategy: {strategy}` needs every sample's length up front, which a stream "
            "(`dataset_streaming: true`) does not have; set `train_sampling_strategy: random`."
        )


def _field_default(dataclass_field: dataclasses.Field) -> Any:
    if dataclass_field.default is not dataclasses.MISSING:
        return dataclass_field.default
    if dataclass_field.default_factory is not dataclasses.MISSING:
        return dataclass_field.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    """YAML-safe form of a config value (enums become their values)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    return value


def resolved_recipe(
    script_args: VLMScriptArguments, training_args: SFTConfig, model_args: ModelConfig
) -> dict[str, Any]:
    """Every key whose effective value differs from its default: a recipe that reproduces the run."""
    resolved: dict[str, Any] = {}
    for instance in (script_args, model_args, training_args):
        values = instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance)
        for dataclass_field in dataclasses.fields(instance):
            if not dataclass_field.init or dataclass_field.name not in values:
                continue
            value = _plain(values[dataclass_field.name])
            if value != _plain(_field_default(dataclass_field)):
                resolved[dataclass_field.name] = value
    resolved.update(_plain(script_args.task_options))
    # Placeholders that `to_dict` puts in place of secrets are not recipe values.
    return {key: value for key, value in resolved.items() if not (isinstance(value, str) and value.startswith("<"))}


# The key index of `recipe_keys` ----------------------------------------------------------------------------------
def _group_name(cls: type, option_classes: dict[str, type]) -> str:
    tasks = [name for name, option_class in option_classes.items() if option_class is cls]
    if tasks:
        return f"options of task {', '.join(tasks)}"
    return {
        VLMScriptArguments: "data and task (vlm_recipes VLMScriptArguments)",
        SFTConfig: "training (trl SFTConfig)",
        VLMModelConfig: "model (trl ModelConfig and the VLM parts)",
    }[cls]


def build_key_index() -> dict[str, Any]:
    """What `recipe_keys.check_command_line` and `--help` read: every recipe key's group, accepted values, default
    and help, built from the installed TRL and transformers classes."""
    import importlib.metadata

    from .tasks import TASKS

    specs = recipe_key_specs()
    option_classes = _task_option_classes()
    keys: dict[str, dict[str, Any]] = {}
    for cls in _recipe_dataclasses():
        for dataclass_field in dataclasses.fields(cls):
            name = dataclass_field.name
            if not dataclass_field.init or name in keys:
                continue
            default = _field_default(dataclass_field)
            default = None if default is dataclasses.MISSING else json.loads(json.dumps(_plain(default), default=str))
            keys[name] = {
                "group": _group_name(cls, option_classes),
                "type": _expected(name, specs[name]),
                "default": default,
                "help": str(dataclass_field.metadata.get("help", "")),
            }
    keys["env"] = {"group": "other", "type": "a mapping", "default": None, "help": "Environment variables to set."}
    versions = {name: importlib.metadata.version(name) for name in ("trl", "transformers")}
    return {"versions": versions, "tasks": sorted(TASKS), "keys": keys}


def write_key_index(path: Path = recipe_keys.KEY_INDEX_FILE) -> None:
    from .files import write_text_atomically

    write_text_atomically(path, json.dumps(build_key_index(), indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-key-index"]:
        sys.exit("usage: python -m vlm_recipes.configs --write-key-index")
    write_key_index()
    print(f"wrote {recipe_keys.KEY_INDEX_FILE}")
