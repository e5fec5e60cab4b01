"""Datasets named by `dataset_name`, TRL's key: a hub id, a local folder in hub layout, a `save_to_disk` folder or one
data file, loaded through `datasets` and turned into our rows without leaving Arrow.

- Loading: `load_from_disk` for a `save_to_disk` folder (a `Dataset` is split `train`), `load_dataset(<builder>,
  data_files=...)` for one parquet/json/jsonl/csv/arrow file (split `train`), and `load_dataset(dataset_name,
  name=dataset_config, streaming=dataset_streaming)` otherwise, as TRL's `sft.py` does, for hub ids and local folders
  alike.
- Rows: the format is detected from the columns (`vlm_recipes.data.formats`) and each row converted by `datasets.map`
  (over `dataset_num_proc` processes) into `id`, `messages` (JSON text) and, where images are paths, their resolved
  paths; an `Image` or bytes column is kept as it is, beside them (not copied). Image headers are read (size and mode,
  no pixels), so that an unreadable image is a bad row before training.
- Caching: the conversion of a dataset whose images are in its data (`Image` feature, bytes) is cached in the
  `datasets` cache folder (never in the user's dataset folder), under a fingerprint of the data, the settings and the
  conversion code; one whose images are files is converted again each run, since the files may have changed.
- Bad rows follow `on_bad_row`, named by dataset, split, index and id.
- Streaming (`dataset_streaming: true`): the same conversion, lazily per example; a bad row reaches the collator marked,
  which stops or skips it under `on_bad_row` (counted with the other skips).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from .._compat import dataset_fingerprint
from .errors import BadRow, DataError
from .formats import RowProblem, detect_format, image_column, to_messages
from .images import read_image_header

logger = logging.getLogger(__name__)

__all__ = ["DATA_FILE_BUILDERS", "HubSource", "open_source"]

# Data-file suffixes -> the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}
# Compression suffixes that `datasets` reads through (`data.jsonl.gz` is a JSONL file).
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# Rows per `datasets.map` batch of the conversion: rows with embedded images bring their bytes into Python.
CONVERT_BATCH_SIZE = 64
# Split names that data-file names stand for, as `datasets` reads them (`datasets.data_files`, 5.2).
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def data_file_builder(path: str | Path) -> str | None:
    """The `datasets` builder that reads a data file, by its suffix (a compression suffix looked through), or None."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return DATA_FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _split_of(path: Path, root: Path) -> str | None:
    """The split a data file's name (or a folder on its way from `root`) stands for, as `datasets` names them."""
    parts = [*path.relative_to(root).parent.parts, path.name.split(".")[0]]
    for split, keywords in SPLIT_KEYWORDS.items():
        pattern = re.compile(r"(^|[-._ 0-9])(" + "|".join(keywords) + r")([-._ 0-9]|$)")
        if any(pattern.search(part.lower()) for part in parts):
            return split
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _local_data_files(path: Path) -> tuple[str | None, dict[str, list[str]]]:
    """The builder and the data files by split of a local folder in hub layout, images and other files left out.

    Why not `load_dataset(folder)` alone: it picks the builder of the most common file type, so a folder of JSONL
    files and the images they name is read as an image folder, and it matches split names against every file, so
    LLaVA's `llava.json` beside `coco/train2017/*.jpg` has no data file of split `train`. Here the data files are
    found first, then their splits: a file named for none of them is `train` when no file is named for a split. A folder
    whose README.md declares its `configs` (a dataset card) is left to `load_dataset` (builder None).
    """
    readme = path / "README.md"
    if readme.is_file() and "\nconfigs:" in readme.read_text(encoding="utf-8", errors="replace"):
        return None, {}
    data_files = sorted(
        f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".") and data_file_builder(f) is not None
    )
    if not data_files:
        raise DataError(f"dataset_name {path}: no data files ({', '.join(sorted(DATA_FILE_BUILDERS))}) in the folder.")
    builders = {data_file_builder(f) for f in data_files}
    if len(builders) > 1:
        raise DataError(
            f"dataset_name {path}: data files of several kinds ({', '.join(sorted(builders))}); keep one kind per "
            "dataset folder, or name one file as `dataset_name`."
        )
    by_split: dict[str, list[str]] = {}
    unnamed = []
    for file in data_files:
        split = _split_of(file, path)
        if split is None:
            unnamed.append(file)
        else:
            by_split.setdefault(split, []).append(str(file))
    if not by_split:
        by_split = {"train": [str(f) for f in unnamed]}
    elif unnamed:
        logger.warning(
            "dataset_name %s: %d data file(s) named for no split are left out: %s",
            path,
            len(unnamed),
            ", ".join(str(f.relative_to(path)) for f in unnamed[:10]),
        )
    return builders.pop(), by_split


class HubSource:
    """One `dataset_name`, opened: its splits, and where relative image paths of a split are looked for."""

    def __init__(self, script_args, streaming: bool | None = None):
        self.name = script_args.dataset_name
        self.config = script_args.dataset_config
        self.streaming = script_args.dataset_streaming if streaming is None else streaming
        self.forced_format = script_args.dataset_format
        self.max_image_pixels = script_args.max_image_pixels
        self.image_base_dir = script_args.image_base_dir
        self._splits = None
        self._data_file_dirs: dict[str, list[str]] = {}
        self._root_dirs: list[str] = []

    # Opening ------------------------------------------------------------------------------------------------------
    @property
    def splits(self):
        if self._splits is None:
            self._splits = self._open()
        return self._splits

    def _open(self):
        import datasets

        path = Path(self.name)
        try:
            if _is_saved_dataset(path):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.Dataset):
                    loaded = datasets.DatasetDict({"train": loaded})
                self._root_dirs = [str(path.resolve())]
                if self.streaming:
                    # Shards, so that several processes (and data-loading workers) each read their own rows.
                    loaded = datasets.IterableDatasetDict(
                        {k: v.to_iterable_dataset(num_shards=min(len(v), 64) or 1) for k, v in loaded.items()}
                    )
                return loaded
            if path.is_file():
                builder = data_file_builder(path)
                if builder is None:
                    raise DataError(
                        f"dataset_name {self.name}: a data file must end in one of {sorted(DATA_FILE_BUILDERS)}."
                    )
                self._root_dirs = [str(path.resolve().parent)]
                return datasets.load_dataset(builder, data_files={"train": str(path)}, streaming=self.streaming)
            if path.is_dir():
                self._root_dirs = [str(path.resolve())]
                builder, files = _local_data_files(path)
                if builder is not None:
                    self._data_file_dirs = {
                        str(split): sorted({str(Path(f).parent) for f in paths}) for split, paths in files.items()
                    }
                    return datasets.load_dataset(builder, data_files=files, streaming=self.streaming)
            return datasets.load_dataset(self.name, name=self.config, streaming=self.streaming)
        except DataError:
            raise
        except datasets.exceptions.DatasetGenerationError as error:  # a data file `datasets` cannot parse
            cause = error.__cause__ or error
            raise DataError(
                f"Cannot read dataset_name {self.name!r}: `datasets` failed on its data files ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else cause!r}). Check that every file is valid "
                "parquet/JSON/JSONL/CSV/arrow (a JSONL file: one JSON object per line)."
            ) from None
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
            hint = "a local folder, data file or save_to_disk folder that exists, or a hub dataset id (with network access)"
            raise DataError(f"Cannot load dataset_name {self.name!r}: {error}. Give {hint}.") from None

    def split_names(self) -> list[str]:
        return list(self.splits.keys())

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def image_dirs(self, split: str) -> list[str]:
        """Where a relative image path of `split` is looked for: `image_base_dir`, else the split's data-file folder
        and the dataset's folder."""
        if self.image_base_dir:
            return [str(Path(self.image_base_dir).resolve())]
        return list(dict.fromkeys([*self._data_file_dirs.get(split, []), *self._root_dirs]))

    def where(self, split: str) -> str:
        return f"{self.name} [{split}]"

    # Splits -> our rows -------------------------------------------------------------------------------------------
    def load_split(self, split: str, report, limit: int | None = None, num_proc: int | None = None):
        """Split `split` as our rows: a `datasets.Dataset` (bad rows handled by `report`) or, when streaming, an
        `IterableDataset` whose bad rows carry an `image_error` for the collator."""
        if not self.has_split(split):
            raise DataError(
                f"dataset_name {self.name!r} has no split {split!r}; its splits are {self.split_names()}. Set "
                "`dataset_train_split` / `dataset_test_split` (or `eval_split`, `generation_split`) to one of them."
            )
        dataset = self.splits[split]
        if self.streaming:
            return self._stream_split(dataset, split, limit)
        return self._map_split(dataset, split, report, limit, num_proc)

    def _columns(self, dataset) -> list[str]:
        columns = dataset.column_names
        if columns is None:  # a stream whose features are not known before its first row
            columns = list(next(iter(dataset.take(1)), {}).keys())
        return list(columns)

    @staticmethod
    def _image_kind(dataset, column: str | None) -> str | None:
        """How `column` holds images: `image` (the `Image` feature, one or a list), `struct` (`{bytes, path}` structs
        without the `Image` type, as pandas or pyarrow write them), `bytes`, `path`, or None."""
        import datasets

        if column is None:
            return None
        feature = (dataset.features or {}).get(column)
        inner = getattr(feature, "feature", feature)  # List(Image()) -> Image()
        if isinstance(inner, datasets.Image):
            return "image"
        if isinstance(inner, dict) and "bytes" in inner:
            return "struct"
        if isinstance(inner, datasets.Value) and inner.dtype in ("binary", "large_binary"):
            return "bytes"
        return "path"

    def _map_split(self, dataset, split: str, report, limit: int | None, num_proc: int | None):
        import datasets
        import pyarrow.compute

        from .rows import decode_json_columns

        where = self.where(split)
        columns = self._columns(dataset)
        fmt = detect_format(columns, self.forced_format, where)
        logger.info("%s: %d rows in the %s format", where, len(dataset), fmt)
        column = image_column(columns)
        kind = self._image_kind(dataset, column)
        source = dataset
        if limit is not None and limit < len(dataset):
            dataset = dataset.select(range(limit))
        features = {"id": datasets.Value("string"), "messages": datasets.Value("string")}
        features["bad_row"] = datasets.Value("string")
        # Each image's (height, width), read with its header here: the length pass counts image tokens from these.
        features["image_sizes"] = datasets.List(datasets.List(datasets.Value("int32")))
        if kind == "path":
            features["images"] = datasets.List(datasets.Value("string"))
        elif kind == "struct":  # rewritten as the `Image` feature (undecoded): a copy of the images, unlike `image`
            features["images"] = datasets.List(datasets.Image(decode=False))
        fn_kwargs = {
            "fmt": fmt,
            "kind": kind,
            "split": split,
            "features": _without_image_decoding(dataset.features, column),
            "image_dirs": self.image_dirs(split),
            "max_image_pixels": self.max_image_pixels,
        }
        fingerprint = datasets.fingerprint.Hasher.hash(
            [dataset_fingerprint(dataset), conversion_code_version(), {k: str(v) for k, v in fn_kwargs.items()}]
        )
        # Read as Arrow batches: an `Image` column comes as its stored `{"bytes", "path"}`, never decoded here.
        converted = (
            dataset.with_format("arrow")
            .map(
                _convert_batch,
                batched=True,
                batch_size=CONVERT_BATCH_SIZE,
                with_indices=True,
                remove_columns=dataset.column_names,
                features=datasets.Features(features),
                fn_kwargs=fn_kwargs,
                new_fingerprint=fingerprint,
                cache_file_name=str(cache_folder("conversions") / f"{fingerprint}.arrow"),
                # Image files may have changed since the last run (a broken one fixed, one replaced): read them again.
                load_from_cache_file=kind != "path",
                num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > CONVERT_BATCH_SIZE else None,
                desc=f"Reading {where} ({fmt})",
            )
            .with_format(None)
        )
        if kind in ("image", "bytes"):
            converted = datasets.concatenate_datasets(
                [converted, _undecoded_images(source, column, len(dataset))], axis=1
            )
        reasons = converted.with_format("arrow").select_columns(["bad_row"])["bad_row"]
        bad = pyarrow.compute.indices_nonzero(pyarrow.compute.is_valid(reasons)).to_pylist()
        if bad:
            ids = converted.with_format("arrow").select_columns(["id"])["id"]
            for index in bad:
                row_id = ids[index].as_py()
                row_id = None if row_id == f"{split}-{index}" else row_id
                report.handle(BadRow(where, index, reasons[index].as_py(), row_id=row_id))
            bad_set = set(bad)
            kept = [index for index in range(len(converted)) if index not in bad_set]
            if not kept:
                raise DataError(f"No usable rows in {where}: {report.summary()}")
            converted = converted.select(kept)
        converted = converted.remove_columns("bad_row")
        return converted.with_transform(functools.partial(decode_json_columns, max_image_pixels=self.max_image_pixels))

    def _stream_split(self, dataset, split: str, limit: int | None):
        where = self.where(split)
        columns = self._columns(dataset)
        fmt = detect_format(columns, self.forced_format, where)
        logger.info("%s: streamed, in the %s format", where, fmt)
        column = image_column(columns)
        kind = self._image_kind(dataset, column) if dataset.features else None
        if kind == "image":  # images reach the conversion as stored; it decodes them itself
            dataset = dataset.cast_column(column, _undecoded_image_feature(dataset.features[column]))
        if limit is not None:
            dataset = dataset.take(limit)
        return dataset.map(
            _stream_example,
            with_indices=True,
            remove_columns=columns,
            fn_kwargs={
                "fmt": fmt,
                "kind": kind,
                "where": where,
                # Several shards: a process (or data-loading worker) reads some of them, counting its rows from 0.
                "single_shard": dataset.num_shards == 1,
                "image_dirs": self.image_dirs(split),
                "max_image_pixels": self.max_image_pixels,
            },
        )


def open_source(script_args, streaming: bool | None = None) -> HubSource:
    return HubSource(script_args, streaming=streaming)


def cache_folder(kind: str) -> Path:
    """Our folder for `kind` in the `datasets` cache (`HF_DATASETS_CACHE`): never the user's dataset folder, which may
    be read-only or shared."""
    import datasets

    folder = Path(datasets.config.HF_DATASETS_CACHE) / "vlm_recipes" / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def conversion_code_version() -> str:
    """A hash of the code that converts rows (this module, the formats, the image checks), part of the conversion's
    fingerprint: `datasets` hashes a function by its own code only, so a fix in a helper it calls would otherwise keep
    serving conversions cached before it."""
    import datasets

    from . import formats, images

    return datasets.fingerprint.Hasher.hash(
        [Path(m.__file__).read_bytes() for m in (formats, images)] + [Path(__file__).read_bytes()]
    )


# --------------------------------------------------------------------------------------------------------------------
# Row conversion (module-level functions: `datasets` hashes them for its cache and pickles them for `num_proc`)
# --------------------------------------------------------------------------------------------------------------------
def _resolve_path(value: str, image_dirs: list[str]) -> str:
    path = Path(value)
    if path.is_absolute():
        return str(path)
    for directory in image_dirs:
        candidate = Path(directory) / path
        if candidate.is_file():
            return str(candidate)
    if not image_dirs:
        raise RowProblem(f"image {value} is a relative path; set `image_base_dir` to the folder it is relative to")
    raise RowProblem(f"image file {value} not found in {' or '.join(image_dirs)}")


def _checked_image(ref: Any, kind: str | None, image_dirs: list[str], max_image_pixels: int | None):
    """`(ref, (height, width))`: the image reference, its header read (size and mode, no pixels decoded), a path
    resolved to where the file is, bytes or an `Image` feature's `{"bytes", "path"}` as stored; and its size as the
    collator will see it (an EXIF rotation applied), kept so that the length pass need not open the image again."""
    from PIL import Image, UnidentifiedImageError

    from ..lengths import image_size, opened_size
    from .images import RGB_CONVERTIBLE_MODES, _check_pixels, without_pil_pixel_limit

    data, path = None, None
    if isinstance(ref, (bytes, bytearray)):
        data = bytes(ref)
    elif isinstance(ref, dict):
        data, path = ref.get("bytes"), ref.get("path")
    elif isinstance(ref, str):
        path = ref
    else:
        raise RowProblem(f"an image given as {type(ref).__name__}; give a path, bytes or an `Image` feature")
    if not data:
        resolved = _resolve_path(path, image_dirs)
        if kind == "image" and resolved != path:
            # An `Image` column is joined to our rows as stored, not rewritten: its paths must stand on their own.
            raise RowProblem(
                f"the `Image` feature holds the relative path {path} without bytes; store absolute paths or the "
                "image bytes (`datasets` embeds them in parquet and on the hub)"
            )
        try:
            read_image_header(resolved, max_image_pixels)
            size = image_size(resolved)
        except DataError as error:
            raise RowProblem(str(error)) from None
        return (resolved if isinstance(ref, str) else {"bytes": None, "path": resolved}), size
    name = path or "(image bytes)"
    try:
        with without_pil_pixel_limit(), Image.open(io.BytesIO(data)) as opened:
            size, mode, seen = opened.size, opened.mode, opened_size(opened)
    except UnidentifiedImageError:
        raise RowProblem(f"image {name} is not an image that PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise RowProblem(f"cannot read the header of image {name}: {error}") from None
    if mode not in RGB_CONVERTIBLE_MODES:
        raise RowProblem(f"image {name} has mode {mode!r}, which cannot be converted to RGB")
    try:
        _check_pixels(size, name, max_image_pixels)
    except DataError as error:
        raise RowProblem(str(error)) from None
    return ref, seen


def _convert_row(row: dict[str, Any], index: int, split: str, fmt: str, kind, image_dirs, max_image_pixels):
    """`(id, messages, image refs, image sizes, problem)` of one row; `problem` is None for a good row."""
    row_id = row.get("id")
    row_id = f"{split}-{index}" if row_id is None else str(row_id)
    try:
        messages, refs = to_messages(row, fmt)
        checked = [_checked_image(ref, kind, image_dirs, max_image_pixels) for ref in refs]
    except RowProblem as problem:
        return row_id, None, [], [], str(problem)
    return row_id, messages, [ref for ref, _ in checked], [list(size) for _, size in checked], None


def _undecoded_image_feature(feature):
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(getattr(feature, "feature", None), datasets.Image):
        return datasets.List(datasets.Image(decode=False))
    return feature


def _without_image_decoding(features, column: str | None):
    """`features` with the image column's `Image` feature left undecoded (the rest, `Json` columns..., decode)."""
    import datasets

    features = datasets.Features(dict(features))
    if column is not None and column in features:
        features[column] = _undecoded_image_feature(features[column])
    return features


def _undecoded_images(source, column: str, rows: int):
    """The image column of `source` as a dataset named `images` whose `Image` feature does not decode (our transform
    decodes), sharing `source`'s Arrow data, not copying it (a `cast` would rewrite every image); its first `rows`."""
    import datasets

    feature = _undecoded_image_feature(source.features[column])
    images = source.select_columns([column])
    if len(images.data) != len(images):  # a selection of rows: its table holds other rows too
        images = images.flatten_indices()
    undecoded = datasets.Dataset(
        images.data,
        info=datasets.DatasetInfo(features=datasets.Features({column: feature})),
        fingerprint=datasets.fingerprint.Hasher.hash(["undecoded", dataset_fingerprint(images)]),
    )
    if column != "images":
        undecoded = undecoded.rename_column(column, "images")
    return undecoded if rows == len(undecoded) else undecoded.select(range(rows))


def _convert_batch(batch, indices: list[int], fmt, kind, split, features, image_dirs, max_image_pixels):
    """Rows of one Arrow batch -> `id`, `messages` (JSON), `bad_row` (the reason, None when good) and, where images are
    paths, the resolved paths. `features` decode the batch (`Json` content of mixed types...), images excepted."""
    batch = features.decode_batch(batch.to_pydict())
    size = len(indices)
    out: dict[str, list] = {"id": [], "messages": [], "bad_row": [], "image_sizes": []}
    if kind in ("path", "struct"):
        out["images"] = []
    for position in range(size):
        row = {key: values[position] for key, values in batch.items()}
        row_id, messages, refs, sizes, problem = _convert_row(
            row, indices[position], split, fmt, kind, image_dirs, max_image_pixels
        )
        out["id"].append(row_id)
        out["image_sizes"].append(sizes)
        out["messages"].append(json.dumps(messages) if messages is not None else "[]")
        out["bad_row"].append(problem)
        if kind in ("path", "struct"):
            out["images"].append(refs)
    return out


def _stream_example(row: dict[str, Any], index: int, fmt, kind, where, single_shard, image_dirs, max_image_pixels):
    from .rows import decode_images

    own_id = row.get("id")
    row_id, messages, refs, _, problem = _convert_row(row, index, "stream", fmt, kind, image_dirs, max_image_pixels)
    if own_id is None:
        row_id = f"row {index}" if single_shard else None  # a position within a shard names no row
    if problem is not None:
        # Marked for the collator, which stops on it or skips it under `on_bad_row` (counted and listed).
        position = f"row {index}" if single_shard else f"row {index} of a shard"
        name = f"{where}, {position}" + (f" (id {own_id})" if own_id is not None else "")
        reason = f"{name}: {problem}"
        return {"id": row_id, "messages": [], "images": [], "image_error": {"image": None, "reason": reason}}
    images, error = decode_images(refs, max_image_pixels)
    return {"id": row_id, "messages": messages, "images": images, "image_error": error}
