"""Each internal of another library that `vlm_recipes._compat` relies on is still there and still does what we use
it for, so that an upgrade that moves one fails here, by name."""

import inspect

import pytest
import torch

from vlm_recipes import _compat

from conftest import real_processor_dir, requires_real_processor


class TestTransformers:
    def test_compiled_chat_template_renders_as_transformers_does(self):
        from transformers.utils.chat_template_utils import render_jinja_template

        template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
        messages = [{"role": "user", "content": "hi"}]
        compiled = _compat.compiled_chat_template(template)
        assert compiled is not None, "transformers no longer has `_compile_jinja_template`"
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=True
        )
        assert compiled.render(messages=messages, add_generation_prompt=True) == rendered[0] == "<user>hi<assistant>"

    def test_hf_deepspeed_config_unset_and_restored(self):
        from transformers.integrations import deepspeed as hf_deepspeed
        from transformers.integrations import is_deepspeed_zero3_enabled

        config = hf_deepspeed.HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
        try:
            assert is_deepspeed_zero3_enabled()
            with _compat.hf_deepspeed_config_unset():
                assert not is_deepspeed_zero3_enabled()
            assert is_deepspeed_zero3_enabled()
            assert hf_deepspeed._hf_deepspeed_config_weak_ref() is config
        finally:
            hf_deepspeed.unset_hf_deepspeed_config()  # process-global: later loads must not see ZeRO-3

    def test_loading_records_weight_conversions_that_saving_reads(self, tiny_model_dirs):
        import transformers.core_model_loading
        from transformers import AutoModelForImageTextToText

        assert 'getattr(model, "_weight_conversions"' in inspect.getsource(transformers.core_model_loading)
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs["qwen2_vl"])
        conversions = _compat.loading_weight_conversions(model)
        assert conversions, "loading Qwen2-VL renames keys (`model.layers` -> `model.language_model.layers`)"
        other = torch.nn.Linear(2, 2)
        assert _compat.loading_weight_conversions(other) is None
        _compat.set_loading_weight_conversions(other, conversions)
        assert _compat.loading_weight_conversions(other) is conversions

    @requires_real_processor("qwen2-vl")
    def test_image_token_count_of_qwen2_vl(self):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(real_processor_dir("qwen2-vl"))
        assert _compat.has_image_token_count(processor)
        # 224 x 448 pixels: 16 x 32 patches of 14 pixels, merged 2 x 2 into 128 tokens.
        assert _compat.image_token_count(processor, 224, 448) == 128
        assert not _compat.has_image_token_count(processor.tokenizer)

    def test_length_grouped_indices_are_the_trainers_sampler_order(self):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = [5, 90, 33, 12, 70, 8, 41, 64, 19, 27, 55, 3]
        expected = list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(3)))
        assert _compat.length_grouped_indices(lengths, 4, torch.Generator().manual_seed(3)) == expected

    def test_trainer_checkpoint_folder_is_the_trainers(self):
        from transformers import Trainer

        assert _compat.trainer_checkpoint_folder(7) == "checkpoint-7"
        assert "PREFIX_CHECKPOINT_DIR" in inspect.getsource(Trainer._save_checkpoint)

    def test_rotate_checkpoints_keeps_the_newest_and_the_best(self, tmp_path):
        for step in (1, 2, 3, 4):
            (tmp_path / f"checkpoint-{step}").mkdir()
        _compat.rotate_checkpoints(str(tmp_path), 2, str(tmp_path / "checkpoint-1"), use_mtime=False)
        assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4"]

    def test_add_first_callback_runs_it_first(self):
        from transformers import TrainerCallback, TrainerControl, TrainerState
        from transformers.trainer_callback import CallbackHandler

        calls = []

        class Recorder(TrainerCallback):
            def __init__(self, name):
                self.name = name

            def on_train_begin(self, args, state, control, **kwargs):
                calls.append(self.name)

        handler = CallbackHandler([Recorder("added")], None, None, None, None)
        trainer = type("Trainer", (), {"callback_handler": handler})()
        _compat.add_first_callback(trainer, Recorder("first"))
        handler.on_train_begin(None, TrainerState(), TrainerControl())
        assert calls == ["first", "added"]

    def test_run_before_training_step(self):
        from transformers import Trainer

        assert list(inspect.signature(Trainer.training_step).parameters)[:3] == ["self", "model", "inputs"]
        seen = []

        class FakeTrainer:
            def training_step(self, model, inputs, num_items_in_batch=None):
                return ("stepped", inputs, num_items_in_batch)

        trainer = FakeTrainer()
        _compat.run_before_training_step(trainer, seen.append)
        assert trainer.training_step(None, {"input_ids": 1}, 4) == ("stepped", {"input_ids": 1}, 4)
        assert seen == [{"input_ids": 1}]


class TestTRL:
    def test_chat_template_dir_holds_the_templates_we_use(self):
        directory = _compat.trl_chat_template_dir()
        for name in ("qwen2_5_vl", "qwen3_vl"):  # the tiny models' (vlm_recipes.tiny)
            assert (directory / f"{name}.jinja").is_file() and (directory / f"{name}_training.jinja").is_file()


class TestPEFT:
    def test_peft_target_matches_as_peft_does(self):
        from peft import LoraConfig

        config = LoraConfig(target_modules=["q_proj"])
        assert _compat.peft_target_matches(config, "model.layers.0.self_attn.q_proj")
        assert not _compat.peft_target_matches(config, "model.layers.0.mlp.up_proj")
        excluded = LoraConfig(target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])
        assert not _compat.peft_target_matches(excluded, "model.layers.0.self_attn.q_proj")
        regex = LoraConfig(target_modules=r"model\.layers\.\d+\.mlp\.up_proj")
        assert _compat.peft_target_matches(regex, "model.layers.3.mlp.up_proj") is True


class TestTorch:
    def test_forward_pre_hooks_lists_the_registered_ones(self):
        layer = torch.nn.Linear(2, 2)

        def hook(module, args):
            return None

        assert _compat.forward_pre_hooks(layer) == []
        layer.register_forward_pre_hook(hook)
        assert _compat.forward_pre_hooks(layer) == [hook]


class TestBitsandbytes:
    def test_the_cpu_repacking_flag_is_read_by_forward(self):
        bnb = pytest.importorskip("bitsandbytes")

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
        assert hasattr(layer, "support_avx512bf16_for_cpu"), "bitsandbytes renamed its CPU repacking flag"
        assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward)
        _compat.turn_off_4bit_cpu_repacking(layer)
        assert layer.support_avx512bf16_for_cpu is False


class TestDatasets:
    def test_dataset_fingerprint_follows_content_and_transforms(self):
        """What our cached passes key on: equal for equal content, changed by a selection or a map."""
        import datasets

        first = datasets.Dataset.from_dict({"a": [1, 2, 3]})
        assert isinstance(_compat.dataset_fingerprint(first), str)
        assert _compat.dataset_fingerprint(first.select([0, 1])) != _compat.dataset_fingerprint(first)
        same = datasets.Dataset.from_dict({"a": [1, 2, 3]})
        assert _compat.dataset_fingerprint(first.map(lambda row: row, new_fingerprint="fixed")) == "fixed"
        assert _compat.dataset_fingerprint(same.select([0, 1])) == _compat.dataset_fingerprint(first.select([0, 1]))
        doubled = first.map(lambda row: {"a": row["a"] * 2})
        assert _compat.dataset_fingerprint(doubled) != _compat.dataset_fingerprint(first)
        assert _compat.dataset_fingerprint(
            datasets.Dataset.from_dict({"a": [1, 2, 4]})
        ) != _compat.dataset_fingerprint(first)
