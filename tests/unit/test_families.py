"""The model-family registry (detection, module prefixes), family chat templates, prompt/answer collation, and a
short training run of every tiny family through `scripts/sft.py`."""

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_recipes.chat_templates import OWN_TEMPLATES, chat_template_text, trl_chat_template
from vlm_recipes.collator import IGNORE_INDEX, LabelReason, VisionChatCollator, normalize_messages
from vlm_recipes.families import (
    FAMILIES,
    PARTS,
    UnknownFamilyError,
    detect_family,
    family_of_model,
    family_of_processor,
    model_class_for,
    module_part,
)
from vlm_recipes.tiny import TINY_FAMILIES

from conftest import real_processor_dir, requires_real_processor

# Registry name of each tiny family (SmolVLM is the Idefics3 architecture).
REGISTRY_NAME = {name: ("idefics3" if name == "smolvlm" else name) for name in TINY_FAMILIES}
PROMPT_ANSWER_FAMILIES = ("paligemma", "florence2")
# Florence-2's prefixes of the microsoft/ remote-code layout, which the transformers-native tiny model does not have.
REMOTE_CODE_PREFIXES = {
    "vision_tower",
    "image_projection",
    "image_proj_norm",
    "image_pos_embed",
    "visual_temporal_embed",
}
REMOTE_CODE_PREFIXES |= {"language_model"}


def image(width=48, height=40, colour="red"):
    return Image.new("RGB", (width, height), colour)


def sample(question, answer, colour="red", system=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"images": [image(colour=colour)], "messages": [*messages, {"role": "assistant", "content": answer}]}


def model_inputs(batch):
    """The batch as the model's own forward takes it (`shift_labels` is for TRL's loss; see family_collation)."""
    return {key: value for key, value in batch.items() if key != "shift_labels"}


# ----------------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------------
class TestDetection:
    @pytest.mark.parametrize(
        ("name", "family"),
        [
            ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
            ("Qwen/Qwen2-VL-7B", "qwen2_vl"),
            ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
            ("Qwen/Qwen2.5-VL-3B-Instruct-AWQ", "qwen2_5_vl"),
            ("Qwen/Qwen3-VL-2B-Instruct", "qwen3_vl"),
            ("Qwen/Qwen3-VL-30B-A3B-Instruct", "qwen3_vl"),
            ("HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3"),
            ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "idefics3"),
            ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3"),
            ("HuggingFaceM4/idefics2-8b", "idefics2"),
            ("HuggingFaceM4/idefics2-8b-chatty", "idefics2"),
            ("llava-hf/llava-1.5-7b-hf", "llava"),
            ("llava-hf/llava-1.5-13b-hf", "llava"),
            ("llava-hf/bakLlava-v1-hf", "llava"),
            ("google/paligemma-3b-pt-224", "paligemma"),
            ("google/paligemma2-3b-pt-448", "paligemma"),
            ("microsoft/Florence-2-base", "florence2"),
            ("florence-community/Florence-2-large-ft", "florence2"),
            ("microsoft/Phi-3-vision-128k-instruct", "phi3_v"),
            ("microsoft/Phi-3.5-vision-instruct", "phi3_v"),
        ],
    )
    def test_hub_names(self, name, family):
        assert detect_family(name).name == family

    @pytest.mark.parametrize(
        "name", ["llava-hf/llava-v1.6-mistral-7b-hf", "meta-llama/Llama-3.2-11B-Vision-Instruct", "gpt2"]
    )
    def test_unknown_name_says_what_to_add(self, name):
        with pytest.raises(UnknownFamilyError, match=r"Add a `ModelFamily` entry .*model_type.*TinyFamily"):
            detect_family(name)

    @pytest.mark.parametrize(
        ("folder", "family"),
        [("qwen2-vl", "qwen2_vl"), ("qwen2.5-vl", "qwen2_5_vl"), ("smolvlm", "idefics3"), ("llava", "llava")],
    )
    def test_real_processor_directories(self, folder, family):
        directory = real_processor_dir(folder)
        if not (directory / "config.json").is_file():
            pytest.skip(f"real processor {folder!r} not found at {directory} (set VLM_REAL_PROCESSORS)")
        assert detect_family(directory).name == family

    @requires_real_processor("llava")
    def test_processor_files_without_config_json(self, tmp_path):
        for path in real_processor_dir("llava").iterdir():
            if path.name != "config.json":
                shutil.copy(path, tmp_path / path.name)
        assert detect_family(tmp_path).name == "llava"

    def test_local_checkpoint_and_lora_adapter(self, tmp_path, tiny_model_dirs):
        model_dir = tiny_model_dirs["qwen2_5_vl"]
        assert detect_family(model_dir).name == "qwen2_5_vl"
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_dir)}))
        assert detect_family(adapter).name == "qwen2_5_vl"
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen3-VL-8B"}))
        assert detect_family(adapter).name == "qwen3_vl"
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        with pytest.raises(UnknownFamilyError, match="base_model_name_or_path"):
            detect_family(adapter)

    def test_unknown_model_type_and_empty_directory(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
        with pytest.raises(UnknownFamilyError, match=r"model_type 'mllama'.*Add a `ModelFamily` entry"):
            detect_family(tmp_path)
        empty = tmp_path / "empty"
        empty.mkdir()
        with pytest.raises(UnknownFamilyError, match="is it a model directory"):
            detect_family(empty)

    def test_every_family_that_transformers_ships_has_a_tiny_model(self):
        shipped = {name for name, family in FAMILIES.items() if not family.trust_remote_code}
        assert set(REGISTRY_NAME.values()) == shipped
        for name in TINY_FAMILIES:
            assert TINY_FAMILIES[name].model_type in FAMILIES[REGISTRY_NAME[name]].model_types

    def test_loading_class_follows_the_family(self, tiny_model_dirs, monkeypatch):
        """Phi-3-vision's remote code registers AutoModelForCausalLM only: `load_model` must load it through that."""
        import transformers

        from vlm_recipes.configs import VLMModelConfig
        from vlm_recipes.models.loading import load_model

        assert model_class_for("microsoft/Phi-3.5-vision-instruct") is transformers.AutoModelForCausalLM
        assert model_class_for(tiny_model_dirs["qwen2_vl"]) is AutoModelForImageTextToText
        assert model_class_for("someone/unknown-model") is AutoModelForImageTextToText

        class Loaded(Exception):
            pass

        def refuse(*args, **kwargs):
            raise Loaded(args[0])

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        model_args = VLMModelConfig(model_name_or_path="microsoft/Phi-3.5-vision-instruct")
        with pytest.raises(ValueError, match="needs remote code: set `trust_remote_code: true`"):
            load_model(model_args, SimpleNamespace(trust_remote_code=False))
        with pytest.raises(Loaded, match="Phi-3.5-vision"):
            load_model(model_args, SimpleNamespace(trust_remote_code=True))

    def test_peft_wrapper_names_are_stripped(self):
        family = FAMILIES["qwen2_vl"]
        assert family.part_of("base_model.model.model.visual.blocks.0.mlp.fc1") == "vision"
        assert family.part_of("base_model.model.model.visual.merger.mlp.0") == "projector"
        assert family.part_of("base_model.model.lm_head") == "language"
        assert family.part_of("base_model.model") is None


# ----------------------------------------------------------------------------------------------------------------------
# Module prefixes against the real module tree of each tiny model
# ----------------------------------------------------------------------------------------------------------------------
def gradients_reach(model, inputs):
    """{part: (parameters with a nonzero gradient, all parameters)} after one backward pass."""
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    family, reached = family_of_model(model), {part: [0, 0] for part in PARTS}
    for name, parameter in model.named_parameters():
        part = family.part_of(name)
        reached[part][1] += 1
        reached[part][0] += int(parameter.grad is not None and bool(parameter.grad.abs().sum() > 0))
    return reached


@pytest.mark.parametrize("tiny_family", sorted(TINY_FAMILIES))
class TestPrefixesOnTinyModels:
    def test_every_parameter_in_one_part_and_every_prefix_exists(self, tiny_family, tiny_model_dirs):
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[tiny_family])
        family = family_of_model(model)
        assert family.name == REGISTRY_NAME[tiny_family] == detect_family(tiny_model_dirs[tiny_family]).name
        parts = {name: family.part_of(name) for name, _ in model.named_parameters()}
        assert None not in parts.values(), [name for name, part in parts.items() if part is None]
        assert set(parts.values()) == set(PARTS)
        module_names = {name for name, _ in model.named_modules()} | set(parts)
        for prefix in family.vision_prefixes + family.projector_prefixes + family.language_prefixes:
            exists = any(name == prefix or name.startswith(prefix + ".") for name in module_names)
            assert exists or (tiny_family == "florence2" and prefix in REMOTE_CODE_PREFIXES), prefix
        assert module_part(model, "lm_head") == "language"

    def test_vision_and_projector_are_what_processes_images(self, tiny_family, tiny_model_dirs):
        """An image batch trains all three parts; a text-only batch reaches the language model alone."""
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[tiny_family])
        processor = AutoProcessor.from_pretrained(tiny_model_dirs[tiny_family])
        batch = VisionChatCollator(processor)([sample("What colour?", "red")])
        with_image = gradients_reach(model, model_inputs(batch))
        for part in PARTS:
            assert with_image[part][0] > 0, (part, with_image)
        # Most of the vision tower is on the image path (the last CLIP layer of LLaVA is not: it reads layer -2).
        assert with_image["vision"][0] >= with_image["vision"][1] // 2, with_image
        ids = processor.tokenizer("the red square", return_tensors="pt").input_ids
        text_only = {"input_ids": ids, "labels": ids}
        text_reach = gradients_reach(model, text_only)
        assert text_reach["vision"][0] == text_reach["projector"][0] == 0, text_reach
        assert text_reach["language"][0] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Chat templates written here
# ----------------------------------------------------------------------------------------------------------------------
CONVERSATIONS = [
    [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "and?"}],
        },
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Both?"}]},
        {"role": "assistant", "content": "Blue, green."},
    ],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
]


def renderings(processor, template, messages):
    """The whole conversation, and the prompt before each assistant turn."""
    messages = normalize_messages(messages)
    prompts = [
        processor.apply_chat_template(messages[:turn], chat_template=template, add_generation_prompt=True)
        for turn, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    return [processor.apply_chat_template(messages, chat_template=template), *prompts]


class TestChatTemplates:
    @requires_real_processor("llava")
    @pytest.mark.parametrize("messages", CONVERSATIONS)
    def test_llava_1_5_renders_as_the_real_template(self, messages):
        processor = AutoProcessor.from_pretrained(real_processor_dir("llava"))
        real = renderings(processor, processor.chat_template, messages)
        assert renderings(processor, OWN_TEMPLATES["llava_1_5"], messages) == real

    @pytest.mark.parametrize("messages", CONVERSATIONS)
    def test_idefics2_renders_as_idefics3_without_its_begin_of_text(self, messages, tiny_model_dirs):
        """Idefics3's template (TRL's copy) is Idefics2's with `<|begin_of_text|>` in front."""
        processor = AutoProcessor.from_pretrained(tiny_model_dirs["idefics2"])
        idefics3 = [
            text.removeprefix("<|begin_of_text|>")
            for text in renderings(processor, trl_chat_template("idefics3"), messages)
        ]
        assert renderings(processor, chat_template_text("idefics2"), messages) == idefics3
        assert renderings(processor, chat_template_text("idefics2", training=True), messages) == idefics3
        assert re.search(r"{%-? generation -?%}", chat_template_text("idefics2", training=True))

    def test_prompt_only_templates(self, tiny_model_dirs):
        processor = AutoProcessor.from_pretrained(tiny_model_dirs["paligemma"])
        messages = normalize_messages(CONVERSATIONS[1][:2])
        assert (
            processor.apply_chat_template(messages, chat_template=OWN_TEMPLATES["paligemma"])
            == "<image>Be brief.\nLook: and?"
        )
        assert (
            processor.apply_chat_template(messages, chat_template=OWN_TEMPLATES["florence2"])
            == "Be brief.\nLook: and?"
        )
        with_answer = normalize_messages(CONVERSATIONS[0])
        for name in PROMPT_ANSWER_FAMILIES:
            rendered = processor.apply_chat_template(with_answer, chat_template=OWN_TEMPLATES[name])
            assert "A cat." not in rendered

    @pytest.mark.parametrize("tiny_family", sorted(TINY_FAMILIES))
    def test_tiny_models_wear_their_family_template(self, tiny_family, tiny_model_dirs):
        processor = AutoProcessor.from_pretrained(tiny_model_dirs[tiny_family])
        collator = VisionChatCollator(processor)  # fills a template that the processor does not reload (Florence-2)
        assert collator.processor.chat_template == chat_template_text(TINY_FAMILIES[tiny_family].chat_template)
        assert family_of_processor(processor).name == REGISTRY_NAME[tiny_family]


# ----------------------------------------------------------------------------------------------------------------------
# Collation of the prompt/answer families and of Idefics2
# ----------------------------------------------------------------------------------------------------------------------
def supervised_text(processor, labels_row):
    return processor.tokenizer.decode(labels_row[labels_row != IGNORE_INDEX])


class TestPromptAnswerCollation:
    def examples(self):
        return [sample("What colour is it?", "red"), sample("Colour?", "dark blue", colour="blue", system="Be brief.")]

    def test_paligemma_prefix_and_suffix(self, tiny_model_dirs):
        processor = AutoProcessor.from_pretrained(tiny_model_dirs["paligemma"])
        batch = VisionChatCollator(processor)(self.examples())
        tokenizer = processor.tokenizer
        for row, answer in enumerate(["red", "dark blue"]):
            labels, types = batch["labels"][row], batch["token_type_ids"][row]
            assert supervised_text(processor, labels) == answer + "<eos>"
            # The answer is exactly the suffix (type 1) and is causal; the prompt, its image tokens and <bos> are not.
            assert torch.equal(labels != IGNORE_INDEX, (types == 1) & batch["attention_mask"][row].bool())
            assert torch.equal(labels[labels != IGNORE_INDEX], batch["input_ids"][row][labels != IGNORE_INDEX])
            ids = batch["input_ids"][row].tolist()
            assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == processor.image_seq_length
            assert ids.index(tokenizer.bos_token_id) == processor.image_seq_length  # <bos> right after the image
        prompt = (batch["token_type_ids"][1] == 0) & batch["attention_mask"][1].bool()
        prompt_text = tokenizer.decode(batch["input_ids"][1][prompt])
        assert prompt_text == "<image>" * processor.image_seq_length + "<bos>Be brief.\nColour?\n"

    def test_florence2_encoder_prompt_and_decoder_answer(self, tiny_model_dirs):
        processor = AutoProcessor.from_pretrained(tiny_model_dirs["florence2"])
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs["florence2"])
        batch = VisionChatCollator(processor)(self.examples())
        tokenizer = processor.tokenizer
        assert supervised_text(processor, batch["labels"][0]) == "<s>red</s>"
        assert supervised_text(processor, batch["labels"][1]) == "<s>dark blue</s>"
        assert torch.equal(batch["shift_labels"], batch["labels"])
        # The decoder reads the targets shifted right behind its start token, as the model itself would build them.
        start = model.config.text_config.decoder_start_token_id
        assert start == tokenizer.eos_token_id
        expected = torch.cat([torch.full_like(batch["labels"][:, :1], start), batch["labels"][:, :-1]], dim=1)
        expected[expected == IGNORE_INDEX] = tokenizer.pad_token_id
        assert torch.equal(batch["decoder_input_ids"], expected)
        # The encoder reads the image, <s>, the prompt and </s>; no answer token.
        encoder_text = tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()])
        assert encoder_text.endswith("<s>Be brief.\nColour?</s>") and "dark" not in encoder_text

    @pytest.mark.parametrize("tiny_family", PROMPT_ANSWER_FAMILIES)
    def test_trl_fused_loss_equals_the_models_own_loss(self, tiny_family, tiny_model_dirs):
        """TRL's SFTTrainer scores labels with a fused LM head; for both families it must give the model's loss."""
        from trl.trainer.utils import add_fused_lm_head

        processor = AutoProcessor.from_pretrained(tiny_model_dirs[tiny_family])
        model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs[tiny_family])
        batch = VisionChatCollator(processor)(self.examples())
        own = model(**model_inputs(batch)).loss
        add_fused_lm_head(model)
        fused = model(**batch, fused_lm_head=True).loss
        assert torch.allclose(fused, own, atol=1e-5), (fused, own)

    @pytest.mark.parametrize("tiny_family", PROMPT_ANSWER_FAMILIES)
    def test_lengths_explain_and_bad_rows(self, tiny_family, tiny_model_dirs):
        processor = AutoProcessor.from_pretrained(tiny_model_dirs[tiny_family])
        collator = VisionChatCollator(processor)
        example = self.examples()[1]
        batch = collator([example])
        explained = collator.explain(example)
        supervised = [token_id for token_id, _, label, reason in explained if label != IGNORE_INDEX]
        assert supervised == batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
        assert all(reason.startswith("supervised") == (label != IGNORE_INDEX) for _, _, label, reason in explained)
        assert LabelReason.IMAGE in {reason for *_, reason in explained}
        assert collator.sample_length(example) == len(explained)
        short = VisionChatCollator(processor, max_length=len(explained) - 1, too_long="drop")
        kept = short([self.examples()[0], example])
        assert kept["input_ids"].shape[0] == 1 and short.num_dropped == 1
        two_turns = {
            "images": [image(), image()],
            "messages": [*example["messages"], *sample("Again?", "yes")["messages"]],
        }
        with pytest.raises(ValueError, match=r"row 1: .* one prompt and one answer.*2 assistant turn"):
            collator([example, two_turns])
        no_image = {
            "images": [],
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hi"}],
        }
        with pytest.raises(ValueError, match=r"row 0: .*image"):
            collator([no_image])


class TestIdefics2Offsets:
    """Idefics2's legacy processor reports no replacement offsets; ours must give assistant-only labels."""

    @pytest.mark.parametrize("splitting", [False, True])
    def test_labels_with_and_without_image_splitting(self, splitting, tiny_model_dirs):
        processor = AutoProcessor.from_pretrained(tiny_model_dirs["idefics2"])
        processor.image_processor.do_image_splitting = splitting
        examples = [
            sample("What colour?", "red"),
            {"images": [image(), image(colour="blue"), image(colour="green")], "messages": CONVERSATIONS[1]},
        ]
        batch = VisionChatCollator(processor)(examples)
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        tiles = 5 if splitting else 1
        assert (batch["input_ids"][1] == image_id).sum() == 3 * tiles * processor.image_seq_len
        assert supervised_text(processor, batch["labels"][0]) == " red<end_of_utterance>\n"
        assert supervised_text(processor, batch["labels"][1]) == (
            " Red.<end_of_utterance>\n Blue, green.<end_of_utterance>\n"
        )

    def test_an_expansion_that_does_not_match_the_processor_is_refused(self, tiny_model_dirs, monkeypatch):
        from vlm_recipes import family_collation

        processor = AutoProcessor.from_pretrained(tiny_model_dirs["idefics2"])
        original = family_collation._idefics2_replacements

        def off_by_one(processor, text):
            expanded, replacements = original(processor, text)
            return expanded.replace("<image>", "", 1), replacements

        monkeypatch.setattr(family_collation, "_idefics2_replacements", off_by_one)
        with pytest.raises(ValueError, match="does not reproduce"):
            VisionChatCollator(processor)([sample("What colour?", "red")])


# ----------------------------------------------------------------------------------------------------------------------
# Training through scripts/sft.py, in process
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_messages_data(tmp_path_factory):
    """A `messages`-task dataset with one image per sample (PaliGemma and Florence-2 need one)."""
    directory = tmp_path_factory.mktemp("colours")
    (directory / "images").mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for split, count in (("train", 8), ("val", 2), ("test", 2)):
        lines = []
        for index in range(count):
            colour = colours[index % len(colours)]
            path = f"images/{split}_{index}.png"
            image(40, 32, colour).save(directory / path)
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": colour},
            ]
            lines.append(json.dumps({"id": f"{split}-{index}", "images": [path], "messages": messages}))
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="module")
def sft_main():
    from vlm_recipes.sft import main

    return main


@pytest.mark.slow
@pytest.mark.parametrize("tiny_family", sorted(TINY_FAMILIES))
def test_training_run(tiny_family, tiny_model_dirs, image_messages_data, sft_main, tmp_path, capsys):
    from vlm_recipes.configs import parse_recipe

    model_dir, output = tiny_model_dirs[tiny_family], tmp_path / "out"
    args = ["recipes/demo/shapes_qwen2vl.yaml", "--model_name_or_path", str(model_dir), "--task", "messages"]
    args += ["--dataset_path", str(image_messages_data), "--output_dir", str(output), "--max_steps", "3"]
    args += ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--verify_saved_model", "false"]
    sft_main(*parse_recipe(args))
    stdout = capsys.readouterr().out
    match = re.search(r"final loss: (\S+) \(steps: (\d+)\)", stdout)
    assert match, stdout[-2000:]
    assert torch.isfinite(torch.tensor(float(match.group(1)))) and int(match.group(2)) == 3
    # Every part trained (full fine-tuning): the saved weights differ from the tiny model's, part by part.
    before = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
    after_model = AutoModelForImageTextToText.from_pretrained(output)
    family, changed = family_of_model(after_model), set()
    for name, tensor in after_model.state_dict().items():
        if not torch.equal(tensor, before[name]):
            changed.add(family.part_of(name))
    assert changed == set(PARTS), changed
