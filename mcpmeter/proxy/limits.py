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
* connections (:class:`GuardedH11Protocol`, uvicorn's h11 protocol with a watchdog): at most
  ``max_connections`` open (fewer when the open-file limit has no room for them); a request
  head must be complete ``header_timeout`` seconds after the connection opened (or after its
  first byte, on a kept-alive connection), whatever trickles in (slowloris); a connection
  on which mcpmeter waits for the client (the rest of a body, the client to read its answer)
  and no byte comes for ``idle_timeout`` seconds is closed. At the cap, the connection that
  has waited longest without sending a complete head is closed to admit a new one; an
  established connection (one that sent a head) is never closed for room, so a flood of
  half-open connections cannot lock out the clients already served.

Each kind of refusal or closing prints one line on stderr at most every
``NOTICE_INTERVAL_S`` seconds (:class:`Notices`), saying how many were left out; so do
accept() failures (EMFILE) and uvicorn's own log lines, which would otherwise print a
traceback per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from itertools import islice
from typing import Any, ClassVar, NamedTuple

import anyio
import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

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
#: A connection still sending its first head is closed for room only once this old (s).
HEADLESS_EVICT_AGE_S = 1.0
#: uvicorn closes a kept-alive connection after this many seconds without a new request.
KEEP_ALIVE_S = 5
#: After an answer that did not read the whole body (401, 413 ...), the rest is read and
#: dropped up to this many bytes; past it the connection is closed.
DISCARD_MAX = 1 * MiB
#: asyncio accepts up to this many connections per loop pass (uvicorn's ``backlog``); small
#: enough that a flood cannot take every free descriptor before the cap refuses it. The
#: kernel's listen queue stays ``LISTEN_QUEUE`` long.
ACCEPT_BATCH = 32
LISTEN_QUEUE = 2048
#: Descriptors kept free of connections: the store, DNS, exporters, a spare per server.
FD_SPARE = 64
FDS_PER_SERVER = 3  # its stdin and stdout pipes, and the child watcher's
MIN_CONNECTIONS = 16

_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
            warn(message + _left_out(left_out, self.interval))

    def flush(self) -> None:
        """At exit: the count of each kind left out since its last line."""
        with self._lock:
            pending = [(e.message, e.left_out) for e in self._kinds.values() if e.left_out and e.message]
            for entry in self._kinds.values():
                entry.left_out = 0
        for message, count in pending:
            warn(f"{message} (and {count} more like it)")


def _left_out(count: int, interval: float) -> str:
    return f" ({count} more like it in the last {interval:g} s)" if count else ""


class NoticeHandler(logging.Handler):
    """uvicorn's log lines (an invalid request, an application's exception) as notices: a
    kind per message, its traceback included, at most one per kind per interval."""

    def __init__(self, notices: Notices) -> None:
        super().__init__(logging.WARNING)
        self.notices = notices

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"uvicorn: {record.getMessage()}"
            left_out = self.notices.allow(f"uvicorn:{record.msg}", text)
            if left_out is None:
                return
            if record.exc_info and record.exc_info[0] is not None:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            warn(text + _left_out(left_out, self.notices.interval))
        except Exception:
            self.handleError(record)


def loop_exception_handler(
    notices: Notices, guard: ConnectionGuard
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An asyncio exception handler: accept() out of descriptors (or memory) is one notice,
    and frees descriptors by closing the oldest connections still sending their first head
    (asyncio itself stops accepting for a second); anything else is asyncio's own report,
    at most one per kind per interval."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS and "accept" in message:
            shed = guard.shed(loop.time())
            closed = f"; closed {shed} connections that sent no complete request head" if shed else ""
            notices.note("accept", f"cannot accept connections: {exc.strerror}; retrying in 1 s{closed}")
            return
        if notices.allow(f"asyncio:{message}", f"asyncio: {message}") is not None:
            loop.default_exception_handler(context)

    return handle


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
    """A request's ASGI ``receive``, carrying what :func:`~mcpmeter.proxy.http_server.read_body`
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


# -- connections ------------------------------------------------------------------------------


def open_fds() -> int:
    """How many descriptors this process has open (a guess where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def connection_budget(limits: ListenLimits, *, fd_limit: int, servers: int, per_connection: int) -> int:
    """How many connections the open-file limit ``fd_limit`` has room for, beside ``servers``
    server processes and what is open now (``per_connection`` descriptors each: 2 when each
    may need its own to a remote server), at most ``limits.max_connections``."""
    room = fd_limit - open_fds() - FD_SPARE - 2 * ACCEPT_BATCH - servers * FDS_PER_SERVER
    return max(MIN_CONNECTIONS, min(limits.max_connections, room // per_connection))


def _canned(status: str, text: str, retry_after: int | None = None) -> bytes:
    body = text.encode() + b"\n"
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n"
    )
    return head.encode() + body


_TOO_MANY = _canned("503 Service Unavailable", "Service Unavailable: too many connections", 1)
_TIMED_OUT = _canned("408 Request Timeout", "Request Timeout: the request head took too long")


class ConnectionGuard:
    """The connections of one ``--listen``: at most ``cap`` open, and the order in which
    those that have not sent a complete request head yet came (the first to go for room)."""

    def __init__(self, limits: ListenLimits, notices: Notices, cap: int) -> None:
        self.limits = limits
        self.notices = notices
        self.cap = cap
        self.evict_age = min(HEADLESS_EVICT_AGE_S, limits.header_timeout / 2)
        self.open: dict[GuardedH11Protocol, None] = {}
        #: Connections still waiting for their first complete request head, oldest first.
        self.headless: dict[GuardedH11Protocol, None] = {}

    def admit(self, connection: GuardedH11Protocol, now: float) -> bool:
        """Whether ``connection`` may stay, closing the oldest headless one for room if need be."""
        if len(self.open) >= self.cap:
            victim = next(iter(self.headless), None)
            if victim is None or now - victim.opened < self.evict_age:
                self.notices.note(
                    "connections",
                    f"refused a connection: {len(self.open)} are open (--max-connections {self.cap})",
                )
                return False
            self.notices.note(
                "evict-connection",
                f"closed a connection that sent no complete request head in {now - victim.opened:.1f} s "
                f"to make room (--max-connections {self.cap})",
            )
            victim.drop(_TIMED_OUT)
        self.open[connection] = None
        self.headless[connection] = None
        return True

    def headed(self, connection: GuardedH11Protocol) -> None:
        self.headless.pop(connection, None)

    def forget(self, connection: GuardedH11Protocol) -> None:
        self.open.pop(connection, None)
        self.headless.pop(connection, None)

    def shed(self, now: float) -> int:
        """Close up to ACCEPT_BATCH of the oldest headless connections (past ``evict_age``)."""
        victims = [c for c in islice(self.headless, ACCEPT_BATCH) if now - c.opened >= self.evict_age]
        for victim in victims:
            victim.drop(_TIMED_OUT)
        return len(victims)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a :class:`ConnectionGuard`: the cap, checked as the
    connection opens (a refused one gets a 503 at once), and one watchdog timer.

    The timer is armed for the earliest deadline it knows of and, when it fires, reads the
    connection's state: waiting for a request head (``header_timeout`` from the connection's
    start or the head's first byte; ``idle_timeout`` of silence on a kept-alive connection),
    for the rest of a body or for the client to read (``idle_timeout`` without progress), or
    for the server (nothing to time: a tool call or an event stream may be quiet for long).
    Bytes arriving only move timestamps; the timer re-arms itself when it fires early.
    """

    guard: ClassVar[ConnectionGuard]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.opened = 0.0
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_in = 0.0
        self._head_since: float | None = None  # waiting for a head since (None: not, or silence)
        self._write_paused_since: float | None = None
        self._discarded = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        now = self.loop.time()
        self.opened = self._last_in = now
        if not self.guard.admit(self, now):
            self._refused = True
            transport.write(_TOO_MANY)
            transport.close()
            return
        super().connection_made(transport)
        self._head_since = now
        self._arm(now + self.guard.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        now = self.loop.time()
        self._last_in = now
        state = self.conn.their_state
        if state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete:
            self._discarded += len(data)  # the rest of a body already answered: dropped
            if self._discarded > DISCARD_MAX:
                self.drop()
                return
        elif state is h11.IDLE and self._head_since is None:  # a kept-alive connection's next head
            self._head_since = now
            self._arm_by(now + self.guard.limits.header_timeout)
        super().data_received(data)
        self._after_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        now = self.loop.time()
        self._last_in = now  # a kept-alive connection's silence counts from the answer's end
        if self.conn.their_state is h11.IDLE:
            self._head_since = None
            if self.conn.trailing_data[0]:  # a pipelined head, in part
                self._head_since = now
                self._arm_by(now + self.guard.limits.header_timeout)
        self._after_events()

    def pause_writing(self) -> None:
        if not self._refused:
            self._write_paused_since = self.loop.time()
            super().pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._write_paused_since = None
            super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._refused:
            super().connection_lost(exc)

    # -- the watchdog --------------------------------------------------------------------------

    def _after_events(self) -> None:
        if self._head_since is not None and self.conn.their_state is not h11.IDLE:
            self._head_since = None
            self._discarded = 0
            self.guard.headed(self)
            self._arm_by(self.loop.time() + self.guard.limits.idle_timeout)  # the next deadline

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._check)

    def _arm_by(self, when: float) -> None:
        if self._timer is None or self._timer.when() > when:
            self._arm(when)

    def _check(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        limits = self.guard.limits
        now = self.loop.time()
        state = self.conn.their_state
        if state is h11.IDLE and self._head_since is not None:
            deadline = self._head_since + limits.header_timeout
            if now >= deadline:
                self.guard.notices.note(
                    "header-timeout",
                    f"closed a connection whose request head was not complete in "
                    f"{limits.header_timeout:g} s (--header-timeout)",
                )
                self.drop(_TIMED_OUT)
                return
        elif state is h11.IDLE or (state is h11.SEND_BODY and not self.flow.read_paused):
            deadline = self._last_in + limits.idle_timeout
            if now >= deadline:
                if state is h11.SEND_BODY:
                    self.guard.notices.note(
                        "idle-timeout",
                        f"closed a connection that sent no byte of its request body for "
                        f"{limits.idle_timeout:g} s (--idle-timeout)",
                    )
                self.drop()
                return
        elif self._write_paused_since is not None:
            deadline = self._write_paused_since + limits.idle_timeout
            if now >= deadline:
                self.guard.notices.note(
                    "idle-timeout",
                    f"closed a connection that read nothing of its answer for "
                    f"{limits.idle_timeout:g} s (--idle-timeout)",
                )
                self.drop(abort=True)  # close() would wait for the unread answer to drain
                return
        else:  # the server is working, or a stream is open: nothing of the client's to time
            deadline = now + limits.idle_timeout
        self._arm(deadline)

    def drop(self, answer: bytes | None = None, *, abort: bool = False) -> None:
        """Close the connection now (writing ``answer`` first), and free its place at once."""
        self.guard.forget(self)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if answer is not None and not abort:
            transport.write(answer)
        if abort or transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


def protocol_for(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to ``guard``."""

    class ListenProtocol(GuardedH11Protocol):
        pass

    ListenProtocol.guard = guard
    return ListenProtocol


def guard_for(
    limits: ListenLimits, notices: Notices, *, servers: int, per_connection: int
) -> ConnectionGuard:
    """The guard of one ``--listen``, its cap lowered to what the open-file limit has room for."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fd_limit = 1 << 20 if soft == resource.RLIM_INFINITY else soft
    cap = connection_budget(limits, fd_limit=fd_limit, servers=servers, per_connection=per_connection)
    return ConnectionGuard(limits, notices, cap)


@contextlib.contextmanager
def quiet_uvicorn(notices: Notices) -> Iterator[None]:
    """uvicorn's log lines go through ``notices`` while this lasts (not one per connection)."""
    logger = logging.getLogger("uvicorn")
    handler = NoticeHandler(notices)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
