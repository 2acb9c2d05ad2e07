"""The embedded default store: one SQLite file in WAL mode.

Many ``wrap`` processes may write the same file at once: each writes whole batches inside
``BEGIN IMMEDIATE`` (one writer at a time, the others wait up to ``busy_timeout``), and
readers (``export``, ``tail``) never block them thanks to WAL.

The path must name a regular file (or, to create one, a new name in a directory): a device
such as ``/dev/null``, a directory or a pipe is refused before SQLite creates anything beside
it, and so are SQLite's URI (``file:...``) and ``:memory:`` names.

Read commands (``create=False``) open the store read-write when they can write its file and
directory, so an older schema is migrated. When they cannot (a read-only filesystem or
mount, a directory of someone else's), the store opens read-only instead: ``mode=ro``,
which reads the write-ahead log through its existing ``-shm`` file, and, when that cannot
open (no ``-shm`` and no right to create one), ``immutable=1``, which reads the main file
without locks or the log. Nothing is created, switched to WAL or migrated then; a store
whose schema needs a migration cannot be read that way and says so.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcpmeter.errors import StoreError, UsageError
from mcpmeter.log import warn
from mcpmeter.record import COLUMNS, INSERT_COLUMNS, STORED_FIELDS, CallRecord, iso_utc
from mcpmeter.store.base import BatchMark, CallFilter, forget_writer, loadable, record_mark
from mcpmeter.store.chain import CHAIN_COLUMNS, GENESIS, chained
from mcpmeter.store.migrations import MIGRATIONS

if TYPE_CHECKING:
    from mcpmeter.store.spill import Spilled

_PLACEHOLDERS = ", ".join("?" for _ in INSERT_COLUMNS)
_INSERT = f"INSERT INTO calls ({', '.join(INSERT_COLUMNS)}, hash) VALUES ({_PLACEHOLDERS}, ?)"
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM calls"
assert INSERT_COLUMNS[0] == "ts" and CHAIN_COLUMNS == INSERT_COLUMNS

BUSY_TIMEOUT_S = 10.0


class SQLiteStore:
    """A SQLite file holding the audit log. Not thread-safe: one instance per thread."""

    def __init__(self, path: str, *, create: bool = True, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        self.location = path
        #: True when opened read-only (see the module doc): every write fails.
        self.read_only = False
        file = Path(path)
        exists = check_store_path(path)
        if not create and not exists:
            raise StoreError(f"no store at {path} (nothing recorded yet? set --db or MCPMETER_DB)")
        if not create and not _writable(file):
            self._db = _open_read_only(path, busy_timeout)
            self.read_only = True
            return
        try:
            if create:
                _create_private(file)
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        try:
            self._configure()
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot use store {path}: {exc}") from exc

    # -- set-up ----------------------------------------------------------------------------

    def _configure(self) -> None:
        db = self._db
        # Switching to WAL needs a moment alone with the file; retry while others hold it.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if mode != "wal":
            raise StoreError(f"store {self.location} cannot use WAL mode (journal_mode={mode})")
        db.execute("PRAGMA synchronous=NORMAL")

    def _schema_is_current(self) -> bool:
        """Whether every migration is applied (a plain read: readers never take the write lock)."""
        return _schema_is_current(self._db)

    def _migrate(self) -> None:
        if self._schema_is_current():
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            applied = {row[0] for row in db.execute("SELECT version FROM schema_version")}
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                for statement in migration.sqlite:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, iso_utc(time.time())),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- writing ---------------------------------------------------------------------------

    def write_calls(self, records: Sequence[CallRecord], mark: BatchMark | None = None) -> int | None:
        """Insert ``records`` in order, extending the hash chain, in one write transaction;
        with ``mark``, record it (see :class:`~mcpmeter.store.base.BatchMark`)."""
        if not records and mark is None:
            return None
        with self.transaction():  # the write lock serialises the chain across processes
            committed = None if mark is None else record_mark(self._one, self._db.execute, mark)
            if records:
                self._insert_calls(records)
            return committed

    def load_spill(self, file_id: str, batches: Sequence[Spilled]) -> int:
        """Insert a spill file's rows unless a file with this id was loaded before.

        The rows and the file's id are committed together, so loading the same spill file
        twice (say after a crash between the commit and the file's removal) adds nothing;
        batches that reached the store after all are skipped. Returns the rows inserted.
        """
        with self.transaction():
            seen = self._db.execute("SELECT 1 FROM spill_loads WHERE file_id = ?", (file_id,)).fetchone()
            if seen:
                return 0
            records = loadable(self._one, batches)
            if records:
                self._insert_calls(records)
            self._db.execute(
                "INSERT INTO spill_loads (file_id, rows, loaded_at) VALUES (?, ?, ?)",
                (file_id, len(records), iso_utc(time.time())),
            )
            return len(records)

    def forget_writer(self, writer: str) -> None:
        with self.transaction():
            forget_writer(self._db.execute, writer)

    def interrupt(self) -> None:
        """Abort what this connection runs now (from another thread)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.interrupt()

    def _one(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        row = self._db.execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    def _insert_calls(self, records: Sequence[CallRecord]) -> None:
        last = self._db.execute("SELECT hash FROM calls ORDER BY id DESC LIMIT 1").fetchone()
        previous = (last[0] or GENESIS) if last else GENESIS
        rows = [[iso_utc(r[0]), *r[1:STORED_FIELDS]] for r in records]
        self._db.executemany(_INSERT, chained(previous, rows))

    # -- generic access for the query modules (ledger, prices, report, tail) ------------------
    #
    # SQL is written with ``?`` placeholders in the subset both SQLite and Postgres run;
    # the Postgres store translates placeholders. ``dialect`` names the engine for the few
    # places that must differ.

    dialect = "sqlite"

    def query(self, sql: str, params: Sequence[Any] = (), batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        """Rows of a read query, streamed."""
        cursor = self._db.execute(sql, params)
        try:
            while rows := cursor.fetchmany(batch):
                yield from rows
        finally:
            cursor.close()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self._db.execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SQLiteStore]:
        """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on error."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield self
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement (inside :meth:`transaction`, or on its own); the rows it changed."""
        return self._db.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        return self._db.executemany(sql, rows).rowcount

    # -- reading ---------------------------------------------------------------------------

    def iter_calls(self, where: CallFilter, batch: int = 1000) -> Iterator[tuple[Any, ...]]:
        clause, params = where.where()
        cursor = self._db.execute(f"{_SELECT}{clause} ORDER BY id", params)
        try:
            while rows := cursor.fetchmany(batch):
                yield from rows
        finally:
            cursor.close()

    def count_calls(self, where: CallFilter | None = None) -> int:
        clause, params = (where or CallFilter()).where()
        return int(self._db.execute(f"SELECT count(*) FROM calls{clause}", params).fetchone()[0])

    def schema_versions(self) -> list[tuple[int, str]]:
        return [
            (int(v), str(n))
            for v, n in self._db.execute("SELECT version, name FROM schema_version ORDER BY version")
        ]

    def close(self) -> None:
        self._db.close()


def check_store_path(path: str) -> bool:
    """Refuse a location that cannot be a store file (:class:`UsageError`); whether it exists.

    Checked before SQLite opens anything: given ``/dev/null`` it would create
    ``/dev/null-journal``, given ``file:x?mode=memory`` (without URI parsing) a directory
    ``file:``.
    """
    if path.startswith("file:"):
        raise UsageError(f"store {path}: SQLite URI filenames are not supported; give the store's file path")
    if path in ("", ":memory:"):
        raise UsageError(
            f"store {path or '(empty)'}: an in-memory database cannot be a store; give a file path"
        )
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise UsageError(f"store {path} is {kind}: give the path of a store file (or of a new one)")
    return True


def _writable(file: Path) -> bool:
    """Whether this process may write the store's file and create files beside it."""
    return os.access(file, os.W_OK) and os.access(file.parent, os.W_OK | os.X_OK)


def _schema_is_current(db: sqlite3.Connection) -> bool:
    try:
        applied = {row[0] for row in db.execute("SELECT version FROM schema_version")}
    except sqlite3.OperationalError:  # no schema_version yet
        return False
    return all(m.version in applied for m in MIGRATIONS)


def _open_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
    """A read-only connection to the store at ``path`` (see the module doc), schema checked."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    problem: sqlite3.Error | None = None
    for suffix in ("", "&immutable=1"):
        try:
            db = sqlite3.connect(
                uri + suffix, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            problem = exc
            continue
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # where a missing -shm shows
        except sqlite3.OperationalError as exc:
            db.close()
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
                raise StoreError(f"cannot read store {path}: {exc}") from None
            problem = exc
            continue
        if not _schema_is_current(db):
            db.close()
            raise StoreError(
                f"store {path} is read-only here and its schema is not this mcpmeter's (an older"
                " store, or not a store): open it once where it can be written, to bring it up to date"
            )
        if suffix and _wal_bytes(path):
            warn(
                f"reading store {path} without its write-ahead log ({path}-wal cannot be read"
                " here without a -shm file): rows not yet checkpointed are not shown"
            )
        return db
    raise StoreError(f"cannot open store {path} read-only: {problem}")


def _wal_bytes(path: str) -> int:
    try:
        return os.stat(f"{path}-wal").st_size
    except OSError:
        return 0


def _create_private(file: Path) -> None:
    """The store's directory (0700 when made here) and file (0600 when made here).

    SQLite gives its -wal and -shm files the main file's mode, so the whole store is private.
    """
    if not file.parent.exists():
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
