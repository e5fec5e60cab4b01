"""The chess task: a board image -> the position as JSON (pieces, then side to move, castling, en passant, clocks).

Modules: `format` (FEN <-> position JSON), `metrics`, `native` (the native rows), `demo_data` (random legal positions
drawn as boards), `pairs` (importing labelled board images) and `task` (the registered `ChessTask`).

python-chess (`chess>=1.11,<2`) is imported inside the functions that use it: the FEN <-> JSON conversion needs only
the standard library, and importing the task registry should not fail for users of other tasks.
"""

from .task import ChessTask

__all__ = ["ChessTask"]
