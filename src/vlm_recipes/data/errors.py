"""What the data modules raise: `DataError` for a file, a row or an image, `BadRow` for one row of a data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["BadRow", "DataError"]


class DataError(ValueError):
    """A problem with the data (a file, a row, an image), reported as one line without a traceback (exit 2)."""


class BadRow(DataError):
    """A malformed data row; the message names the file, the row (and its id, when known) and what is wrong."""

    def __init__(self, file: str | Path, row: int | str, reason: str, row_id: str | None = None, unit: str = "row"):
        # `unit`: "line" where the row could not be read at all (bytes that are not UTF-8), so it has no row yet.
        self.file, self.row, self.reason, self.row_id, self.unit = str(file), row, reason, row_id, unit
        where = f"{unit} {row}" if row_id is None or str(row_id) == str(row) else f"{unit} {row} (id {row_id})"
        super().__init__(f"{file}, {where}: {reason}")

    def with_row_id(self, row_id: Any) -> BadRow:
        """This error naming the row's id too: the checks that raise (`resolve_image`...) do not know it."""
        if row_id is None or self.row_id is not None:
            return self
        return BadRow(self.file, self.row, self.reason, row_id=str(row_id), unit=self.unit)
