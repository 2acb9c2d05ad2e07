"""What every store offers the rest of mcpmeter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from mcpmeter.record import CallRecord


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

    def write_calls(self, records: Sequence[CallRecord]) -> None:
        """Insert ``records`` in one transaction, in order, extending the hash chain."""

    def load_spill(self, file_id: str, records: Sequence[CallRecord]) -> bool:
        """Insert a spill file's records unless ``file_id`` was loaded before (one transaction)."""

    def iter_calls(self, where: CallFilter, batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        """Rows matching ``where`` in id order, every column of ``record.COLUMNS``, streamed."""

    def schema_versions(self) -> list[tuple[int, str]]:
        """The migrations applied, as (version, name)."""

    def close(self) -> None: ...
