"""The chess answer format: the position JSON, and its conversion to and from FEN.

The position JSON is the FEN spelled out, compact and in one canonical order so that a small model has one right
answer to learn, token for token:
`{"pieces":[{"square":"a1","color":"white","type":"rook"},...],"metadata":{"side_to_move":"white",
"castling":["white_kingside","white_queenside","black_kingside","black_queenside"],"en_passant":null,
"halfmove_clock":0,"fullmove_number":1}}`, pieces rank by rank from a1 to h8 (a1, b1, ..., h1, a2, ..., h8).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "EMPTY",
    "fen_to_position_json",
    "format_position",
    "pieces_to_squares",
    "placement_squares",
    "position_json_to_fen",
    "squares_to_placement",
]

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


def squares_to_placement(squares: list[str]) -> str:
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


def pieces_to_squares(pieces: Any) -> list[str]:
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
    squares = pieces_to_squares(position["pieces"])
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
            squares_to_placement(squares),
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
