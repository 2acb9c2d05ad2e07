"""The hot path: bytes in, the same bytes out, then a look at them.

A :class:`Pump` carries one direction. Each chunk a transport reads is written to the other
side first, as is (no re-framing, no re-serialising, no waiting for a full line), and only
then handed to the :class:`Tap`, which cuts it into frames for the meter. The meter runs in
the same event-loop callback, so a request is always registered before its response can be
read, and the relay never waits on anything the meter does: settled records leave through
the audit writer's queue.

Flow control is end to end: when a sink's buffer fills (a slow reader), it pauses the
source it is fed from, so memory stays bounded whatever the peers do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from mcpmeter.frame import LineSplitter
from mcpmeter.log import warn_once
from mcpmeter.meters.calls import CallMeter


class Sink(Protocol):
    """Where a pump writes: the far side's transport."""

    def write(self, data: bytes) -> None:
        """Queue ``data``; never blocks, never raises once the far side is gone."""

    def close(self) -> None:
        """Half-close after everything queued is written (EOF to the far side)."""


class Source(Protocol):
    """Where a pump reads from; the sink pauses it when its buffer fills."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


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
    """One direction of the relay: source -> sink, then tap."""

    __slots__ = ("_clock", "_on_eof", "bytes", "eof", "sink", "source", "tap")

    def __init__(
        self,
        tap: Tap,
        on_eof: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.tap = tap
        self.sink: Sink | None = None
        self.source: Source | None = None
        self.bytes = 0
        self.eof = False
        self._on_eof = on_eof
        self._clock = clock

    def data(self, data: bytes) -> None:
        seen = self._clock()
        sink = self.sink
        if sink is not None:
            sink.write(data)
        self.bytes += len(data)
        self.tap.feed(data, seen)

    def end(self) -> None:
        """The source reached EOF (or failed): close the sink, meter a partial last frame."""
        if self.eof:
            return
        self.eof = True
        self.tap.finish(self._clock())
        if self.sink is not None:
            self.sink.close()
        self._on_eof()

    # Flow control, called by the sink's transport.
    def pause(self) -> None:
        if self.source is not None:
            self.source.pause_reading()

    def resume(self) -> None:
        if self.source is not None:
            self.source.resume_reading()
