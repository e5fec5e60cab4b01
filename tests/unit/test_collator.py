"""Label properties of VisionChatCollator on tiny models of each family and on the real processors."""

import re

import numpy
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, ProcessorMixin

from vlm_recipes import collator as collator_module
from vlm_recipes.collator import IGNORE_INDEX, LabelReason, VisionChatCollator, _offsets_array
from vlm_recipes.data.errors import DataError
from vlm_recipes.distributed import ImageInEveryBatch
from vlm_recipes.tiny import trl_chat_template

from conftest import real_processor_dir, requires_real_processor

# Per template kind, what an assistant turn looks like once rendered: the text that must be supervised, stripped.
END_OF_TURN = {"qwen": "<|im_end|>", "smolvlm": "<end_of_utterance>", "llava": "</s>"}
REAL_PROCESSORS = {
    "qwen2-vl": ("qwen", {}),
    "qwen2.5-vl": ("qwen", {}),
    "smolvlm": ("smolvlm", {"do_image_splitting": False}),
    "llava": ("llava", {}),
}
# Tiny families that render whole conversations (PaliGemma and Florence-2 take one prompt and one answer, no
# multi-turn or text-only rows: tests/unit/test_families.py checks their labels).
TINY_KIND = {
    "qwen2_vl": "qwen",
    "qwen2_5_vl": "qwen",
    "qwen3_vl": "qwen",
    "smolvlm": "smolvlm",
    "idefics2": "smolvlm",
    "llava": "llava",
}
# Tiny templates with generation markers whose marker mask is comparable: LLaVA-1.5's answers get an eos appended by
# the collator, which the markers do not cover, and Idefics2's legacy processor gives transformers no replacement
# offsets, so its marker mask is misplaced (tests/unit/test_families.py checks Idefics2's labels).
MARKER_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "smolvlm")


def image(width, height, colour="red"):
    return Image.new("RGB", (width, height), colour)


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def conversations():
    """Single image; multi-turn with a system prompt and images in two turns; text-only; two images in one turn."""
    return [
        {"images": [image(64, 48)], "messages": [user("What is this?", 1), assistant("A red square.")]},
        {
            "images": [image(90, 120, "blue"), image(56, 56, "green")],
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                user("First picture?", 1),
                assistant("Blue."),
                user("And the second one?", 1),
                assistant("Green, small."),
            ],
        },
        {"images": [], "messages": [user("Say hi."), {"role": "assistant", "content": "hi there"}]},
        {
            "images": [image(80, 60), image(60, 80, "yellow")],
            "messages": [user("Compare.", 2), assistant("Red, yellow.")],
        },
    ]


def supervised_runs(labels_row):
    """Contiguous runs of supervised positions, as lists of token ids."""
    runs, current = [], []
    for label in labels_row.tolist():
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


def check_labels(processor, kind, examples, batch):
    tokenizer = processor.tokenizer
    input_ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    for row, example in enumerate(examples):
        supervised = labels[row] != IGNORE_INDEX
        # Labels copy the input where supervised, and padding is never supervised.
        assert torch.equal(labels[row][supervised], input_ids[row][supervised])
        assert not supervised[attention[row] == 0].any()
        # No image token carries loss.
        assert not (input_ids[row][supervised] == image_token_id).any()
        # One supervised run per assistant turn, each exactly the turn's content plus its end-of-turn token.
        answers = [m for m in example["messages"] if m["role"] == "assistant"]
        runs = supervised_runs(labels[row])
        assert len(runs) == len(answers), (row, [tokenizer.decode(r) for r in runs])
        for run, message in zip(runs, answers):
            content = message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
            assert tokenizer.decode(run).strip() == content + END_OF_TURN[kind]
        # Everything else in the row (system, user, template, image tokens) is masked: the supervised count is
        # exactly the runs' lengths.
        assert int(supervised.sum()) == sum(len(r) for r in runs)


def check_image_token_counts(processor, examples, batch):
    """Each row holds as many image tokens as the processor's image grid implies."""
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = (batch["input_ids"] == image_token_id).sum(dim=1).tolist()
    if "image_grid_thw" in batch:  # Qwen: patches of the grid merged merge_size x merge_size
        merge = processor.image_processor.merge_size
        per_image = (batch["image_grid_thw"].prod(dim=1) // merge**2).tolist()
    elif hasattr(processor, "image_seq_len"):  # Idefics3 without splitting: image_seq_len tokens per image
        per_image = [processor.image_seq_len] * sum(len(e["images"]) for e in examples)
    else:  # LLaVA: one token per patch of the fixed-size crop
        size = processor.image_processor.crop_size["height"]
        per_image = [(size // processor.patch_size) ** 2] * sum(len(e["images"]) for e in examples)
    expected, cursor = [], 0
    for example in examples:
        expected.append(sum(per_image[cursor : cursor + len(example["images"])]))
        cursor += len(example["images"])
    assert counts == expected


def tiny_processor(tiny_model_dirs, family):
    return AutoProcessor.from_pretrained(tiny_model_dirs[family])


def real_processor(name):
    directory = real_processor_dir(name)
    if not (directory / "tokenizer_config.json").is_file():
        pytest.skip(f"real processor {name!r} not found at {directory} (set VLM_REAL_PROCESSORS)")
    return AutoProcessor.from_pretrained(directory, **REAL_PROCESSORS[name][1])


def check_direct_rendering(processor, expect_direct: bool = True):
    """The collator's own rendering (transformers' compiled template, called directly) is what the processor's
    `apply_chat_template` renders, for whole conversations and for prompts with the generation cue."""
    collator = VisionChatCollator(processor)
    assert (collator._direct_template is not None) == expect_direct
    for example in conversations():
        messages, _ = collator.validate_example(example, "row")
        for turn in range(1, len(messages) + 1):
            for cue in (False, True):
                expected = processor.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=cue)
                assert collator.render_messages(messages[:turn], add_generation_prompt=cue) == expected


class TestLabelsTinyFamilies:
    @pytest.mark.parametrize("family", sorted(TINY_KIND))
    def test_assistant_only_mixed_batch(self, family, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, family)
        examples = conversations()
        batch = VisionChatCollator(processor)(examples)
        check_labels(processor, TINY_KIND[family], examples, batch)
        check_image_token_counts(processor, examples, batch)

    @pytest.mark.parametrize("family", sorted(TINY_KIND))
    def test_text_only_batch(self, family, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, family)
        examples = [conversations()[2]] * 2
        batch = VisionChatCollator(processor)(examples)
        assert "pixel_values" not in batch
        check_labels(processor, TINY_KIND[family], examples, batch)

    @pytest.mark.parametrize("family", sorted(TINY_KIND))
    def test_direct_rendering_is_the_processors(self, family, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, family)
        # SmolVLM's processor has its own `apply_chat_template`: the collator goes through it.
        check_direct_rendering(processor, expect_direct=type(processor).__name__ != "SmolVLMProcessor")


class TestLabelsRealProcessors:
    @pytest.mark.parametrize("name", sorted(REAL_PROCESSORS))
    def test_assistant_only_mixed_batch(self, name):
        processor = real_processor(name)
        examples = conversations()
        batch = VisionChatCollator(processor)(examples)
        check_labels(processor, REAL_PROCESSORS[name][0], examples, batch)
        check_image_token_counts(processor, examples, batch)
        for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
            assert key in batch

    @pytest.mark.parametrize("name", sorted(REAL_PROCESSORS))
    def test_direct_rendering_is_the_processors(self, name):
        processor = real_processor(name)
        # The real SmolVLM checkpoint loads as Idefics3Processor, which keeps the stock `apply_chat_template`.
        check_direct_rendering(processor)

    @pytest.mark.parametrize("name", sorted(REAL_PROCESSORS))
    def test_each_row_alone_equals_its_row_in_the_batch(self, name):
        """Batching (padding, mixed image counts) changes nothing of a row's tokens or labels."""
        processor = real_processor(name)
        collator = VisionChatCollator(processor)
        examples = conversations()
        batch = collator(examples)
        for row, example in enumerate(examples):
            alone = collator([example])
            length = alone["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][row, :length], alone["input_ids"][0])
            assert torch.equal(batch["labels"][row, :length], alone["labels"][0])
            assert (batch["labels"][row, length:] == IGNORE_INDEX).all()

    @requires_real_processor("smolvlm")
    def test_smolvlm_with_image_splitting(self):
        processor = AutoProcessor.from_pretrained(real_processor_dir("smolvlm"))  # tiles + a global view
        examples = [conversations()[0], conversations()[2]]
        batch = VisionChatCollator(processor)(examples)
        check_labels(processor, "smolvlm", examples, batch)
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        tiles = int(batch["pixel_attention_mask"][0].flatten(1).any(dim=1).sum())
        assert tiles > 1
        assert int((batch["input_ids"][0] == image_token_id).sum()) == tiles * processor.image_seq_len

    @requires_real_processor("qwen2-vl")
    def test_qwen_vision_start_end_are_masked(self):
        processor = real_processor("qwen2-vl")
        batch = VisionChatCollator(processor)([conversations()[1]])
        for token in ("<|vision_start|>", "<|vision_end|>"):
            token_id = processor.tokenizer.convert_tokens_to_ids(token)
            positions = batch["input_ids"][0] == token_id
            assert positions.sum() == 2
            assert (batch["labels"][0][positions] == IGNORE_INDEX).all()

    @requires_real_processor("llava")
    def test_llava_gets_an_end_of_sequence_token_to_learn_stopping(self):
        processor = real_processor("llava")
        collator = VisionChatCollator(processor)
        reasons = [reason for *_, reason in collator.explain(conversations()[0])]
        assert reasons.count(LabelReason.ADDED_EOS) == 1
        no_eos = VisionChatCollator(processor, add_eos_if_missing=False)([conversations()[0]])
        assert processor.tokenizer.eos_token_id not in no_eos["input_ids"][0].tolist()


def marker_masks(processor, example):
    """The assistant mask transformers derives from `{% generation %}` markers."""
    # List content everywhere: the SmolVLM template iterates over `content` and would drop a plain string.
    messages = [
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in example["messages"]
    ]
    encoded = processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={"images": example["images"] or None, "return_tensors": "pt"},
    )
    return torch.as_tensor(encoded["input_ids"][0]), torch.as_tensor(encoded["assistant_masks"][0]).bool()


def assert_spans_match_markers(processor):
    """Our labels mark exactly the tokens that the markers mark; returns the labels of each conversation."""
    collator = VisionChatCollator(processor)
    all_labels = []
    for example in conversations():
        ids, mask = marker_masks(processor, example)
        batch = collator([example])
        assert torch.equal(batch["input_ids"][0], ids)
        assert torch.equal(batch["labels"][0] != IGNORE_INDEX, mask)
        all_labels.append(batch["labels"])
    return all_labels


class TestAgreesWithGenerationMarkers:
    """Where a template has generation markers, our marker-free spans equal `return_assistant_tokens_mask`."""

    @pytest.mark.parametrize("family", MARKER_FAMILIES)
    def test_tiny_training_templates(self, family, tiny_training_template_dirs):
        processor = AutoProcessor.from_pretrained(tiny_training_template_dirs[family])
        assert re.search(r"{%-? generation -?%}", processor.chat_template)
        assert_spans_match_markers(processor)

    @pytest.mark.parametrize(("name", "template"), [("qwen2-vl", "qwen2_5_vl"), ("smolvlm", "smolvlm")])
    def test_real_processors_with_trl_training_templates(self, name, template):
        processor = real_processor(name)
        original = processor.chat_template
        assert not re.search(r"{%-? generation -?%}", original)
        processor.chat_template = trl_chat_template(template + "_training")
        with_markers = assert_spans_match_markers(processor)
        # The original template (no markers) gives the same labels as its training variant.
        processor.chat_template = original
        collator = VisionChatCollator(processor)
        for example, labels in zip(conversations(), with_markers):
            assert torch.equal(collator([example])["labels"], labels)


class TestTooLong:
    def lengths(self, collator, examples):
        return [collator.sample_length(example, i) for i, example in enumerate(examples)]

    def test_error_names_sample_and_length(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        examples = conversations()
        lengths = self.lengths(VisionChatCollator(processor), examples)
        collator = VisionChatCollator(processor, max_length=lengths[1] - 1, too_long="error")
        with pytest.raises(ValueError, match=rf"row 1 is {lengths[1]} tokens long .*max_length={lengths[1] - 1}"):
            collator(examples)

    def test_drop_leaves_out_and_counts_never_truncates(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        examples = conversations()
        lengths = self.lengths(VisionChatCollator(processor), examples)
        limit = sorted(lengths)[1]  # keeps the two shortest rows whole
        collator = VisionChatCollator(processor, max_length=limit, too_long="drop")
        batch = collator(examples)
        kept = [i for i, length in enumerate(lengths) if length <= limit]
        assert batch["input_ids"].shape[0] == len(kept)
        assert batch["attention_mask"].sum(dim=1).tolist() == [lengths[i] for i in kept]
        assert collator.num_dropped == len(examples) - len(kept)
        reference = VisionChatCollator(processor)([examples[i] for i in kept])
        assert torch.equal(batch["labels"], reference["labels"])

    def test_drop_of_a_whole_batch_says_to_filter_first(self, tiny_model_dirs):
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"), max_length=5, too_long="drop")
        with pytest.raises(ValueError, match="filter_too_long"):
            collator(conversations()[:2])

    def test_filter_too_long_on_a_dataset(self, tiny_model_dirs):
        class ListDataset(list):  # the two methods of `datasets.Dataset` that the filter uses
            def select(self, indices):
                return ListDataset(self[i] for i in indices)

        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        examples = [dict(e, id=f"s{i}") for i, e in enumerate(conversations())]
        lengths = self.lengths(VisionChatCollator(processor), examples)
        dataset = ListDataset(examples)
        collator = VisionChatCollator(processor, max_length=max(lengths) - 1, too_long="drop")
        filtered, dropped = collator.filter_too_long(dataset)
        assert len(filtered) == len(examples) - len(dropped) and len(dropped) >= 1
        assert [e["id"] for e in filtered] == [f"s{i}" for i, n in enumerate(lengths) if n <= max(lengths) - 1]
        assert dropped == [f"row {i} (id 's{i}')" for i, n in enumerate(lengths) if n > max(lengths) - 1]

    def test_bad_policy(self, tiny_model_dirs):
        with pytest.raises(ValueError, match="too_long"):
            VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"), too_long="truncate")


class TestBadRows:
    @pytest.mark.parametrize(
        ("example", "message"),
        [
            ({"images": [], "messages": [user("hi", 1), assistant("x")]}, r"row 1: 1 image placeholder.* 0 image"),
            ({"images": [image(32, 32)], "messages": [user("hi"), assistant("x")]}, r"row 1: 0 image placeholder"),
            ({"images": [], "messages": [user("hi")]}, r"row 1: no assistant turn"),
            ({"images": [], "messages": []}, r"row 1: `messages` is empty"),
            ({"images": [], "messages": [assistant("x"), user("hi")]}, r"row 1: .*starts with an assistant"),
            (
                {"images": [], "messages": [user("hi"), assistant("  ")]},
                r"row 1, message 1: the assistant turn is empty",
            ),
            ({"images": [], "messages": [{"role": "robot", "content": "x"}]}, r"row 1, message 0: `role`"),
            ({"id": "abc", "images": [], "messages": [user("hi")]}, r"row 1 \(id 'abc'\): no assistant"),
        ],
    )
    def test_error_names_row_and_problem(self, example, message, tiny_model_dirs):
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"))
        good = conversations()[0]
        with pytest.raises(ValueError, match=message):
            collator([good, example])


def undecodable(row_id="bad", image_path="/data/broken.jpg"):
    """A sample as the dataset's transform gives it when its image cannot be decoded (`vlm_recipes.data.rows`)."""
    return {
        "id": row_id,
        "images": [None],
        "messages": [user("What is this?", 1), assistant("A red square.")],
        "image_error": {
            "image": image_path,
            "reason": "cannot decode: image file is truncated (3 bytes not processed)",
        },
    }


def decodable():
    return [dict(example, id=f"s{i}", image_error=None) for i, example in enumerate(conversations()[:2])]


class TestUndecodableImages:
    def assert_same_batch(self, batch, reference):
        assert batch.keys() == reference.keys()
        for key in reference:
            assert torch.equal(batch[key], reference[key]), key

    def test_error_names_the_sample_and_its_image(self, tiny_model_dirs):
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"))  # `on_bad_row` defaults to error
        with pytest.raises(DataError) as raised:
            collator([decodable()[0], undecodable()])
        assert str(raised.value) == (
            "sample id 'bad': image /data/broken.jpg: cannot decode: image file is truncated (3 bytes not processed). "
            "Fix or remove the image, or set `on_bad_row: skip` to leave such samples out (counted and listed)."
        )

    def test_skip_drops_the_sample_from_its_batch_and_lists_it(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        collator = VisionChatCollator(processor, on_bad_row="skip")
        first, second = decodable()
        batch = collator([first, undecodable(), second])
        self.assert_same_batch(batch, VisionChatCollator(processor)([first, second]))
        assert collator.skipped_samples == [
            {
                "id": "bad",
                "image": "/data/broken.jpg",
                "reason": "cannot decode: image file is truncated (3 bytes not processed)",
            }
        ]
        assert collator.num_substituted == 0
        assert "samples skipped for an image that cannot be decoded: 1\n  - id 'bad': image /data/broken.jpg" in (
            collator.skipped_summary()
        )

    def test_a_batch_of_bad_samples_only_gets_the_last_good_sample(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        collator = VisionChatCollator(processor, on_bad_row="skip")
        first, second = decodable()
        collator([first, second])
        batch = collator([undecodable("b1"), undecodable("b2")])
        self.assert_same_batch(batch, VisionChatCollator(processor)([second]))
        assert (batch["labels"] != IGNORE_INDEX).any()  # supervised tokens: the loss has something to divide by
        assert [sample["id"] for sample in collator.skipped_samples] == ["b1", "b2"]
        assert collator.num_substituted == 1
        assert "where the last good sample stood in: 1" in collator.skipped_summary()

    def test_bad_samples_only_before_any_good_one_is_an_error(self, tiny_model_dirs):
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"), on_bad_row="skip")
        with pytest.raises(DataError, match=r"\(sample id 'b1'\), and no good sample has been seen yet"):
            collator([undecodable("b1")])

    def test_skips_in_data_loading_workers_reach_the_main_process(self, tiny_model_dirs, tmp_path):
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"), on_bad_row="skip")
        collator.record_skips_to(tmp_path / "skipped_samples.jsonl")
        first, second = decodable()
        examples = [first, undecodable("b1"), second, undecodable("b2")]
        loader = torch.utils.data.DataLoader(examples, batch_size=2, num_workers=1, collate_fn=collator)
        assert [batch["input_ids"].shape[0] for batch in loader] == [1, 1]
        assert [sample["id"] for sample in collator.skipped_samples] == ["b1", "b2"]
        # Through the multi-process wrapper too, which forwards the collator's attributes.
        assert [sample["id"] for sample in ImageInEveryBatch(collator).skipped_samples] == ["b1", "b2"]

    def test_bad_policy(self, tiny_model_dirs):
        with pytest.raises(ValueError, match="on_bad_row"):
            VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"), on_bad_row="ignore")


# A model's own template that refuses some conversations, as Llama's and Mistral's do.
ALTERNATING = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% endfor %}"
)


class TestTemplateErrors:
    def test_names_the_row_and_the_templates_reason(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        processor.chat_template = ALTERNATING + processor.chat_template
        collator = VisionChatCollator(processor)
        refused = {"id": "r7", "images": [], "messages": [user("a"), user("b"), assistant("c")]}
        expected = r"row 1 \(id 'r7'\): the chat template refuses this conversation: Conversation roles must alternate"
        with pytest.raises(DataError, match=expected):
            collator([dict(conversations()[2], id="ok"), refused])
        # The length pass renders every sample before training, with the same message.
        from vlm_recipes.lengths import sample_lengths

        with pytest.raises(DataError, match=expected):
            sample_lengths([dict(conversations()[2], id="ok"), refused], collator, progress=False)


class _Text(str):
    """A str subclass, as some data sources give (numpy.str_, enums): carries methods a template must not see."""


class TestValidatedMessagesArePlain:
    def test_roles_and_texts_become_exact_str(self, tiny_model_dirs):
        # The collator renders validated messages without transformers' conversion to plain types (see `_render`).
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"))
        example = {
            "images": [],
            "messages": [
                {"role": _Text("user"), "content": _Text("hi")},
                {"role": "assistant", "content": [{"type": "text", "text": _Text("yes")}]},
            ],
        }
        messages, _ = collator.validate_example(example, "row")
        values = [m["role"] for m in messages] + [item["text"] for m in messages for item in m["content"]]
        assert values == ["user", "assistant", "hi", "yes"]
        assert all(type(value) is str for value in values)
        plain = {"images": [], "messages": [user("hi"), assistant("yes")]}
        assert collator.rendered_text(example) == collator.rendered_text(plain)


class TestPromptCache:
    def test_one_render_per_distinct_prompt(self, tiny_model_dirs, monkeypatch):
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"))
        calls = []
        render = collator._render_uncached

        def counted(template, messages, add_generation_prompt):
            calls.append(add_generation_prompt)
            return render(template, messages, add_generation_prompt)

        monkeypatch.setattr(collator, "_render_uncached", counted)
        same_prompt = [
            {"images": [image(32, 32)], "messages": [user("What colour?", 1), assistant(colour)]}
            for colour in ("red", "blue", "green")
        ]
        examples = [*same_prompt, {"images": [], "messages": [user("Another question"), assistant("yes")]}]
        batch = collator(examples)
        assert calls.count(True) == 2  # one prompt render for the three rows that share it, one for the other
        assert calls.count(False) == 4  # every whole conversation is rendered
        uncached = VisionChatCollator(collator.processor)
        monkeypatch.setattr(uncached, "_cached_prompt", lambda template, messages: render(template, messages, True))
        assert torch.equal(uncached(examples)["labels"], batch["labels"])

    def test_new_template_or_special_tokens_start_a_new_cache(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        collator = VisionChatCollator(processor)
        messages, _ = collator.validate_example({"images": [], "messages": [user("hi"), assistant("yes")]}, "row")
        before = collator.render_messages(messages[:1], add_generation_prompt=True)
        processor.chat_template = "PREFIX " + processor.chat_template
        assert collator.render_messages(messages[:1], add_generation_prompt=True) == "PREFIX " + before
        processor.chat_template = processor.chat_template + "{{ eos_token }}"
        with_old_eos = collator.render_messages(messages[:1], add_generation_prompt=True)
        processor.tokenizer.eos_token = processor.tokenizer.pad_token  # the same template, another special token
        expected = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        assert expected.endswith(processor.tokenizer.pad_token) and expected != with_old_eos
        assert collator.render_messages(messages[:1], add_generation_prompt=True) == expected

    def test_templates_that_vary_between_calls_are_not_cached(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        processor.chat_template = "{{ strftime_now('%H:%M:%S.%f') }}" + processor.chat_template
        collator = VisionChatCollator(processor)
        messages, _ = collator.validate_example({"images": [], "messages": [user("hi"), assistant("yes")]}, "row")
        collator.render_messages(messages[:1], add_generation_prompt=True)
        assert collator._prompts == {}

    def test_size_is_bounded(self, tiny_model_dirs, monkeypatch):
        monkeypatch.setattr(collator_module, "_PROMPT_CACHE_SIZE", 3)
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, "qwen2_vl"))
        for question in range(7):
            messages, _ = collator.validate_example({"messages": [user(f"q{question}"), assistant("a")]}, "row")
            collator.render_messages(messages[:1], add_generation_prompt=True)
            assert len(collator._prompts) <= 3
        assert len(collator._prompts) == 1  # started again at the seventh


class TestOffsetsArray:
    def test_equals_numpy_on_a_padded_batch(self):
        offsets = [[(0, 3), (3, 7), (0, 0)], [(0, 2), (2, 9), (9, 12)]]
        array = _offsets_array(offsets)
        assert array.dtype == numpy.int64 and array.shape == (2, 3, 2)
        assert (array == numpy.asarray(offsets)).all()
        assert _offsets_array([]).shape == (0, 0, 2)

    def test_ragged_rows_are_an_error_not_a_silent_cut(self):
        with pytest.raises(ValueError, match="expected a padded batch"):
            _offsets_array([[(0, 3), (3, 7)], [(0, 2)]])
        with pytest.raises(ValueError, match=r"not \(start, end\) pairs"):
            _offsets_array([[(0, 3, 5), (3, 7)]])


class TestExplain:
    def test_reasons_cover_every_token(self, tiny_model_dirs):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        collator = VisionChatCollator(processor)
        example = conversations()[1]
        explained = collator.explain(example)
        batch = collator([example])
        assert [token_id for token_id, *_ in explained] == batch["input_ids"][0].tolist()
        for (_, _, label, reason), expected in zip(explained, batch["labels"][0].tolist()):
            assert label == expected
            assert reason.startswith("supervised") == (label != IGNORE_INDEX)
        reasons = {reason for *_, reason in explained}
        assert {LabelReason.SYSTEM, LabelReason.USER, LabelReason.IMAGE, LabelReason.ASSISTANT} <= reasons
        assert LabelReason.PROMPT_CUE in reasons

    @pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
    def test_templates_default_system_prompt_is_a_system_turn_tiny(self, family, tiny_model_dirs):
        assert_default_system_prompt_is_a_system_turn(tiny_processor(tiny_model_dirs, family))

    @requires_real_processor("qwen2-vl")
    @requires_real_processor("qwen2.5-vl")
    @pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
    def test_templates_default_system_prompt_is_a_system_turn_real(self, name):
        assert_default_system_prompt_is_a_system_turn(real_processor(name))

    @pytest.mark.parametrize("family", ["qwen3_vl", "smolvlm", "idefics2", "llava"])
    def test_no_system_turn_where_the_template_adds_none(self, family, tiny_model_dirs):
        collator = VisionChatCollator(tiny_processor(tiny_model_dirs, family))
        reasons = [reason for *_, reason in collator.explain(conversations()[0])]
        assert LabelReason.SYSTEM not in reasons
        assert LabelReason.USER in reasons


def assert_default_system_prompt_is_a_system_turn(processor):
    """Qwen2-VL's template opens a conversation without a system message with its own: those tokens read "system",
    the user's own "user"."""
    collator = VisionChatCollator(processor)
    example = conversations()[0]  # no system message
    explained = collator.explain(example)
    by_reason = {}
    for token_id, _, _, reason in explained:
        by_reason.setdefault(reason, []).append(token_id)
    system = processor.tokenizer.decode(by_reason[LabelReason.SYSTEM])
    assert system == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert explained[0][3] == LabelReason.SYSTEM
    user_text = processor.tokenizer.decode(by_reason[LabelReason.USER])
    assert user_text.startswith("<|im_start|>user\n") and "What is this?" in user_text and "system" not in user_text
    # The labels themselves are unchanged: only assistant tokens are supervised.
    assert [label for *_, label, _ in explained] == collator([example])["labels"][0].tolist()


def collate_a_first_batch(collator):
    """`collator` on a first batch with images, other than `conversations()`: it decides how `mm_token_type_ids` are
    built."""
    collator([conversations()[0], conversations()[3]])


def assert_same_batch(ours, reference):
    assert list(ours) == list(reference)  # the same keys in the same order
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


class TestMmTokenTypeIds:
    """After its first batch the collator builds `mm_token_type_ids` itself where the processor's method is the stock
    one (one comparison over the padded batch instead of transformers' row-by-row loop); batches are unchanged."""

    @pytest.mark.parametrize("family", sorted(TINY_KIND))
    def test_tiny_families(self, family, tiny_model_dirs):
        self.check(tiny_processor(tiny_model_dirs, family))

    @pytest.mark.parametrize("name", sorted(REAL_PROCESSORS))
    def test_real_processors(self, name):
        self.check(real_processor(name))

    @staticmethod
    def check(processor):
        examples = conversations()
        reference = VisionChatCollator(processor)(examples)  # a first batch: the processor's own ids
        collator = VisionChatCollator(processor)
        collate_a_first_batch(collator)
        returns_types = "mm_token_type_ids" in reference
        stock = type(processor).create_mm_token_type_ids is ProcessorMixin.create_mm_token_type_ids
        assert collator._own_mm_token_types is (returns_types and stock)
        builds = []
        original = type(processor).create_mm_token_type_ids

        def counted(self, input_ids):
            builds.append(len(input_ids))
            return original(self, input_ids)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(processor), "create_mm_token_type_ids", counted)
            assert_same_batch(collator(examples), reference)
        # The processor's row-by-row method runs no more once the collator builds the ids.
        assert builds == ([] if collator._own_mm_token_types else [len(examples)] * returns_types)
        if collator._own_mm_token_types:
            image_positions = reference["input_ids"] == processor.image_token_id
            assert image_positions.any()
            assert torch.equal(reference["mm_token_type_ids"], image_positions.long())

    def test_a_text_only_first_batch_decides_nothing(self, tiny_model_dirs):
        """Without image tokens both ways give zeros only: the decision waits for a batch with images."""
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        collator = VisionChatCollator(processor)
        text_only = [conversations()[2]] * 2
        assert_same_batch(collator(text_only), VisionChatCollator(processor)(text_only))
        assert collator._own_mm_token_types is None
        examples = conversations()
        assert_same_batch(collator(examples), VisionChatCollator(processor)(examples))
        assert collator._own_mm_token_types is True
        assert_same_batch(collator(text_only), VisionChatCollator(processor)(text_only))

    def test_a_disagreement_on_the_first_batch_keeps_the_processors_ids(self, tiny_model_dirs, monkeypatch):
        processor = tiny_processor(tiny_model_dirs, "qwen2_vl")
        examples = conversations()
        reference = VisionChatCollator(processor)(examples)
        collator = VisionChatCollator(processor)
        monkeypatch.setattr(collator, "_mm_token_type_ids", lambda input_ids: numpy.zeros_like(input_ids))
        collate_a_first_batch(collator)
        assert_same_batch(collator(examples), reference)
        assert collator._own_mm_token_types is False
