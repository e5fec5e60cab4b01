"""`dataset_name` datasets: hub-layout folders, save_to_disk folders and data files in the four formats users bring,
read through `datasets`; each gives the same tokens and labels as the same conversation in the native messages task.
Bad rows, format detection, the cached conversion and length passes, and streaming."""

import json
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from vlm_recipes import lengths as lengths_module
from vlm_recipes.collator import IGNORE_INDEX, LabelReason, VisionChatCollator
from vlm_recipes.configs import VLMScriptArguments
from vlm_recipes.data.errors import DataError
from vlm_recipes.data.formats import FORMATS, detect_format, to_messages
from vlm_recipes.data.splits import eval_split_name, load_splits
from vlm_recipes.lengths import sample_lengths

SIZES = {"red.png": (48, 64), "blue.png": (120, 80), "green.png": (32, 32)}  # name: (height, width)
COLOURS = {"red.png": (220, 30, 30), "blue.png": (30, 60, 220), "green.png": (30, 200, 60)}

# The conversations, in the native messages format: one image with a system turn, two images over two turns, no image.
NATIVE = [
    {
        "id": "one",
        "images": ["images/red.png"],
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "Red."},
        ],
    },
    {
        "id": "two",
        "images": ["images/blue.png", "images/green.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And the next?"}]},
            {"role": "assistant", "content": "Green."},
        ],
    },
    {
        "id": "text",
        "images": [],
        "messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}],
    },
]


def script_args(**values):
    args = VLMScriptArguments(**values)
    args.keys_set = set(values)
    return args


@pytest.fixture(scope="module")
def processor(tiny_model_dirs):
    return AutoProcessor.from_pretrained(tiny_model_dirs["qwen2_vl"])


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The native messages data: `train.jsonl` and the images it names."""
    root = tmp_path_factory.mktemp("native")
    (root / "images").mkdir()
    for name, (height, width) in SIZES.items():
        Image.new("RGB", (width, height), COLOURS[name]).save(root / "images" / name)
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in NATIVE))
    return root


def native_rows(native):
    (dataset,), _ = load_splits(script_args(task="messages", dataset_path=str(native)), ["train"])
    return {row["id"]: row for row in dataset}


def png_bytes(native, name):
    return (native / "images" / name).read_bytes()


def assert_same_encoding(collator, row, reference):
    got, expected = collator([row]), collator([reference])
    assert torch.equal(got["input_ids"], expected["input_ids"]), row["id"]
    assert torch.equal(got["labels"], expected["labels"]), row["id"]
    if "pixel_values" in expected:
        assert torch.equal(got["pixel_values"], expected["pixel_values"]), row["id"]


def arrow_struct_content(content):
    """Content items as `datasets` stores them from HuggingFaceH4/llava-instruct-mix-vsft: every item has every key."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return [
        {"type": item["type"], "text": item.get("text"), "index": 0 if item["type"] == "image" else None}
        for item in content
    ]


# --------------------------------------------------------------------------------------------------------------------
# Datasets in each format, built locally
# --------------------------------------------------------------------------------------------------------------------
def messages_parquet(native, root: Path) -> Path:
    """Hub layout (`data/train-*.parquet`), images embedded as the `Image` feature, Arrow-struct content."""
    rows = [
        {
            "images": [{"bytes": png_bytes(native, Path(path).name), "path": None} for path in row["images"]],
            "messages": [{"role": m["role"], "content": arrow_struct_content(m["content"])} for m in row["messages"]],
            "id": row["id"],
        }
        for row in NATIVE
    ]
    dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    (root / "data").mkdir(parents=True)
    dataset.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def prompt_completion_saved(native, root: Path) -> Path:
    """A `save_to_disk` DatasetDict; images as paths relative to the saved folder."""
    rows = []
    for row in NATIVE:
        rows.append(
            {
                "id": row["id"],
                "images": row["images"],
                "prompt": row["messages"][:-1],
                "completion": row["messages"][-1:],
            }
        )
    for row in rows:  # content as Arrow structs, the shape a hub dataset has
        row["prompt"] = [{"role": m["role"], "content": arrow_struct_content(m["content"])} for m in row["prompt"]]
        row["completion"] = [
            {"role": m["role"], "content": arrow_struct_content(m["content"])} for m in row["completion"]
        ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(root / "saved"))
    (root / "saved" / "images").mkdir()
    for name in SIZES:
        (root / "saved" / "images" / name).write_bytes(png_bytes(native, name))
    return root / "saved"


def llava_json(native, root: Path) -> Path:
    """LLaVA's JSON (one array): `image`, `conversations` with `<image>` markers; images relative to the file."""
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = []
    for row in NATIVE:
        conversations = []
        for message in row["messages"]:
            content = message["content"]
            if isinstance(content, list):
                content = "\n".join("<image>" if item["type"] == "image" else item["text"] for item in content)
            conversations.append({"from": speakers[message["role"]], "value": content})
        entry = {"id": row["id"], "conversations": conversations}
        if row["images"]:
            entry["image"] = row["images"]
        rows.append(entry)
    root.mkdir(parents=True)
    for name in SIZES:
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / name).write_bytes(png_bytes(native, name))
    (root / "llava.json").write_text(json.dumps(rows))
    return root / "llava.json"


def sharegpt_jsonl(native, root: Path) -> Path:
    """ShareGPT JSONL: `system` column, `conversations` with `<image>` markers, `images` as absolute paths."""
    speakers = {"user": "human", "assistant": "gpt"}
    lines = []
    for row in NATIVE:
        system = "".join(m["content"] for m in row["messages"] if m["role"] == "system")
        conversations = []
        for message in row["messages"]:
            if message["role"] == "system":
                continue
            content = message["content"]
            if isinstance(content, list):
                content = "".join("<image>" if item["type"] == "image" else item["text"] for item in content)
            conversations.append({"from": speakers[message["role"]], "value": content})
        images = [str(native / path) for path in row["images"]]
        lines.append(json.dumps({"id": row["id"], "system": system, "conversations": conversations, "images": images}))
    root.mkdir(parents=True)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


BUILDERS = {
    "messages": messages_parquet,
    "prompt_completion": prompt_completion_saved,
    "llava": llava_json,
    "sharegpt": sharegpt_jsonl,
}


class TestFormatsGiveTheNativeEncoding:
    @pytest.mark.parametrize("fmt", sorted(BUILDERS))
    def test_same_tokens_and_labels_as_the_native_task(self, fmt, native, processor, tmp_path, caplog):
        collator = VisionChatCollator(processor)
        reference = native_rows(native)
        name = BUILDERS[fmt](native, tmp_path / fmt)
        with caplog.at_level("INFO", logger="vlm_recipes.data.hub"):
            (dataset,), report = load_splits(script_args(dataset_name=str(name)), ["train"])
        assert f"in the {fmt} format" in caplog.text  # the chosen format is logged
        assert not report.skipped and len(dataset) == len(NATIVE)
        rows = {row["id"]: row for row in dataset}
        for row_id, row in rows.items():
            if fmt == "prompt_completion" and row_id == "two":
                continue  # a prompt holding an assistant turn: loss on the completion only (below)
            assert_same_encoding(collator, row, reference[row_id])

    def test_prompt_completion_trains_on_the_completion_only(self, native, processor, tmp_path):
        collator = VisionChatCollator(processor)
        (dataset,), _ = load_splits(
            script_args(dataset_name=str(prompt_completion_saved(native, tmp_path / "pc"))), ["train"]
        )
        row = next(row for row in dataset if row["id"] == "two")
        reference = native_rows(native)["two"]
        got, expected = collator([row]), collator([reference])
        assert torch.equal(got["input_ids"], expected["input_ids"])
        trained = got["labels"][0] != IGNORE_INDEX
        # The native row trains on both answers; the completion is the second one alone.
        assert trained.sum() < (expected["labels"][0] != IGNORE_INDEX).sum()
        assert processor.tokenizer.decode(got["labels"][0][trained]).startswith("Green.")
        assert torch.equal(got["labels"][0][trained], expected["labels"][0][trained])
        # What inspect_batch.py shows: the prompt's answer is masked, and says why.
        reasons = {reason for _, _, label, reason in collator.explain(row) if label == IGNORE_INDEX}
        assert LabelReason.ASSISTANT_CONTEXT in reasons
        assert all(
            label != IGNORE_INDEX for _, _, label, reason in collator.explain(row) if reason == LabelReason.ASSISTANT
        )

    def test_string_prompt_and_completion_get_images_before_the_user_text(self, native, processor, tmp_path):
        """TRL's placement: a conversation without placeholders gets the images first in its first user turn."""
        rows = [
            {"id": "one", "images": [str(native / "images/red.png")], "prompt": "What colour?", "completion": "Red."}
        ]
        file = tmp_path / "pc.jsonl"
        file.write_text(json.dumps(rows[0]) + "\n")
        (dataset,), _ = load_splits(script_args(dataset_name=str(file)), ["train"])
        reference = dict(native_rows(native)["one"])
        reference["messages"] = reference["messages"][1:]  # without the system turn
        assert_same_encoding(VisionChatCollator(processor), dataset[0], reference)


def test_csv_holds_conversations_as_json_text(native, processor, tmp_path):
    import csv

    with open(tmp_path / "rows.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "conversations"])
        for row in NATIVE:
            turns = [
                {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in row["messages"]
            ]
            for turn in turns:
                if isinstance(turn["value"], list):
                    turn["value"] = "\n".join("<image>" if i["type"] == "image" else i["text"] for i in turn["value"])
            writer.writerow([row["id"], json.dumps([str(native / p) for p in row["images"]]), json.dumps(turns)])
    (dataset,), _ = load_splits(script_args(dataset_name=str(tmp_path / "rows.csv")), ["train"])
    reference = native_rows(native)
    collator = VisionChatCollator(processor)
    for row in dataset:
        assert_same_encoding(collator, row, reference[row["id"]])


class TestDetection:
    def test_recipe_choices_are_the_known_formats(self):
        from vlm_recipes.configs import DATASET_FORMATS

        assert DATASET_FORMATS == FORMATS

    def test_columns_decide(self):
        assert detect_format(["messages", "images"]) == "messages"
        assert detect_format(["prompt", "completion", "images"]) == "prompt_completion"
        assert detect_format(["image", "conversations", "id"]) == "llava"
        assert detect_format(["conversations", "images", "system"]) == "sharegpt"
        assert detect_format(["messages", "prompt", "completion"], forced="prompt_completion") == "prompt_completion"

    def test_undetectable_format_names_the_columns_and_the_known_formats(self, tmp_path):
        file = tmp_path / "odd.jsonl"
        file.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
        with pytest.raises(DataError) as error:
            load_splits(script_args(dataset_name=str(file)), ["train"])
        message = str(error.value)
        assert "['question', 'answer']" in message
        for fmt in FORMATS:
            assert fmt in message
        assert "dataset_format" in message

    def test_forced_format_needs_its_columns(self):
        with pytest.raises(DataError, match="no `conversations` column"):
            detect_format(["messages", "images"], forced="sharegpt")

    def test_llava_markers_split_the_text(self):
        row = {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "Look: <image>\nWhat?"}, {"from": "gpt", "value": "A."}],
        }
        messages, images = to_messages(row, "llava")
        assert messages[0]["content"] == [
            {"type": "text", "text": "Look:"},
            {"type": "image"},
            {"type": "text", "text": "What?"},
        ]
        assert images == ["a.png"]


# --------------------------------------------------------------------------------------------------------------------
# Bad rows: named by split, index and id; `on_bad_row` decides
# --------------------------------------------------------------------------------------------------------------------
def bad_rows_folder(native, root: Path) -> Path:
    image = str(native / "images/red.png")
    (root / "data").mkdir(parents=True)
    (root / "broken.png").write_bytes(b"not an image at all")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}
    answer = {"role": "assistant", "content": "Red."}
    rows = [
        {"id": "good", "images": [image], "messages": [user, answer]},
        {"id": "count", "images": [image, image], "messages": [user, answer]},
        {"id": "silent", "images": [image], "messages": [user]},
        {"id": "tool", "images": [image], "messages": [user, {"role": "tool", "content": "x"}, answer]},
        {"id": "unreadable", "images": [str(root / "broken.png")], "messages": [user, answer]},
    ]
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


class TestBadRows:
    def test_error_names_split_row_and_id(self, native, tmp_path):
        folder = bad_rows_folder(native, tmp_path / "bad")
        with pytest.raises(DataError) as error:
            load_splits(script_args(dataset_name=str(folder)), ["train"])
        message = str(error.value)
        assert "[train], row 1 (id count)" in message and "2 image(s)" in message

    def test_skip_counts_and_names_each_reason(self, native, tmp_path):
        folder = bad_rows_folder(native, tmp_path / "bad")
        (dataset,), report = load_splits(script_args(dataset_name=str(folder), on_bad_row="skip"), ["train"])
        assert [row["id"] for row in dataset] == ["good"]
        reasons = {error.row_id: error.reason for error in report.skipped}
        assert set(reasons) == {"count", "silent", "tool", "unreadable"}
        assert "1 image placeholder(s) in the conversation but 2 image(s)" in reasons["count"]
        assert "no assistant turn" in reasons["silent"]
        assert "unknown role 'tool'" in reasons["tool"]
        assert "not an image" in reasons["unreadable"]
        assert "skipped 4 malformed row(s)" in report.summary()

    def test_stream_hands_bad_rows_to_the_collator(self, native, processor, tmp_path):
        folder = bad_rows_folder(native, tmp_path / "bad")
        args = script_args(dataset_name=str(folder), dataset_streaming=True, on_bad_row="skip")
        (stream,), _ = load_splits(args, ["train"])
        rows = list(stream)
        assert [row["id"] for row in rows if not row["image_error"]] == ["good"]
        skipping = VisionChatCollator(processor, on_bad_row="skip")
        batch = skipping(rows)
        assert batch["input_ids"].shape[0] == 1
        summary = skipping.skipped_summary()
        assert (
            "malformed streamed rows skipped: 4\n" in summary
            and "[train], row 3 (id tool): messages message 1 has unknown role 'tool'" in summary
        )
        with pytest.raises(DataError, match=r"\[train\], row 1 \(id count\)"):
            VisionChatCollator(processor, on_bad_row="error")(rows)


# --------------------------------------------------------------------------------------------------------------------
# Sources, splits, caching, streaming
# --------------------------------------------------------------------------------------------------------------------
class TestSources:
    def test_save_to_disk_dataset_is_split_train(self, native, processor, tmp_path):
        rows = [dict(row, images=[str(native / path) for path in row["images"]]) for row in NATIVE]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        datasets.load_dataset("json", data_files=str(tmp_path / "rows.jsonl"))["train"].save_to_disk(
            str(tmp_path / "saved")
        )
        (dataset,), _ = load_splits(script_args(dataset_name=str(tmp_path / "saved")), ["train"])
        reference = native_rows(native)
        collator = VisionChatCollator(processor)
        for row in dataset:
            assert_same_encoding(collator, row, reference[row["id"]])

    def test_missing_split_lists_the_splits(self, native, tmp_path):
        folder = messages_parquet(native, tmp_path / "pq")
        with pytest.raises(DataError, match=r"no split 'validation'; its splits are \['train'\]"):
            load_splits(script_args(dataset_name=str(folder)), ["train", "validation"])

    def test_unparsable_data_file_is_one_line(self, tmp_path):
        (tmp_path / "rows.jsonl").write_text('{"messages": []}\n{"messages": [\n')
        with pytest.raises(DataError, match=r"Cannot read dataset_name .*rows.jsonl.*one JSON object per line"):
            load_splits(script_args(dataset_name=str(tmp_path / "rows.jsonl")), ["train"])

    def test_unreachable_name_is_one_line(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        with pytest.raises(DataError, match="Cannot load dataset_name 'no-such-user/no-such-dataset'"):
            load_splits(script_args(dataset_name="no-such-user/no-such-dataset"), ["train"])

    def test_eval_split_is_dataset_test_split_unless_set(self):
        assert eval_split_name(script_args(dataset_name="x")) == "test"
        assert eval_split_name(script_args(dataset_name="x", dataset_test_split="validation")) == "validation"
        assert eval_split_name(script_args(dataset_name="x", eval_split="dev")) == "dev"
        assert eval_split_name(script_args(dataset_path="x")) == "val"

    def test_struct_images_without_the_image_type(self, native, processor, tmp_path):
        """Parquet written by pandas or pyarrow holds images as `{bytes, path}` structs, not the `Image` type."""
        rows = [
            {
                "id": row["id"],
                "images": [{"bytes": png_bytes(native, Path(path).name), "path": None} for path in row["images"]],
                "messages": json.dumps(row["messages"]),
            }
            for row in NATIVE
        ]
        (tmp_path / "pq").mkdir()
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
        assert not isinstance(
            datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "train.parquet"))["train"]
            .features["images"]
            .feature,
            datasets.Image,
        )
        reference = native_rows(native)
        collator = VisionChatCollator(processor)
        for streaming in (False, True):
            (dataset,), _ = load_splits(
                script_args(dataset_name=str(tmp_path / "pq"), dataset_streaming=streaming), ["train"]
            )
            for row in dataset:
                assert_same_encoding(collator, row, reference[row["id"]])

    def test_llava_folder_with_image_folders_named_for_splits(self, native, tmp_path):
        """LLaVA's layout: `llava_mix.json` beside `coco/train2017/*.png`; the images are not data files."""
        root = tmp_path / "llava"
        (root / "coco" / "train2017").mkdir(parents=True)
        (root / "coco" / "train2017" / "1.png").write_bytes(png_bytes(native, "red.png"))
        row = {
            "id": "a",
            "image": "coco/train2017/1.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        }
        (root / "llava_mix.json").write_text(json.dumps([row]))
        (dataset,), _ = load_splits(script_args(dataset_name=str(root)), ["train"])
        assert dataset[0]["id"] == "a" and dataset[0]["images"][0].size == (64, 48)

    def test_text_that_only_looks_like_json_stays_text(self, native, tmp_path):
        rows = [
            {
                "images": [str(native / "images/red.png")],
                "prompt": "[Question] What colour?",
                "completion": "[1, 2, 3]",
            }
        ]
        (tmp_path / "pc.jsonl").write_text(json.dumps(rows[0]) + "\n")
        (dataset,), report = load_splits(script_args(dataset_name=str(tmp_path / "pc.jsonl")), ["train"])
        assert not report.skipped
        assert dataset[0]["messages"][0]["content"][-1]["text"] == "[Question] What colour?"
        assert dataset[0]["messages"][1]["content"][0]["text"] == "[1, 2, 3]"

    def test_compressed_data_file(self, native, tmp_path):
        import gzip

        row = dict(NATIVE[0], images=[str(native / "images/red.png")])
        (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
        (dataset,), _ = load_splits(script_args(dataset_name=str(tmp_path / "rows.jsonl.gz")), ["train"])
        assert dataset[0]["id"] == "one"

    def test_max_train_samples_takes_the_first_rows(self, native, tmp_path):
        folder = messages_parquet(native, tmp_path / "pq")
        (dataset,), _ = load_splits(script_args(dataset_name=str(folder), max_train_samples=2), ["train"])
        assert [row["id"] for row in dataset] == ["one", "two"]
        assert all(isinstance(image, Image.Image) for row in dataset for image in row["images"])


class TestCachedPasses:
    def test_second_load_reads_the_conversion_cache(self, native, tmp_path):
        import os

        folder = messages_parquet(native, tmp_path / "pq")
        (first,), _ = load_splits(script_args(dataset_name=str(folder)), ["train"])
        files = [entry["filename"] for entry in first.cache_files if "vlm_recipes" in entry["filename"]]
        assert files and not any(str(folder) in name for name in files)  # in the datasets cache, not the user's folder
        written = {name: os.stat(name).st_mtime_ns for name in files}
        (second,), _ = load_splits(script_args(dataset_name=str(folder)), ["train"])
        assert {name: os.stat(name).st_mtime_ns for name in files} == written  # read back, not written again
        assert [row["messages"] for row in second] == [row["messages"] for row in first]

    def test_changed_image_files_are_read_again(self, native, processor, tmp_path):
        """Images given as paths can change between runs: a fixed file is no longer a bad row, and a replaced one
        gets its new length."""
        images = tmp_path / "images"
        images.mkdir()
        (images / "a.png").write_bytes(b"broken")
        (images / "b.png").write_bytes(png_bytes(native, "green.png"))
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}
        rows = [
            {"id": name, "images": [f"images/{name}.png"], "messages": [user, {"role": "assistant", "content": "x"}]}
            for name in ("a", "b")
        ]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        args = script_args(dataset_name=str(tmp_path / "rows.jsonl"), on_bad_row="skip")
        (dataset,), report = load_splits(args, ["train"])
        assert [row["id"] for row in dataset] == ["b"] and len(report.skipped) == 1
        collator = VisionChatCollator(processor)
        small = sample_lengths(dataset, collator)[0][0]
        (images / "a.png").write_bytes(png_bytes(native, "red.png"))
        Image.new("RGB", (256, 256)).save(images / "b.png")
        (dataset,), report = load_splits(args, ["train"])
        assert [row["id"] for row in dataset] == ["a", "b"] and not report.skipped
        lengths = sample_lengths(dataset, collator)[0]
        assert lengths[1] > small and lengths == [int(collator([row])["attention_mask"].sum()) for row in dataset]

    def test_lengths_are_exact_and_read_back_from_the_cache(self, native, processor, tmp_path, monkeypatch):
        collator = VisionChatCollator(processor)
        folder = messages_parquet(native, tmp_path / "pq")
        (dataset,), _ = load_splits(script_args(dataset_name=str(folder)), ["train"])
        lengths, names = sample_lengths(dataset, collator)
        assert lengths == [int(collator([row])["attention_mask"].sum()) for row in dataset]
        assert names[1] == "row 1 (id 'two')"

        def measured_again(*args, **kwargs):
            raise AssertionError("lengths measured again instead of read from the cache")

        monkeypatch.setattr(lengths_module, "_lengths_of_examples", measured_again)
        (again,), _ = load_splits(script_args(dataset_name=str(folder)), ["train"])
        assert sample_lengths(again, collator)[0] == lengths

    def test_native_task_lengths_are_cached_too(self, native, processor, monkeypatch):
        collator = VisionChatCollator(processor)
        (dataset,), _ = load_splits(script_args(task="messages", dataset_path=str(native)), ["train"])
        lengths, _ = sample_lengths(dataset, collator)
        assert lengths == [int(collator([row])["attention_mask"].sum()) for row in dataset]

        def measured_again(*args, **kwargs):
            raise AssertionError("lengths measured again instead of read from the cache")

        monkeypatch.setattr(lengths_module, "_lengths_of_examples", measured_again)
        (again,), _ = load_splits(script_args(task="messages", dataset_path=str(native)), ["train"])
        assert sample_lengths(again, collator)[0] == lengths
        # Another processor setting is another cache entry: measured again.
        with pytest.raises(AssertionError, match="measured again"):
            sample_lengths(again, VisionChatCollator(processor, add_eos_if_missing=False))

    def test_lengths_over_processes_equal_one_process(self, native, processor, tmp_path):
        collator = VisionChatCollator(processor)
        rows = [dict(NATIVE[i % 3], id=f"r{i}") for i in range(300)]
        for row in rows:
            row["images"] = [str(native / path) for path in row["images"]]
        file = tmp_path / "many.jsonl"
        file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (dataset,), _ = load_splits(script_args(dataset_name=str(file)), ["train"], num_proc=2)
        assert sample_lengths(dataset, collator, num_proc=2) == sample_lengths(dataset.select(range(300)), collator)


class TestStreaming:
    def test_stream_gives_the_native_encoding(self, native, processor, tmp_path):
        folder = messages_parquet(native, tmp_path / "pq")
        (stream,), _ = load_splits(script_args(dataset_name=str(folder), dataset_streaming=True), ["train"])
        assert isinstance(stream, datasets.IterableDataset)
        reference = native_rows(native)
        collator = VisionChatCollator(processor)
        seen = [row["id"] for row in stream]
        assert seen == ["one", "two", "text"]
        for row in stream:
            assert_same_encoding(collator, row, reference[row["id"]])

    def test_streaming_needs_max_steps_and_no_grouping(self, tmp_path):
        from vlm_recipes.configs import parse_recipe
        from vlm_recipes.recipe_keys import RecipeError

        base = ["--dataset_name", str(tmp_path), "--dataset_streaming", "true", "--output_dir", str(tmp_path / "o")]
        base += ["--use_cpu", "true", "--bf16", "false"]
        with pytest.raises(RecipeError, match="set `max_steps`"):
            parse_recipe(base)
        with pytest.raises(RecipeError, match="train_sampling_strategy: random"):
            parse_recipe([*base, "--max_steps", "2", "--train_sampling_strategy", "group_by_length"])
        with pytest.raises(RecipeError, match="set `generation_max_samples`"):
            parse_recipe([*base, "--max_steps", "2", "--eval_after_train", "true"])
        script, training, _ = parse_recipe([*base, "--max_steps", "2"])
        assert script.dataset_streaming and training.max_steps == 2
