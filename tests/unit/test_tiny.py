import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.chat_templates import fill_missing_chat_template
from vlm_recipes.tiny import TINY_FAMILIES, build_tiny_model

from conftest import real_processor_dir, requires_real_processor, run_script


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
class TestTinyModels:
    def test_loads_offline_and_is_tiny(self, family, tiny_model_dirs):
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[family])
        processor = AutoProcessor.from_pretrained(tiny_model_dirs[family])
        assert sum(p.numel() for p in model.parameters()) < 1_000_000
        fill_missing_chat_template(processor)  # Florence2Processor does not reload a saved template (transformers 5)
        assert processor.chat_template is not None
        assert model.config.model_type == TINY_FAMILIES[family].model_type
        # The model's image token is the processor's, so the processor's expansion feeds the vision tower.
        assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def test_forward_with_image(self, family, tiny_model_dirs):
        from PIL import Image

        from vlm_recipes.collator import VisionChatCollator

        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[family])
        processor = AutoProcessor.from_pretrained(tiny_model_dirs[family])
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        ]
        # The collator knows each family's layout (PaliGemma's prefix/suffix, Florence-2's encoder-decoder).
        batch = VisionChatCollator(processor)([{"images": [Image.new("RGB", (70, 90), "red")], "messages": messages}])
        batch.pop("shift_labels", None)  # for TRL's loss only (vlm_recipes.family_collation)
        output = model(**batch)
        assert torch.isfinite(output.loss)

    def test_seed_makes_weights_reproducible(self, family, tmp_path):
        first = AutoModelForImageTextToText.from_pretrained(build_tiny_model(family, tmp_path / "a", seed=3))
        second = AutoModelForImageTextToText.from_pretrained(build_tiny_model(family, tmp_path / "b", seed=3))
        for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("family", "processor_name"), [("qwen2_vl", "qwen2-vl"), ("smolvlm", "smolvlm"), ("llava", "llava")]
)
def test_wraps_real_processor(family, processor_name, tmp_path):
    directory = real_processor_dir(processor_name)
    if not (directory / "tokenizer_config.json").is_file():
        pytest.skip(f"real processor {processor_name!r} not found at {directory}")
    output = build_tiny_model(family, tmp_path / family, processor_dir=directory)
    processor = AutoProcessor.from_pretrained(output)
    model = AutoModelForImageTextToText.from_pretrained(output)
    real = AutoProcessor.from_pretrained(directory)
    assert processor.chat_template == real.chat_template
    assert len(processor.tokenizer) == len(real.tokenizer)
    assert model.get_input_embeddings().num_embeddings >= len(real.tokenizer)


@requires_real_processor("qwen2-vl")
def test_wrong_family_for_processor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pick the matching --family"):
        build_tiny_model("smolvlm", tmp_path / "x", processor_dir=real_processor_dir("qwen2-vl"))


def test_make_tiny_model_script(tmp_path):
    result = run_script(["scripts/make_tiny_model.py", "--family", "qwen2_5_vl", "--output", str(tmp_path / "m")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qwen2_5_vl:" in result.stdout
    AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
