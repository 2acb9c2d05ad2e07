"""``mcpmeter verify`` and ``mcpmeter store recover``: checking and repairing the audit log."""

from __future__ import annotations

from mcpmeter.chain import CHAIN_COLUMNS, GENESIS, Verdict, verify
from mcpmeter.store.base import Store

_ROWS = f"SELECT id, {', '.join(CHAIN_COLUMNS)}, hash FROM calls WHERE id >= ? ORDER BY id"


def verify_store(store: Store, since: str | None = None) -> Verdict:
    """Walk the chain from the first row (or the first row at or after ``since``), streaming."""
    start = 0
    previous = GENESIS
    if since is not None:
        first = store.query_one("SELECT min(id) FROM calls WHERE ts >= ?", (since,))
        if first is None or first[0] is None:
            return Verdict(0, None, None, None)
        start = int(first[0])
        before = store.query_one("SELECT hash FROM calls WHERE id < ? ORDER BY id DESC LIMIT 1", (start,))
        if before is not None:
            previous = before[0] or GENESIS
    return verify(store.query(_ROWS, (start,), batch=5000), previous)
