"""The fleet store: one PostgreSQL database (psycopg 3) written by many ``wrap`` processes on many hosts.

``MCPMETER_DB=postgresql://user@host:5432/db`` selects it (install ``mcpmeter[postgres]``). The
tables live in the first schema of the connection's ``search_path``, so
``?options=-csearch_path%3Dmeter`` puts a store in schema ``meter``.

Placeholders. Query modules write SQL once, with ``?`` placeholders, for both engines. This
store translates it in :func:`translate` (cached): outside quoted text, ``?`` becomes ``%s``
and ``%`` becomes ``%%``; inside ``'string literals'``, ``"identifiers"`` and comments only
``%`` is doubled. So a literal ``'?'`` stays a question mark. The rule for SQL meant for both
engines: a bare ``?`` is always a parameter (do not use Postgres' jsonb ``?`` operators; use
``jsonb_exists``), and no backslash escapes in ``E'...'`` strings (double the quote instead).

The hash chain. Every batch is written in one READ COMMITTED transaction that first takes
``pg_advisory_xact_lock(CHAIN_LOCK, hashtext(current_schema()))``, then reads the last row's
hash, then inserts the batch (one ``COPY``) with the hashes computed here. Only a holder of
that lock inserts into ``calls``, so ids (an identity sequence) are drawn by one transaction
at a time: a later holder's ids are all greater than an earlier one's, and id order is
commit order. (A sequence alone is not enough: two transactions drawing ids concurrently may
commit in the other order, and the chain would fork.) The lock is released only after the
commit is visible, and in READ COMMITTED the next holder's hash read takes a fresh snapshot
after it got the lock, so it sees the previous batch. A rolled-back batch leaves a gap in the
ids, never a break in the chain. Waiting for the lock is bounded by ``lock_timeout``; past
it the write fails and the audit writer spills the batch.

Other writes. :meth:`PostgresStore.transaction` takes another advisory lock
(``WRITE_LOCK``), so the query modules' read-then-write transactions are serialised as
SQLite's ``BEGIN IMMEDIATE`` serialises them, without making the audit writers wait.

Migrations run under the session lock ``pg_advisory_lock(MIGRATION_LOCK, ...)``: of ten
processes starting at once, one applies them (each in its own transaction, recorded by name
in ``schema_version``) and the others find them applied once they get the lock. A store
already up to date takes no lock.

Connection loss. Any error of the connection surfaces as a :class:`StoreError` (one line)
from the call that met it: the audit writer then spills that batch to its JSONL file. The
next call reconnects; if that fails too, calls fail fast (no connection attempt) for a
back-off that doubles from ``RECONNECT_MIN_S`` up to ``RECONNECT_MAX_S``, so a writer whose
database is down spills at once instead of waiting on every batch. Once reconnected, the
writer loads its spill file back.

Reads. :meth:`PostgresStore.query` streams (libpq's chunked or single-row mode), so memory
stays flat on any number of rows; while a query is being read, the store takes no other
call (finish or close the iterator first). ``numeric`` results (``sum`` and ``avg`` of
integers) load as ``int`` when whole and ``float`` otherwise, as SQLite returns them.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.adapt import Buffer, Loader

from mcpmeter.errors import StoreError
from mcpmeter.record import COLUMNS, INSERT_COLUMNS, STORED_FIELDS, CallRecord, iso_utc
from mcpmeter.store.base import BatchMark, CallFilter, forget_writer, loadable, record_mark
from mcpmeter.store.chain import CHAIN_COLUMNS, GENESIS, chain
from mcpmeter.store.migrations import MIGRATIONS

if TYPE_CHECKING:
    from mcpmeter.store.spill import Spilled

assert INSERT_COLUMNS[0] == "ts" and CHAIN_COLUMNS == INSERT_COLUMNS

#: Advisory lock classes ('mcpm' + n), each paired with ``hashtext(current_schema())``: stores
#: in different schemas of one database do not wait for each other.
CHAIN_LOCK = 0x6D63_7001
WRITE_LOCK = 0x6D63_7002
MIGRATION_LOCK = 0x6D63_7003

CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT_S = 10.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0

_COPY = f"COPY calls ({', '.join(INSERT_COLUMNS)}, hash) FROM STDIN"
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM calls"
_LAST_HASH = "SELECT hash FROM calls ORDER BY id DESC LIMIT 1"
#: libpq 17 fetches a streamed result in chunks; older ones row by row.
_CHUNKED = psycopg.pq.version() >= 170000

_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|[?%]""", re.DOTALL)


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """``sql`` with ``?`` placeholders, in psycopg's ``%s`` style (see the module docstring)."""

    def token(match: re.Match[str]) -> str:
        text = match.group()
        if text == "?":
            return "%s"
        return text.replace("%", "%%")

    return _TOKENS.sub(token, sql)


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    return re.sub(r"^([a-z]+://[^:/@]*):[^@]*@", r"\1:***@", url)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class _NumberLoader(Loader):
    """``numeric`` as ``int`` when whole, else ``float`` (as SQLite returns sums and averages)."""

    def load(self, data: Buffer) -> int | float:
        text = bytes(data)
        return int(text) if text.lstrip(b"-").isdigit() else float(text)


class PostgresStore:
    """A Postgres database holding the audit log. Not thread-safe: one instance per thread."""

    dialect = "postgres"

    def __init__(
        self,
        url: str,
        *,
        create: bool = True,
        connect_timeout: int = CONNECT_TIMEOUT_S,
        lock_timeout: float = LOCK_TIMEOUT_S,
    ) -> None:
        # ``create`` is accepted for parity with SQLite: the database must exist, and its
        # tables are created (migrated) whenever the store is opened.
        self.location = redact(url)
        self._url = url
        self._connect_timeout = connect_timeout
        self._lock_timeout_ms = max(1, round(lock_timeout * 1000))
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        self._depth = 0  # open transactions
        self._streaming = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self._conn = self._connect()
        try:
            with self._errors("cannot migrate"):
                self._migrate(self._conn)
        except BaseException:
            self.close()
            raise

    # -- the connection ----------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        extra: dict[str, Any] = {}
        if "connect_timeout" not in self._url:
            extra["connect_timeout"] = self._connect_timeout
        if "application_name" not in self._url:
            extra["application_name"] = "mcpmeter"
        try:
            conn = psycopg.connect(self._url, autocommit=True, **extra)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to store {self.location}: {_one_line(exc)}") from exc
        conn.adapters.register_loader("numeric", _NumberLoader)
        return conn

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The open connection; a new one if it was lost (with back-off after a failed attempt)."""
        if self._streaming:
            raise StoreError("a query on this store is still being read: finish or close it first")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if self._depth:
            raise StoreError(f"lost the connection to store {self.location} inside a transaction")
        if conn is not None:
            conn.close()
            self._conn = None
        now = time.monotonic()
        if now < self._retry_at:
            raise StoreError(
                f"store {self.location} is unreachable; next attempt in {self._retry_at - now:.1f} s"
            )
        try:
            self._conn = self._connect()
        except StoreError:
            self._backoff = min(RECONNECT_MAX_S, max(RECONNECT_MIN_S, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            raise
        self._backoff = 0.0
        self._retry_at = 0.0
        return self._conn

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Database errors as one-line :class:`StoreError` s (the rest pass through)."""
        try:
            yield
        except psycopg.Error as exc:
            raise StoreError(f"{action} store {self.location}: {_one_line(exc)}") from exc

    def _migrate(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        wanted = {m.version for m in MIGRATIONS}
        if wanted <= self._applied(conn):
            return  # the common case: no lock, no write
        lock = f"{MIGRATION_LOCK}, hashtext(current_schema())"
        conn.execute(f"SELECT pg_advisory_lock({lock})")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            applied = self._applied(conn)  # another process may have applied them meanwhile
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                with conn.transaction():
                    for statement in migration.postgres:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, iso_utc(time.time())),
                    )
        finally:
            if not conn.broken:
                conn.execute(f"SELECT pg_advisory_unlock({lock})")

    @staticmethod
    def _applied(conn: psycopg.Connection[tuple[Any, ...]]) -> set[int]:
        exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return set()
        return {int(v) for (v,) in conn.execute("SELECT version FROM schema_version")}

    @contextlib.contextmanager
    def _locked(self, lock: int, action: str) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A transaction holding the advisory lock ``lock`` (waiting at most ``lock_timeout``)."""
        with self._errors(action):
            conn = self._connection()
            with conn.transaction():
                self._depth += 1
                try:
                    conn.execute(
                        f"SET LOCAL lock_timeout = {self._lock_timeout_ms};"
                        f" SELECT pg_advisory_xact_lock({lock}, hashtext(current_schema()))"
                    )
                    yield conn
                finally:
                    self._depth -= 1

    # -- writing -----------------------------------------------------------------------------

    def write_calls(self, records: Sequence[CallRecord], mark: BatchMark | None = None) -> int | None:
        """Insert ``records`` in order, extending the hash chain, in one transaction; with
        ``mark``, record it (see :class:`~mcpmeter.store.base.BatchMark`)."""
        if not records and mark is None:
            return None
        with self._locked(CHAIN_LOCK, "cannot write to") as conn:
            committed = None
            if mark is not None:
                committed = record_mark(_one(conn), _run(conn), mark)
            if records:
                self._insert_calls(conn, records)
            return committed

    def load_spill(self, file_id: str, batches: Sequence[Spilled]) -> int:
        """Insert a spill file's rows unless a file with this id was loaded before.

        The rows and the file's id are committed together (see :class:`SQLiteStore`).
        """
        with self._locked(CHAIN_LOCK, "cannot load spilled rows into") as conn:
            if conn.execute("SELECT 1 FROM spill_loads WHERE file_id = %s", (file_id,)).fetchone():
                return 0
            records = loadable(_one(conn), batches)
            if records:
                self._insert_calls(conn, records)
            conn.execute(
                "INSERT INTO spill_loads (file_id, rows, loaded_at) VALUES (%s, %s, %s)",
                (file_id, len(records), iso_utc(time.time())),
            )
            return len(records)

    def forget_writer(self, writer: str) -> None:
        with self._locked(WRITE_LOCK, "cannot write to") as conn:
            forget_writer(_run(conn), writer)

    def interrupt(self) -> None:
        """Cancel what this connection runs now (from another thread; best effort)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                conn.cancel_safe(timeout=0.5)

    @staticmethod
    def _insert_calls(conn: psycopg.Connection[tuple[Any, ...]], records: Sequence[CallRecord]) -> None:
        rows = [(iso_utc(r[0]), *r[1:STORED_FIELDS]) for r in records]
        last = conn.execute(_LAST_HASH).fetchone()
        hashes = chain((last[0] or GENESIS) if last else GENESIS, rows)
        with conn.cursor() as cursor, cursor.copy(_COPY) as copy:
            write_row = copy.write_row
            for row, digest in zip(rows, hashes, strict=True):
                write_row((*row, digest))

    # -- generic access for the query modules (ledger, prices, report, tail) -------------------

    def query(self, sql: str, params: Sequence[Any] = (), batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        """Rows of a read query, streamed."""
        with self._errors("cannot read"):
            conn = self._connection()
            self._streaming = True
            try:
                cursor = conn.cursor()
                try:
                    yield from cursor.stream(translate(sql), params, size=batch if _CHUNKED else 1)
                finally:
                    cursor.close()
            finally:
                self._streaming = False

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._errors("cannot read"):
            return self._connection().execute(translate(sql), params).fetchone()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresStore]:
        """A write transaction, serialised with every other store's (an advisory lock)."""
        with self._locked(WRITE_LOCK, "cannot write to"):
            yield self

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement (inside :meth:`transaction`, or on its own); the rows it changed."""
        with self._errors("cannot write to"):
            return self._connection().execute(translate(sql), params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """One statement for each of ``rows`` (pipelined); the rows changed in all."""
        with self._errors("cannot write to"), self._connection().cursor() as cursor:
            cursor.executemany(translate(sql), rows)
            return cursor.rowcount

    # -- reading -----------------------------------------------------------------------------

    def iter_calls(self, where: CallFilter, batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        clause, params = where.where()
        return self.query(f"{_SELECT}{clause} ORDER BY id", params, batch)

    def count_calls(self, where: CallFilter | None = None) -> int:
        clause, params = (where or CallFilter()).where()
        row = self.query_one(f"SELECT count(*) FROM calls{clause}", params)
        return int(row[0]) if row else 0

    def schema_versions(self) -> list[tuple[int, str]]:
        rows = self.query("SELECT version, name FROM schema_version ORDER BY version")
        return [(int(v), str(n)) for v, n in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _one(conn: psycopg.Connection[tuple[Any, ...]]) -> Any:
    def one(sql: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        return conn.execute(translate(sql), params).fetchone()

    return one


def _run(conn: psycopg.Connection[tuple[Any, ...]]) -> Any:
    def run(sql: str, params: Sequence[Any]) -> object:
        return conn.execute(translate(sql), params)

    return run
