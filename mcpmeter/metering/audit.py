"""The audit writer: settled records go into a queue; one thread writes them in batches.

The relay's only cost per record is a ``deque.append`` (no lock, no wake-up). A background
thread wakes every ``interval`` seconds, drains the queue and writes up to ``max_batch`` rows
per transaction. When the store cannot be written (locked past its timeout, read-only, disk
full), the batch goes to a JSONL spill file (:mod:`mcpmeter.store.spill`), fsynced, and is
loaded back by the next writer that starts: no row is lost, and the relay never waits for
the store. When no spill location can be written either, rows wait in memory (bounded).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mcpmeter.errors import MeterError
from mcpmeter.log import warn, warn_once
from mcpmeter.record import CallRecord
from mcpmeter.store.base import BatchMark
from mcpmeter.store.spill import encode_lines, recover_spill, spill_locations, spill_path_for
from mcpmeter.threads import quiet_thread

if TYPE_CHECKING:
    from mcpmeter.store.base import Store

#: Fills ``cost_usd`` on a batch of records (see :func:`mcpmeter.prices.tool_pricer`).
__all__ = [
    "AuditWriter",
    "BatchExporter",
    "Exporting",
    "Pricer",
    "WriterListener",
    "recover_spill",
    "spill_locations",
    "spill_path_for",
]

Pricer = Callable[[Sequence[CallRecord]], Sequence[CallRecord]]


class WriterListener:
    """Told what the audit writer does, on the writer's thread. Each method must return
    quickly (slow work goes to a queue of the listener's own); an exception is reported
    once on stderr and never stops the writer. The defaults do nothing.
    """

    def on_tick(self, store: Store) -> None:
        """The store is open (after each batch, and every interval when idle)."""

    def on_unavailable(self) -> None:
        """The store cannot be opened (the rows go to the spill)."""

    def after_write(self, store: Store, records: Sequence[CallRecord]) -> None:
        """A batch was committed to the store."""

    def on_batch(self, records: Sequence[CallRecord]) -> None:
        """A batch was handled, priced, whether stored or spilled."""

    def close(self) -> None:
        """The writer has stopped: no more calls follow."""


class BatchExporter(Protocol):
    """Gets every batch the writer handles (priced, whether stored or spilled), on its thread.

    ``submit`` must not block (hand the batch to a bounded queue of its own); ``close`` is
    called once, after the last batch. See :class:`mcpmeter.exporters.otel.SpanExporter`.
    """

    def submit(self, records: Sequence[CallRecord]) -> None: ...

    def close(self) -> None: ...


class Exporting(WriterListener):
    """Hands every batch to an exporter (spans and metrics), and closes it with the writer."""

    def __init__(self, exporter: BatchExporter) -> None:
        self._exporter = exporter

    def on_batch(self, records: Sequence[CallRecord]) -> None:
        self._exporter.submit(records)

    def close(self) -> None:
        self._exporter.close()


DEFAULT_INTERVAL_S = 0.05
DEFAULT_MAX_BATCH = 2000
#: Rows kept in memory while neither the store nor any spill location can take them.
MAX_HELD_ROWS = 200_000


class _Batch:
    """Rows taken from the queue: ``number`` is set just before they go to the store."""

    __slots__ = ("number", "records")

    def __init__(self, records: list[CallRecord]) -> None:
        self.number: int | None = None
        self.records: Sequence[CallRecord] = records


class AuditWriter:
    """Batches records into the store from a background thread. ``put`` is the sink.

    Shutdown is bounded: :meth:`close` gives the thread ``timeout`` seconds to write what is
    queued; past that (the store is stuck), or as soon as :meth:`hurry` is called (a signal
    came), the rows not yet written are spilled from the calling thread, fsynced, and the
    writer stops. The spill names each row's write, so a write that was still in flight and
    commits after all is not loaded twice (see :mod:`mcpmeter.store.spill`).
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        *,
        spill_path: Path | None = None,
        spill_paths: Sequence[Path] | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        pricer: Callable[[Store], Pricer] | None = None,
        listeners: Sequence[WriterListener] = (),
        max_held: int = MAX_HELD_ROWS,
    ) -> None:
        #: Told of ticks, batches and the end (budgets, exporters).
        self._listeners = tuple(listeners)
        self._open_store = open_store
        self._pricer_factory = pricer
        self._price: Pricer | None = None
        if spill_paths is None:
            spill_paths = [] if spill_path is None else [spill_path]
        self._spill_paths = list(spill_paths)
        self._spill_at = 0  # the location spilled to last
        self._interval = interval
        self._max_batch = max_batch
        self._max_held = max_held
        self._queue: deque[CallRecord] = deque()
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, name="mcpmeter-audit-writer", daemon=True)
        self._started = False
        self._store: Store | None = None
        self.put: Callable[[CallRecord], None] = self._queue.append
        self.writer_id = uuid.uuid4().hex
        #: Guards the hand-over at shutdown: the batch in flight, the spill files, ``_abandoned``.
        self._lock = threading.Lock()
        self._abandoned = False
        self._inflight: _Batch | None = None
        self._numbers = 0
        self._unresolved: list[int] = []  # failed writes that may have committed after all
        self._held: list[tuple[int | None, Sequence[CallRecord]]] = []
        self._held_rows = 0
        self._marked = False
        self.written = 0
        self.spilled = 0
        self.recovered = 0
        self.lost = 0
        self._needs_recovery = False

    def start(self) -> AuditWriter:
        self._started = True
        self._thread.start()
        return self

    def hurry(self) -> None:
        """Make a :meth:`close` under way spill at once (safe from a signal handler)."""
        self._hurry.set()

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued so far, then stop the thread; spill what is left after
        ``timeout`` seconds (or once :meth:`hurry` is called)."""
        self._stop.set()
        if not self._started:  # never started: write from here
            self._run()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and not self._hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._thread.join(min(remaining, 0.05))
        if self._thread.is_alive():
            self._abandon()
        elif self._store is not None:
            self._store.close()
            self._store = None
        listeners, self._listeners = self._listeners, ()
        for listener in listeners:
            try:
                listener.close()
            except Exception as exc:
                warn_once("listener-close", f"{type(listener).__name__} failed to close: {exc}")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after :meth:`close` gave up on it); whether it did."""
        if self._started:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _abandon(self) -> None:
        """From the closing thread: spill the rows in flight, queued and held; stop writing."""
        with self._lock:
            self._abandoned = True
            inflight, self._inflight = self._inflight, None
            queued = list(self._queue)
            self._queue.clear()
            held, self._held = self._held, []
        batches = list(held)
        if inflight is not None:
            batches.append((inflight.number, inflight.records))
        if queued:
            batches.append((None, queued))
        rows = sum(len(records) for _, records in batches)
        if rows:
            where = self._spill_batches(batches, owned=True)
            if where is not None:
                self.spilled += rows
                warn(f"the store did not answer in time: {rows} audit rows spilled to {where}")
            else:
                self.lost += rows
                warn(f"lost {rows} audit rows: no store and no spill location could take them")
        store = self._store
        if store is not None:  # unblock the thread, without waiting for it to answer
            threading.Thread(target=_interrupt, args=(store,), name="mcpmeter-interrupt", daemon=True).start()

    # -- the thread ------------------------------------------------------------------------

    def _thread_main(self) -> None:
        quiet_thread()
        self._run()

    def _run(self) -> None:
        try:
            self._connect()
            while not self._stop.wait(self._interval):
                if self._abandoned:
                    return
                self._tick()
                self._drain()
            self._drain()
            self._give_up_held()
            self._forget()
        finally:
            if self._abandoned and self._store is not None:  # close() left the store to us
                store, self._store = self._store, None
                with contextlib.suppress(Exception):
                    store.close()

    def _give_up_held(self) -> None:
        """At the end: rows still held in memory get one last chance at a spill location."""
        if self._held:
            self._retry_held()
        with self._lock:
            if self._held and not self._abandoned:
                self.lost += self._held_rows
                warn(f"lost {self._held_rows} audit rows: no store and no spill location could take them")
                self._held, self._held_rows = [], 0

    def _tick(self) -> None:
        """Periodic work for others that needs the store (budgets read which apply)."""
        if self._held:
            self._retry_held()
        store = self._store
        if store is None:
            self._unavailable()
            return
        for listener in self._listeners:
            try:
                listener.on_tick(store)
            except Exception as exc:
                warn_once("tick", f"store check failed: {exc}")

    def _unavailable(self) -> None:
        for listener in self._listeners:
            try:
                listener.on_unavailable()
            except Exception as exc:
                warn_once("unavailable", f"store fallback failed: {exc}")

    def _connect(self) -> None:
        try:
            self._store = self._open_store()
        except MeterError as exc:
            warn_once("store-open", f"{exc}; rows go to the spill file until it can be written")
            self._unavailable()
            return
        self._recover_spill()
        self._tick()

    def _forget(self) -> None:
        """At a clean end: a writer that spilled nothing needs no row in ``audit_writers``."""
        if self._store is None or not self._marked or self.spilled or self._unresolved or self._abandoned:
            return
        try:
            self._store.forget_writer(self.writer_id)
        except Exception as exc:
            warn_once("forget-writer", f"cannot tidy audit_writers: {exc}")

    def _take(self) -> _Batch | None:
        """The next batch from the queue (it is then in flight), or None."""
        with self._lock:
            if self._abandoned or not self._queue:
                return None
            popleft = self._queue.popleft
            records: list[CallRecord] = []
            try:
                while len(records) < self._max_batch:
                    records.append(popleft())
            except IndexError:
                pass
            batch = _Batch(records)
            self._inflight = batch
            return batch

    def _drain(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._write(batch)
            except Exception as exc:  # a bug here must not stop the writer: spill the batch
                warn_once("writer-error", f"audit writer error (rows spilled): {exc!r}")
                self._failed(batch, attempted=batch.number is not None)

    def _write(self, batch: _Batch) -> None:
        if self._store is None:
            try:
                self._store = self._open_store()
            except MeterError:
                self._export(batch.records)
                self._failed(batch, attempted=False)
                return
        store = self._store
        batch.records = self._priced(store, batch.records)
        self._export(batch.records)
        with self._lock:
            if self._abandoned:
                return
            self._numbers += 1
            batch.number = self._numbers
        mark = BatchMark(self.writer_id, batch.number, tuple(self._unresolved))
        try:
            committed = store.write_calls(batch.records, mark)
        except Exception as exc:
            warn_once("store-write", f"cannot write to store {store.location}: {exc}; spilling rows")
            self._failed(batch, attempted=True)
            return
        with self._lock:
            if self._abandoned:
                return  # the closing thread spilled this batch: recovery sees it committed
            self._inflight = None
            self._marked = True
            self.written += len(batch.records)
            self._unresolved.clear()
            if self._held:
                self._requeue_held(committed)
        for listener in self._listeners:
            try:
                listener.after_write(store, batch.records)
            except Exception as exc:
                warn_once("after-write", f"cannot settle budgets: {exc}")
        if self._needs_recovery:  # the store is back: load what was spilled
            self._recover_spill()

    def _failed(self, batch: _Batch, *, attempted: bool) -> None:
        """A write failed (or could not start): its rows go to the spill."""
        with self._lock:
            if self._abandoned:
                return
            self._inflight = None
            number = batch.number if attempted else None
            if number is not None:
                self._unresolved.append(number)
            if self._spill_batches([(number, batch.records)]) is not None:
                self.spilled += len(batch.records)
                self._needs_recovery = True
            else:
                self._hold(number, batch.records)

    def _export(self, batch: Sequence[CallRecord]) -> None:
        for listener in self._listeners:
            try:
                listener.on_batch(batch)
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

    def _spill_batches(
        self, batches: Sequence[tuple[int | None, Sequence[CallRecord]]], *, owned: bool = False
    ) -> Path | None:
        """Append ``batches`` to the first spill location that takes them (fsynced); where.

        ``owned``: into a file only this process's recovery may claim while it lives (the
        closing thread's spill, whose batch in flight may still commit until we exit).
        """
        data = b"".join(encode_lines(self.writer_id, number, records) for number, records in batches)
        if not self._spill_paths:
            return None
        order = self._spill_paths[self._spill_at :] + self._spill_paths[: self._spill_at]
        for path in order:
            target = path.with_name(f"{path.name}.{os.getpid()}-exit.loading") if owned else path
            try:
                _append_synced(target, data)
            except OSError as exc:
                warn_once(f"spill:{path}", f"cannot write spill file {target}: {exc.strerror or exc}")
                continue
            index = self._spill_paths.index(path)
            if index != self._spill_at:
                warn(f"spilling audit rows to {target} instead")
                self._spill_at = index
            return target
        return None

    def _hold(self, number: int | None, records: Sequence[CallRecord]) -> None:
        """Keep rows no location could take in memory (bounded), to try again."""
        self._held.append((number, records))
        self._held_rows += len(records)
        warn_once("held", "no spill location can be written: audit rows are kept in memory meanwhile")
        while self._held_rows > self._max_held and self._held:
            _, dropped = self._held.pop(0)
            self._held_rows -= len(dropped)
            self.lost += len(dropped)
            warn_once(
                "held-lost", f"more than {self._max_held} audit rows held in memory: dropping the oldest"
            )

    def _retry_held(self) -> None:
        with self._lock:
            if self._abandoned or not self._held:
                return
            if self._spill_batches(self._held) is not None:
                self.spilled += self._held_rows
                self._needs_recovery = True
                self._held, self._held_rows = [], 0

    def _requeue_held(self, committed: int | None) -> None:
        """After a successful write: held rows go back to the queue, but for the batch the
        write found committed after all (under ``_lock``)."""
        for number, records in reversed(self._held):
            if number is None or number != committed:
                self._queue.extendleft(reversed(records))
        self._held, self._held_rows = [], 0

    def _recover_spill(self) -> None:
        if not self._spill_paths or self._store is None:
            return
        try:
            self.recovered += recover_spill(self._store)
        except Exception as exc:
            warn(f"cannot load spill files of {self._store.location}: {exc}; they are left in place")
        self._needs_recovery = False


def _interrupt(store: Store) -> None:
    quiet_thread()
    store.interrupt()


def _append_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
