"""What watches a relay, behind one door: the budget gate and the meter.

Every transport relays frames and shows each one to its :class:`Observers`, under the same
rules, whatever carries the bytes:

1. **The gate decides first.** A client's ``tools/call`` is shown to the gate (``verdict``)
   before any byte of it is forwarded; a refused call is never forwarded, and the meter is
   told (``refused``) right after it has seen the request.
2. **The meter sees every frame once, in the order of its direction.** On stdio it sees a
   chunk's frames right after the chunk is written (the write is never delayed by
   metering). On HTTP it sees a client's message just before it is sent (sending waits on
   the network, and the answer may come back on another task before the send returns) and
   a server's message as it arrives, before it is delivered.
3. **The frame is decoded once** (:class:`~mcpmeter.protocol.frame.Frame`): whoever asks
   first decodes it, the others read the same envelope.
4. **An observer never breaks the relay.** An exception in the meter is counted
   (``stats.meter_errors``) and reported once on stderr; the frame was relayed and the
   next ones are metered. When the gate itself fails (its store is down), the call is
   forwarded: the store failing never stops the relay.

One lock per connection (``lock``) serialises the meter: the stdio pumps take it around a
chunk's frames, the HTTP paths around each frame (:meth:`Observers.observe`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from mcpmeter.log import warn_once
from mcpmeter.protocol.frame import Frame

if TYPE_CHECKING:
    from mcpmeter.metering.calls import CallMeter


#: How a ``tools/call`` request's method is written, but for JSON escapes: a frame may be one
#: only if it has this, or an escape that could spell it (``\/`` or ``\u``).
_CALL = b'"tools/call"'
_ESCAPES = (b"\\/", b"\\u")


def may_be_call(data: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """Whether ``data[start:end]`` may hold a ``tools/call``: only such frames are shown to
    the gate (which decides whether it is one)."""
    if end is None:
        end = len(data)
    return data.find(_CALL, start, end) >= 0 or any(data.find(e, start, end) >= 0 for e in _ESCAPES)


class Gate(Protocol):
    """What a relay asks before forwarding a ``tools/call`` (see :mod:`mcpmeter.metering.budget`)."""

    #: False while no budget or guard applies: the relay then forwards frames unasked.
    active: bool

    def check(self, frame: Frame) -> tuple[object, bytes] | None:
        """(request id, answer frame) to refuse ``frame`` with, or None to forward it.

        ``frame.data`` may be a view of the bytes read: nothing of it may be kept after the
        call.
        """

    def answer(self, frame: bytes) -> None:
        """Send the client the proxy's own answer (between the server's frames)."""


class Observers:
    """The meter and the gate of one connection, their errors isolated from the relay."""

    __slots__ = ("gate", "lock", "meter")

    def __init__(self, meter: CallMeter, gate: Gate | None = None) -> None:
        self.meter = meter
        self.gate = gate
        #: Held whenever the meter is fed or closed.
        self.lock: threading.Lock = meter.lock

    @property
    def gating(self) -> bool:
        """Whether calls must be shown to the gate before they are forwarded."""
        gate = self.gate
        return gate is not None and gate.active

    def verdict(self, frame: Frame) -> tuple[object, bytes] | None:
        """The gate's verdict on a client's frame: (id, answer) to refuse it, else None."""
        gate = self.gate
        if gate is None:
            return None
        try:
            return gate.check(frame)
        except Exception as exc:
            warn_once("gate-error", f"budget check failed, calls are forwarded unchecked: {exc}")
            return None

    def seen(self, frame: Frame) -> None:
        """Meter one frame; the caller holds :attr:`lock`."""
        try:
            self.meter.seen(frame)
        except Exception as exc:  # a meter bug must never reach the relay
            self._meter_failed(exc)

    def observe(self, frame: Frame) -> None:
        """Meter one frame, taking :attr:`lock`."""
        try:
            with self.lock:
                self.meter.seen(frame)
        except Exception as exc:
            self._meter_failed(exc)

    def refused(self, direction: str, rpc_id: object, answer_bytes: int, seen: float) -> None:
        """The request ``rpc_id`` (already seen) was answered by the proxy, not forwarded;
        the caller holds :attr:`lock`."""
        try:
            self.meter.on_refused(direction, rpc_id, answer_bytes, seen)
        except Exception as exc:
            self._meter_failed(exc)

    def _meter_failed(self, exc: Exception) -> None:
        self.meter.stats.meter_errors += 1
        warn_once("meter-error", f"metering error (frames still relayed): {exc!r}")
