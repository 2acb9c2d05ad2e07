"""What every store offers the rest of mcpmeter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from mcpmeter.record import CallRecord, iso_utc

if TYPE_CHECKING:
    from mcpmeter.store.spill import Spilled


@dataclass(frozen=True, slots=True)
class CallFilter:
    """Row filters shared by ``export``, ``tail`` and ``report``. None means any."""

    since: str | None = None  # ISO-8601 UTC, inclusive
    until: str | None = None  # ISO-8601 UTC, exclusive
    project_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None
    tool: str | None = None
    status: str | None = None
    after_id: int | None = None

    def clauses(self, alias: str = "", placeholder: str = "?") -> tuple[list[str], list[Any]]:
        """The conditions on ``calls`` (columns prefixed with ``alias``, e.g. ``"c."``) and their
        parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, op, value in (
            ("ts", ">=", self.since),
            ("ts", "<", self.until),
            ("project_id", "=", self.project_id),
            ("agent_id", "=", self.agent_id),
            ("session_id", "=", self.session_id),
            ("tool", "=", self.tool),
            ("status", "=", self.status),
            ("id", ">", self.after_id),
        ):
            if value is not None:
                clauses.append(f"{alias}{column} {op} {placeholder}")
                params.append(value)
        return clauses, params

    def where(self, placeholder: str = "?") -> tuple[str, list[Any]]:
        """A SQL ``WHERE`` clause (or "") and its parameters."""
        clauses, params = self.clauses(placeholder=placeholder)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


class BatchMark(NamedTuple):
    """What an audit writer's write records beside its rows, so a spill loads exactly once.

    ``batch`` numbers the writer's writes (increasing, never reused); the write sets its
    writer's row in ``audit_writers`` to it. ``unresolved`` are earlier writes of this
    writer that failed but may have committed (their rows were spilled): the write reads
    the writer's last committed number first, and when it is one of them, records it in
    ``spill_voids`` so that recovery skips that batch's spilled copy.
    """

    writer: str
    batch: int
    unresolved: tuple[int, ...] = ()


_LAST_BATCH = "SELECT batch FROM audit_writers WHERE writer_id = ?"
_SET_BATCH = (
    "INSERT INTO audit_writers (writer_id, batch, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (writer_id) DO UPDATE SET batch = excluded.batch, updated_at = excluded.updated_at"
)
_VOID = "INSERT INTO spill_voids (writer_id, batch) VALUES (?, ?) ON CONFLICT DO NOTHING"
_IS_VOID = "SELECT 1 FROM spill_voids WHERE writer_id = ? AND batch = ?"


def record_mark(
    one: Callable[[str, Sequence[Any]], tuple[Any, ...] | None],
    run: Callable[[str, Sequence[Any]], object],
    mark: BatchMark,
) -> int | None:
    """Inside a write transaction: record ``mark``; return the unresolved batch found committed.

    ``one`` and ``run`` execute SQL written with ``?`` placeholders on the transaction's
    connection (one row, or none).
    """
    committed = None
    if mark.unresolved:
        row = one(_LAST_BATCH, (mark.writer,))
        if row is not None and row[0] in mark.unresolved:
            committed = int(row[0])
            run(_VOID, (mark.writer, committed))
    run(_SET_BATCH, (mark.writer, mark.batch, iso_utc(time.time())))
    return committed


def spilled_committed(
    one: Callable[[str, Sequence[Any]], tuple[Any, ...] | None], writer: str, batch: int
) -> bool:
    """Whether a spilled batch reached the store after all (see :class:`BatchMark`)."""
    row = one(_LAST_BATCH, (writer,))
    if row is not None and row[0] == batch:
        return True
    return one(_IS_VOID, (writer, batch)) is not None


def forget_writer(run: Callable[[str, Sequence[Any]], object], writer: str) -> None:
    """A writer that spilled nothing no longer needs its row."""
    run("DELETE FROM audit_writers WHERE writer_id = ?", (writer,))


def loadable(
    one: Callable[[str, Sequence[Any]], tuple[Any, ...] | None], batches: Sequence[Spilled]
) -> list[CallRecord]:
    """The records of ``batches`` that are not in the store yet, in order."""
    records: list[CallRecord] = []
    for spilled in batches:
        if spilled.batch is not None and spilled_committed(one, spilled.writer, spilled.batch):
            continue
        records.extend(spilled.records)
    return records


class Store(Protocol):
    """A place rows are written to (by one writer per process) and read from.

    Query modules use :meth:`query`, :meth:`execute` and :meth:`transaction` with SQL that
    both engines run (``?`` placeholders: a bare ``?`` is always a parameter; Postgres gets
    ``%s``, see :func:`mcpmeter.store.postgres.translate`); ``dialect`` (``"sqlite"`` or
    ``"postgres"``) names the engine where they differ. A :meth:`transaction` is serialised
    with every other store's transaction on both engines: read-then-write inside one is safe.
    """

    location: str
    dialect: str

    def query(self, sql: str, params: Sequence[Any] = (), batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        """Rows of a read query, streamed."""

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None: ...

    def transaction(self) -> AbstractContextManager[Store]:
        """A write transaction: committed on success, rolled back on error."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int: ...

    def write_calls(self, records: Sequence[CallRecord], mark: BatchMark | None = None) -> int | None:
        """Insert ``records`` in one transaction, in order, extending the hash chain; with
        ``mark``, record it (see :class:`BatchMark`) and return the unresolved batch found
        committed, if any."""

    def load_spill(self, file_id: str, batches: Sequence[Spilled]) -> int:
        """Insert a spill file's rows unless ``file_id`` was loaded before, skipping batches
        already in the store (one transaction). Returns the rows inserted."""

    def forget_writer(self, writer: str) -> None:
        """Drop ``writer``'s row in ``audit_writers`` (it spilled nothing)."""

    def interrupt(self) -> None:
        """From another thread: make a call blocked on this store fail soon (best effort)."""

    def iter_calls(self, where: CallFilter, batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        """Rows matching ``where`` in id order, every column of ``record.COLUMNS``, streamed."""

    def schema_versions(self) -> list[tuple[int, str]]:
        """The migrations applied, as (version, name)."""

    def close(self) -> None: ...
