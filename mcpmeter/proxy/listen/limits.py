"""What one client, or many, may take of ``wrap --listen``, and what happens past it.

Anyone who can reach the port could otherwise exhaust the proxy: a server process per
session without end, every file descriptor (then every new connection hangs, valid tokens
included), or memory with one huge body. The limits, each a ``wrap`` flag
(:class:`ListenLimits`):

* sessions: at most ``max_sessions`` live, at most ``max_servers`` server processes when each
  session has its own, and ``session_rate`` new ones per second per client address (a token
  bucket ``session_burst`` deep). Past a cap a session idle for ``evict_idle`` seconds is
  closed to make room, least recently used first; with none to close the answer is 503 with
  ``Retry-After``; past the rate, 429. Those servers start ``STARTING`` at a time (half
  the cores), so a burst of sessions cannot take every core from the ones being served.
* bodies: ``max_body`` bytes, refused with 413 as soon as ``Content-Length`` or the bytes
  read pass it.
* connections: ``max_connections``, ``header_timeout`` and ``idle_timeout``, enforced on
  uvicorn's side of the socket (see :mod:`mcpmeter.proxy.listen.guard`).

This module holds what the application itself checks: the limits, the refusals it
answers with (:class:`Refused`), the per-client session rate (:class:`SessionRate`), the
server slots (:class:`Slots`) and the body bound (:class:`BoundedReceive`). Each kind of
refusal or closing prints one line on stderr at most every ``NOTICE_INTERVAL_S`` seconds
(:class:`Notices`), saying how many were left out.
"""

from __future__ import annotations

import ipaddress
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from itertools import islice
from typing import Any, NamedTuple

import anyio

from mcpmeter.errors import UsageError
from mcpmeter.log import warn

Message = MutableMapping[str, Any]

MiB = 1 << 20

#: A kind of notice prints at most once in this many seconds.
NOTICE_INTERVAL_S = 10.0
#: Retry-After of a 503 for a session or server cap (seconds).
RETRY_S = 5
#: How long a new session may wait for a server process, closing, to free its slot.
ADMIT_WAIT_S = 2.0
#: Server processes starting at once (spawned, not yet written anything): half the cores,
#: so that a flood of new sessions cannot take every core from the sessions being served.
STARTING = max(1, (os.cpu_count() or 2) // 2)
#: How long a new session waits for its turn to start its server before a 503.
STARTING_WAIT_S = 30.0
#: A server that has written nothing after this long no longer counts as starting.
STARTING_HOLD_S = 10.0


class ListenLimits(NamedTuple):
    """The limits of one ``--listen`` (the ``wrap`` flag of each field is in its name)."""

    max_connections: int = 4096
    max_sessions: int = 1000
    #: Server processes, when each session has its own (``-- CMD`` without --shared-server).
    max_servers: int = 100
    #: New sessions per second per client address (an IPv6 /64 counts as one); 0: no limit.
    session_rate: float = 10.0
    session_burst: int = 100
    #: Bytes of one request body: room for a 100 MB frame, the product's promise.
    max_body: int = 256 * MiB
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    #: At a session or server cap, a session idle this long may be closed for room; 0: never.
    evict_idle: float = 60.0


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: str) -> int:
    """``1048576``, ``512K``, ``256M``, ``256MiB``, ``1G`` (binary multiples) as bytes."""
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    number = text[: len(text) - len(unit)].strip()
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise UsageError(f"wrap: --max-body expects a size such as 256MiB, got {value!r}") from None
    if not size >= 1 or math.isinf(size):
        raise UsageError(f"wrap: --max-body must be at least 1 byte, got {value!r}")
    return int(size)


# -- notices ----------------------------------------------------------------------------------


class _Kind:
    __slots__ = ("last", "left_out", "message")

    def __init__(self, last: float, message: str) -> None:
        self.last = last
        self.left_out = 0
        self.message = message


class Notices:
    """mcpmeter's lines about refusals: one per kind per ``interval`` seconds, the next one
    saying how many were left out, so a flood of refusals is a few lines, never a flood."""

    def __init__(
        self, interval: float = NOTICE_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def allow(self, kind: str, message: str = "") -> int | None:
        """None when a line of ``kind`` must not be written now; else how many were left out."""
        now = self._clock()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now - entry.last < self.interval:
                entry.left_out += 1
                entry.message = message
                return None
            left_out = entry.left_out if entry is not None else 0
            self._kinds[kind] = _Kind(now, message)
            return left_out

    def note(self, kind: str, message: str) -> None:
        left_out = self.allow(kind, message)
        if left_out is not None:
            warn(message + more_like_it(left_out, self.interval))

    def flush(self) -> None:
        """At exit: the count of each kind left out since its last line."""
        with self._lock:
            pending = [(e.message, e.left_out) for e in self._kinds.values() if e.left_out and e.message]
            for entry in self._kinds.values():
                entry.left_out = 0
        for message, count in pending:
            warn(f"{message} (and {count} more like it)")


def more_like_it(count: int, interval: float) -> str:
    """What a notice adds when ``count`` lines like it were left out in the last ``interval`` s."""
    return f" ({count} more like it in the last {interval:g} s)" if count else ""


# -- sessions ---------------------------------------------------------------------------------


class Refused(Exception):
    """A request refused for a limit: its HTTP status, its one line for stderr (by kind)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        extra = [(b"connection", b"close")] if self.status == 413 else []
        if self.retry_after is not None:
            extra.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        return extra


class BodyTooLarge(Refused):
    def __init__(self, limit: int, size: int | None = None) -> None:
        said = f"a request body of {size} bytes" if size is not None else "a request body"
        super().__init__(413, "body", f"refused {said}: over {limit} bytes (--max-body)")
        self.limit = limit

    @property
    def answer(self) -> bytes:
        return f"Content Too Large: a request body may have {self.limit} bytes (--max-body)".encode()


def client_key(address: str | None) -> str:
    """Whose sessions count together: an IPv4 address, or the /64 of an IPv6 one (a single
    host commonly has a whole /64)."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SessionRate:
    """New sessions per client: a token bucket per :func:`client_key`, ``burst`` deep,
    refilled at ``rate`` per second. Full buckets are forgotten when the table grows large."""

    MAX_CLIENTS = 65536

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, address: str | None) -> float:
        """0 when ``address`` may open a session now (a token is taken); else the seconds
        until it may."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        key = client_key(address)
        tokens, when = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > self.MAX_CLIENTS:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [k for k, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) > self.MAX_CLIENTS:  # the oldest half goes (a fresh bucket is full)
            for key in list(islice(self._buckets, len(self._buckets) // 2)):
                del self._buckets[key]


class Slots:
    """A counted resource under a cap (server processes): taken, given back, waited for."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._freed = anyio.Event()

    @property
    def full(self) -> bool:
        return self.used >= self.cap

    def take(self) -> None:
        self.used += 1

    def give(self) -> None:
        self.used -= 1
        self._freed.set()
        self._freed = anyio.Event()

    async def freed(self) -> None:
        """Until a slot is given back."""
        await self._freed.wait()


# -- bodies -----------------------------------------------------------------------------------


class BoundedReceive:
    """A request's ASGI ``receive``, carrying what :func:`~mcpmeter.proxy.listen.http.read_body`
    checks: the body limit and the length the client announced."""

    __slots__ = ("_receive", "length", "limit")

    def __init__(self, receive: Callable[[], Awaitable[Message]], limit: int, length: int | None) -> None:
        self._receive = receive
        self.limit = limit
        self.length = length

    async def __call__(self) -> Message:
        return await self._receive()


def content_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # h11 refuses such a request before it gets here
