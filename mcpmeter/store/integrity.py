"""``mcpmeter verify`` and ``mcpmeter store recover``: checking and repairing the audit log.

:func:`check_store` walks the chain (:mod:`mcpmeter.store.chain`, plain or keyed) and checks two
things a chain cannot show by itself:

Id gaps. A row deleted from the middle breaks the chain, unless whoever deleted it also
recomputed the hashes after it; rows deleted from the end, then more rows written, leave an
intact chain. Both leave ids missing. Whether a gap is a failure depends on the engine:

- SQLite: ``calls.id`` is ``INTEGER PRIMARY KEY AUTOINCREMENT``, so an id is never reused, and
  the counter (``sqlite_sequence``) is updated in the write's own transaction: a write that
  fails is rolled back whole, counter included, so no id is ever skipped. A gap means rows
  were deleted: it fails. The counter also tells how many ids were drawn, so rows deleted
  from the end show as a gap after the last row (unless the counter was edited too).
- Postgres: ``calls.id`` is an identity sequence, and a sequence is not transactional: a
  batch rolled back (a lost connection, a lock timeout, then a spill) has drawn ids that no
  row will carry. A gap is legitimate there: it is reported as a warning, never a failure.

The head checkpoint. ``head`` (an id and the hash that row had, as ``verify`` prints it on
success) fails the check when that row is gone (the log was cut back) or its hash differs.
The hash of a row pins every row up to it, so a checkpoint kept where the store's writers
cannot reach catches the one thing the chain and the gaps cannot: rows deleted from the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator, Sequence
from typing import Any, NamedTuple

from mcpmeter.errors import UsageError
from mcpmeter.store.base import Store
from mcpmeter.store.chain import (
    CHAIN_COLUMNS,
    CONFIGURED,
    GENESIS,
    NO_KEY_TO_REQUIRE,
    Key,
    Verdict,
    resolve_key,
    verify,
)

_ROWS = f"SELECT id, {', '.join(CHAIN_COLUMNS)}, hash FROM calls WHERE id >= ? ORDER BY id"
_IDS = "SELECT id FROM calls WHERE id > ? ORDER BY id"
#: Gap ranges kept (and so printed); the count and the number of ids missing are exact.
MAX_GAP_RANGES = 10


class Gaps(NamedTuple):
    """Ids missing between the rows walked (and, on SQLite, after the last one)."""

    ranges: tuple[tuple[int, int], ...] = ()  # the first MAX_GAP_RANGES, each (first, last) id
    total: int = 0  # ranges in all
    ids: int = 0  # ids missing in all

    def describe(self) -> str:
        """``ids missing: 8..10, 15 (2 gaps, 4 ids)``."""
        shown = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in self.ranges)
        more = f", ... (the first {len(self.ranges)} of " if self.total > len(self.ranges) else " ("
        gaps = "gap" if self.total == 1 else "gaps"
        ids = "id" if self.ids == 1 else "ids"
        return f"ids missing: {shown}{more}{self.total} {gaps}, {self.ids} {ids})"


class Head(NamedTuple):
    """A checkpoint: a row's id and the hash it had."""

    id: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Head:
        """``ID:HASH`` (a keyed hash has a colon of its own: the first colon splits)."""
        row_id, sep, digest = text.strip().partition(":")
        if not sep or not row_id.isdigit() or int(row_id) < 1 or not digest:
            raise UsageError(f"--head takes ID:HASH (verify prints them as 'head ID HASH'), not {text!r}")
        return cls(int(row_id), digest)


class Check(NamedTuple):
    """What :func:`check_store` found."""

    verdict: Verdict
    gaps: Gaps
    #: Whether a gap fails the check on this engine (SQLite) or is a warning (Postgres).
    gaps_fail: bool
    #: Why the head checkpoint does not hold, or None (held, or none given).
    head_problem: str | None = None

    @property
    def failed(self) -> bool:
        return (
            self.verdict.broken is not None
            or self.head_problem is not None
            or (self.gaps_fail and self.gaps.total > 0)
        )


class _GapTracker:
    def __init__(self, after: int) -> None:
        self.last = after  # the last id seen (0 before the first row)
        self.ranges: list[tuple[int, int]] = []
        self.count = 0
        self.ids = 0

    def see(self, row_id: int) -> None:
        if row_id > self.last + 1:
            self.missing(self.last + 1, row_id - 1)
        self.last = max(self.last, row_id)

    def missing(self, first: int, last: int) -> None:
        self.count += 1
        self.ids += last - first + 1
        if len(self.ranges) < MAX_GAP_RANGES:
            self.ranges.append((first, last))

    def gaps(self) -> Gaps:
        return Gaps(tuple(self.ranges), self.count, self.ids)


def verify_store(
    store: Store, since: str | None = None, *, key: Key = CONFIGURED, require_key: bool = False
) -> Verdict:
    """Walk the chain from the first row (or the first row at or after ``since``), streaming."""
    return check_store(store, since, key=key, require_key=require_key, gaps=False).verdict


def check_store(
    store: Store,
    since: str | None = None,
    *,
    key: Key = CONFIGURED,
    require_key: bool = False,
    head: Head | None = None,
    gaps: bool = True,
) -> Check:
    """Walk the chain as :func:`verify_store` does; find id gaps; check the ``head`` checkpoint."""
    secret = resolve_key(key)
    if require_key and secret is None:
        raise UsageError(NO_KEY_TO_REQUIRE)
    tracker = _GapTracker(0)
    start, previous = 0, GENESIS
    verdict: Verdict | None = None
    if since is not None:
        first = store.query_one("SELECT min(id) FROM calls WHERE ts >= ?", (since,))
        if first is None or first[0] is None:
            verdict = Verdict(0, None, None, None, with_key=secret is not None)
            last = store.query_one("SELECT max(id) FROM calls")
            tracker.last = int(last[0]) if last is not None and last[0] is not None else 0
        else:
            start = int(first[0])
            before = store.query_one(
                "SELECT id, hash FROM calls WHERE id < ? ORDER BY id DESC LIMIT 1", (start,)
            )
            if before is not None:
                tracker.last = int(before[0])
                previous = before[1] or GENESIS
    if verdict is None:
        walked = _tracked(store.query(_ROWS, (start,), batch=5000), tracker)
        with contextlib.closing(walked):
            verdict = verify(walked, previous, key=secret, require_key=require_key)
        if gaps and verdict.broken is not None:  # the walk stopped early: the ids after it
            for (row_id,) in store.query(_IDS, (tracker.last,), batch=5000):
                tracker.see(int(row_id))
    gaps_fail = store.dialect == "sqlite"
    if gaps and gaps_fail:
        drawn = store.query_one("SELECT seq FROM sqlite_sequence WHERE name = 'calls'")
        if drawn is not None and drawn[0] is not None and int(drawn[0]) > tracker.last:
            tracker.missing(tracker.last + 1, int(drawn[0]))
    head_problem = _check_head(store, head) if head is not None else None
    return Check(verdict, tracker.gaps() if gaps else Gaps(), gaps_fail, head_problem)


def _tracked(rows: Iterator[Sequence[Any]], tracker: _GapTracker) -> Generator[Sequence[Any], None, None]:
    try:
        for row in rows:
            tracker.see(int(row[0]))
            yield row
    finally:  # Postgres takes no other call while a query is being read
        close = getattr(rows, "close", None)
        if close is not None:
            close()


def _check_head(store: Store, head: Head) -> str | None:
    row = store.query_one("SELECT hash FROM calls WHERE id = ?", (head.id,))
    if row is None:
        last = store.query_one("SELECT max(id) FROM calls")
        end = int(last[0]) if last is not None and last[0] is not None else None
        if end is None:
            return f"the checkpoint's row {head.id} is gone: the log is empty (truncated)"
        if end < head.id:
            return f"the checkpoint's row {head.id} is gone: the log ends at row {end} (truncated)"
        return f"the checkpoint's row {head.id} is gone: it was deleted"
    stored = row[0]
    if stored != head.hash:
        shown = "no hash" if stored is None else f"hash {_short(stored)}"
        return (
            f"the checkpoint's row {head.id} has {shown}, not {_short(head.hash)}: "
            "it or a row before it was rewritten"
        )
    return None


def _short(digest: str) -> str:
    return digest if len(digest) <= 24 else digest[:24] + "..."
