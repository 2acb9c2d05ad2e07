"""The audit writer: settled records go into a queue; one thread writes them in batches.

The relay's only cost per record is a ``deque.append`` (no lock, no wake-up). A background
thread wakes every ``interval`` seconds, drains the queue and writes up to ``max_batch`` rows
per transaction. When the store cannot be written (locked past its timeout, read-only, disk
full), the batch goes to a JSONL spill file beside the store, fsynced, and is loaded back by
the next writer that starts: no row is lost, and the relay never waits for the store.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

import msgspec

from mcpmeter.errors import MeterError
from mcpmeter.log import warn, warn_once
from mcpmeter.record import CallRecord

if TYPE_CHECKING:
    from mcpmeter.store.base import Store

#: Fills ``cost_usd`` on a batch of records (see :func:`mcpmeter.prices.tool_pricer`).
Pricer = Callable[[Sequence[CallRecord]], Sequence[CallRecord]]


class BatchExporter(Protocol):
    """Gets every batch the writer handles (priced, whether stored or spilled), on its thread.

    ``submit`` must not block (hand the batch to a bounded queue of its own); ``close`` is
    called once, after the last batch. See :class:`mcpmeter.otel.SpanExporter`.
    """

    def submit(self, records: Sequence[CallRecord]) -> None: ...

    def close(self) -> None: ...


DEFAULT_INTERVAL_S = 0.05
DEFAULT_MAX_BATCH = 2000


def spill_path_for(location: str) -> Path | None:
    """Where rows go while the store cannot take them.

    Beside a SQLite store (``audit.db`` -> ``audit.db.spill.jsonl``); for a Postgres URL, a
    file under ``$XDG_DATA_HOME/mcpmeter/`` named after the server and database,
    ``spill-<host>[-<port>]-<db>[-<schema>].jsonl`` (the schema when the URL's ``options`` set a
    ``search_path``), so every process writing that database on this host shares it.
    """
    if "://" not in location:
        return Path(location + ".spill.jsonl")
    from mcpmeter.store import default_db

    url = urlsplit(location)
    query = parse_qs(url.query)
    host = url.hostname or (query.get("host") or ["localhost"])[0]
    port = "" if url.port in (None, 5432) else str(url.port)
    parts = [host, port, url.path.lstrip("/") or url.username or ""]
    found = re.search(r"search_path\s*=\s*([^\s,]+)", " ".join(query.get("options", [])))
    if found:
        parts.append(found.group(1))
    name = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", part) for part in parts if part)
    return Path(default_db()).parent / f"spill-{name}.jsonl"


class AuditWriter:
    """Batches records into the store from a background thread. ``put`` is the sink."""

    def __init__(
        self,
        open_store: Callable[[], Store],
        *,
        spill_path: Path | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        pricer: Callable[[Store], Pricer] | None = None,
        on_tick: Callable[[Store], None] | None = None,
        on_unavailable: Callable[[], None] | None = None,
        after_write: Callable[[Store, Sequence[CallRecord]], None] | None = None,
        exporter: BatchExporter | None = None,
    ) -> None:
        self._exporter = exporter
        self._on_tick = on_tick
        self._on_unavailable = on_unavailable
        self._after_write = after_write
        self._open_store = open_store
        self._pricer_factory = pricer
        self._price: Pricer | None = None
        self._spill_path = spill_path
        self._interval = interval
        self._max_batch = max_batch
        self._queue: deque[CallRecord] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcpmeter-audit-writer", daemon=True)
        self._store: Store | None = None
        self.put: Callable[[CallRecord], None] = self._queue.append
        self.written = 0
        self.spilled = 0
        self.recovered = 0
        self._needs_recovery = False

    def start(self) -> AuditWriter:
        self._thread.start()
        return self

    def close(self, timeout: float | None = 30.0) -> None:
        """Write everything queued so far, then stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._queue:  # the thread never ran or gave up: write from here
            self._drain()
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        self._connect()
        while not self._stop.wait(self._interval):
            self._tick()
            self._drain()
        self._drain()

    def _tick(self) -> None:
        """Periodic work for others that needs the store (budgets read which apply)."""
        if self._on_tick is None:
            return
        if self._store is None:
            if self._on_unavailable is not None:
                self._on_unavailable()
            return
        try:
            self._on_tick(self._store)
        except Exception as exc:
            warn_once("tick", f"store check failed: {exc}")

    def _connect(self) -> None:
        try:
            self._store = self._open_store()
        except MeterError as exc:
            warn_once("store-open", f"{exc}; rows go to the spill file until it can be written")
            if self._on_unavailable is not None:
                self._on_unavailable()
            return
        self._recover_spill()
        self._tick()

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch: list[CallRecord] = []
            popleft = queue.popleft
            try:
                while len(batch) < self._max_batch:
                    batch.append(popleft())
            except IndexError:
                pass
            self._write(batch)

    def _write(self, batch: Sequence[CallRecord]) -> None:
        if self._store is None:
            try:
                self._store = self._open_store()
            except MeterError:
                self._export(batch)
                self._spill(batch)
                return
        batch = self._priced(self._store, batch)
        self._export(batch)
        try:
            self._store.write_calls(batch)
            self.written += len(batch)
        except Exception as exc:
            warn_once("store-write", f"cannot write to store {self._store.location}: {exc}; spilling rows")
            self._spill(batch)
            return
        if self._after_write is not None:
            try:
                self._after_write(self._store, batch)
            except Exception as exc:
                warn_once("after-write", f"cannot settle budgets: {exc}")
        if self._needs_recovery:  # the store is back: load what this process spilled
            self._recover_spill()

    def _export(self, batch: Sequence[CallRecord]) -> None:
        if self._exporter is not None:
            try:
                self._exporter.submit(batch)
            except Exception as exc:
                warn_once("export", f"cannot export spans: {exc}")

    def _priced(self, store: Store, batch: Sequence[CallRecord]) -> Sequence[CallRecord]:
        """Fill ``cost_usd`` from the tool prices in force (a pricing failure never costs a row)."""
        if self._pricer_factory is None:
            return batch
        try:
            if self._price is None:
                self._price = self._pricer_factory(store)
            return self._price(batch)
        except Exception as exc:
            warn_once("pricing", f"cannot price tool calls (rows written without cost_usd): {exc}")
            return batch

    # -- spill -----------------------------------------------------------------------------

    def _spill(self, batch: Sequence[CallRecord]) -> None:
        if self._spill_path is None:
            warn(f"lost {len(batch)} audit rows: the store failed and there is no spill file")
            return
        encode = msgspec.json.encode
        data = b"".join(encode(record) + b"\n" for record in batch)
        try:
            self._spill_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._spill_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.spilled += len(batch)
            self._needs_recovery = True
        except OSError as exc:
            warn(f"lost {len(batch)} audit rows: cannot write spill file {self._spill_path}: {exc}")

    def _recover_spill(self) -> None:
        if self._spill_path is None or self._store is None:
            return
        try:
            self.recovered += recover_spill(self._store, self._spill_path)
        except Exception as exc:
            warn(f"cannot load spill files beside {self._store.location}: {exc}; they are left in place")
        self._needs_recovery = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_spill_files(spill_path: Path) -> list[Path]:
    """Rename every loadable spill file to a name this process owns.

    The live spill file (``audit.db.spill.jsonl``) and files left half-loaded by a process
    that died (``audit.db.spill.jsonl.<pid>.loading``) are claimed with an atomic rename, so
    two processes never load the same file.
    """
    mine = os.getpid()
    claimed: list[Path] = []
    candidates = [spill_path, *sorted(spill_path.parent.glob(spill_path.name + ".*.loading"))]
    for index, path in enumerate(candidates):
        if path != spill_path:
            owner = path.name[len(spill_path.name) + 1 : -len(".loading")]
            if owner.isdigit() and (int(owner) == mine or _pid_alive(int(owner))):
                continue
        target = path.with_name(f"{spill_path.name}.{mine}-{index}.loading")
        try:
            os.rename(path, target)
        except OSError:
            continue  # absent, or another process claimed it first
        claimed.append(target)
    return claimed


def recover_spill(store: Store, spill_path: Path) -> int:
    """Load spill files back into ``store``, idempotently. Returns the rows added.

    Each file's rows and its content hash are committed in one transaction, so a file that
    was loaded but not removed (a crash in between) is recognised and not loaded twice. A
    torn last line (a crash while spilling) is skipped with a warning.
    """
    added = 0
    for path in _claim_spill_files(spill_path):
        data = path.read_bytes()
        records: list[CallRecord] = []
        bad = 0
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                records.append(CallRecord(*msgspec.json.decode(line)))
            except (msgspec.DecodeError, TypeError):
                bad += 1
        if bad:
            warn(f"{path}: skipped {bad} unreadable spill lines")
        if store.load_spill(hashlib.sha256(data).hexdigest(), records):
            added += len(records)
        path.unlink()
    return added
