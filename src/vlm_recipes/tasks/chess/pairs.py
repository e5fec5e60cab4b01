"""Importing labelled board images: (board image, FEN) pairs -> the native chess format."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterable
from pathlib import Path

from .format import fen_to_position_json
from .native import native_row, write_split_rows

__all__ = ["create_vlm_dataset"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _split_counts(total: int, ratios: tuple[float, float, float]) -> dict[str, int]:
    if len(ratios) != 3 or any(ratio < 0 for ratio in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(
            f"`split_ratios` must be three non-negative numbers (train, val, test) summing to 1, got {ratios}"
        )
    # Held-out splits rounded down (the epsilon absorbs 0.1 * 30 = 3.0000000000000004-style float error the other
    # way), and the train split takes the rest, so that the counts always add up to `total`.
    val, test = (int(total * ratio + 1e-9) for ratio in ratios[1:])
    return {"train": total - val - test, "val": val, "test": test}


def create_vlm_dataset(
    pairs_dir_or_list: str | Path | Iterable[tuple[str | Path, str]],
    output_dir: str | Path,
    max_samples: int | None = None,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, int]:
    """Turn (board image, FEN) pairs into the native chess format, so that any labelled set of boards can be used.

    Folder convention: every `<name>.png` (or `.jpg`, `.jpeg`) directly in the folder has a `<name>.fen` beside it,
    a text file whose first non-empty line is the FEN (all six fields). An image without its `.fen`, or a `.fen`
    without its image, is an error rather than a silent drop. Instead of a folder, a list of `(image path, FEN)`
    pairs may be given.

    Pairs are sorted (by name, or kept in list order), shuffled with `seed`, cut to `max_samples`, and split by
    `split_ratios` (train, val, test; held-out counts rounded down, train takes the rest). Images are copied to
    `<output_dir>/<split>/images/<split>_NNNNNN<suffix>`, and `<split>.json` is written atomically for all three splits
    (an empty list for an empty split). A malformed FEN raises `ValueError` naming its source. Returns the count of
    rows per split.
    """
    if isinstance(pairs_dir_or_list, (str, Path)):
        pairs = _pairs_from_folder(Path(pairs_dir_or_list))
    else:
        pairs = [
            (Path(image), fen, f"pair {number} ({image})") for number, (image, fen) in enumerate(pairs_dir_or_list)
        ]
    for image, fen, source in pairs:
        if not image.is_file():
            raise FileNotFoundError(f"{source}: image file {image} not found")
        try:
            fen_to_position_json(fen)
        except ValueError as error:
            raise ValueError(f"{source}: malformed FEN {fen!r}: {error}") from error
    random.Random(seed).shuffle(pairs)
    if max_samples is not None:
        pairs = pairs[:max_samples]
    counts = _split_counts(len(pairs), split_ratios)
    output_dir = Path(output_dir)
    start = 0
    for split, count in counts.items():
        (output_dir / split / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for index, (image, fen, _) in enumerate(pairs[start : start + count], start=1):
            relative = f"{split}/images/{split}_{index:06d}{image.suffix.lower()}"
            shutil.copyfile(image, output_dir / relative)
            rows.append(native_row(f"chess_{start + index:06d}", relative, fen))
        write_split_rows(rows, output_dir / f"{split}.json")
        start += count
    return counts


def _pairs_from_folder(folder: Path) -> list[tuple[Path, str, str]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"Pairs folder {folder} not found.")
    images = {
        path.stem: path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES
    }
    labels = {path.stem: path for path in folder.iterdir() if path.is_file() and path.suffix == ".fen"}
    unlabelled, orphaned = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    if unlabelled or orphaned:
        raise ValueError(
            f"In {folder}, every image needs a `<name>.fen` beside it and every `.fen` its image; "
            f"images without a .fen: {unlabelled[:10]}, .fen files without an image: {orphaned[:10]}."
        )
    pairs = []
    for stem in sorted(images):
        lines = [line.strip() for line in labels[stem].read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{labels[stem]} is empty; it must hold a FEN on its first line")
        pairs.append((images[stem], lines[0], str(labels[stem])))
    return pairs
