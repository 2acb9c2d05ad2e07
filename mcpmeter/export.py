"""``mcpmeter export``: audit rows out as JSON lines or CSV, streamed (memory stays flat)."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import IO, Any

import orjson

from mcpmeter.record import COLUMNS

#: jsonl and csv are written here; parquet by :mod:`mcpmeter.parquet`; otlp replays rows to a
#: collector (:func:`mcpmeter.otel.replay`).
FORMATS = ("jsonl", "csv", "parquet", "otlp")


def write_jsonl(rows: Iterable[tuple[Any, ...]], out: IO[bytes]) -> int:
    """One JSON object per row, keys in column order. Returns the number of rows."""
    count = 0
    dumps = orjson.dumps
    columns = COLUMNS
    buffer: list[bytes] = []
    for row in rows:
        buffer.append(dumps(dict(zip(columns, row, strict=True))))
        count += 1
        if len(buffer) >= 1000:
            out.write(b"\n".join(buffer) + b"\n")
            buffer.clear()
    if buffer:
        out.write(b"\n".join(buffer) + b"\n")
    return count


class _BytesWriter:
    """Lets :mod:`csv` write text into a binary stream."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out

    def write(self, text: str) -> int:
        return self._out.write(text.encode())


def write_csv(rows: Iterable[tuple[Any, ...]], out: IO[bytes]) -> int:
    """A header row, then one line per row; nulls are empty cells."""
    writer = csv.writer(_BytesWriter(out), lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count
