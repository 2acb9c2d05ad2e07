"""The hot path: bytes in, the same bytes out, then a look at them.

A :class:`Pump` carries one direction in its own thread: a blocking read, a blocking write
of exactly the bytes read (no re-framing, no re-serialising, no waiting for a full line),
and only then the :class:`Tap`, which cuts the chunk into frames for the meter. Blocking
I/O in two threads is the fastest relay Python has (each hop is one wake-up, no event
loop) and gives end-to-end flow control for free: a slow reader blocks the write, which
stops the read. The meter runs under one lock per connection, after the write, so it never
delays the bytes it looks at; settled records leave through the audit writer's queue.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mcpmeter.frame import LineSplitter
from mcpmeter.log import warn_once
from mcpmeter.meters.calls import CallMeter

#: Bytes asked for per read. Larger reads would allocate with mmap on every call.
CHUNK = 1 << 16


class Endpoint(Protocol):
    """One side of a pump: something to read from or write to."""

    def read(self) -> bytes:
        """The next chunk; ``b""`` at end of stream. Blocks."""

    def write(self, data: bytes) -> None:
        """Write all of ``data``. Blocks; raises OSError once the far side is gone."""


class FdEndpoint:
    """A file descriptor (pipe, socket, terminal or file), read and written blocking.

    A descriptor someone left in non-blocking mode is waited on with ``select`` instead of
    being switched to blocking (the mode is shared with every process holding it).
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self) -> bytes:
        while True:
            try:
                return os.read(self.fd, CHUNK)
            except BlockingIOError:
                select.select([self.fd], [], [])

    def write(self, data: bytes) -> None:
        fd = self.fd
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        if written == len(data):
            return
        view = memoryview(data)[written:]
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                select.select([], [fd], [])


class Tap:
    """Cuts one direction's bytes into frames for the meter; isolates the meter's errors."""

    __slots__ = ("_direction", "_meter", "_splitter")

    def __init__(self, direction: str, meter: CallMeter) -> None:
        self._direction = direction
        self._meter = meter
        self._splitter = LineSplitter(self._on_line)

    def _on_line(self, line: bytes | bytearray, seen: float) -> None:
        # Errors are caught per frame, so one bad frame never costs the frames after it.
        try:
            self._meter.on_frame(self._direction, line, seen)
        except Exception as exc:  # a meter bug must never reach the relay
            self._meter.stats.meter_errors += 1
            warn_once("meter-error", f"metering error (frames still relayed): {exc!r}")

    def feed(self, data: bytes, seen: float) -> None:
        self._splitter.feed(data, seen)

    def finish(self, seen: float) -> None:
        """The stream ended: meter a last frame that had no newline."""
        self._splitter.finish(seen)


class Pump:
    """One direction of the relay: read from ``source``, write to ``sink``, then tap.

    When the sink fails (its reader went away) the pump keeps reading and metering, so the
    source is never blocked by a peer that is gone, and calls ``on_sink_lost`` once. At end
    of stream it calls ``on_eof``; ``done`` is set when the thread has finished.
    """

    def __init__(
        self,
        name: str,
        source: Endpoint,
        sink: Endpoint,
        tap: Tap,
        lock: threading.Lock,
        *,
        on_eof: Callable[[], None] = lambda: None,
        on_sink_lost: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.source = source
        self.sink = sink
        self.tap = tap
        self.bytes = 0
        self.sink_lost = False
        self.done = threading.Event()
        self._lock = lock
        self._on_eof = on_eof
        self._on_sink_lost = on_sink_lost
        self._clock = clock
        self._thread = threading.Thread(target=self._run, name=f"mcpmeter-{name}", daemon=True)

    def start(self) -> Pump:
        self._thread.start()
        return self

    def _run(self) -> None:
        read = self.source.read
        write = self.sink.write
        feed = self.tap.feed
        clock = self._clock
        lock = self._lock
        try:
            while True:
                try:
                    data = read()
                except OSError:
                    break
                if not data:
                    break
                seen = clock()
                if not self.sink_lost:
                    try:
                        write(data)
                    except OSError:
                        self.sink_lost = True
                        self._on_sink_lost()
                self.bytes += len(data)
                with lock:
                    feed(data, seen)
        finally:
            with lock:
                self.tap.finish(clock())
            self._on_eof()
            self.done.set()
