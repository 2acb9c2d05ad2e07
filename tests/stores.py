"""The store backends a parametrized test runs on: a new SQLite file, or a new schema in Postgres.

Postgres is the server at ``MCPMETER_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``).
Each test gets a schema of its own (``search_path`` in the URL's ``options``) and an
``application_name`` of the same name, so that its connections can be found (and ended) and
the schema dropped afterwards. When no Postgres answers, the Postgres cases skip, unless
``MCPMETER_REQUIRE_PG`` is set (CI sets it): then they fail.

Tests read and tamper with the tables through a connection of their own (``Backend.sql``),
never through mcpmeter's store.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from mcpmeter.store import Store, open_store

PG_URL = os.environ.get("MCPMETER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgres")


@functools.cache
def postgres_missing() -> str | None:
    """Why the Postgres cases cannot run here, or None when they can."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"no Postgres at {PG_URL}: {first}"
    return None


def require_postgres() -> None:
    """Skip (or, with ``MCPMETER_REQUIRE_PG``, fail) a test that needs Postgres when none answers."""
    reason = postgres_missing()
    if reason is None:
        return
    if os.environ.get("MCPMETER_REQUIRE_PG"):
        pytest.fail(f"MCPMETER_REQUIRE_PG is set but {reason}")
    pytest.skip(f"{reason} (set MCPMETER_TEST_PG, or MCPMETER_REQUIRE_PG to make this a failure)")


@dataclass
class Backend:
    """One store location and a way to look inside it that does not go through mcpmeter."""

    kind: str
    location: str
    schema: str | None = None

    def open(self, **kwargs: Any) -> Store:
        return open_store(self.location, **kwargs)

    def sql(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one statement (``?`` placeholders) in its own committed transaction; its rows."""
        if self.kind == "sqlite":
            con = sqlite3.connect(self.location)
            try:
                cursor = con.execute(sql, params)
                rows = cursor.fetchall()
                con.commit()
                return rows
            finally:
                con.close()
        import psycopg

        with psycopg.connect(self.location, autocommit=True) as con:
            cursor = con.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def rows(self) -> list[dict[str, Any]]:
        """Every row of ``calls``, in id order, as dicts."""
        if self.kind == "sqlite":
            con = sqlite3.connect(self.location)
            con.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in con.execute("SELECT * FROM calls ORDER BY id")]
            finally:
                con.close()
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.location, row_factory=dict_row) as con:
            return con.execute("SELECT * FROM calls ORDER BY id").fetchall()

    def tables(self) -> list[str]:
        if self.kind == "sqlite":
            return [r[0] for r in self.sql("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [r[0] for r in self.sql("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]

    def indexes(self) -> dict[str, str]:
        """Index name -> its definition."""
        if self.kind == "sqlite":
            found = self.sql("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        else:
            found = self.sql("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()")
        return {str(name): str(definition) for name, definition in found}

    def columns(self, table: str) -> list[str]:
        if self.kind == "sqlite":
            return [r[1] for r in self.sql(f"PRAGMA table_info({table})")]
        return [
            r[0]
            for r in self.sql(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
                table,
            )
        ]

    def plan(self, query: str) -> str:
        """The engine's plan for ``query`` as one string (Postgres: with sequential scans off,
        so that an empty table still shows which index would serve the query)."""
        if self.kind == "sqlite":
            return " ".join(str(row[-1]) for row in self.sql(f"EXPLAIN QUERY PLAN {query}"))
        import psycopg

        with psycopg.connect(self.location, autocommit=True) as con:
            con.execute("SET enable_seqscan = off")
            return " ".join(str(row[0]) for row in con.execute(f"EXPLAIN {query}"))

    @contextlib.contextmanager
    def write_lock_held(self) -> Iterator[None]:
        """Another process holding the lock the store takes to extend the chain."""
        if self.kind == "sqlite":
            con = sqlite3.connect(self.location, isolation_level=None)
            try:
                con.execute("BEGIN IMMEDIATE")
                yield
                con.execute("ROLLBACK")
            finally:
                con.close()
            return
        import psycopg

        from mcpmeter.store.postgres import CHAIN_LOCK

        with psycopg.connect(self.location) as con:
            con.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (CHAIN_LOCK,))
            yield
            con.rollback()

    @contextlib.contextmanager
    def own_role(self) -> Iterator[str]:
        """Postgres: this store's URL as a role of its own (which a test may then lock out)."""
        role = self.schema
        _admin(f"CREATE ROLE {role} LOGIN")
        _admin(f"GRANT ALL ON SCHEMA {role} TO {role}")
        url = urlsplit(self.location)
        netloc = f"{role}@{url.hostname}" + (f":{url.port}" if url.port else "")
        try:
            yield urlunsplit(url._replace(netloc=netloc))
        finally:
            self.end_connections()
            _admin(f"DROP OWNED BY {role} CASCADE")
            _admin(f"DROP ROLE {role}")

    def end_connections(self) -> int:
        """Postgres: end every server process of this test's connections (the server going away)."""
        return len(
            _admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                (self.schema,),
            )
        )


def _admin(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as con:
        cursor = con.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


@contextlib.contextmanager
def make_backend(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """A store location nothing has used yet. Spill files of URL stores go under ``tmp_path``."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if kind == "sqlite":
        yield Backend("sqlite", str(tmp_path / "audit.db"))
        return
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    _admin(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{joiner}options=-csearch_path%3D{schema}&application_name={schema}"
    try:
        yield Backend("postgres", url, schema)
    finally:
        _admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (schema,),
        )
        _admin(f"DROP SCHEMA {schema} CASCADE")


def subprocess_env(backend: Backend, tmp_path: Path) -> dict[str, str]:
    """An environment for ``mcpmeter`` subprocesses: this store, no inherited tags, spill files
    under ``tmp_path`` (where :func:`make_backend` put this process's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = backend.location
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    return env
