"""Model loading, QLoRA, LoRA targets per part, freezing, per-part learning rates, gradient checkpointing.

On tiny models of every family in `TINY_FAMILIES` that the family registry knows, on CPU (bitsandbytes 4-bit and
8-bit run on CPU).
"""

import gc
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from trl import SFTConfig

from vlm_recipes.collator import VisionChatCollator
from vlm_recipes.configs import RecipeError, VLMModelConfig, parse_recipe
from vlm_recipes.data.rows import BadRowReport, build_dataset
from vlm_recipes.families import UnknownFamilyError, detect_family, family_of_model
from vlm_recipes.models.checks import (
    check_quantization_for_zero3,
    check_training_setup,
    deepspeed_zero_stage,
    training_dtype,
)
from vlm_recipes.models.loading import load_model, load_processor
from vlm_recipes.models.lora import lora_target_modules_for, peft_config_for
from vlm_recipes.models.quantization import (
    _float32_input_to_autocast_dtype,
    has_4bit_autocast_hook,
    keep_4bit_outputs_in_autocast_dtype,
    keep_4bit_weights_unpacked_on_cpu,
    quantization_config_for,
)
from vlm_recipes.tasks import get_task
from vlm_recipes.tiny import TINY_FAMILIES
from vlm_recipes.trainer import (
    VLMSFTTrainer,
    detach_frozen_vision_inputs,
    part_parameter_groups,
    use_reentrant_checkpointing,
)

from conftest import REPO_ROOT, run_script


def registered(family_name):
    """Tiny families whose model type the registry knows (others arrive later and are covered once registered)."""
    from vlm_recipes.families import FAMILIES

    model_type = TINY_FAMILIES[family_name].model_type
    return any(model_type in family.model_types for family in FAMILIES.values())


FAMILY_PARAMS = [
    pytest.param(name, marks=pytest.mark.skipif(not registered(name), reason=f"{name} not in the family registry"))
    for name in TINY_FAMILIES
]


def model_config(model_dir, **overrides):
    return VLMModelConfig(model_name_or_path=str(model_dir), **{"dtype": "float32", **overrides})


def training_config(output_dir, **overrides):
    values = {
        "output_dir": str(output_dir),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "max_length": 512,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "seed": 0,
    }
    values.update(overrides)
    return SFTConfig(**values)


def lora_module_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed_parameters(before, model):
    return {name for name, parameter in model.named_parameters() if not torch.equal(before[name], parameter.detach())}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """Shapes demo data: eight training conversations (one of them text-only)."""
    directory = tmp_path_factory.mktemp("shapes-models")
    get_task("shapes").make_data(directory, num=10, seed=0)
    return directory


@pytest.fixture(scope="module")
def train_dataset(shapes_dir):
    """The rows with an image (PaliGemma and Florence-2 take exactly one image per sample)."""
    rows = get_task("shapes").load_rows(shapes_dir, "train", shapes_dir, BadRowReport())
    return build_dataset([row for row in rows if len(row["images"]) == 1])


def make_trainer(model_dir, dataset, model_args, args, eval_dataset=None):
    processor = load_processor(model_args)
    if getattr(processor, "chat_template", None) is None:
        pytest.skip(f"{model_dir.name}: its processor has no chat template, so VisionChatCollator cannot train it")
    model = load_model(model_args, args)
    return VLMSFTTrainer(
        model_args=model_args,
        model=model,
        args=args,
        data_collator=VisionChatCollator(processor, max_length=args.max_length),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config_for(model, model_args),
    )


def train(trainer):
    """Train; returns (changed parameter names, finite losses logged)."""
    before = snapshot(trainer.model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    return changed_parameters(before, trainer.model)


# --------------------------------------------------------------------------------------------------------------------
class TestLoraTargets:
    @pytest.mark.parametrize("family_name", FAMILY_PARAMS)
    def test_language_model_only_by_default_and_vision_on_request(self, family_name, tiny_model_dirs):
        from peft import get_peft_model

        model_dir = tiny_model_dirs[family_name]
        family = detect_family(model_dir)
        for lora_vision, parts in ((False, {"language"}), (True, {"vision", "projector", "language"})):
            model = load_model(model_config(model_dir))
            linear = [
                name
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and family.part_of(name) in parts and name != "lm_head"
            ]
            args = model_config(model_dir, use_peft=True, lora_r=2, lora_vision=lora_vision)
            peft_model = get_peft_model(model, peft_config_for(model, args))
            lora_names = [name.removeprefix("base_model.model.") for name in lora_module_names(peft_model)]
            # All linear layers of the chosen parts (PEFT's all-linear, restricted to them), never the output head.
            assert sorted(lora_names) == sorted(linear)
            assert {family.part_of(name) for name in lora_names} == parts

    @pytest.mark.parametrize("family_name", FAMILY_PARAMS)
    def test_explicit_targets_are_honoured_within_the_chosen_parts(self, family_name, tiny_model_dirs):
        model_dir = tiny_model_dirs[family_name]
        model = load_model(model_config(model_dir))
        family = family_of_model(model)
        names = [name for name, _ in model.named_modules()]
        requested = [name for name in names if re.search(r"\.(q_proj|gate_proj)$", name)]
        for lora_vision, parts in ((False, {"language"}), (True, {"vision", "projector", "language"})):
            args = model_config(model_dir, use_peft=True, lora_target_modules=["q_proj", "gate_proj"])
            args.lora_vision = lora_vision
            regex = lora_target_modules_for(model, args)
            targets = [name for name in names if re.fullmatch(regex, name)]
            assert targets == [name for name in requested if family.part_of(name) in parts]
        # A single name (TRL turns a one-item list into a string, a regex to PEFT) is still a name.
        single = lora_target_modules_for(model, model_config(model_dir, use_peft=True, lora_target_modules=["v_proj"]))
        assert [n for n in names if re.fullmatch(single, n)] == [
            n for n in names if n.endswith(".v_proj") and family.part_of(n) == "language"
        ]

    def test_qwen2_5_vl_gate_proj_of_the_vision_blocks_only_with_lora_vision(self, tiny_model_dirs):
        if "qwen2_5_vl" not in TINY_FAMILIES or not registered("qwen2_5_vl"):
            pytest.skip("no tiny Qwen2.5-VL")
        model = load_model(model_config(tiny_model_dirs["qwen2_5_vl"]))
        vision_gate = [name for name, _ in model.named_modules() if name.startswith("model.visual.blocks.")]
        vision_gate = [name for name in vision_gate if name.endswith("gate_proj")]
        assert vision_gate  # the name clash that bare-name targeting gets wrong
        for lora_vision, expected in ((False, False), (True, True)):
            args = model_config(tiny_model_dirs["qwen2_5_vl"], use_peft=True, lora_vision=lora_vision)
            regex = lora_target_modules_for(model, args)
            assert all(bool(re.fullmatch(regex, name)) == expected for name in vision_gate)

    def test_targets_that_match_nothing_or_only_vision_stop_with_the_key(self, tiny_model_dirs):
        model_dir = tiny_model_dirs["qwen2_vl"]
        model = load_model(model_config(model_dir))
        with pytest.raises(ValueError, match="lora_target_modules.*matches no module"):
            lora_target_modules_for(model, model_config(model_dir, use_peft=True, lora_target_modules=["nope_proj"]))
        with pytest.raises(ValueError, match="lora_vision: true"):
            lora_target_modules_for(model, model_config(model_dir, use_peft=True, lora_target_modules=["qkv", "fc1"]))

    def test_frozen_part_gets_no_lora(self, tiny_model_dirs):
        model_dir = tiny_model_dirs["qwen2_vl"]
        model = load_model(model_config(model_dir))
        family = family_of_model(model)
        args = model_config(model_dir, use_peft=True, lora_vision=True, freeze_vision_tower=True)
        regex = lora_target_modules_for(model, args)
        parts = {family.part_of(name) for name, _ in model.named_modules() if re.fullmatch(regex, name)}
        assert parts == {"projector", "language"}

    def test_modules_trained_in_full_get_no_adapter(self, tiny_model_dirs):
        model_dir = tiny_model_dirs["qwen2_vl"]
        model = load_model(model_config(model_dir))
        regex = lora_target_modules_for(model, model_config(model_dir, use_peft=True, lora_modules_to_save=["o_proj"]))
        targets = [name for name, _ in model.named_modules() if re.fullmatch(regex, name)]
        assert targets and not any(name.endswith("o_proj") for name in targets)
        assert any(name.endswith("q_proj") for name in targets)


# --------------------------------------------------------------------------------------------------------------------
class TestQuantisedLoading:
    @pytest.mark.parametrize("family_name", FAMILY_PARAMS)
    def test_4bit_nf4_double_quant_compute_dtype(self, family_name, tiny_model_dirs, tmp_path):
        import bitsandbytes as bnb

        model_args = model_config(tiny_model_dirs[family_name], use_peft=True, load_in_4bit=True)
        model = load_model(model_args, training_config(tmp_path))
        family = family_of_model(model)
        assert model.is_loaded_in_4bit
        language_linear = [
            module
            for name, module in model.named_modules()
            if family.part_of(name) == "language" and isinstance(module, torch.nn.Linear) and name != "lm_head"
        ]
        assert language_linear and all(isinstance(module, bnb.nn.Linear4bit) for module in language_linear)
        state = language_linear[0].weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # NF4 + double quantisation by default
        assert language_linear[0].compute_dtype == torch.float32  # dtype float32, no mixed precision
        assert language_linear[0].weight.dtype == torch.uint8

    @pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory maps (Linux)")
    def test_4bit_model_does_not_keep_the_checkpoint_mapped(self, tiny_model_dirs, tmp_path):
        model_dir = tmp_path / "qwen2_vl"  # a copy no other test's model can hold mapped
        shutil.copytree(tiny_model_dirs["qwen2_vl"], model_dir)
        checkpoint = str((model_dir / "model.safetensors").resolve())

        def mapped() -> bool:
            gc.collect()
            return checkpoint in Path("/proc/self/maps").read_text()

        plain = load_model(model_config(model_dir))
        assert mapped()  # loading without a copy maps the checkpoint: what the 4-bit case must not keep
        reference = {name: tensor.clone() for name, tensor in plain.state_dict().items()}
        del plain
        assert not mapped()
        model = load_model(model_config(model_dir, use_peft=True, load_in_4bit=True))
        assert not mapped()
        embeddings = model.get_input_embeddings().weight
        assert torch.equal(embeddings, reference[next(k for k in reference if k.endswith("embed_tokens.weight"))])

    def test_compute_dtype_follows_the_training_dtype(self, tmp_path):
        assert training_dtype(model_config("m"), training_config(tmp_path, bf16=True)) == torch.bfloat16
        assert training_dtype(model_config("m"), training_config(tmp_path)) == torch.float32
        assert training_dtype(VLMModelConfig(dtype="float16"), training_config(tmp_path)) == torch.float16
        auto = VLMModelConfig(dtype="auto", use_peft=True, load_in_4bit=True)
        config = quantization_config_for(auto, training_config(tmp_path, bf16=True))
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
        assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
        storage = VLMModelConfig(use_peft=True, load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
        assert quantization_config_for(storage).bnb_4bit_quant_storage == torch.bfloat16

    def test_8bit_loads(self, tiny_model_dirs, tmp_path):
        import bitsandbytes as bnb

        model_args = model_config(tiny_model_dirs["qwen2_vl"], use_peft=True, load_in_8bit=True)
        model = load_model(model_args, training_config(tmp_path))
        assert model.is_loaded_in_8bit
        layer = model.model.language_model.layers[0].mlp.down_proj
        assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8


@pytest.fixture
def cuda_layer_norm_policy():
    """CUDA's autocast runs `layer_norm` in float32 (PyTorch's autocast op reference); CPU's keeps bfloat16.
    `vlm_recipes.testing`'s emulation gives `nn.LayerNorm` CUDA's behaviour under CPU autocast."""
    from vlm_recipes import testing

    with testing.cuda_layer_norm_policy("cpu") as emulated:
        assert emulated
        yield


def force_cpu_repack(monkeypatch, available: bool = True) -> None:
    """Make the bitsandbytes 4-bit layers built from now on repack their weights for CPU inference as on a CPU with
    AVX512-BF16 (or never, with `available=False`), whatever CPU runs the test.

    bitsandbytes 0.50.2 decides once per layer: `Linear4bit.__init__` sets `support_avx512bf16_for_cpu` from
    `has_avx512bf16()`, imported into `bitsandbytes.nn.modules`. The repack itself is plain torch and fails before
    any AVX512-BF16 kernel runs; past it, on another CPU, bitsandbytes would run its default kernel on the packed
    layout, which `keep_4bit_weights_unpacked_on_cpu` never lets happen."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: available)


@pytest.fixture
def cpu_repack_forced(monkeypatch):
    """4-bit layers built in the test repack for CPU inference as on an AVX512-BF16 CPU (`force_cpu_repack`)."""
    force_cpu_repack(monkeypatch)


def quantised_linear(out_features: int, in_features: int):
    """A bitsandbytes NF4 linear (double quantisation, float32 compute) of random weights, quantised on CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
    )
    return layer.to("cpu")  # quantises


def is_packed_for_cpu(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def remove_autocast_hooks(model) -> int:
    removed = 0
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _float32_input_to_autocast_dtype:
                del module._forward_pre_hooks[key]
                removed += 1
    return removed


class TestFourBitUnderAutocast:
    """A 4-bit linear returns autocast's dtype, as `nn.Linear` does, not its input's (float32 after a LayerNorm)."""

    # The tiny families with an `nn.LayerNorm` before a 4-bit linear: in the vision tower and projector, and in
    # Florence-2's language model (BART's) as well. Qwen2.5-VL's tower uses RMSNorm, which returns its input's dtype.
    AFFECTED = frozenset({"qwen2_vl", "qwen3_vl", "smolvlm", "idefics2", "llava", "paligemma", "florence2"})

    def test_same_product_in_autocast_dtype(self, tiny_model_dirs, cpu_repack_forced):
        """On any CPU as on one with AVX512-BF16, where bitsandbytes would repack the weight for the no-grad calls."""
        import bitsandbytes as bnb

        model = load_model(
            model_config(tiny_model_dirs["qwen2_vl"], dtype="bfloat16", use_peft=True, load_in_4bit=True)
        )
        layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
        assert layers and all(has_4bit_autocast_hook(layer) for layer in layers)
        layer = layers[0]
        assert layer.compute_dtype == torch.bfloat16
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))

        def run(inputs):
            inputs = inputs.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = layer(inputs)
            output.float().sum().backward()
            return output, inputs.grad

        hooked, hooked_grad = run(x)
        assert remove_autocast_hooks(model) == len(layers)
        plain, plain_grad = run(x)
        assert hooked.dtype == torch.bfloat16 and plain.dtype == torch.float32  # bitsandbytes alone: the input's dtype
        assert torch.equal(hooked.float(), plain)  # the same bf16 product either way
        assert torch.equal(hooked_grad, plain_grad)
        assert keep_4bit_outputs_in_autocast_dtype(model) == len(layers)
        assert keep_4bit_outputs_in_autocast_dtype(model) == 0  # hooked once
        assert layer(x).dtype == torch.float32  # outside autocast nothing changes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x.bfloat16()).dtype == torch.bfloat16
            assert layer(x.to("meta")).device.type == "meta"  # a device autocast does not know: left alone

    @pytest.mark.parametrize("family_name", FAMILY_PARAMS)
    def test_every_4bit_linear_returns_bf16_under_cuda_autocast(
        self, family_name, tiny_model_dirs, train_dataset, cuda_layer_norm_policy
    ):
        """With CUDA's policy for `layer_norm`, the families in `AFFECTED` ran 4-bit linears (and so activations) in
        float32; loaded by `load_model`, every 4-bit linear returns bf16, and a checkpointed step with LoRA in the
        tower too gets finite gradients."""
        import bitsandbytes as bnb

        model_args = model_config(
            tiny_model_dirs[family_name], dtype="bfloat16", use_peft=True, load_in_4bit=True, lora_vision=True
        )
        processor = load_processor(model_args)
        if getattr(processor, "chat_template", None) is None:
            pytest.skip(f"{family_name}: its processor has no chat template, so VisionChatCollator cannot batch it")
        model = load_model(model_args)
        model = get_peft_model(model, peft_config_for(model, model_args))  # LoRA wrappers in the tower too
        model.enable_input_require_grads()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = VisionChatCollator(processor, max_length=512)([train_dataset[i] for i in range(2)])
        batch.pop("shift_labels", None)  # Florence-2's own loss passes the labels as shift_labels
        family = family_of_model(model)
        dtypes: dict[str, set] = {}

        def record(name):
            return lambda module, args, output: dtypes.setdefault(family.part_of(name), set()).add(output.dtype)

        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.register_forward_hook(record(name))

        def step():
            dtypes.clear()
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()  # the recomputation runs under the same policy, in the same dtypes
            assert torch.isfinite(loss)
            return {part: set(found) for part, found in dtypes.items()}

        seen = step()
        assert "language" in seen and all(found == {torch.bfloat16} for found in seen.values()), seen
        lora_grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name and p.grad is not None]
        assert lora_grads and all(torch.isfinite(grad).all() for grad in lora_grads)
        remove_autocast_hooks(model)
        float32_without_hook = torch.float32 in set().union(*step().values())
        assert float32_without_hook == (family_name in self.AFFECTED)  # what the hook prevents


# --------------------------------------------------------------------------------------------------------------------
class TestFourBitOnAnyCPU:
    """bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 kernel on the first eval-mode forward without
    grad; `load_model` turns that off (`keep_4bit_weights_unpacked_on_cpu`). Forced here, so on any CPU."""

    # (out, in): in not a multiple of the block (64); out not a multiple of 32; both fine, where the repack works
    # but leaves a weight that trains without input gradients.
    SHAPES = ((96, 32), (40, 128), (128, 128))

    def test_bitsandbytes_alone_fails_on_a_narrow_layer(self, cpu_repack_forced):
        """What happens without the fix (the error of the issue), and proof that the fixture forces the repack."""
        layer = quantised_linear(96, 32).eval()
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"shape '\[96, 0\]' is invalid for input of size 48"):
            layer(torch.randn(3, 32))

    @pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
    def test_layer_evaluates_then_trains_as_without_the_repack(self, shape, cpu_repack_forced):
        out_features, in_features = shape
        layer = quantised_linear(out_features, in_features)
        assert keep_4bit_weights_unpacked_on_cpu(torch.nn.Sequential(layer)) == 1
        x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(1))

        def trained_step():
            inputs = x.clone().requires_grad_(True)
            layer.train()(inputs).square().sum().backward()
            return inputs.grad

        before = trained_step()
        layer.eval()
        with torch.no_grad():
            evaluated = layer(x)
        assert not is_packed_for_cpu(layer)
        assert torch.equal(evaluated, layer.train()(x))  # the product training computes
        assert torch.equal(trained_step(), before)  # gradients still reach the input after an evaluation

    def test_qlora_model_evaluates_then_trains_as_without_the_repack(
        self, tiny_model_dirs, train_dataset, monkeypatch
    ):
        """A QLoRA tiny model: an eval-mode forward without grad, then a training step, give the same logits and LoRA
        gradients with the repack forced as on a CPU without it."""
        import bitsandbytes as bnb

        model_args = model_config(tiny_model_dirs["qwen2_vl"], use_peft=True, load_in_4bit=True, lora_dropout=0.0)
        batch = VisionChatCollator(load_processor(model_args), max_length=512)([train_dataset[i] for i in range(2)])

        def evaluate_then_train(repack_available):
            force_cpu_repack(monkeypatch, available=repack_available)
            model = load_model(model_args)
            torch.manual_seed(0)  # the same LoRA initialisation
            model = get_peft_model(model, peft_config_for(model, model_args))
            layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
            assert layers
            model.eval()
            with torch.no_grad():
                logits = model(**batch).logits
            assert not any(is_packed_for_cpu(layer) for layer in layers)
            model.train()
            model(**batch).loss.backward()
            gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            assert gradients and all(".lora_" in name for name in gradients)
            return logits, gradients

        logits, gradients = evaluate_then_train(repack_available=True)
        reference_logits, reference_gradients = evaluate_then_train(repack_available=False)
        assert torch.equal(logits, reference_logits)
        assert gradients.keys() == reference_gradients.keys()
        assert all(torch.equal(gradients[name], reference_gradients[name]) for name in gradients)

    def test_trainer_evaluates_in_the_middle_of_training(self, tiny_model_dirs, train_dataset, tmp_path, monkeypatch):
        """`Trainer.evaluate` between training steps (the chess recipe's `eval_strategy: steps`), repack forced:
        the same evaluation losses and trained adapter as without it."""

        def run(repack_available):
            force_cpu_repack(monkeypatch, available=repack_available)
            model_args = model_config(tiny_model_dirs["qwen2_vl"], use_peft=True, load_in_4bit=True, lora_r=4)
            args = training_config(tmp_path / str(repack_available), max_steps=2, eval_strategy="steps", eval_steps=1)
            torch.manual_seed(0)
            trainer = make_trainer(
                tiny_model_dirs["qwen2_vl"], train_dataset, model_args, args, eval_dataset=train_dataset
            )
            trainer.train()
            eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
            assert len(eval_losses) == 2
            return eval_losses, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}

        eval_losses, weights = run(repack_available=True)
        reference_losses, reference_weights = run(repack_available=False)
        assert eval_losses == reference_losses
        assert all(torch.equal(weights[name], reference_weights[name]) for name in reference_weights)


# --------------------------------------------------------------------------------------------------------------------
class TestErrors:
    def test_4bit_and_8bit_together(self):
        with pytest.raises(ValueError, match="set only one: `load_in_4bit: true`"):
            VLMModelConfig(use_peft=True, load_in_4bit=True, load_in_8bit=True)

    @pytest.mark.parametrize("key", ["load_in_4bit", "load_in_8bit"])
    def test_quantised_without_peft(self, key):
        with pytest.raises(ValueError, match=f"set `use_peft: true`.*--use_peft true --{key} true"):
            VLMModelConfig(**{key: True})

    def test_recipe_errors_are_one_line(self, tmp_path):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({"model_name_or_path": "m", "output_dir": str(tmp_path), "use_cpu": True}))
        with pytest.raises(RecipeError, match="use_peft: true"):
            parse_recipe([str(recipe), "--load_in_4bit", "true"])
        _, _, model_args = parse_recipe([str(recipe), "--use_peft", "true", "--load_in_4bit", "true"])
        assert model_args.use_bnb_nested_quant and model_args.bnb_4bit_quant_type == "nf4"

    def test_half_precision_dtype_must_match_mixed_precision(self, tmp_path):
        with pytest.raises(ValueError, match="set `fp16: true` and `bf16: false`, or `dtype: bfloat16`"):
            check_training_setup(VLMModelConfig(dtype="float16"), training_config(tmp_path, bf16=True))
        check_training_setup(VLMModelConfig(dtype="bfloat16"), training_config(tmp_path, bf16=True))
        check_training_setup(VLMModelConfig(dtype="float16"), training_config(tmp_path))  # no mixed precision
        check_training_setup(VLMModelConfig(dtype="float32"), training_config(tmp_path, bf16=True))

    def test_zero3_quant_storage_must_equal_compute_dtype(self, tmp_path):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        zero3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}
        try:
            args = training_config(tmp_path, bf16=True, deepspeed=zero3)
            assert deepspeed_zero_stage(args) == 3
            wrong = VLMModelConfig(use_peft=True, load_in_4bit=True, bnb_4bit_quant_storage="float32")
            with pytest.raises(ValueError, match="set `bnb_4bit_quant_storage: bfloat16`"):
                check_quantization_for_zero3(wrong, args)
            right = VLMModelConfig(use_peft=True, load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
            check_quantization_for_zero3(right, args)
            unset = VLMModelConfig(use_peft=True, load_in_4bit=True)
            check_quantization_for_zero3(unset, args)
            assert quantization_config_for(unset, args).bnb_4bit_quant_storage == torch.bfloat16  # filled in
            # Frozen weights under ZeRO-3 (LoRA, a frozen part): reentrant checkpointing; full fine-tuning: not.
            assert use_reentrant_checkpointing(VLMModelConfig(use_peft=True), args)
            assert use_reentrant_checkpointing(VLMModelConfig(freeze_vision_tower=True), args)
            assert not use_reentrant_checkpointing(VLMModelConfig(), args)
            with pytest.raises(ValueError, match="load_in_8bit.*ZeRO-3.*load_in_4bit: true"):
                check_quantization_for_zero3(VLMModelConfig(use_peft=True, load_in_8bit=True), args)
            with pytest.raises(ValueError, match="remove that section"):
                optimizer = {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
                check_training_setup(
                    VLMModelConfig(vision_tower_lr=1e-5),
                    training_config(tmp_path, bf16=True, deepspeed={**zero3, **optimizer}),
                )
        finally:
            unset_hf_deepspeed_config()  # the DeepSpeed config is process-global; later loads must not see ZeRO-3
        check_quantization_for_zero3(wrong, training_config(tmp_path))  # no DeepSpeed: nothing to check
        assert not use_reentrant_checkpointing(VLMModelConfig(use_peft=True), training_config(tmp_path))

    def test_unknown_family_needs_explicit_targets(self, tiny_model_dirs):
        model = load_model(model_config(tiny_model_dirs["qwen2_vl"]))
        model.config.model_type = "not_a_family"
        with pytest.raises(UnknownFamilyError):
            peft_config_for(model, model_config("m", use_peft=True))
        config = peft_config_for(model, model_config("m", use_peft=True, lora_target_modules=["q_proj", "v_proj"]))
        assert set(config.target_modules) == {"q_proj", "v_proj"}


# --------------------------------------------------------------------------------------------------------------------
class TestFreezingAndParameterGroups:
    def test_freeze_flags_and_groups_with_part_learning_rates(self, tiny_model_dirs, tmp_path):
        model_args = model_config(
            tiny_model_dirs["qwen2_vl"], freeze_vision_tower=True, projector_lr=1e-3, language_model_lr=2e-4
        )
        model = load_model(model_args, training_config(tmp_path))
        family = family_of_model(model)
        for name, parameter in model.named_parameters():
            assert parameter.requires_grad == (family.part_of(name) != "vision"), name
        decay = [name for name, _ in model.named_parameters() if not name.endswith("bias") and "norm" not in name]
        groups = part_parameter_groups(model, model_args, 5e-5, 0.1, decay)
        part_of = {id(p): family.part_of(name) for name, p in model.named_parameters()}
        lrs = {}
        for group in groups:
            parts = {part_of[id(p)] for p in group["params"]}
            assert len(parts) == 1
            lrs.setdefault(parts.pop(), set()).add(group["lr"])
            in_group = {id(p) for p in group["params"]}
            decays = {name in decay for name, p in model.named_parameters() if id(p) in in_group}
            assert decays == {group["weight_decay"] > 0}
        assert lrs == {"projector": {1e-3}, "language": {2e-4}}
        assert sum(len(group["params"]) for group in groups) == sum(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
def vision_block_inputs(model) -> list[bool]:
    """Whether the input of each checkpointed vision block requires grad, appended on every forward."""
    family = family_of_model(model)
    seen: list[bool] = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(bool(hidden.requires_grad))

    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and family.part_of(name) == "vision":
            module.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.slow
class TestFrozenVisionTower:
    """A frozen vision tower runs without autograd: no activations kept for it, no backward through it, and the same
    gradients for everything that trains."""

    @pytest.mark.parametrize("family_name", ["qwen2_vl", "llava"])
    def test_same_lora_gradients_without_autograd_in_the_tower(self, family_name, tiny_model_dirs, train_dataset):
        from peft import get_peft_model

        model_args = model_config(tiny_model_dirs[family_name], use_peft=True, lora_r=4, lora_dropout=0.0)
        processor = load_processor(model_args)
        model = load_model(model_args)
        model = get_peft_model(model, peft_config_for(model, model_args))
        model.enable_input_require_grads()  # what TRL and the Trainer do
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = VisionChatCollator(processor, max_length=512)([train_dataset[i] for i in range(2)])
        seen = vision_block_inputs(model)

        def gradients():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

        reference = gradients()
        assert seen and all(seen)  # transformers' hook has autograd record the frozen tower
        seen.clear()
        assert detach_frozen_vision_inputs(model)
        detached = gradients()
        assert seen and not any(seen)
        assert reference.keys() == detached.keys() and any(g.abs().sum() > 0 for g in detached.values())
        for name, gradient in reference.items():
            torch.testing.assert_close(detached[name], gradient, msg=name)

    @pytest.mark.parametrize("lora_vision, use_reentrant", [(False, False), (False, True), (True, False)])
    def test_trainer_detaches_only_a_frozen_tower(
        self, lora_vision, use_reentrant, tiny_model_dirs, train_dataset, tmp_path
    ):
        """Reentrant checkpointing (ours under ZeRO-3) too, without torch's warning about the frozen blocks' inputs."""
        model_args = model_config(tiny_model_dirs["qwen2_vl"], use_peft=True, lora_r=4, lora_vision=lora_vision)
        args = training_config(
            tmp_path,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
            max_steps=1,
        )
        trainer = make_trainer(tiny_model_dirs["qwen2_vl"], train_dataset, model_args, args)
        seen = vision_block_inputs(trainer.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            changed = train(trainer)
        assert not [w for w in caught if "None of the inputs have requires_grad" in str(w.message)]
        assert seen and all(flag == lora_vision for flag in seen)
        family = family_of_model(trainer.model)
        assert {family.part_of(name) for name in changed if ".lora_B." in name} == (
            {"vision", "projector", "language"} if lora_vision else {"language"}
        )

    def test_trainable_projector_still_trains_behind_a_frozen_tower(self, tiny_model_dirs, train_dataset, tmp_path):
        model_args = model_config(tiny_model_dirs["qwen2_vl"], freeze_vision_tower=True)
        args = training_config(tmp_path, gradient_checkpointing=True, max_steps=1)
        trainer = make_trainer(tiny_model_dirs["qwen2_vl"], train_dataset, model_args, args)
        seen = vision_block_inputs(trainer.model)
        changed = train(trainer)
        assert seen and not any(seen)
        family = family_of_model(trainer.model)
        assert {family.part_of(name) for name in changed} == {"projector", "language"}


@pytest.mark.slow
class TestTraining:
    @pytest.mark.parametrize("family_name", FAMILY_PARAMS)
    def test_qlora_changes_only_lora_and_stays_4bit(self, family_name, tiny_model_dirs, train_dataset, tmp_path):
        import bitsandbytes as bnb

        model_args = model_config(tiny_model_dirs[family_name], use_peft=True, load_in_4bit=True, lora_r=4)
        trainer = make_trainer(tiny_model_dirs[family_name], train_dataset, model_args, training_config(tmp_path))
        changed = train(trainer)
        family = family_of_model(trainer.model)
        assert changed and all(".lora_" in name for name in changed), sorted(changed)[:5]
        assert any(".lora_B." in name for name in changed)
        lora_modules = {
            name: module for name, module in trainer.model.named_modules() if isinstance(module, LoraLayer)
        }
        assert lora_modules and {family.part_of(name) for name in lora_modules} == {"language"}
        assert all(isinstance(module.base_layer, bnb.nn.Linear4bit) for module in lora_modules.values())
        assert all(module.base_layer.weight.dtype == torch.uint8 for module in lora_modules.values())
        vision_linear = [
            module
            for name, module in trainer.model.named_modules()
            if family.part_of(name) == "vision" and isinstance(module, torch.nn.Linear)
        ]
        assert vision_linear and all(isinstance(module, bnb.nn.Linear4bit) for module in vision_linear)

    def test_8bit_lora_trains(self, tiny_model_dirs, train_dataset, tmp_path):
        import bitsandbytes as bnb

        model_args = model_config(tiny_model_dirs["qwen2_vl"], use_peft=True, load_in_8bit=True, lora_r=4)
        trainer = make_trainer(tiny_model_dirs["qwen2_vl"], train_dataset, model_args, training_config(tmp_path))
        changed = train(trainer)
        assert changed and all(".lora_" in name for name in changed)
        layer = trainer.model.base_model.model.model.language_model.layers[0].mlp.down_proj.base_layer
        assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8

    def test_frozen_vision_tower_stays_put_and_groups_carry_part_lrs(self, tiny_model_dirs, train_dataset, tmp_path):
        model_args = model_config(
            tiny_model_dirs["qwen2_vl"], freeze_vision_tower=True, projector_lr=3e-3, language_model_lr=2e-3
        )
        trainer = make_trainer(
            tiny_model_dirs["qwen2_vl"], train_dataset, model_args, training_config(tmp_path, weight_decay=0.01)
        )
        changed = train(trainer)
        family = family_of_model(trainer.model)
        changed_parts = {family.part_of(name) for name in changed}
        assert changed_parts == {"projector", "language"}  # nothing in the frozen vision tower moved
        part_of = {id(p): family.part_of(name) for name, p in trainer.model.named_parameters()}
        by_part = {}
        for group in trainer.optimizer.param_groups:
            by_part.setdefault(part_of[id(group["params"][0])], set()).add(
                (group["initial_lr"], group["weight_decay"])
            )
        assert by_part == {"projector": {(3e-3, 0.01), (3e-3, 0.0)}, "language": {(2e-3, 0.01), (2e-3, 0.0)}}

    @pytest.mark.parametrize(
        "family_name, use_reentrant",
        # Qwen3-VL under reentrant checkpointing: its vision tower exposes no input embeddings, so transformers'
        # `enable_input_require_grads` (which TRL calls) does not reach its blocks; `VLMSFTTrainer` has to.
        [("qwen2_vl", False), ("qwen3_vl", True)],
    )
    def test_gradient_checkpointing_trains_lora_in_every_part(
        self, family_name, use_reentrant, tiny_model_dirs, train_dataset, tmp_path
    ):
        """Non-reentrant (our default) and reentrant (ours under ZeRO-3 with frozen weights): every adapter gets
        gradients, those in checkpointed vision blocks fed by frozen pixel inputs too."""
        if family_name not in tiny_model_dirs or not registered(family_name):
            pytest.skip(f"no tiny {family_name} in the registry")
        model_args = model_config(tiny_model_dirs[family_name], use_peft=True, lora_r=4, lora_vision=True)
        args = training_config(
            tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        )
        trainer = make_trainer(tiny_model_dirs[family_name], train_dataset, model_args, args)
        changed = train(trainer)
        checkpointed = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert checkpointed and all(module.gradient_checkpointing for module in checkpointed)
        family = family_of_model(trainer.model)
        assert all(".lora_" in name for name in changed)
        lora_b = [name for name, _ in trainer.model.named_parameters() if ".lora_B." in name]
        assert {family.part_of(name) for name in lora_b} == {"vision", "projector", "language"}
        assert set(lora_b) <= changed, sorted(set(lora_b) - changed)[:4]

    def test_gradient_checkpointing_defaults_to_non_reentrant(self, tiny_model_dirs, train_dataset, tmp_path):
        model_args = model_config(tiny_model_dirs["qwen2_vl"], use_peft=True, lora_r=4, freeze_vision_tower=True)
        args = training_config(tmp_path, gradient_checkpointing=True, max_steps=1)
        trainer = make_trainer(tiny_model_dirs["qwen2_vl"], train_dataset, model_args, args)
        assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
        assert any(".lora_B." in name for name in train(trainer))

    def test_sft_script_qlora_from_the_command_line(self, tmp_path, tiny_model_dirs, shapes_dir):
        """`--use_peft true --load_in_4bit true` turns a demo recipe into QLoRA, end to end."""
        output = tmp_path / "out"
        result = run_script(
            [
                "scripts/sft.py",
                "recipes/demo/shapes_qwen2vl.yaml",
                "--use_peft",
                "true",
                "--load_in_4bit",
                "true",
                "--lora_r",
                "4",
                "--max_steps",
                "3",
                "--output_dir",
                str(output),
                "--model_name_or_path",
                str(tiny_model_dirs["qwen2_vl"]),
                "--dataset_path",
                str(shapes_dir),
                "--verify_saved_model",
                "false",
            ],
            cwd=REPO_ROOT,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert "(steps: 3)" in result.stdout
        log = result.stderr
        assert "4-bit nf4, double quantisation True, compute torch.float32" in log
        assert "LoRA on all linear layers: 14 module(s) in the language model" in log
        from safetensors.torch import load_file

        adapter = load_file(output / "adapter_model.safetensors")
        assert adapter and all("language_model" in name for name in adapter)
