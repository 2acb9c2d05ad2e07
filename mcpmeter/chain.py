"""The tamper-evident chain over the audit log.

Each row's ``hash`` is SHA-256 over the previous row's hash and the row's canonical fields:

    hash(n) = sha256( hash(n-1) + "\\n" + canonical(row n) )     (hash(0) = "")

where ``canonical`` is the compact JSON array of every stored column but ``id`` and
``hash`` (``record.INSERT_COLUMNS``: the documented columns in order, then ``args``), with
REAL columns as floats and INTEGER columns as integers (so a value reads back from any
engine exactly as it was hashed). Rows are chained in ``id``
order, per store.

Concurrent writers: the chain is extended only inside the store's write lock (SQLite's
``BEGIN IMMEDIATE``; an advisory transaction lock on Postgres), by reading the last row's
hash and inserting the batch in the same transaction. So however many ``wrap`` processes
write one store, there is one chain, in id order. Altering, deleting, inserting or
reordering a row breaks the chain at that row (or the next), which ``mcpmeter verify``
reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import sha256 as _sha256
from typing import Any, NamedTuple

import msgspec

from mcpmeter.record import INSERT_COLUMNS

#: The hashed columns, in order: every stored column but ``id`` and ``hash``.
CHAIN_COLUMNS: tuple[str, ...] = INSERT_COLUMNS
_REAL = frozenset({"latency_ms", "cost_usd"})
_INTEGER = frozenset({"request_bytes", "response_bytes", "error_code"})
GENESIS = ""
_encode = msgspec.json.encode


_REAL_AT = tuple(i for i, c in enumerate(CHAIN_COLUMNS) if c in _REAL)
_INTEGER_AT = tuple(i for i, c in enumerate(CHAIN_COLUMNS) if c in _INTEGER)


def canonical(fields: Sequence[Any]) -> bytes:
    """The bytes hashed for one row (``fields`` in :data:`CHAIN_COLUMNS` order)."""
    values = list(fields)
    # Only the numeric columns can read back as another type (an integer in a REAL column).
    for i in _REAL_AT:
        value = values[i]
        if value is not None and type(value) is not float:
            values[i] = float(value)
    for i in _INTEGER_AT:
        value = values[i]
        if value is not None and type(value) is not int:
            values[i] = int(value)
    return _encode(values)


def link(previous: str, fields: Sequence[Any]) -> str:
    """The hash of a row whose predecessor's hash is ``previous``."""
    return _sha256(previous.encode() + b"\n" + canonical(fields)).hexdigest()


def chain(previous: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """Hashes for ``rows`` appended after a row whose hash is ``previous``."""
    hashes = []
    for fields in rows:
        previous = link(previous, fields)
        hashes.append(previous)
    return hashes


def chained(previous: str, rows: Iterable[list[Any]]) -> list[list[Any]]:
    """``rows`` (lists of :data:`CHAIN_COLUMNS` values), each with its hash appended, in place."""
    out = []
    for fields in rows:
        previous = link(previous, fields)
        fields.append(previous)
        out.append(fields)
    return out


class Break(NamedTuple):
    """Where the chain breaks: the first row whose stored hash is not what it should be."""

    id: int
    reason: str


class Verdict(NamedTuple):
    rows: int
    first_id: int | None
    last_id: int | None
    broken: Break | None


def verify(rows: Iterable[Sequence[Any]], previous: str = GENESIS) -> Verdict:
    """Walk ``(id, *CHAIN_COLUMNS, hash)`` rows in id order; stop at the first break.

    Streaming: memory is constant whatever the number of rows.
    """
    count = 0
    first_id = last_id = None
    for row in rows:
        row_id, fields, stored = row[0], row[1:-1], row[-1]
        count += 1
        if first_id is None:
            first_id = row_id
        last_id = row_id
        if stored is None:
            return Verdict(count, first_id, last_id, Break(row_id, "the row has no hash"))
        expected = link(previous, fields)
        if stored != expected:
            reason = (
                f"stored hash {stored[:12]}... is not {expected[:12]}... computed from its fields and "
                "the previous row's hash: this row was altered, or the row before it was "
                "deleted, inserted or altered"
            )
            return Verdict(count, first_id, last_id, Break(row_id, reason))
        previous = stored
    return Verdict(count, first_id, last_id, None)
