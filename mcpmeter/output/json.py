"""JSON out, through one library (orjson) for every command that writes it.

Values are written exactly as the store holds them (no escaping for a terminal: that is
:func:`mcpmeter.output.terminal.printable`'s job, for human outputs only). Three shapes:

- :func:`write_json`: one document, indented two spaces (``report --format json``, ``prices
  show --format json``) or compact on one line (``budget show --format json``);
- :func:`write_json_lines`: one compact object per row, keys in column order (``export``,
  ``tail --json``), buffered, or flushed line by line for a reader that follows along;
- :func:`write_json_stream`: an object whose first member is an array written one item a
  line as the items arrive, so memory stays flat however many there are (``report
  invocations --format json``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

import orjson

#: Lines :func:`write_json_lines` joins into one write when it need not flush each.
LINES_PER_WRITE = 1000


def json_bytes(value: Any, *, indent: bool = False) -> bytes:
    """``value`` as JSON: compact, or indented two spaces."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2) if indent else orjson.dumps(value)


def json_text(value: Any, *, indent: bool = False) -> str:
    """:func:`json_bytes` as text."""
    return json_bytes(value, indent=indent).decode()


def write_json(value: Any, out: IO[str], *, indent: bool = True) -> None:
    """One JSON document, then a newline."""
    out.write(json_text(value, indent=indent))
    out.write("\n")


def write_json_lines(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], out: IO[bytes], *, flush: bool = False
) -> int:
    """One JSON object per row (``columns`` its keys, in order), one per line; returns how many.

    With ``flush``, each line is written and flushed as it comes (a reader following along
    sees every row at once); otherwise lines are written :data:`LINES_PER_WRITE` at a time.
    """
    dumps = orjson.dumps
    count = 0
    if flush:
        for row in rows:
            out.write(dumps(dict(zip(columns, row, strict=True))) + b"\n")
            out.flush()
            count += 1
        return count
    buffer: list[bytes] = []
    for row in rows:
        buffer.append(dumps(dict(zip(columns, row, strict=True))))
        count += 1
        if len(buffer) >= LINES_PER_WRITE:
            out.write(b"\n".join(buffer) + b"\n")
            buffer.clear()
    if buffer:
        out.write(b"\n".join(buffer) + b"\n")
    return count


def write_json_stream(out: IO[str], key: str, items: Iterable[Any], after: Mapping[str, Any]) -> None:
    """``{"KEY": [item, ...], **after}``, each item compact on a line of its own, written as
    ``items`` yields them; the members of ``after`` follow, each compact on its line."""
    out.write("{\n  " + json_text(key) + ": [")
    separator = "\n    "
    for item in items:
        out.write(separator + json_text(item))
        separator = ",\n    "
    out.write("\n  ]")
    for name, value in after.items():
        out.write(",\n  " + json_text(name) + ": " + json_text(value))
    out.write("\n}\n")
