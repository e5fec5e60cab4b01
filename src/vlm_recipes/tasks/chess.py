"""Chess: a board image -> the position as JSON (pieces, then side to move, castling, en passant and clocks).

Native format: `<data_dir>/<split>.json` (`train`, `val`, `test`), each a JSON list of rows
`{"id": "chess_000001", "image": "train/images/train_000001.png", "conversations": [{"from": "user", "value":
"<image>\\nAnalyze this chess board image ..."}, {"from": "assistant", "value": "<position JSON>"}]}`, image paths
relative to `image_base_dir`. `from` may also use the LLaVA names `human` / `gpt`.

The position JSON is the FEN spelled out, compact and in one canonical order so that a small model has one right
answer to learn, token for token:
`{"pieces":[{"square":"a1","color":"white","type":"rook"},...],"metadata":{"side_to_move":"white",
"castling":["white_kingside","white_queenside","black_kingside","black_queenside"],"en_passant":null,
"halfmove_clock":0,"fullmove_number":1}}`, pieces rank by rank from a1 to h8 (a1, b1, ..., h1, a2, ..., h8).
Only the pieces can be read off a board image; the metadata has to be guessed, which is why the metrics separate the
board (`square_accuracy`, `exact_board_match`, `fen_accuracy`) from the whole answer (`exact_json_match`).

python-chess (`chess>=1.11,<2`) is imported inside the functions that use it: the FEN <-> JSON conversion needs only
the standard library, and importing the task registry should not fail for users of other tasks.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..data.errors import BadRow, DataError
from ..data.images import resolve_image
from ..data.rows import BadRowReport, decode_utf8_lines
from ..files import write_text_atomically
from .base import Task, register_task

__all__ = [
    "PROMPT",
    "ChessTask",
    "aggregate_position_scores",
    "create_vlm_dataset",
    "fen_to_position_json",
    "format_position",
    "placement_squares",
    "position_json_to_fen",
    "position_scores",
    "random_position",
    "render_board",
]

PROMPT = (
    "Analyze this chess board image and describe the position in JSON format: the pieces (square, color, type) "
    "and the metadata (side to move, castling rights, en passant square, halfmove clock, fullmove number)."
)
IMAGE_MARKER = "<image>"
BOARD_SIZE = 128  # 16 pixels a square: big enough to read a letter, small enough for a tiny model on CPU

PIECE_TYPES = {"p": "pawn", "n": "knight", "b": "bishop", "r": "rook", "q": "queen", "k": "king"}
PIECE_LETTERS = {name: letter for letter, name in PIECE_TYPES.items()}
COLORS = ("white", "black")
# Square index = python-chess's: a1 = 0, b1 = 1, ..., h1 = 7, a2 = 8, ..., h8 = 63.
SQUARE_NAMES = tuple(file + rank for rank in "12345678" for file in "abcdefgh")
SQUARE_INDEX = {name: index for index, name in enumerate(SQUARE_NAMES)}
EMPTY = "."
# FEN letter and JSON name of each castling right, in FEN's canonical order.
CASTLING_RIGHTS = (
    ("K", "white_kingside"),
    ("Q", "white_queenside"),
    ("k", "black_kingside"),
    ("q", "black_queenside"),
)
METADATA_KEYS = ("side_to_move", "castling", "en_passant", "halfmove_clock", "fullmove_number")
PIECE_KEYS = ("square", "color", "type")

_USER_ROLES = {"user": "user", "human": "user"}
_ASSISTANT_ROLES = {"assistant": "assistant", "gpt": "assistant"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# FEN <-> position JSON ---------------------------------------------------------------------------------------------
def placement_squares(placement: str) -> list[str]:
    """The 64 squares (a1..h8) of a FEN piece-placement field: a piece letter (`P`, `k`, ...) or `.` when empty."""
    ranks = placement.split("/")
    if len(ranks) != 8:
        raise ValueError(f"piece placement {placement!r} has {len(ranks)} ranks, not 8")
    squares = [EMPTY] * 64
    for rank_from_top, rank_text in enumerate(ranks):
        rank = 7 - rank_from_top
        file = 0
        for character in rank_text:
            if character in "12345678":
                file += int(character)
            elif character.lower() in PIECE_TYPES:
                if file > 7:
                    raise ValueError(f"rank {rank + 1} of {placement!r} runs past the h-file")
                squares[rank * 8 + file] = character
                file += 1
            else:
                raise ValueError(f"unknown character {character!r} in piece placement {placement!r}")
        if file != 8:
            raise ValueError(f"rank {rank + 1} of {placement!r} covers {file} files, not 8")
    return squares


def _squares_to_placement(squares: list[str]) -> str:
    ranks = []
    for rank in range(7, -1, -1):
        text, empty_run = "", 0
        for symbol in squares[rank * 8 : rank * 8 + 8]:
            if symbol == EMPTY:
                empty_run += 1
                continue
            text += (str(empty_run) if empty_run else "") + symbol
            empty_run = 0
        ranks.append(text + (str(empty_run) if empty_run else ""))
    return "/".join(ranks)


def _check_en_passant(square: Any) -> None:
    if square is not None and (not isinstance(square, str) or square not in SQUARE_INDEX or square[1] not in "36"):
        raise ValueError(f"en passant square must be null or a square on rank 3 or 6, got {square!r}")


def fen_to_position_json(fen: str) -> dict[str, Any]:
    """The position JSON of a FEN (all six fields required); raises `ValueError` that says which field is wrong.

    Castling rights come out in FEN's KQkq order whatever order the FEN gave, so that equal positions give equal
    JSON; for a canonical FEN, `position_json_to_fen(fen_to_position_json(fen)) == fen`.
    """
    fields = fen.split()
    if len(fields) != 6:
        raise ValueError(f"a FEN has 6 space-separated fields, got {len(fields)} in {fen!r}")
    placement, side, castling, en_passant, halfmove, fullmove = fields
    squares = placement_squares(placement)
    if side not in ("w", "b"):
        raise ValueError(f"side to move must be 'w' or 'b', got {side!r}")
    if castling != "-" and (len(set(castling)) != len(castling) or not set(castling) <= set("KQkq")):
        raise ValueError(f"castling field must be '-' or distinct letters of KQkq, got {castling!r}")
    _check_en_passant(None if en_passant == "-" else en_passant)
    if not halfmove.isdigit():
        raise ValueError(f"halfmove clock must be a non-negative integer, got {halfmove!r}")
    if not fullmove.isdigit() or int(fullmove) < 1:
        raise ValueError(f"fullmove number must be a positive integer, got {fullmove!r}")
    pieces = [
        {
            "square": SQUARE_NAMES[index],
            "color": "white" if symbol.isupper() else "black",
            "type": PIECE_TYPES[symbol.lower()],
        }
        for index, symbol in enumerate(squares)
        if symbol != EMPTY
    ]
    metadata = {
        "side_to_move": "white" if side == "w" else "black",
        "castling": [name for letter, name in CASTLING_RIGHTS if letter in castling],
        "en_passant": None if en_passant == "-" else en_passant,
        "halfmove_clock": int(halfmove),
        "fullmove_number": int(fullmove),
    }
    return {"pieces": pieces, "metadata": metadata}


def _check_keys(value: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object, got {type(value).__name__}")
    if set(value) != set(keys):
        missing, unknown = sorted(set(keys) - set(value)), sorted(set(value) - set(keys))
        raise ValueError(f"{what} must have exactly the keys {list(keys)} (missing {missing}, unknown {unknown})")


def _pieces_to_squares(pieces: Any) -> list[str]:
    """The 64 squares of a `pieces` list (any order); raises `ValueError` on a malformed piece or a doubled square."""
    if not isinstance(pieces, list):
        raise ValueError(f"`pieces` must be a list, got {type(pieces).__name__}")
    squares = [EMPTY] * 64
    for number, piece in enumerate(pieces):
        _check_keys(piece, PIECE_KEYS, f"piece {number}")
        square, color, piece_type = piece["square"], piece["color"], piece["type"]
        if not isinstance(square, str) or square not in SQUARE_INDEX:
            raise ValueError(f"piece {number}: unknown square {square!r}")
        if color not in COLORS:
            raise ValueError(f"piece {number}: color must be 'white' or 'black', got {color!r}")
        if not isinstance(piece_type, str) or piece_type not in PIECE_LETTERS:
            raise ValueError(f"piece {number}: type must be one of {list(PIECE_LETTERS)}, got {piece_type!r}")
        if squares[SQUARE_INDEX[square]] != EMPTY:
            raise ValueError(f"piece {number}: square {square} holds two pieces")
        letter = PIECE_LETTERS[piece_type]
        squares[SQUARE_INDEX[square]] = letter.upper() if color == "white" else letter
    return squares


def _is_count(value: Any, minimum: int) -> bool:
    # bool is an int in Python; `true` is not a move number.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def position_json_to_fen(position: Any) -> str:
    """The FEN of a position JSON (parsed, not text); raises `ValueError` that says what is malformed.

    Strict on purpose: unknown keys, doubled squares or a `true` clock are errors, so that a loaded dataset holds only
    answers the metrics can read, and a prediction counts as a valid position only if it follows the schema.
    """
    _check_keys(position, ("pieces", "metadata"), "the position")
    squares = _pieces_to_squares(position["pieces"])
    metadata = position["metadata"]
    _check_keys(metadata, METADATA_KEYS, "`metadata`")
    side = metadata["side_to_move"]
    if side not in COLORS:
        raise ValueError(f"`side_to_move` must be 'white' or 'black', got {side!r}")
    castling = metadata["castling"]
    names = [name for _, name in CASTLING_RIGHTS]
    if (
        not isinstance(castling, list)
        or not all(isinstance(name, str) and name in names for name in castling)
        or len(set(castling)) != len(castling)
    ):
        raise ValueError(f"`castling` must be a list of distinct names from {names}, got {castling!r}")
    _check_en_passant(metadata["en_passant"])
    if not _is_count(metadata["halfmove_clock"], 0):
        raise ValueError(f"`halfmove_clock` must be a non-negative integer, got {metadata['halfmove_clock']!r}")
    if not _is_count(metadata["fullmove_number"], 1):
        raise ValueError(f"`fullmove_number` must be a positive integer, got {metadata['fullmove_number']!r}")
    castling_field = "".join(letter for letter, name in CASTLING_RIGHTS if name in castling) or "-"
    return " ".join(
        [
            _squares_to_placement(squares),
            "w" if side == "white" else "b",
            castling_field,
            metadata["en_passant"] or "-",
            str(metadata["halfmove_clock"]),
            str(metadata["fullmove_number"]),
        ]
    )


def format_position(position: dict[str, Any]) -> str:
    """Position JSON as the answer text: no spaces, keys in schema order (every space is a token the model pays)."""
    return json.dumps(position, separators=(",", ":"))


# Metrics -------------------------------------------------------------------------------------------------------
def _canonical(value: Any) -> str:
    # Compared as text, not with ==, because Python finds 0 == False == 0.0 and the JSON answer must not.
    return json.dumps(value, sort_keys=True)


def position_scores(prediction: str, target: str) -> dict[str, float | None]:
    """Per-example scores of a generated answer against the target position JSON text.

    - `valid_json`: the prediction parses as JSON;
    - `valid_position`: it converts to a FEN (`position_json_to_fen`) that python-chess finds valid (kings, pawns,
      castling and en passant consistent);
    - `exact_json_match`: the parsed objects are equal (values and types; piece order matters, as it does for the
      text the model learns);
    - `fen_accuracy`: the prediction converts to a FEN whose piece-placement field equals the target's;
    - `square_accuracy`: the fraction of the 64 squares with the right content (13 classes: empty, or one of 6 piece
      types in 2 colours), read from `pieces` alone, so that a wrong metadata block does not hide a right board; a
      prediction whose `pieces` cannot be read counts as all squares wrong;
    - `occupied_square_accuracy`: the same over the squares the target occupies (empty squares are most of a board
      and would flatter a model that draws nothing);
    - `exact_board_match`: all 64 squares right (unlike `fen_accuracy`, a malformed metadata block does not matter).
    """
    import chess

    target_position = json.loads(target)
    target_squares = _pieces_to_squares(target_position["pieces"])
    try:
        predicted = json.loads(prediction)
        valid_json = True
    except (json.JSONDecodeError, RecursionError):
        predicted, valid_json = None, False
    predicted_squares = None
    fen = None
    if valid_json:
        try:
            predicted_squares = _pieces_to_squares(predicted.get("pieces") if isinstance(predicted, dict) else None)
        except ValueError:
            pass
        try:
            fen = position_json_to_fen(predicted)
        except ValueError:
            pass
    valid_position = False
    if fen is not None:
        try:
            valid_position = chess.Board(fen).is_valid()
        except ValueError:
            valid_position = False
    correct = (
        [False] * 64 if predicted_squares is None else [p == t for p, t in zip(predicted_squares, target_squares)]
    )
    occupied = [index for index, symbol in enumerate(target_squares) if symbol != EMPTY]
    return {
        "valid_json": float(valid_json),
        "valid_position": float(valid_position),
        "exact_json_match": float(valid_json and _canonical(predicted) == _canonical(target_position)),
        "fen_accuracy": float(fen is not None and fen.split()[0] == _squares_to_placement(target_squares)),
        "square_accuracy": sum(correct) / 64,
        "occupied_square_accuracy": sum(correct[i] for i in occupied) / len(occupied) if occupied else None,
        "exact_board_match": float(all(correct)),
    }


_RATE_NAMES = {"valid_json": "valid_json_rate", "valid_position": "valid_position_rate"}


def aggregate_position_scores(scores: list[dict[str, float | None]]) -> dict[str, float]:
    """Split metrics: the mean of each per-example score (`valid_json` -> `valid_json_rate`, `valid_position` ->
    `valid_position_rate`), and `num_examples`. Every board has 64 squares, so the mean of `square_accuracy` is also
    the accuracy over all squares of the split. A score that is None (no occupied target square) is left out."""
    metrics: dict[str, float] = {}
    for key in (
        "valid_json",
        "valid_position",
        "exact_json_match",
        "fen_accuracy",
        "square_accuracy",
        "occupied_square_accuracy",
        "exact_board_match",
    ):
        values = [score[key] for score in scores if score.get(key) is not None]
        metrics[_RATE_NAMES.get(key, key)] = sum(values) / len(values) if values else float("nan")
    metrics["num_examples"] = float(len(scores))
    return metrics


# Demo data -----------------------------------------------------------------------------------------------------
def random_position(rng: random.Random, max_plies: int = 80):
    """A legal position: a random playout of 0..`max_plies` plies from the start (stopping early at mate or stalemate).

    Moves are sorted before the draw so that the position depends on the seed only, not on move-generation order.
    """
    import chess

    board = chess.Board()
    for _ in range(rng.randint(0, max_plies)):
        moves = sorted(board.legal_moves, key=lambda move: move.uci())
        if not moves:
            break
        board.push(rng.choice(moves))
    return board


def render_board(board, size: int = BOARD_SIZE):
    """A PIL image of `board` (a python-chess board), white at the bottom: each piece a disc in its colour with its
    letter (K Q R B N P) in the opposite colour, drawn with PIL's default font, so that nothing needs downloading."""
    from PIL import Image, ImageDraw, ImageFont

    if size % 8:
        raise ValueError(f"board image size must be a multiple of 8, got {size}")
    cell = size // 8
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, cell * 3 // 4))
    for index in range(64):
        file, rank = index % 8, index // 8
        left, top = file * cell, (7 - rank) * cell
        light = (file + rank) % 2 == 1  # a1 is a dark square
        draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=(240, 217, 181) if light else (181, 136, 99))
        piece = board.piece_at(index)
        if piece is None:
            continue
        white = piece.color  # python-chess: True is white
        disc, ink = ((250, 250, 250), (20, 20, 20)) if white else ((20, 20, 20), (250, 250, 250))
        margin = max(1, cell // 10)
        draw.ellipse(
            (left + margin, top + margin, left + cell - 1 - margin, top + cell - 1 - margin),
            fill=disc,
            outline=(90, 90, 90),
        )
        letter = piece.symbol().upper()
        box = draw.textbbox((0, 0), letter, font=font)
        x = left + (cell - (box[2] - box[0])) / 2 - box[0]
        y = top + (cell - (box[3] - box[1])) / 2 - box[1]
        draw.text((x, y), letter, fill=ink, font=font)
    return image


def _native_row(row_id: str, image: str, fen: str) -> dict[str, Any]:
    return {
        "id": row_id,
        "image": image,
        "conversations": [
            {"from": "user", "value": f"{IMAGE_MARKER}\n{PROMPT}"},
            {"from": "assistant", "value": format_position(fen_to_position_json(fen))},
        ],
    }


def _write_json_atomically(rows: list[dict[str, Any]], path: Path) -> None:
    # Written whole then renamed, so that an interrupted run never leaves a split that looks complete.
    write_text_atomically(path, json.dumps(rows, indent=2) + "\n")


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
            rows.append(_native_row(f"chess_{start + index:06d}", relative, fen))
        _write_json_atomically(rows, output_dir / f"{split}.json")
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


# The task --------------------------------------------------------------------------------------------------------
def _row_from_native(
    raw: Any, file: Path, index: int, split: str, image_base_dir: Path, max_pixels: int | None
) -> dict[str, Any]:
    """One native row as a training row, or a `BadRow` naming what is wrong."""
    if not isinstance(raw, dict):
        raise BadRow(file, index, f"expected a JSON object, got {type(raw).__name__}")
    for key in ("image", "conversations"):
        if key not in raw:
            raise BadRow(file, index, f"missing key `{key}`")
    conversations = raw["conversations"]
    if not isinstance(conversations, list) or len(conversations) != 2:
        raise BadRow(file, index, "`conversations` must be a list of two turns (user, then assistant)")
    for turn, (message, roles) in enumerate(zip(conversations, (_USER_ROLES, _ASSISTANT_ROLES))):
        if (
            not isinstance(message, dict)
            or message.get("from") not in roles
            or not isinstance(message.get("value"), str)
        ):
            raise BadRow(file, index, f"turn {turn} must be {{'from': one of {sorted(roles)}, 'value': <string>}}")
    question, answer = conversations[0]["value"], conversations[1]["value"]
    markers = question.count(IMAGE_MARKER) + answer.count(IMAGE_MARKER)
    if markers != 1 or IMAGE_MARKER not in question:
        raise BadRow(file, index, f"expected one `{IMAGE_MARKER}` marker, in the user turn; found {markers}")
    try:
        position = json.loads(answer)
    except json.JSONDecodeError as error:
        raise BadRow(file, index, f"assistant value is not JSON ({error.msg} at column {error.colno})") from None
    try:
        fen = position_json_to_fen(position)
    except ValueError as error:
        raise BadRow(file, index, f"assistant value is not a valid position JSON: {error}") from None
    image = resolve_image(raw["image"], image_base_dir, file, index, max_pixels)
    # The image goes where the marker was, so that a prompt with text before the image keeps its order.
    before, after = (text.strip() for text in question.split(IMAGE_MARKER))
    user_content = [
        *([{"type": "text", "text": before}] if before else []),
        {"type": "image"},
        *([{"type": "text", "text": after}] if after else []),
    ]
    messages = [
        {"role": "user", "content": user_content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"id": raw.get("id", f"{split}-{index}"), "images": [image], "messages": messages, "fen": fen}


@register_task
class ChessTask(Task):
    """Board image -> position JSON; see the module docstring for the format and `position_scores` for the metrics."""

    name = "chess"

    split_filename = "{split}.json"

    def load_rows(
        self, data_dir: Path, split: str, image_base_dir: Path, report: BadRowReport
    ) -> list[dict[str, Any]]:
        """Rows `{"id", "images", "messages", "fen"}`; a bad row (its `row` is its 0-based index in the list) goes to
        `report`. A file that is not a JSON list cannot be read row by row, so it raises a `DataError` naming the
        file and the line instead."""
        file = self.split_file(data_dir, split)
        if not file.is_file():
            raise FileNotFoundError(f"Data file {file} not found.")
        lines, problems = decode_utf8_lines(file.read_bytes())
        if problems:
            line = min(problems)
            raise DataError(f"{file}, line {line}: {problems[line]}")
        text = "".join(lines)
        if not text.strip():
            raise DataError(f"{file}: the file is empty; a chess data file holds a JSON list of rows.")
        try:
            raw_rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{file}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(raw_rows, list):
            raise DataError(f"{file} must hold a JSON list of rows, got a {type(raw_rows).__name__}.")
        rows = []
        for index, raw in enumerate(raw_rows):
            try:
                rows.append(_row_from_native(raw, file, index, split, Path(image_base_dir), report.max_image_pixels))
            except BadRow as error:
                report.handle(error.with_row_id(raw.get("id") if isinstance(raw, dict) else None))
        return rows

    def make_data(self, output_dir: Path, num: int, seed: int) -> None:
        """Write `train/val/test.json` (80/10/10, at least one held-out row each) and 128x128 board PNGs of random
        legal positions, the same bytes for the same seed."""
        if num < 3:
            raise ValueError(f"`num`={num} cannot fill train, val and test; use at least 3.")
        output_dir = Path(output_dir)
        rng = random.Random(seed)
        held_out = max(1, num // 10)
        number = 0
        for split, count in {"train": num - 2 * held_out, "val": held_out, "test": held_out}.items():
            (output_dir / split / "images").mkdir(parents=True, exist_ok=True)
            rows = []
            for index in range(1, count + 1):
                board = random_position(rng)
                relative = f"{split}/images/{split}_{index:06d}.png"
                render_board(board).save(output_dir / relative)
                number += 1
                rows.append(_native_row(f"chess_{number:06d}", relative, board.fen()))
            _write_json_atomically(rows, output_dir / f"{split}.json")

    def score(self, prediction: str, target: str, row: dict[str, Any]) -> dict[str, float | None]:
        # From the target text, not row["fen"]: evaluation rows come back from a `datasets.Dataset` without it.
        return position_scores(prediction, target)

    def aggregate(self, scores: list[dict[str, float]], rows: list[dict[str, Any]]) -> dict[str, float]:
        return aggregate_position_scores(scores)
