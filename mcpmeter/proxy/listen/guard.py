"""uvicorn under the limits of ``wrap --listen``: connections, uvicorn's logs, accept().

* connections (:class:`GuardedH11Protocol`, uvicorn's h11 protocol with a watchdog): at most
  ``max_connections`` open (fewer when the open-file limit has no room for them); a request
  head must be complete ``header_timeout`` seconds after the connection opened (or after its
  first byte, on a kept-alive connection), whatever trickles in (slowloris); a connection
  on which mcpmeter waits for the client (the rest of a body, the client to read its answer)
  and no byte comes for ``idle_timeout`` seconds is closed. At the cap, the connection that
  has waited longest without sending a complete head is closed to admit a new one; an
  established connection (one that sent a head) is never closed for room, so a flood of
  half-open connections cannot lock out the clients already served.
* accept() failures (EMFILE) and uvicorn's own log lines, which would otherwise print a
  traceback per connection, go through :class:`~mcpmeter.proxy.listen.limits.Notices`:
  one line per kind per interval.

The limits themselves, and what the application checks of them, are in
:mod:`mcpmeter.proxy.listen.limits`. This module imports uvicorn; only the server
(:mod:`mcpmeter.proxy.listen.serve`) imports it, when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import traceback
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, ClassVar

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from mcpmeter.log import warn
from mcpmeter.proxy.listen.limits import ListenLimits, MiB, Notices, more_like_it

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
            warn(text + more_like_it(left_out, self.notices.interval))
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
