"""Demo data of chess: random legal positions drawn as small board images, written as native rows."""

from __future__ import annotations

import random
from pathlib import Path

from .native import native_row, write_split_rows

__all__ = ["BOARD_SIZE", "random_position", "render_board", "write_demo_data"]

BOARD_SIZE = 128  # 16 pixels a square: big enough to read a letter, small enough for a tiny model on CPU


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


def write_demo_data(output_dir: Path, num: int, seed: int) -> None:
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
            rows.append(native_row(f"chess_{number:06d}", relative, board.fen()))
        write_split_rows(rows, output_dir / f"{split}.json")
