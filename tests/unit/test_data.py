"""Data loading that never crashes a run: image headers checked at load time, decoding failures recorded for the
collator, every image converted to RGB correctly, and one-line errors that name the file, the line and the row."""

import io
import json
import random
import warnings
import zlib
from types import SimpleNamespace

import numpy
import pytest
from PIL import Image

from vlm_recipes.data.errors import BadRow, DataError
from vlm_recipes.data.images import load_rgb_image, read_image_header, resolve_image, to_rgb
from vlm_recipes.data.rows import BadRowReport, build_dataset, read_jsonl
from vlm_recipes.data.splits import load_splits
from vlm_recipes.lengths import image_size
from vlm_recipes.tasks import get_task

from conftest import REPO_ROOT, run_script

PIL_LIMIT = 89_478_485


# ---------------------------------------------------------------------------------------------------------------------
# Bad image files, made by hand
# ---------------------------------------------------------------------------------------------------------------------
def noise_image(size=(64, 48), seed=0) -> Image.Image:
    """Random pixels, so that a saved file is large enough to cut in half with its header intact."""
    values = numpy.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=numpy.uint8)
    return Image.fromarray(values)


def png_bytes(image: Image.Image | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    (image or Image.new("RGB", (4, 3), (10, 20, 30))).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR chunk is rewritten to claim `width` x `height` (its CRC fixed, so the header is valid)."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    # 8-byte signature, then the IHDR chunk: 4-byte length, b"IHDR", 13 bytes of data (width, height first), CRC.
    assert data[12:16] == b"IHDR"
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def truncated_jpeg() -> bytes:
    """A JPEG cut in half: its header reads fine, decoding its pixels fails."""
    buffer = io.BytesIO()
    noise_image().save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def truncated_png() -> bytes:
    data = png_bytes(noise_image())
    return data[: len(data) * 6 // 10]


# name -> (bytes, what the load-time reason says)
BAD_HEADERS = {
    "zero_bytes": (b"", "is empty (0 bytes)"),
    "text_named_png": (b"this is a text file, not a picture\n", "is not an image file that PIL can read"),
    "png_cut_in_its_header": (png_bytes()[:20], "cannot read the header of image"),
    "bomb_30000x30000": (png_claiming(30_000, 30_000), "30000x30000 (900,000,000 pixels), over max_image_pixels"),
    # Between PIL's limit and twice it, PIL only warns (`DecompressionBombWarning`): a bad row all the same.
    "over_the_limit_10000x10000": (png_claiming(10_000, 10_000), "10000x10000 (100,000,000 pixels)"),
}


def write_messages_split(directory, images: list[str], split="train"):
    lines = []
    for index, image in enumerate(images):
        user = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": "red"}]
        lines.append(json.dumps({"id": f"{split}-{index}", "images": [image], "messages": messages}))
    (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def script_args(directory, **overrides):
    values = {
        "task": "messages",
        "task_options": None,
        "dataset_path": str(directory),
        "image_base_dir": None,
        "on_bad_row": "error",
        "max_image_pixels": PIL_LIMIT,
        "max_train_samples": None,
        "max_eval_samples": None,
    }
    return SimpleNamespace(**{**values, **overrides})


class TestImageHeaderAtLoadTime:
    @pytest.mark.parametrize("name", sorted(BAD_HEADERS))
    def test_bad_image_is_a_bad_row_naming_file_row_and_reason(self, name, tmp_path):
        data, reason = BAD_HEADERS[name]
        (tmp_path / "good.png").write_bytes(png_bytes())
        (tmp_path / "bad.png").write_bytes(data)
        write_messages_split(tmp_path, ["good.png", "bad.png", "good.png"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning (nor any other) escapes the check
            with pytest.raises(BadRow) as raised:
                load_splits(script_args(tmp_path), ["train"])
            assert raised.value.file == str(tmp_path / "train.jsonl") and raised.value.row == 2
            assert str(tmp_path / "bad.png") in raised.value.reason and reason in raised.value.reason
            (train,), report = load_splits(script_args(tmp_path, on_bad_row="skip"), ["train"])
        assert train["id"] == ["train-0", "train-2"]
        assert [(error.row, reason in error.reason) for error in report.skipped] == [(2, True)]
        assert Image.MAX_IMAGE_PIXELS == PIL_LIMIT  # PIL's own setting is left as it was

    def test_the_pixel_limit_comes_from_the_recipe(self, tmp_path):
        (tmp_path / "big.png").write_bytes(png_bytes(Image.new("RGB", (40, 30))))
        write_messages_split(tmp_path, ["big.png"])
        (train,), _ = load_splits(script_args(tmp_path), ["train"])
        assert len(train) == 1
        with pytest.raises(BadRow, match=r"40x30 \(1,200 pixels\), over max_image_pixels=1,000"):
            load_splits(script_args(tmp_path, max_image_pixels=1_000), ["train"])

    def test_a_limit_above_pils_lets_a_large_header_through(self, tmp_path):
        path = tmp_path / "large.png"
        path.write_bytes(png_claiming(20_000, 10_000))  # 200M pixels: PIL alone raises DecompressionBombError
        assert read_image_header(path, max_pixels=300_000_000).size == (20_000, 10_000)
        assert image_size(str(path)) == (10_000, 20_000)  # the length pass reads it too

    def test_header_reports_size_and_mode(self, tmp_path):
        path = tmp_path / "a.png"
        path.write_bytes(png_bytes(Image.new("LA", (5, 7))))
        header = read_image_header(path)
        assert (header.width, header.height, header.mode) == (5, 7, "LA")

    def test_resolve_image_keeps_its_old_checks(self, tmp_path):
        with pytest.raises(BadRow, match=r"data.jsonl, row 3: image file .*missing.png not found"):
            resolve_image("missing.png", tmp_path, tmp_path / "data.jsonl", 3)
        with pytest.raises(BadRow, match="image path must be a non-empty string"):
            resolve_image("", tmp_path, tmp_path / "data.jsonl", 3)

    @pytest.mark.parametrize("task_name", ["messages", "shapes", "element", "chess", "ui_actions", "medical_steps"])
    def test_every_task_checks_headers(self, task_name, tmp_path):
        task = get_task(task_name)
        data = tmp_path / "data"
        if task_name == "messages":
            (tmp_path / "data").mkdir()
            (data / "a.png").write_bytes(png_bytes())
            (data / "b.png").write_bytes(png_bytes())
            write_messages_split(data, ["a.png", "b.png"])
        else:
            task.make_data(data, 30 if task_name != "medical_steps" else 6, seed=0)
        rows = task.load_rows(data, "train", data, BadRowReport("error"))
        bad_image = rows[0]["images"][0]
        with open(bad_image, "wb"):  # emptied
            pass
        report = BadRowReport("skip")
        kept = task.load_rows(data, "train", data, report)
        assert report.skipped and f"image file {bad_image} is empty (0 bytes)" in report.skipped[0].reason
        assert bad_image not in [image for row in kept for image in row["images"]]
        with pytest.raises(BadRow, match="is empty"):
            task.load_rows(data, "train", data, BadRowReport("error"))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding: failures recorded on the example, never raised by the dataset
# ---------------------------------------------------------------------------------------------------------------------
def image_row(row_id, image):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "x"},
    ]
    return {"id": row_id, "images": [str(image)], "messages": messages}


class TestDecodingFailures:
    @pytest.mark.parametrize("make", [truncated_jpeg, truncated_png], ids=["jpeg", "png"])
    def test_truncated_file_is_recorded_not_raised(self, make, tmp_path):
        good, bad = tmp_path / "good.png", tmp_path / "bad.img"
        good.write_bytes(png_bytes())
        bad.write_bytes(make())
        read_image_header(bad)  # the header reads fine: only decoding finds the damage
        dataset = build_dataset([image_row("a", good), image_row("b", bad)])
        first, second = dataset[0], dataset[1]
        assert first["image_error"] is None and first["images"][0].mode == "RGB"
        assert second["images"] == [None]
        assert second["image_error"]["image"] == str(bad)
        assert "truncated" in second["image_error"]["reason"]
        batch = dataset[0:2]  # how the DataLoader fetches (`__getitems__`): a batch through the transform
        assert [error is None for error in batch["image_error"]] == [True, False]

    def test_pixel_limit_applies_when_decoding(self, tmp_path):
        path = tmp_path / "a.png"
        path.write_bytes(png_bytes(Image.new("RGB", (40, 30))))
        dataset = build_dataset([image_row("a", path)], max_image_pixels=1_000)
        assert "over max_image_pixels=1,000" in dataset[0]["image_error"]["reason"]

    def test_bad_header_in_length_pass_is_a_data_error(self, tmp_path):
        path = tmp_path / "a.png"
        path.write_bytes(b"not an image")
        with pytest.raises(DataError, match=r"cannot read the header of image .*a.png"):
            image_size(str(path))
        with pytest.raises(DataError, match=r"cannot read the header of image .*a.png"):
            image_size({"path": str(path), "bytes": None})


# ---------------------------------------------------------------------------------------------------------------------
# Conversion to RGB, mode by mode, against hand-computed pixels
# ---------------------------------------------------------------------------------------------------------------------
def pixels(image) -> list:
    assert image.mode == "RGB"
    return [tuple(int(v) for v in pixel) for pixel in numpy.asarray(image).reshape(-1, 3)]


class TestToRgb:
    def test_16_bit_grayscale_is_scaled_not_clipped(self, tmp_path):
        values = numpy.array([[0, 300, 100 * 257, 65535]], dtype=numpy.uint16)
        image = Image.fromarray(values)
        assert image.mode == "I;16"
        expected = [(0, 0, 0), (1, 1, 1), (100, 100, 100), (255, 255, 255)]  # value >> 8
        assert pixels(to_rgb(image)) == expected
        assert pixels(image.convert("RGB"))[1] == (255, 255, 255)  # PIL alone: 300 clipped to white
        # From a 16-bit PNG file, through the dataset (what reached the model as almost white before)
        path = tmp_path / "sixteen.png"
        image.save(path)
        assert pixels(load_rgb_image(str(path))) == expected
        assert pixels(build_dataset([image_row("a", path)])[0]["images"][0]) == expected

    def test_32_bit_integer_mode_is_read_as_16_bit(self):
        image = Image.fromarray(numpy.array([[-5, 512, 70000]], dtype=numpy.int32))
        assert image.mode == "I"
        assert pixels(to_rgb(image)) == [(0, 0, 0), (2, 2, 2), (255, 255, 255)]

    def test_palette_without_transparency(self, tmp_path):
        image = Image.new("P", (2, 1))
        image.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
        image.putdata([0, 1])
        path = tmp_path / "p.png"
        image.save(path)
        assert pixels(load_rgb_image(str(path))) == [(255, 0, 0), (0, 128, 255)]

    def test_palette_with_transparency_is_composited_on_white(self, tmp_path):
        image = Image.new("P", (2, 1))
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        image.putdata([0, 1])
        path = tmp_path / "p.png"
        image.save(path, transparency=1)  # index 1 (blue) fully transparent
        assert Image.open(path).mode == "P"
        assert pixels(load_rgb_image(str(path))) == [(255, 0, 0), (255, 255, 255)]

    def test_cmyk(self):
        image = Image.new("CMYK", (4, 1))
        image.putdata([(0, 255, 255, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128)])
        # R = (255 - C) * (255 - K) / 255, and so on (PIL's conversion, no colour profile)
        assert pixels(to_rgb(image)) == [(255, 0, 0), (0, 255, 255), (0, 0, 0), (127, 127, 127)]

    def test_rgba_is_composited_on_white(self, tmp_path):
        image = Image.new("RGBA", (3, 1))
        image.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
        path = tmp_path / "rgba.png"
        image.save(path)
        # half-transparent blue on white: R = G = 255 * (1 - 128 / 255) = 127, B = 255
        assert pixels(load_rgb_image(str(path))) == [(255, 255, 255), (255, 0, 0), (127, 127, 255)]

    def test_la_is_composited_on_white(self):
        image = Image.new("LA", (2, 1))
        image.putdata([(100, 0), (100, 255)])
        assert pixels(to_rgb(image)) == [(255, 255, 255), (100, 100, 100)]

    def test_rgb_is_returned_as_it_is(self):
        image = Image.new("RGB", (1, 1), (1, 2, 3))
        assert to_rgb(image) is image

    # A 2x1 image, red then blue, stored with an EXIF orientation: what a viewer (and `datasets`) shows.
    @pytest.mark.parametrize(
        "orientation, size, expected",
        [
            (1, (2, 1), [(255, 0, 0), (0, 0, 255)]),
            (3, (2, 1), [(0, 0, 255), (255, 0, 0)]),  # turned 180 degrees
            (6, (1, 2), [(255, 0, 0), (0, 0, 255)]),  # turned 90 degrees clockwise: the left pixel goes on top
            (8, (1, 2), [(0, 0, 255), (255, 0, 0)]),  # turned 90 degrees anticlockwise: the left pixel goes below
        ],
    )
    def test_exif_rotation(self, orientation, size, expected, tmp_path):
        image = Image.new("RGB", (2, 1))
        image.putdata([(255, 0, 0), (0, 0, 255)])
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / "rotated.png"
        image.save(path, exif=exif)
        decoded = load_rgb_image(str(path))
        assert decoded.size == size and pixels(decoded) == expected
        assert image_size(str(path)) == (size[1], size[0])  # the length pass agrees on (height, width)


# ---------------------------------------------------------------------------------------------------------------------
# Data files: JSONL lines, encodings, empty files, no usable rows
# ---------------------------------------------------------------------------------------------------------------------
class TestReadJsonl:
    def test_truncated_last_line_is_reported_as_that_line(self, tmp_path):
        path = tmp_path / "train.jsonl"
        lines = [json.dumps({"id": index}) for index in range(5)]
        path.write_text("\n".join(lines) + '\n{"id": 5, "images": ["a.pn')
        with pytest.raises(BadRow, match=r"train.jsonl, row 6: invalid JSON \(Unterminated string .* column 22\)"):
            read_jsonl(path, BadRowReport("error"))
        report = BadRowReport("skip")
        assert [line for line, _ in read_jsonl(path, report)] == [1, 2, 3, 4, 5]
        assert [error.row for error in report.skipped] == [6]

    def test_bytes_that_are_not_utf8_name_file_line_and_byte(self, tmp_path):
        path = tmp_path / "train.jsonl"
        path.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": "caf\xe9"}\n{"id": 4}\n')
        with pytest.raises(BadRow) as raised:
            read_jsonl(path, BadRowReport("error"))
        assert str(raised.value) == f"{path}, line 3: not UTF-8 (byte 0xe9 at column 12)"
        report = BadRowReport("skip")
        assert [row["id"] for _, row in read_jsonl(path, report)] == [1, 2, 4]
        assert [str(error) for error in report.skipped] == [str(raised.value)]

    def test_empty_file_names_the_file(self, tmp_path):
        path = tmp_path / "train.jsonl"
        path.write_text("\n \n")
        with pytest.raises(DataError, match=f"{path}: the file is empty"):
            read_jsonl(path, BadRowReport("skip"))


class TestNoUsableRows:
    def test_every_reason_survives_when_no_row_does(self, tmp_path):
        write_messages_split(tmp_path, [f"missing-{index}.png" for index in range(25)])
        with pytest.raises(DataError) as raised:
            load_splits(script_args(tmp_path, on_bad_row="skip"), ["train"])
        message = str(raised.value)
        assert message.startswith(f"No usable rows in split 'train' of {tmp_path}: skipped 25 malformed row(s):")
        listed = [line for line in message.splitlines() if line.startswith("  - ")]
        assert (
            len(listed) == 20
            and "train.jsonl, row 1 (id train-0): image file" in listed[0]
            and "missing-0.png" in listed[0]
        )
        assert message.splitlines()[-1] == "  ... and 5 more"

    def test_build_dataset_of_nothing_is_a_data_error(self):
        with pytest.raises(DataError, match="No usable rows"):
            build_dataset([])


# ---------------------------------------------------------------------------------------------------------------------
# End to end: scripts/sft.py
# ---------------------------------------------------------------------------------------------------------------------
def element_data(directory, seed=0):
    get_task("element").make_data(directory, 30, seed=seed)
    rows = [json.loads(line) for line in (directory / "train.jsonl").read_text().splitlines()]
    return rows


@pytest.mark.slow  # a subprocess (about 20 s on 2 cores, most of it imports)
def test_bad_row_under_error_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    rows = element_data(data)
    (data / rows[3]["image_path"]).write_bytes(b"")
    (tmp_path / "model").mkdir()  # exists, so no tiny model is built: the data stops the run before any model loads
    result = run_script(
        [
            "scripts/sft.py",
            "recipes/demo/element.yaml",
            "--output_dir",
            str(tmp_path / "out"),
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--dataset_path",
            str(data),
        ],
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    image = data / rows[3]["image_path"]
    assert errors == [
        f"error: {data / 'train.jsonl'}, row 4 (id {rows[3]['id']}): image file {image} is empty (0 bytes)"
    ]
    assert result.stderr.rstrip().endswith(errors[0])


@pytest.mark.slow
def test_truncated_jpeg_is_skipped_during_training_and_listed(tmp_path):
    data = tmp_path / "data"
    rows = element_data(data)
    bad = rows[random.Random(0).randrange(len(rows))]
    (data / bad["image_path"]).write_bytes(truncated_jpeg())  # a JPEG under a .png name: PIL goes by the content
    output = tmp_path / "out"
    result = run_script(
        [
            "scripts/sft.py",
            "recipes/demo/element.yaml",
            "--output_dir",
            str(output),
            "--model_name_or_path",
            str(tmp_path / "tiny"),
            "--dataset_path",
            str(data),
            "--on_bad_row",
            "skip",
            "--max_steps",
            "2",  # 10 train samples, 8 a batch: every sample once
            "--eval_after_train",
            "false",
            "--logging_steps",
            "1",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    image = str(data / bad["image_path"])
    assert "samples skipped for an image that cannot be decoded: 1" in result.stdout, result.stdout[-3000:]
    assert f"  - id {bad['id']!r}: image {image}: cannot decode: image file is truncated" in result.stdout
    report = json.loads((output / "compute_report.json").read_text())
    assert report["skipped_samples"]["count"] == 1 and report["skipped_samples"]["substituted_batches"] == 0
    [sample] = report["skipped_samples"]["samples"]
    assert (sample["id"], sample["image"]) == (bad["id"], image)
    assert report["samples_seen"] == 9  # the skipped sample never reached the model
    assert (REPO_ROOT / "recipes" / "demo" / "element.yaml").is_file()
