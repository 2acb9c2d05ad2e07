"""``mcpmeter export``: audit rows out as JSON lines or CSV, streamed (memory stays flat).

Parquet is :mod:`mcpmeter.exporters.parquet`; ``--format otlp`` replays rows to a collector
(:func:`mcpmeter.exporters.otel.replay`).

Every column of :data:`mcpmeter.record.COLUMNS`, in order, one row at a time from the
store's cursor. The writers are the output layer's: JSON through orjson
(:func:`mcpmeter.output.json.write_json_lines`), CSV escaped against spreadsheet formulas
(:class:`mcpmeter.output.csv.CsvWriter`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, Any

from mcpmeter.output.csv import CsvWriter
from mcpmeter.output.csv import write_csv as write_csv_rows
from mcpmeter.output.json import write_json_lines
from mcpmeter.record import COLUMNS

__all__ = ["CsvWriter", "write_csv", "write_jsonl"]


def write_jsonl(rows: Iterable[tuple[Any, ...]], out: IO[bytes]) -> int:
    """One JSON object per row, keys in column order. Returns the number of rows."""
    return write_json_lines(COLUMNS, rows, out)


def write_csv(rows: Iterable[tuple[Any, ...]], out: IO[bytes]) -> int:
    """A header row, then one line per row; nulls are empty cells. Returns the number of rows."""
    return write_csv_rows(COLUMNS, rows, lambda text: out.write(text.encode()))
