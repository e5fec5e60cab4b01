"""Cheap sample lengths (no pixels decoded, no model) and what uses them: length grouping, `too_long` up front, the
data-loading defaults."""

import json
import statistics

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.trainer_pt_utils import get_length_grouped_indices

from vlm_recipes import trainer as trainer_module
from vlm_recipes.collator import VisionChatCollator
from vlm_recipes.configs import VLMScriptArguments
from vlm_recipes.data import rows as rows_module
from vlm_recipes.data.rows import build_dataset
from vlm_recipes.data.splits import load_splits
from vlm_recipes.lengths import ImageTokenCounter, image_size, padding_fraction, prepare_lengths, sample_lengths
from vlm_recipes.tasks import get_task
from vlm_recipes.trainer import SeededLengthGroupedSampler, apply_data_loading_defaults, default_dataloader_num_workers

from conftest import real_processor_dir, requires_real_processor

SIZES = [(48, 64), (200, 300), (701, 37), (120, 90), (512, 512)]  # (height, width)


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": text}


def examples(sizes=SIZES):
    """One image of each size, a text-only row, and a multi-turn row with a system prompt and two images."""
    rows = [
        {
            "id": f"img-{h}x{w}",
            "images": [Image.new("RGB", (w, h))],
            "messages": [user("What is it?", 1), assistant("A shape.")],
        }
        for h, w in sizes
    ]
    rows.append({"id": "text", "images": [], "messages": [user("No image here."), assistant("Fine.")]})
    rows.append(
        {
            "id": "multi",
            "images": [Image.new("RGB", (90, 120)), Image.new("RGB", (56, 56))],
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                user("First?", 1),
                assistant("Blue."),
                user("Second?", 1),
                assistant("Green, with a longer answer."),
            ],
        }
    )
    return rows


def encoded_lengths(collator, rows):
    """The lengths the collator really produces, one batch (padding excluded)."""
    batch = collator(rows)
    return batch["attention_mask"].sum(dim=1).tolist()


def usable_rows(collator, rows):
    """Prompt/answer families (PaliGemma, Florence-2) take exactly one image and one answer."""
    usable = []
    for row in rows:
        try:
            collator.sample_length(row)
        except ValueError:
            continue
        usable.append(row)
    return usable


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    get_task("shapes").make_data(directory, num=80, seed=3)
    (train,), _ = load_splits(VLMScriptArguments(task="shapes", dataset_path=str(directory)), ["train"])
    return train


class TestCheapLengthIsExact:
    def test_every_tiny_family(self, tiny_model_dirs):
        for family, directory in tiny_model_dirs.items():
            collator = VisionChatCollator(AutoProcessor.from_pretrained(directory))
            rows = usable_rows(collator, examples())
            assert len(rows) >= 3, family
            cheap, names = sample_lengths(rows, collator, progress=False)
            assert cheap == [collator.sample_length(row, i) for i, row in enumerate(rows)], family
            if collator.layout == "causal":  # an encoder-decoder's attention mask covers its encoder side only
                assert cheap == encoded_lengths(collator, rows), family
            assert names[0] == "row 0 (id 'img-48x64')"

    @pytest.mark.parametrize(
        "name, kwargs",
        [
            pytest.param(
                "qwen2-vl", {"min_pixels": 3136, "max_pixels": 50176}, marks=requires_real_processor("qwen2-vl")
            ),
            pytest.param("qwen2-vl", {}, marks=requires_real_processor("qwen2-vl")),
            pytest.param("qwen2.5-vl", {"max_pixels": 200704}, marks=requires_real_processor("qwen2.5-vl")),
            pytest.param("smolvlm", {}, marks=requires_real_processor("smolvlm")),
            pytest.param("smolvlm", {"do_image_splitting": False}, marks=requires_real_processor("smolvlm")),
            pytest.param("llava", {}, marks=requires_real_processor("llava")),
        ],
    )
    def test_real_processors(self, name, kwargs):
        processor = AutoProcessor.from_pretrained(real_processor_dir(name), **kwargs)
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        collator = VisionChatCollator(processor)
        rows = examples(SIZES + [(1000, 700)])
        cheap, _ = sample_lengths(rows, collator, progress=False)
        assert cheap == [collator.sample_length(row, i) for i, row in enumerate(rows)]
        if "max_pixels" in kwargs:  # the budget binds: 1000x700 would be ~890 image tokens without it
            assert cheap[len(SIZES)] - cheap[0] <= kwargs["max_pixels"] // (28 * 28)

    @requires_real_processor("smolvlm")
    def test_image_splitting_changes_the_count(self):
        split = ImageTokenCounter(AutoProcessor.from_pretrained(real_processor_dir("smolvlm")))
        single = ImageTokenCounter(
            AutoProcessor.from_pretrained(real_processor_dir("smolvlm"), do_image_splitting=False)
        )
        assert split(1000, 700) > single(1000, 700) == single(48, 64)

    def test_dataset_images_are_never_decoded(self, tiny_model_dirs, shapes_dataset, monkeypatch):
        collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"]))
        expected = [collator.sample_length(shapes_dataset[i], i) for i in range(len(shapes_dataset))]
        decoded = []
        original = rows_module.load_rgb_image  # what the dataset's transform decodes each image with
        monkeypatch.setattr(rows_module, "load_rgb_image", lambda *a, **k: decoded.append(1) or original(*a, **k))
        cheap, _ = sample_lengths(shapes_dataset, collator, progress=False)
        assert cheap == expected
        assert decoded == []  # sizes came from the file headers
        assert len(set(cheap)) > 3  # the demo's image sizes vary, and so do the lengths

    def test_exif_rotation_is_followed(self, tiny_model_dirs, tmp_path):
        # A 60x200 JPEG whose EXIF says "rotate 90 degrees": datasets decodes it as 200 wide, 60 high.
        path = tmp_path / "rotated.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.new("RGB", (60, 200), "white").save(path, exif=exif)
        assert image_size(str(path)) == (60, 200)
        rows = [{"id": "r", "images": [str(path)], "messages": [user("Which way?", 1), assistant("Sideways.")]}]
        dataset = build_dataset(rows)
        collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"]))
        cheap, _ = sample_lengths(dataset, collator, progress=False)
        assert dataset[0]["images"][0].size == (200, 60)
        assert cheap == [collator.sample_length(dataset[0])]

    def test_processors_without_token_arithmetic_are_exact_too(self, tiny_model_dirs, monkeypatch):
        # Legacy processors (Idefics2) have no `_get_num_multimodal_tokens`: blank images of the same sizes instead.
        collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["smolvlm"]))
        monkeypatch.setattr(ImageTokenCounter, "__init__", _unavailable_counter_init)
        rows = examples()
        cheap, _ = sample_lengths(rows, collator, progress=False)
        assert cheap == encoded_lengths(collator, rows)


def _unavailable_counter_init(self, processor):
    self.processor, self.tokenizer, self.image_token = processor, processor.tokenizer, processor.image_token
    self.available, self.placeholder_length, self._cache = False, 1, {}


class TestLengthGrouping:
    def test_grouping_lowers_padding_on_demo_data(self, tiny_model_dirs, shapes_dataset):
        collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"]))
        lengths, _ = sample_lengths(shapes_dataset, collator, progress=False)
        random_, grouped = [], []
        for seed in range(10):
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(lengths), generator=generator).tolist()
            random_.append(padding_fraction(lengths, [order[i : i + 4] for i in range(0, len(order), 4)]))
            order = get_length_grouped_indices(lengths, 4, generator=generator)
            grouped.append(padding_fraction(lengths, [order[i : i + 4] for i in range(0, len(order), 4)]))
        assert statistics.mean(grouped) < 0.6 * statistics.mean(random_)

    def test_padding_fraction_by_hand(self):
        assert padding_fraction([2, 4, 3, 3], [[0, 1], [2, 3]]) == pytest.approx(2 / 14)

    def test_trainer_reads_the_lengths_without_decoding(self, tiny_model_dirs, shapes_dataset, tmp_path, monkeypatch):
        from transformers import AutoModelForImageTextToText
        from trl import SFTConfig

        from vlm_recipes.configs import VLMModelConfig
        from vlm_recipes.trainer import VLMSFTTrainer

        model_dir = tiny_model_dirs["qwen2_vl"]
        processor = AutoProcessor.from_pretrained(model_dir)
        collator = VisionChatCollator(processor, max_length=512)
        args = SFTConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            train_sampling_strategy="group_by_length",
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            use_cpu=True,
            report_to="none",
        )
        script_args = VLMScriptArguments(task="shapes", dataset_path="unused")
        train, _, dropped = prepare_lengths(script_args, args, collator, shapes_dataset, None)
        assert dropped == {"train": []}
        lengths, _ = sample_lengths(shapes_dataset, collator, progress=False)
        trainer = VLMSFTTrainer(
            model_args=VLMModelConfig(model_name_or_path=str(model_dir)),
            model=AutoModelForImageTextToText.from_pretrained(model_dir),
            args=args,
            data_collator=collator,
            train_dataset=train,
            processing_class=processor,
        )
        decoded = []
        original = rows_module.load_rgb_image  # what the dataset's transform decodes each image with
        monkeypatch.setattr(rows_module, "load_rgb_image", lambda *a, **k: decoded.append(1) or original(*a, **k))
        sampler = trainer._get_train_sampler()  # what `get_train_dataloader` asks for
        assert isinstance(sampler, SeededLengthGroupedSampler) and sampler.lengths == lengths
        assert decoded == []  # building the sampler read no row
        loader = trainer.get_train_dataloader()
        seen = [row for batch in loader for row in batch["attention_mask"].sum(dim=1).tolist()]
        assert sorted(seen) == sorted(lengths)
        images = sum(len(row_images) for row_images in train.with_format("arrow")[:].to_pydict()["images"])
        assert images > 0
        assert len(decoded) == images  # each image decoded once in the epoch

        decoded.clear()
        trainer.args.train_sampling_strategy = "batch_rebalance"  # the Trainer's own sampler, from our column
        assert sorted(index for batch in trainer._get_train_sampler() for index in batch) == list(range(len(train)))
        assert decoded == []


class TestTooLongUpFront:
    def setup_collator(self, tiny_model_dirs, shapes_dataset, policy):
        collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"]), max_length=1)
        lengths, _ = sample_lengths(shapes_dataset, collator, progress=False)
        collator.max_length = sorted(lengths)[len(lengths) // 2]
        collator.too_long = policy
        return collator, lengths

    def test_drop_counts_and_names(self, tiny_model_dirs, shapes_dataset):
        from trl import SFTConfig

        collator, lengths = self.setup_collator(tiny_model_dirs, shapes_dataset, "drop")
        args = SFTConfig(output_dir="unused", use_cpu=True, report_to="none")
        script_args = VLMScriptArguments(task="shapes", dataset_path="unused", too_long="drop")
        train, _, dropped = prepare_lengths(script_args, args, collator, shapes_dataset, None)
        over = [i for i, length in enumerate(lengths) if length > collator.max_length]
        assert 0 < len(over) < len(lengths)
        assert dropped["train"] == [f"row {i} (id {shapes_dataset[i]['id']!r})" for i in over]
        assert len(train) == len(lengths) - len(over)
        assert max(sample_lengths(train, collator, progress=False)[0]) <= collator.max_length

    def test_drop_then_group_by_length(self, tiny_model_dirs, shapes_dataset):
        from trl import SFTConfig

        collator, lengths = self.setup_collator(tiny_model_dirs, shapes_dataset, "drop")
        args = SFTConfig(
            output_dir="unused", use_cpu=True, report_to="none", train_sampling_strategy="group_by_length"
        )
        script_args = VLMScriptArguments(task="shapes", dataset_path="unused", too_long="drop")
        train, _, _ = prepare_lengths(script_args, args, collator, shapes_dataset, None)
        kept = [length for length in lengths if length <= collator.max_length]
        assert train.with_format("arrow")[:]["length"].to_pylist() == kept
        assert [train[i]["length"] for i in range(len(train))] == kept  # through the transform too
        assert isinstance(train[0]["messages"], list) and hasattr(train[0]["images"][0], "size")

    def test_error_names_the_sample_before_training(self, tiny_model_dirs, shapes_dataset):
        from trl import SFTConfig

        collator, lengths = self.setup_collator(tiny_model_dirs, shapes_dataset, "error")
        first = next(i for i, length in enumerate(lengths) if length > collator.max_length)
        args = SFTConfig(output_dir="unused", use_cpu=True, report_to="none")
        script_args = VLMScriptArguments(task="shapes", dataset_path="unused", too_long="error")
        message = f"train row {first} (id {shapes_dataset[first]['id']!r}) is {lengths[first]} tokens long"
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            prepare_lengths(script_args, args, collator, shapes_dataset, None)


class TestDataLoadingDefaults:
    def test_worker_count(self):
        assert [default_dataloader_num_workers(n) for n in (1, 2, 3, 4, 8, 64)] == [0, 0, 2, 3, 4, 4]

    def test_unset_keys_get_defaults(self, monkeypatch):
        from trl import SFTConfig

        monkeypatch.setattr(trainer_module, "_usable_cpus", lambda: 8)
        args = SFTConfig(output_dir="unused", use_cpu=True, report_to="none")
        changed = apply_data_loading_defaults(args, set())
        assert args.train_sampling_strategy == "group_by_length"
        assert args.dataloader_num_workers == 4 and args.dataloader_persistent_workers is True
        assert args.dataloader_pin_memory is False  # no CUDA in this run
        assert set(changed) == {
            "train_sampling_strategy",
            "dataloader_num_workers",
            "dataloader_pin_memory",
            "dataloader_persistent_workers",
        }

    def test_keys_the_user_set_are_kept(self, monkeypatch):
        from trl import SFTConfig

        monkeypatch.setattr(trainer_module, "_usable_cpus", lambda: 8)
        args = SFTConfig(
            output_dir="unused",
            use_cpu=True,
            report_to="none",
            dataloader_num_workers=0,
            train_sampling_strategy="random",
        )
        apply_data_loading_defaults(args, {"dataloader_num_workers", "train_sampling_strategy"})
        assert args.dataloader_num_workers == 0 and args.train_sampling_strategy == "random"
        assert args.dataloader_persistent_workers is False  # persistent workers need workers

    def test_old_group_by_length_key_points_to_its_new_name(self):
        from vlm_recipes.configs import RecipeError, parse_recipe

        with pytest.raises(RecipeError, match="train_sampling_strategy: group_by_length"):
            parse_recipe(["--group_by_length", "true"])

    def test_collator_and_dataset_work_in_worker_processes(self, tiny_model_dirs, shapes_dataset):
        collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"]))
        loader = torch.utils.data.DataLoader(shapes_dataset, batch_size=8, num_workers=1, collate_fn=collator)
        batch = next(iter(loader))
        in_process = collator([shapes_dataset[i] for i in range(8)])
        assert torch.equal(batch["input_ids"], in_process["input_ids"])
        assert torch.equal(batch["labels"], in_process["labels"])


def test_length_column_is_json_free(tiny_model_dirs, shapes_dataset):
    """The length column travels with the rows the collator gets, and the collator ignores it."""
    from trl import SFTConfig

    collator = VisionChatCollator(AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"]))
    args = SFTConfig(output_dir="unused", use_cpu=True, report_to="none", train_sampling_strategy="group_by_length")
    train, _, _ = prepare_lengths(
        VLMScriptArguments(task="shapes", dataset_path="x"), args, collator, shapes_dataset, None
    )
    row = train[0]
    assert isinstance(row["length"], int) and isinstance(row["messages"], list)
    assert json.dumps(row["messages"])
    assert collator([row])["attention_mask"].sum().item() == row["length"]
