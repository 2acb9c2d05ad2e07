"""The hot path: bytes in, the same bytes out, then a look at them.

A :class:`Pump` carries one direction in its own thread: a blocking read, a blocking write
of exactly the bytes read (no re-framing, no re-serialising, no waiting for a full line),
and only then the :class:`Tap`, which cuts the chunk into frames for the meter. Blocking
I/O in two threads is the fastest relay Python has (each hop is one wake-up, no event
loop) and gives end-to-end flow control for free: a slow reader blocks the write, which
stops the read. The meter runs under one lock per connection, after the write, so it never
delays the bytes it looks at; settled records leave through the audit writer's queue.

The one exception is the client->server pump while a budget or the loop guard applies
(its observers' gate): a call must be decided before any of it reaches the server, so that
pump forwards client lines whole, each once its newline has come (see ``Pump._gated``).
The rules every transport follows with its observers are in :mod:`mcpmeter.proxy.observers`.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mcpmeter.protocol.envelope import Buffer
from mcpmeter.protocol.frame import Frame, LineSplitter
from mcpmeter.proxy.observers import Observers, may_be_call
from mcpmeter.threads import quiet_thread

#: Bytes asked for per read. Larger reads would allocate with mmap on every call.
CHUNK = 1 << 16


class Endpoint(Protocol):
    """One side of a pump: something to read from or write to."""

    def read(self) -> bytes:
        """The next chunk; ``b""`` at end of stream. Blocks."""

    def write(self, data: bytes | bytearray) -> None:
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

    def write(self, data: bytes | bytearray) -> None:
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


class ClientWriter:
    """The client's stdout when the proxy may answer calls itself.

    The server->client pump writes what the server says, chunk by chunk; an answer from
    the proxy must never land inside one of the server's frames. So an answer is written
    at once when the last chunk ended a line, else held and written right after the newline
    that ends the server's current frame.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._mid_line = False
        self._pending: list[bytes] = []

    def read(self) -> bytes:  # pragma: no cover - a sink only
        raise OSError("ClientWriter is not readable")

    def write(self, data: bytes | bytearray) -> None:
        with self._lock:
            if self._pending:
                if self._mid_line:
                    nl = data.find(b"\n")
                    if nl < 0:
                        self._endpoint.write(data)
                        return
                    self._endpoint.write(data[: nl + 1])
                    data = data[nl + 1 :]
                    self._mid_line = False
                pending, self._pending = b"".join(self._pending), []
                self._endpoint.write(pending)
            if data:
                self._endpoint.write(data)
                self._mid_line = data[-1] != 0x0A

    def inject(self, frame: bytes) -> None:
        """Write one whole frame (newline included) between the server's frames."""
        with self._lock:
            if self._mid_line:
                self._pending.append(frame)
                return
            with contextlib.suppress(OSError):
                self._endpoint.write(frame)

    def flush(self) -> None:
        """At the end: what is still held (the server died mid-frame) goes out anyway."""
        with self._lock:
            pending, self._pending = b"".join(self._pending), []
            if pending:
                with contextlib.suppress(OSError):
                    self._endpoint.write(pending)


class Tap:
    """Cuts one direction's bytes into frames and shows each to the connection's observers."""

    __slots__ = ("_seen", "_splitter", "direction", "observers")

    def __init__(self, direction: str, observers: Observers) -> None:
        self.direction = direction
        self.observers = observers
        self._seen = observers.seen  # isolates the meter's errors, frame by frame
        self._splitter = LineSplitter(self._on_line)

    def _on_line(self, line: Buffer, seen: float) -> None:
        self._seen(Frame(line, self.direction, seen))

    def feed(self, data: bytes, seen: float) -> None:
        self._splitter.feed(data, seen)

    def frame(self, frame: Frame) -> None:
        """Show one whole frame the pump collected itself (a line the gate read), which the
        splitter never saw."""
        self._seen(frame)

    @property
    def mid_line(self) -> bool:
        """Whether the splitter holds the start of a line (its end is still to come)."""
        return self._splitter.pending_bytes > 0

    def finish(self, seen: float) -> None:
        """The stream ended: a last frame that had no newline."""
        self._splitter.finish(seen)

    def refused(self, rpc_id: object, answer_bytes: int, seen: float) -> None:
        """The request ``rpc_id`` (already shown) was answered by the proxy, not forwarded."""
        self.observers.refused(self.direction, rpc_id, answer_bytes, seen)


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
        *,
        gated: bool = False,
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
        self._lock = tap.observers.lock
        self._on_eof = on_eof
        self._on_sink_lost = on_sink_lost
        self._clock = clock
        self._thread = threading.Thread(target=self._run, name=f"mcpmeter-{name}", daemon=True)
        #: Decides, line by line, whether a tools/call may be forwarded (budgets, loop guard):
        #: the client->server pump's observers' gate.
        self.gate = tap.observers.gate if gated else None
        #: The unfinished line the gate holds back (without its newline): the only copy.
        self._held = bytearray()

    def start(self) -> Pump:
        self._thread.start()
        return self

    def _run(self) -> None:
        quiet_thread()
        read = self.source.read
        write = self.sink.write
        feed = self.tap.feed
        clock = self._clock
        lock = self._lock
        gate = self.gate
        try:
            while True:
                try:
                    data = read()
                except OSError:
                    break
                if not data:
                    break
                seen = clock()
                # Held bytes of an unfinished line go first, whatever the gate says meanwhile.
                # With the gate on, a chunk that ends inside a line is gated too: that line is
                # held until complete, so a call split across reads (its method in the next
                # chunk, or even cut in two) is still checked before any of it goes out.
                if self._held or (
                    gate is not None and gate.active and (data[-1] != 0x0A or may_be_call(data))
                ):
                    self._gated(data, seen)
                    continue
                if not self.sink_lost:
                    try:
                        write(data)
                    except OSError:
                        self._lose_sink()
                self.bytes += len(data)
                with lock:
                    feed(data, seen)
        finally:
            self._end_held(clock())
            with lock:
                self.tap.finish(clock())
            self._on_eof()
            self.done.set()

    def _lose_sink(self) -> None:
        self.sink_lost = True
        self._on_sink_lost()

    def _write(self, data: bytes | bytearray) -> None:
        if not self.sink_lost:
            try:
                self.sink.write(data)
            except OSError:
                self._lose_sink()

    def _gated(self, data: bytes, seen: float) -> None:
        """Forward the complete lines the gate lets through; answer the others from here.

        A line is held back until its newline arrives (a call must not start reaching the
        server before it is allowed). It is collected in one bytearray, the frame's only
        copy: the gate reads its envelope in place and the meter reads the same decoded
        frame, so a 200 MB call costs about 200 MB and is decoded once. Lines that end in
        this chunk are checked where they lie (a view, no copy), and each line the gate read
        goes to the meter as that same frame; the other lines go through the splitter. Each
        refusal reaches the meter right after the line it refuses (the meter settles the
        newest request of that id).
        """
        tap = self.tap
        observers = tap.observers
        direction = tap.direction
        self.bytes += len(data)
        size = len(data)
        pos = 0  # where the next line starts
        out = 0  # data[out:pos] is let through and not written yet
        done: Frame | None = None  # the held line this chunk ends
        done_verdict: tuple[object, bytes] | None = None
        #: (start, end past the newline, frame, verdict) of each line of this chunk the gate read.
        checked: list[tuple[int, int, Frame, tuple[object, bytes] | None]] = []
        if self._held:
            nl = data.find(b"\n")
            if nl < 0:
                self._held += data
                return
            held, self._held = self._held, bytearray()
            held += memoryview(data)[:nl]
            done = Frame(held, direction, seen)
            done_verdict = self._verdict(done)
            if done_verdict is None:
                self._write(held)
                self._write(b"\n")
            pos = out = nl + 1
        elif tap.mid_line:
            # This line's start went out before the gate was on (the store's budgets were
            # still being read): the rest can only follow, and the splitter, which has its
            # start, meters it.
            nl = data.find(b"\n")
            pos = size if nl < 0 else nl + 1
        fed = out  # the splitter has been fed data[:fed]
        kept = size  # data[kept:] starts a line held back
        while pos < size:
            nl = data.find(b"\n", pos)
            if nl < 0:
                kept = pos
                self._held = bytearray(memoryview(data)[pos:])
                break
            if may_be_call(data, pos, nl):
                frame = Frame(memoryview(data)[pos:nl], direction, seen)
                verdict = observers.verdict(frame)
                checked.append((pos, nl + 1, frame, verdict))
                if verdict is not None:
                    if out < pos:
                        self._write(data[out:pos])
                    out = nl + 1
            pos = nl + 1
        if out < kept:
            self._write(data if out == 0 and kept == size else data[out:kept])
        with self._lock:
            if done is not None:
                tap.frame(done)
                if done_verdict is not None:
                    tap.refused(done_verdict[0], len(done_verdict[1]), self._clock())
            for start, end, frame, verdict in checked:
                if fed < start:
                    tap.feed(data[fed:start], seen)
                tap.frame(frame)
                if verdict is not None:
                    tap.refused(verdict[0], len(verdict[1]), self._clock())
                fed = end
            if fed < kept:
                tap.feed(data if fed == 0 and kept == size else data[fed:kept], seen)
        gate = self.gate
        assert gate is not None
        if done_verdict is not None:
            gate.answer(done_verdict[1] + b"\n")
        for _start, _end, _frame, verdict in checked:
            if verdict is not None:
                gate.answer(verdict[1] + b"\n")

    def _verdict(self, frame: Frame) -> tuple[object, bytes] | None:
        """The gate's verdict on a held line (a bytearray, never a view)."""
        line = frame.data
        assert not isinstance(line, memoryview)
        return self.tap.observers.verdict(frame) if may_be_call(line) else None

    def _end_held(self, seen: float) -> None:
        """The stream ended inside a held line: the end of the stream ends it. It is checked,
        forwarded unterminated as it came (or answered), and metered like any frame."""
        held, self._held = self._held, bytearray()
        if not held:
            return
        frame = Frame(held, self.tap.direction, seen)
        verdict = self._verdict(frame) if self.gate is not None else None
        if verdict is None:
            self._write(held)
        with self._lock:
            self.tap.frame(frame)
            if verdict is not None:
                self.tap.refused(verdict[0], len(verdict[1]), self._clock())
        if verdict is not None and self.gate is not None:
            self.gate.answer(verdict[1] + b"\n")
