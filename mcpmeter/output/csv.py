"""CSV out: the one CSV writer of mcpmeter (``export``, ``report``, ``report invocations``).

Values come from clients and servers, so a spreadsheet must never take a cell for a formula
(CSV injection, as OWASP describes it): a text cell that starts with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return gets a leading ``'``, and so does one that starts with
``'`` itself, so the escape is reversible (drop one leading ``'`` from a text cell that has
one). Numbers are written as numbers: a negative ``error_code`` stays ``-32602``. A null is
an empty cell; a list or an object (``report invocations``' ``tools``) the text of its JSON,
so a name holding a comma stays one name. A cell holding a CR or an LF is always quoted, so
every reader sees one record per row.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mcpmeter.output.json import json_text

#: How a text cell may start that a spreadsheet could read as a formula (or that is the escape).
CSV_ESCAPED_START = frozenset("=+-@\t\r'")


def csv_cell(value: Any) -> Any:
    """One cell as :class:`CsvWriter` writes it: null empty, text escaped, numbers as they are."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        value = json_text(value)
    if isinstance(value, str) and value[:1] in CSV_ESCAPED_START:
        return "'" + value
    return value


class _Line:
    """The file :mod:`csv` writes to: one call per record, ending CR LF, passed on ending LF.

    The csv module quotes a cell that holds a character of the line terminator, so with
    CR LF a bare CR inside a value is quoted too (with LF alone it would not be, and readers
    would split the record there); each record is then written with a plain LF.
    """

    def __init__(self, write: Callable[[str], object]) -> None:
        self._write = write

    def write(self, line: str) -> None:
        self._write(line[:-2] + "\n")


class CsvWriter:
    """Writes CSV records to ``write`` (a text sink, e.g. ``out.write``); see the module doc."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self._writer = csv.writer(_Line(write), lineterminator="\r\n")

    def writerow(self, cells: Iterable[Any]) -> None:
        self._writer.writerow(map(csv_cell, cells))


def write_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]], write: Callable[[str], object]) -> int:
    """A header of ``columns``, then one record per row (its cells in column order), to the
    text sink ``write``; returns the number of rows."""
    writer = CsvWriter(write)
    writer.writerow(columns)
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count
