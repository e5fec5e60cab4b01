"""Metrics of chess, per example (`position_scores`) and per split (`aggregate_position_scores`).

Only the pieces can be read off a board image; the metadata has to be guessed, which is why the metrics separate the
board (`square_accuracy`, `exact_board_match`, `fen_accuracy`) from the whole answer (`exact_json_match`).
"""

from __future__ import annotations

import json
from typing import Any

from .format import EMPTY, pieces_to_squares, position_json_to_fen, squares_to_placement

__all__ = ["aggregate_position_scores", "position_scores"]


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
    target_squares = pieces_to_squares(target_position["pieces"])
    try:
        predicted = json.loads(prediction)
        valid_json = True
    except (json.JSONDecodeError, RecursionError):
        predicted, valid_json = None, False
    predicted_squares = None
    fen = None
    if valid_json:
        try:
            predicted_squares = pieces_to_squares(predicted.get("pieces") if isinstance(predicted, dict) else None)
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
        "fen_accuracy": float(fen is not None and fen.split()[0] == squares_to_placement(target_squares)),
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
