"""Sample lengths without running the model or decoding pixels, and what uses them.

The length of a sample is what the model sees: the tokens of the chat-template-rendered conversation plus the image
tokens each image expands into. We compute it from the rendered text (tokenizer only) and each image's SIZE (read
from the file header, never its pixels), with the processor's own arithmetic for the number of image tokens
(`vlm_recipes._compat.image_token_count`), the method vLLM uses to size its placeholders. It follows the
processor's pixel budget (`min_pixels`/`max_pixels`), its resize target and image splitting. A processor without it
(legacy Idefics2) has each sample's text processed with blank images of its images' sizes instead: exact, no pixels
decoded, slower.

What the lengths are for:
- grouping samples of similar length into batches (`train_sampling_strategy: group_by_length`), so that batches carry
  little padding: the lengths go into the dataset's `length_column_name` column, which the length-grouped sampler
  of `vlm_recipes.trainer` reads;
- the `too_long` policy, checked before training: `error` stops the run naming the sample and its length, `drop`
  leaves such samples out and counts them. (The collator still checks every batch, as a safety net.)

The tests check that these lengths equal the collator's encoded lengths exactly, for every tiny family and the real
processors.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._compat import dataset_fingerprint, has_image_token_count, image_token_count
from .data.rows import row_name

logger = logging.getLogger(__name__)

__all__ = [
    "ImageTokenCounter",
    "apply_too_long_policy",
    "image_size",
    "padding_fraction",
    "prepare_lengths",
    "sample_lengths",
    "sampling_strategy",
]

# EXIF orientations that turn the image by 90 degrees: `datasets` (and `ImageOps.exif_transpose`) swap its sides.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


# --------------------------------------------------------------------------------------------------------------------
# Image sizes, without decoding pixels
# --------------------------------------------------------------------------------------------------------------------
def opened_size(opened) -> tuple[int, int]:
    """`(height, width)` of an opened PIL image as it will be decoded: an EXIF rotation by 90 degrees swaps them."""
    width, height = opened.size
    # Why the PNG case: Pillow's `PngImageFile.getexif` decodes the whole image whenever no eXIf chunk came before
    # the pixels (it looks for one after them), which made this size read cost a full decode for most PNGs.
    if opened.format == "PNG" and "exif" not in opened.info and not _png_exif_after_pixels(opened):
        return height, width
    if opened.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:  # 0x0112: the EXIF Orientation tag
        width, height = height, width
    return height, width


def _png_exif_after_pixels(opened) -> bool:
    """Whether a PNG holds an eXIf chunk (after its pixel data), found by reading chunk headers only."""
    handle, position = opened.fp, opened.fp.tell()
    try:
        handle.seek(8)  # past the signature
        while len(header := handle.read(8)) == 8:
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind in (b"eXIf", b"IEND"):
                return kind == b"eXIf"
            handle.seek(length + 4, 1)  # the chunk's data and CRC
        return False
    finally:
        handle.seek(position)


def _file_size(source: Any, name: Any = None) -> tuple[int, int]:
    from PIL import Image

    from .data.errors import DataError
    from .data.images import without_pil_pixel_limit

    # The recipe's `max_image_pixels` was checked at load time and may be above PIL's own limit, hence its check off.
    try:
        with without_pil_pixel_limit(), Image.open(source) as opened:
            return opened_size(opened)
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # what PIL raises for a header it cannot read
        raise DataError(f"cannot read the header of image {name or source}: {error}") from None


def image_size(image: Any) -> tuple[int, int]:
    """`(height, width)` of an image as the collator will see it, without decoding its pixels.

    Accepts a PIL image, a file path, a `datasets.Image` storage dict (`{"path", "bytes"}`), or an array/tensor
    (`HWC` or `CHW`). Files are opened lazily (PIL reads the header only); an EXIF rotation by 90 degrees swaps the
    sides, as `datasets` applies it when it decodes the image. A header that cannot be read is a `DataError` naming the
    image (load time has already left such images out: `vlm_recipes.data.images.resolve_image`).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        width, height = image.size
        return height, width
    if isinstance(image, (str, Path)):
        return _file_size(image)
    if isinstance(image, (bytes, bytearray)):
        return _file_size(io.BytesIO(image), name="(image bytes)")
    if isinstance(image, dict) and ("path" in image or "bytes" in image):
        if image.get("bytes"):
            return _file_size(io.BytesIO(image["bytes"]), name=image.get("path") or "(image bytes)")
        if image.get("path"):
            return _file_size(image["path"])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) == 3:
        channels_first = shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
        return (int(shape[1]), int(shape[2])) if channels_first else (int(shape[0]), int(shape[1]))
    raise TypeError(
        f"Cannot read the size of an image given as {type(image).__name__}; give a PIL image, a file path, a "
        "`datasets.Image` dict with `path` or `bytes`, or an HWC/CHW array."
    )


class ImageTokenCounter:
    """How many tokens the processor turns one image placeholder into, for an image of a given size.

    Uses the processor's `_get_num_multimodal_tokens` (transformers' own arithmetic, which follows the pixel budget,
    resize target and image splitting of the processor's current settings; `_compat.image_token_count`), once per
    distinct size. `available` is False
    for processors without it (legacy Idefics2), or where it fails: `sample_lengths` then processes each sample's
    text with blank images of its images' sizes, which is exact and still decodes no pixels.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", None)
        self.available = bool(self.image_token) and has_image_token_count(processor)
        # The rendered text holds this many tokens per image before the processor expands it.
        self.placeholder_length = (
            len(self.tokenizer(self.image_token, add_special_tokens=False)["input_ids"]) if self.image_token else 0
        )
        self._cache: dict[tuple[int, int], int] = {}

    def __call__(self, height: int, width: int) -> int | None:
        """Tokens that one image of `height` x `width` pixels takes in the processed text (None: not available)."""
        key = (int(height), int(width))
        if key not in self._cache and self.available:
            # transformers documents `MultiModalData` as meant for vLLM, its API open to change: if it changes,
            # lengths come from processing with blank images instead (same result, slower), said once.
            try:
                self._cache[key] = image_token_count(self.processor, *key)
            except (AttributeError, KeyError, TypeError, IndexError) as error:
                logger.warning(
                    "%s._get_num_multimodal_tokens failed (%r); measuring lengths by processing blank images.",
                    type(self.processor).__name__,
                    error,
                )
                self.available = False
        return self._cache.get(key) if self.available else None


def _length_with_blank_images(collator, text: str, sizes: list[tuple[int, int]]) -> int:
    """Token count of `text` processed with blank images of `sizes`: what the collator gets, pixels aside."""
    from PIL import Image

    from .collator import special_tokens_kwargs

    blanks = [Image.new("RGB", (width, height)) for height, width in sizes]
    encoded = collator.processor(
        text=[text],
        images=[blanks] if blanks else None,
        return_tensors=None,
        **special_tokens_kwargs(collator.tokenizer, [text]),
    )
    return len(encoded["input_ids"][0])


# --------------------------------------------------------------------------------------------------------------------
# Sample lengths
# --------------------------------------------------------------------------------------------------------------------
def sample_lengths(
    dataset,
    collator,
    description: str = "Measuring sample lengths",
    progress: bool = True,
    num_proc: int | None = None,
) -> tuple[list[int], list[str]]:
    """Return `(lengths, names)`: each sample's token count as the collator will encode it, and its name.

    The conversation is rendered with the collator's own rendering (the same text it processes, end-of-turn tokens
    it appends included) and tokenized; each image placeholder counts as the image tokens the processor expands it
    into for that image's size. Pixels are never decoded; the model never runs. A malformed row raises the collator's
    own error, naming the row.

    A `datasets.Dataset` is measured by `datasets.map` (over `num_proc` processes), its result cached with the dataset
    (an in-memory one's in the `datasets` cache folder) under a fingerprint of the dataset and the processor
    (`processor_fingerprint`): a second run on the same data and processor reads the lengths back at once. Anything
    else (a list of examples) is measured in this process.
    """
    import datasets

    if getattr(collator, "layout", "causal") != "causal":
        return _processed_lengths(dataset, collator, description, progress)
    if not isinstance(dataset, datasets.Dataset):
        examples = list(dataset)
        return _lengths_of_examples(examples, collator), [row_name(example, i) for i, example in enumerate(examples)]
    transform = dataset.format["format_kwargs"].get("transform") if dataset.format["type"] == "custom" else None
    plain = dataset.with_format(None)
    fingerprint = datasets.fingerprint.Hasher.hash(
        [
            dataset_fingerprint(dataset),  # for an in-memory dataset (a native task's rows), of the table's content
            image_files_digest(plain),  # image files change without the rows that name them changing
            processor_fingerprint(collator),
            lengths_code_version(),
        ]
    )
    if "image_sizes" in plain.column_names and "images" in plain.column_names:
        # The sizes were read with the headers when the rows were converted (`vlm_recipes.data.hub`): the images
        # themselves (their bytes, for embedded ones) are not read again.
        plain = plain.remove_columns("images")
    # In our folder of the `datasets` cache, not beside the dataset (the user's folder may be read-only or shared).
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "vlm_recipes" / "sample_lengths"
    cache_dir.mkdir(parents=True, exist_ok=True)
    measured = plain.map(
        _length_batch,
        batched=True,
        batch_size=LENGTH_BATCH_SIZE,
        with_indices=True,
        remove_columns=plain.column_names,
        features=datasets.Features({"length": datasets.Value("int64")}),
        fn_kwargs={"collator": collator, "transform": transform},
        new_fingerprint=fingerprint,
        cache_file_name=str(cache_dir / f"{fingerprint}.arrow"),
        num_proc=num_proc if num_proc and num_proc > 1 and len(plain) > LENGTH_BATCH_SIZE else None,
        desc=description,
    )
    lengths = measured.with_format("arrow")["length"].to_pylist()
    ids = plain.with_format("arrow").select_columns(["id"])["id"].to_pylist() if "id" in plain.column_names else None
    names = [row_name({"id": ids[i] if ids else None}, i) for i in range(len(lengths))]
    return lengths, names


# Rows per `datasets.map` batch of the length pass, and per tokenizer call.
LENGTH_BATCH_SIZE = 256
# Image-token counters by collator, one per process (a `datasets.map` worker builds its own).
_COUNTERS: dict[int, ImageTokenCounter] = {}


@functools.cache
def lengths_code_version() -> str:
    """A hash of the code that counts lengths (this module and the collator's rendering), part of the cached lengths'
    fingerprint, so that no run reads lengths counted by older code."""
    import datasets

    from . import collator

    return datasets.fingerprint.Hasher.hash([Path(__file__).read_bytes(), Path(collator.__file__).read_bytes()])


def image_files_digest(dataset) -> str:
    """A hash of the files behind a dataset's `images` column (path, size, modification time), "" where it has none:
    images stored as bytes are part of the data itself. One `stat` per distinct file, no file read."""
    import os

    import pyarrow
    import pyarrow.compute as pc

    if "images" not in dataset.column_names:
        return ""
    column = dataset.with_format("arrow").select_columns(["images"])["images"]
    flat = pc.list_flatten(column) if pyarrow.types.is_list(column.type) else column
    if pyarrow.types.is_struct(flat.type):
        flat = pc.filter(pc.struct_field(flat, "path"), pc.is_null(pc.struct_field(flat, "bytes")))
    if not pyarrow.types.is_string(flat.type) and not pyarrow.types.is_large_string(flat.type):
        return ""
    stats = []
    for path in sorted(pc.unique(pc.drop_null(flat)).to_pylist()):
        try:
            status = os.stat(path)
            stats.append((path, status.st_size, status.st_mtime_ns))
        except OSError:
            stats.append((path, None, None))
    import datasets

    return datasets.fingerprint.Hasher.hash(stats)


def processor_fingerprint(collator) -> str:
    """A hash of what sample lengths depend on: the processor's settings, its tokenizer and chat template, and how
    the collator renders (end-of-turn tokens it appends)."""
    import datasets

    processor = collator.processor
    settings = processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)
    tokenizer = collator.tokenizer
    return datasets.fingerprint.Hasher.hash(
        [
            type(processor).__name__,
            settings,
            tokenizer.name_or_path,
            len(tokenizer),
            getattr(tokenizer, "chat_template", None),
            getattr(processor, "chat_template", None),
            getattr(collator, "add_eos_if_missing", None),
        ]
    )


def _length_batch(batch: dict[str, list], indices: list[int], collator, transform) -> dict[str, list]:
    batch = dict(batch)  # `datasets.map` merges its input batch into the output: it must stay as it came
    images = batch.pop("images", None)
    if transform is not None:
        batch = transform(batch)
    if images is not None:
        batch["images"] = images
    elif "image_sizes" in batch:  # the images themselves were left unread: stand-ins, one per image, for the checks
        batch["images"] = [[None] * len(sizes) for sizes in batch["image_sizes"]]
    size = len(indices)
    examples = [{key: values[i] for key, values in batch.items()} for i in range(size)]
    return {"length": _lengths_of_examples(examples, collator, indices)}


def _lengths_of_examples(examples: list[dict[str, Any]], collator, indices: list[int] | None = None) -> list[int]:
    """Token counts of examples whose images are undecoded (paths, bytes or storage dicts); `indices` name them."""
    from .collator import special_tokens_kwargs

    counter = _COUNTERS.get(id(collator))
    if counter is None or counter.processor is not collator.processor:
        counter = _COUNTERS[id(collator)] = ImageTokenCounter(collator.processor)
    tokenizer = collator.tokenizer
    lengths: list[int] = []
    texts: list[str] = []
    image_tokens: list[int] = []

    def flush() -> None:
        # Texts that already start with BOS are tokenized without a second one, as the collator does.
        by_kwargs: dict[bool, list[int]] = {}
        for position, text in enumerate(texts):
            by_kwargs.setdefault(bool(special_tokens_kwargs(tokenizer, [text])), []).append(position)
        counts = [0] * len(texts)
        for without_special, positions in by_kwargs.items():
            kwargs = {"add_special_tokens": False} if without_special else {}
            encoded = tokenizer([texts[p] for p in positions], **kwargs)["input_ids"]
            for position, ids in zip(positions, encoded):
                counts[position] = len(ids)
        lengths.extend(count + extra for count, extra in zip(counts, image_tokens))
        texts.clear()
        image_tokens.clear()

    for position, example in enumerate(examples):
        index = indices[position] if indices is not None else position
        text = collator.rendered_text(example, index)
        if example.get("image_sizes") is not None:
            sizes = [tuple(size) for size in example["image_sizes"]]
        else:
            images = example.get("images") or []
            sizes = [image_size(image) for image in (images if isinstance(images, (list, tuple)) else [images])]
        counts = [counter(*size) for size in sizes]
        if None in counts:  # no token arithmetic for this processor: process the text with blank images
            flush()
            lengths.append(_length_with_blank_images(collator, text, sizes))
            continue
        texts.append(text)
        image_tokens.append(sum(count - counter.placeholder_length for count in counts))
        if len(texts) >= LENGTH_BATCH_SIZE:
            flush()
    flush()
    return lengths


def _processed_lengths(dataset, collator, description: str, progress: bool) -> tuple[list[int], list[str]]:
    """Lengths by processing each sample (images decoded): for prompt/answer families (PaliGemma, Florence-2), which
    take the prompt and the answer as two inputs and have no one rendered text to count tokens on."""
    from tqdm.auto import tqdm

    logger.info("%s: lengths measured by processing each sample (prompt/answer layout).", collator.layout)
    lengths, names = [], []
    for index in tqdm(range(len(dataset)), desc=description, leave=False, disable=not progress):
        example = dataset[index]
        lengths.append(collator.sample_length(example, index))
        names.append(row_name(example, index))
    return lengths, names


def apply_too_long_policy(
    dataset, lengths: list[int], names: list[str], max_length: int | None, policy: str, split: str = "train"
) -> tuple[Any, list[int], list[str]]:
    """Apply `too_long` before training: return `(dataset, lengths, dropped names)`.

    `error` raises on the first sample over `max_length`, naming it, its length and how many others are over;
    `drop` leaves such samples out (`dataset.select`) and returns their names, so that they are counted.
    """
    if max_length is None:
        return dataset, lengths, []
    over = [i for i, length in enumerate(lengths) if length > max_length]
    if not over:
        return dataset, lengths, []
    if policy == "error":
        first = over[0]
        others = f" ({len(over) - 1} other {split} sample(s) too)" if len(over) > 1 else ""
        raise ValueError(
            f"{split} {names[first]} is {lengths[first]} tokens long (image tokens included), over max_length="
            f"{max_length}{others}. Samples are never truncated, since a cut inside or before the image tokens "
            "breaks the image/text alignment: raise `max_length`, lower the image pixel budget (`max_pixels`), or set "
            "`too_long: drop` to leave such samples out (they are counted and reported)."
        )
    over_set = set(over)
    kept = [i for i in range(len(lengths)) if i not in over_set]
    if not kept:
        raise ValueError(
            f"Every {split} sample is over max_length={max_length} (shortest: {min(lengths)} tokens); raise "
            "`max_length` or lower the image pixel budget."
        )
    return dataset.select(kept), [lengths[i] for i in kept], [names[i] for i in over]


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> float:
    """Share of padding tokens when each batch (a list of indices into `lengths`) is padded to its longest sample."""
    padded = real = 0
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        if not batch_lengths:
            continue
        padded += max(batch_lengths) * len(batch_lengths)
        real += sum(batch_lengths)
    return (padded - real) / padded if padded else 0.0


# --------------------------------------------------------------------------------------------------------------------
# What `scripts/sft.py` calls
# --------------------------------------------------------------------------------------------------------------------
def prepare_lengths(script_args, training_args, collator, train_dataset, eval_dataset):
    """Measure sample lengths, apply `too_long` up front and add the length column that length grouping reads.

    Returns `(train_dataset, eval_dataset, dropped)`, `dropped` mapping a split to the names of samples left out.
    Nothing is measured when neither `max_length` nor length grouping needs it.
    """
    grouping = sampling_strategy(training_args) in ("group_by_length", "batch_rebalance")
    column = training_args.length_column_name
    dropped: dict[str, list[str]] = {}
    prepared = []
    for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is None or (collator.max_length is None and not grouping) or not hasattr(dataset, "__len__"):
            # A stream has no length pass: the collator applies `too_long` to each batch (same policy, counted).
            prepared.append(dataset)
            continue
        lengths, names = sample_lengths(
            dataset,
            collator,
            description=f"Measuring {split} sample lengths",
            num_proc=getattr(training_args, "dataset_num_proc", None),
        )
        dataset, lengths, dropped[split] = apply_too_long_policy(
            dataset, lengths, names, collator.max_length, script_args.too_long, split
        )
        if grouping:
            dataset = _with_column(dataset, column, lengths)
        prepared.append(dataset)
        if lengths:
            logger.info(
                "%s: %d samples, %d-%d tokens (mean %.0f)",
                split,
                len(lengths),
                min(lengths),
                max(lengths),
                sum(lengths) / len(lengths),
            )
    return prepared[0], prepared[1], dropped


def _with_column(dataset, column: str, values: list[int]):
    """`dataset` plus a column, its format (our `with_transform`) kept.

    The column is added to the unformatted dataset: on a `select`ed one (after `too_long: drop`), `add_column` first
    rewrites the rows through the format's transform, which decodes every image and cannot store what it returns.
    """
    form = dataset.format
    plain = dataset.with_format(None)
    if column in plain.column_names:
        plain = plain.remove_columns(column)
    plain = plain.add_column(column, values)
    columns = form["columns"]
    if columns is not None and column not in columns:
        columns = [*columns, column]
    return plain.with_format(
        form["type"], columns=columns, output_all_columns=form["output_all_columns"], **form["format_kwargs"]
    )


def sampling_strategy(training_args) -> str:
    """The run's `train_sampling_strategy` as text (`random`, `group_by_length`, `batch_rebalance`)."""
    strategy = getattr(training_args, "train_sampling_strategy", "random")
    return getattr(strategy, "value", strategy)
