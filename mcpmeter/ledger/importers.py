"""``ledger import``: a file's records, read in their format, written to the ledger in batches.

Imports stream: records are read one at a time and written in batches of :data:`BATCH`
rows, one transaction each, so memory stays flat however big the file and concurrent
``wrap`` writers wait for one batch at most.

A file is JSON lines when its first non-blank line starts with ``{``, else CSV with a header.
Its format (:mod:`mcpmeter.ledger.formats`) is given, or told from the first record. A
record that breaks a rule is a bad row: skipped and counted (or, with ``--strict``, the end
of the import).

Every format is UTF-8 text (a leading BOM is dropped). A line that is not ends the import,
whatever the format, with one line naming the file, the line and the first bad byte: a
Latin-1 file would otherwise be half read as U+FFFD and half skipped. The rows before it
stay imported, as with ``--strict`` (importing the fixed file adds them no second time).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import IO, Any

import orjson

from mcpmeter.errors import MeterError, UsageError
from mcpmeter.ledger.api import Ledger
from mcpmeter.ledger.formats import FORMATS, detect_format, read_record
from mcpmeter.ledger.rows import BadRow, LedgerRow
from mcpmeter.store import Store

#: Rows per insert transaction during an import.
BATCH = 1000

#: One record of a file and the line it starts on: a decoded object, or why it is not one.
Record = tuple[int, dict[str, Any] | BadRow]


class NotUtf8(Exception):
    """Line ``line`` of an import is not UTF-8: its first bad byte is ``byte``, at ``column`` (1-based)."""

    def __init__(self, line: int, column: int, byte: int) -> None:
        super().__init__(f"line {line} is not UTF-8")
        self.line, self.column, self.byte = line, column, byte


@dataclass(slots=True)
class ImportResult:
    """What an import did: rows new to the ledger, rows it had already, rows skipped."""

    file: str
    format: str
    source: str | None
    imported: int = 0
    already: int = 0
    skipped: int = 0
    first_error: BadRow | None = None

    def summary(self) -> str:
        """The one line ``ledger import`` ends with."""
        text = f"imported {self.imported}, skipped {self.skipped}"
        if self.first_error is not None:
            text += f" (first: {self.first_error})"
        if self.already:
            text += f"; {self.already} already in the ledger"
        return text


def import_file(
    store: Store,
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    strict: bool = False,
    source: str | None = None,
    agent_id: str | None = None,
    project_id: str | None = None,
    batch: int = BATCH,
    now: float | None = None,
) -> ImportResult:
    """Import the LLM calls in ``path`` (``-`` for stdin) into ``store``, streamed.

    ``format`` ``auto`` decides from the file's first record. ``source``, ``agent_id`` and
    ``project_id``, when given, replace what every row says. A bad record is skipped and
    counted (the first one is kept in the result), or with ``strict`` raised as
    :class:`BadRow` once the rows before it are written.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    name = "<stdin>" if os.fspath(path) == "-" else os.fspath(path)
    now = time.time() if now is None else now
    stream: IO[bytes]
    if name == "<stdin>":
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(path, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        return _import(store, stream, name, format, strict, source, agent_id, project_id, max(1, batch), now)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _import(
    store: Store,
    stream: IO[bytes],
    name: str,
    format: str,
    strict: bool,
    source: str | None,
    agent_id: str | None,
    project_id: str | None,
    batch_size: int,
    now: float,
) -> ImportResult:
    result = ImportResult(name, format, source)
    ledger = Ledger(store=store)
    batch: list[LedgerRow] = []

    def flush() -> None:
        if batch:
            added = ledger.write(batch)
            result.imported += added
            result.already += len(batch) - added
            batch.clear()

    try:
        container, records = _records(_utf8_lines(enumerate(stream, 1)), name)
        decided = False
        for line, record in records:
            if not decided and not isinstance(record, BadRow):
                if format == "auto":
                    detected = detect_format(record, container)
                    if detected is None:
                        raise UsageError(
                            f"{name}:{line}: cannot tell the format from the first record:"
                            f" use --format {'|'.join(FORMATS[1:])}"
                        )
                    result.format = detected
                decided = True
            try:
                if isinstance(record, BadRow):
                    raise record
                row = read_record(record, result.format, source or result.format, now)
            except BadRow as exc:
                error = exc.at(name, line)
                if strict:
                    flush()
                    raise BadRow(
                        error.field,
                        f"{error.problem} (--strict: stopped here;"
                        f" {_rows(result.imported)} imported before it)",
                        name,
                        line,
                    ) from None
                result.skipped += 1
                if result.first_error is None:
                    result.first_error = error
                continue
            if source is not None or agent_id is not None or project_id is not None:
                row = LedgerRow(
                    row.ts,
                    agent_id if agent_id is not None else row.agent_id,
                    project_id if project_id is not None else row.project_id,
                    row.request_id,
                    row.model,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.cached_tokens,
                    source if source is not None else row.source,
                    row.tags,
                )
            batch.append(row)
            if len(batch) >= batch_size:
                flush()
    except NotUtf8 as exc:
        flush()
        raise MeterError(
            f"{name}:{exc.line}: not UTF-8 (byte 0x{exc.byte:02x} at column {exc.column}): convert the file"
            f" to UTF-8 (e.g. iconv -f latin1 -t utf-8); {_rows(result.imported)} imported before it"
        ) from None
    flush()
    return result


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


# -- reading files -----------------------------------------------------------------------------


def _utf8_lines(lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """``lines`` as they are, raising :class:`NotUtf8` at the first that is not UTF-8."""
    for number, raw in lines:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotUtf8(number, exc.start + 1, raw[exc.start]) from None
        yield number, raw


def _records(lines: Iterator[tuple[int, bytes]], name: str) -> tuple[str, Iterator[Record]]:
    """The container (``json``, ``csv`` or ``empty``) and its records, with line numbers."""
    for number, raw in lines:
        if raw.strip():
            first = (number, raw.removeprefix(b"\xef\xbb\xbf"))
            break
    else:
        return "empty", iter(())
    lead = first[1].lstrip()[:1]
    if lead == b"[":
        raise UsageError(
            f"{name} is one JSON array: give one object a line (e.g. jq -c '.[]' FILE > FILE.jsonl)"
        )
    rest = chain([first], lines)
    if lead == b"{":
        return "json", _json_records(rest)
    return "csv", _csv_records(rest)


def _json_records(lines: Iterable[tuple[int, bytes]]) -> Iterator[Record]:
    loads = orjson.loads
    for number, raw in lines:
        if not raw.strip():
            continue
        try:
            value = loads(raw)
        except orjson.JSONDecodeError as exc:
            yield number, BadRow(None, f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        if isinstance(value, dict):
            yield number, value
        else:
            yield number, BadRow(None, f"expected a JSON object, got {type(value).__name__}")


def _csv_records(lines: Iterator[tuple[int, bytes]]) -> Iterator[Record]:
    last = [0]

    def text() -> Iterator[str]:
        for number, raw in lines:
            last[0] = number
            yield raw.decode("utf-8")  # checked by _utf8_lines

    reader = csv.reader(text())
    header = [name.strip() for name in next(reader, [])]
    end = last[0]
    for row in reader:
        start, end = end + 1, last[0]
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield start, BadRow(None, f"expected {len(header)} columns as in the header, got {len(row)}")
            continue
        yield start, dict(zip(header, row, strict=True))
