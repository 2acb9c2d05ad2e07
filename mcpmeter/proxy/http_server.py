"""mcpmeter as an HTTP server: ``wrap --listen HOST:PORT (-- CMD | --url URL)``.

Clients reach the wrapped server over HTTP, as many at once as they like:

* ``/mcp``: streamable HTTP. A POST without ``Mcp-Session-Id`` carrying ``initialize``
  opens a session; its answer carries the session's id, and later requests name it. GET
  opens the session's stream for messages the server starts; DELETE ends the session.
  A POST whose ``MCP-Protocol-Version`` is outside the handshake era (2026-07-28) needs no
  session: its ``Mcp-Method`` and ``Mcp-Name`` headers must agree with its body (400 and
  a -32020 error otherwise).
* ``/sse`` + ``/messages?session_id=...``: the HTTP+SSE transport (2024-11-05). GET
  ``/sse`` opens a session and its event stream, whose first event announces where to
  POST; every answer comes on the stream.

Each handshake-era session has an upstream of its own: a server subprocess (``-- CMD``,
the default), a share of one subprocess (``--shared-server``, ids rewritten by
:mod:`mcpmeter.proxy.mux`), or its own session with the remote server (``--url``).
2026-07-28 requests, which carry no session, share one upstream (ids rewritten): a
subprocess that served the handshake era refuses them, so they get one of their own. Each
such request is a short-lived session of its own (its own meter and channel), since
independent clients may send the same ids at the same time.

A request's answer goes back on its POST: a JSON body, or an event stream when the server
sends something for that request first (its progress, a question for the client). What the
server starts itself goes to the session's GET stream when one is open, else to the POST
of the newest request still waiting (switched to an event stream), else waits for a GET
stream. Every frame either way is metered by the session's :class:`CallMeter` (all sharing
one audit writer); ``X-Request-Id`` becomes the join key of the requests it came with, when
their ``_meta`` has none (the session's record sink fills it in).

A loopback bind without a token also checks ``Host`` (421 unless a loopback name), since a
DNS-rebinding page sends no ``Origin`` on its same-origin GETs. Accepted browser origins
get CORS answers.

Only loopback addresses are served without ``--auth-token`` (``Authorization: Bearer``,
compared in constant time). ``Origin`` is checked on every request (DNS rebinding): absent,
a localhost origin, or one given with ``--allow-origin``; anything else gets 403.

SIGTERM or SIGINT: new requests get 503, the requests in flight get up to 5 s to be
answered, every stream ends, every session is closed (subprocesses get stdin EOF, then
SIGTERM, then SIGKILL; remote sessions get their DELETE), and every row is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import math
import os
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.to_thread
import httpx
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcpmeter.errors import MeterError, UsageError
from mcpmeter.log import verbose, warn, warn_once
from mcpmeter.metering.audit import AuditWriter
from mcpmeter.metering.budget import BudgetGate
from mcpmeter.metering.calls import C2S, S2C, CallMeter
from mcpmeter.metering.tags import Tenant, new_session_id
from mcpmeter.protocol.rpc import (
    HEADER_MISMATCH,
    INVALID_REQUEST,
    MAX_DEPTH,
    NAME_PARAMS,
    PARSE_ERROR,
    REQUEST,
    RESPONSE,
    UPSTREAM_ERROR,
    Head,
    body_problem,
    cancelled_frame,
    decode_header_value,
    encode_id,
    error_frame,
    frame_members,
    heads,
    id_key,
    is_batch,
    is_message,
    is_modern,
    join_batch,
    raw_ids,
    too_deep,
)
from mcpmeter.protocol.sse import encode_event
from mcpmeter.proxy.child import ChildServer
from mcpmeter.proxy.http_client import HttpUpstream, new_client
from mcpmeter.proxy.limits import (
    ADMIT_WAIT_S,
    RETRY_S,
    STARTING,
    STARTING_HOLD_S,
    STARTING_WAIT_S,
    BodyTooLarge,
    BoundedReceive,
    ListenLimits,
    Notices,
    Refused,
    SessionRate,
    Slots,
    content_length,
)
from mcpmeter.proxy.mux import Mux
from mcpmeter.proxy.relay import gate_verdict
from mcpmeter.proxy.shutdown import Signals
from mcpmeter.proxy.upstream import Deliver, Upstream, UpstreamError, meter_frame
from mcpmeter.record import CallRecord

if TYPE_CHECKING:
    from mcpmeter.metering.budget import Budget
    from mcpmeter.store.base import Store

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
IdKey = tuple[str, object]

#: After SIGTERM, how long requests in flight may take to be answered.
DRAIN_S = 5.0
#: A streamable-HTTP session with nothing in flight and no stream open for this long is closed.
SESSION_IDLE_S = 30 * 60.0
#: Messages the server starts, kept for a GET stream that is not open yet.
BACKLOG = 1024
#: Events queued for one SSE stream before the server's output waits for the client.
STREAM_BUFFER = 1024
#: How long the members of a batch wait for the server (``--batch-timeout``). Servers of
#: the 2025-06-18 revision on may drop a batch without a word; after this, mcpmeter answers
#: each member still unanswered with a -32000 error and tells the server it gave up.
BATCH_TIMEOUT_S = 60.0
#: Ids a session keeps reserved after their POST stopped waiting (timed out, client gone)
#: while the server may still answer them: reused too soon, a late answer would go to the
#: new request. The oldest is released past this many.
STALE_IDS = 1024
SWITCH_INTERVAL_S = 0.0002

#: The HTTP status of a 2026-07-28 answer that is a JSON-RPC error with this code.
_ERROR_STATUS = {-32700: 400, -32600: 400, -32602: 400, -32601: 404, -32020: 400, -32021: 400, -32022: 400}
_ROUTING_HEADERS = (b"mcp-protocol-version", b"mcp-method", b"mcp-name")
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: mcpmeter's answer to a batch member (or a body) that is not a JSON-RPC message.
_NOT_A_MESSAGE = "mcpmeter: Invalid Request: not a JSON-RPC message"


class ListenOptions(NamedTuple):
    host: str
    port: int
    tenant: Tenant
    #: The session id was given (``--session`` / ``MCPMETER_SESSION_ID``): every session uses it.
    fixed_session: bool = False
    argv: list[str] | None = None
    url: str | None = None
    transport: str = "auto"
    headers: Mapping[str, str] = {}
    shared_server: bool = False
    trust_tag_headers: bool = False
    auth_token: str | None = None
    allow_origins: tuple[str, ...] = ()
    db: str | None = None
    kill_after: float = 5.0
    record_args: bool = False
    #: The flag budgets of one session's tags (``--budget``, ``--max-calls``); stored ones too.
    budgets_for: Callable[[Tenant], tuple[Budget, ...]] | None = None
    max_repeat: int | None = None
    reject_as: str = "tool-error"
    alert_webhook: str | None = None
    #: ``--batch-timeout``: how long a batch's members wait for the server's answers.
    batch_timeout: float = BATCH_TIMEOUT_S
    #: ``--max-sessions``, ``--max-body``, ``--header-timeout`` ... (see transports/limits.py).
    limits: ListenLimits = ListenLimits()


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[::1]:PORT`` or ``PORT`` (on 127.0.0.1)."""
    host, colon, port = value.rpartition(":")
    if not colon:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"wrap: --listen expects HOST:PORT, got {value!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No ``Origin`` (not a browser), a localhost origin, or one listed in ``allowed``."""
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    try:
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and host in _LOCAL_HOSTS


def host_is_local(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name (any port)."""
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.strip("[]").lower() in _LOCAL_HOSTS


_CORS_HEADERS = [
    (b"access-control-allow-methods", b"GET, POST, DELETE"),
    (
        b"access-control-allow-headers",
        b"authorization, content-type, last-event-id, mcp-session-id, mcp-protocol-version, mcp-method, "
        b"mcp-name, x-request-id, x-mcpmeter-project, x-mcpmeter-agent, x-mcpmeter-session",
    ),
    (b"access-control-max-age", b"600"),
]
_CORS_EXPOSE = (b"access-control-expose-headers", b"mcp-session-id, mcp-protocol-version")


def _with_cors(send: Send, origin: str) -> Send:
    """``send``, adding the CORS headers an allowed browser origin needs to read the answer."""
    allow = [(b"access-control-allow-origin", origin.encode("latin-1")), _CORS_EXPOSE, (b"vary", b"Origin")]

    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", []), *allow])
        await send(message)

    return cors_send


# -- ASGI plumbing ----------------------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


async def read_body(receive: Receive) -> bytes:
    """The whole request body; BodyTooLarge as soon as it passes ``--max-body``.

    The limit comes with ``receive`` (a :class:`BoundedReceive`, made by
    :meth:`Gateway.__call__`). A body that arrives in one piece is returned as it came;
    a longer one is gathered in one bytearray that grows with what actually arrived (never
    sized from ``Content-Length`` alone, which a client may announce and not send), and
    nothing past the limit is kept: memory stays near the body's size (twice it at the
    final copy into bytes).
    """
    limit = receive.limit if isinstance(receive, BoundedReceive) else None
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    chunk: bytes = message.get("body", b"")
    more: bool = message.get("more_body", False)
    if limit is not None and len(chunk) > limit:
        raise BodyTooLarge(limit, len(chunk))
    if not more:
        return chunk
    buffer = bytearray(chunk)
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if limit is not None and len(buffer) + len(chunk) > limit:
            raise BodyTooLarge(limit, None if more else len(buffer) + len(chunk))
        buffer += chunk
    return bytes(buffer)


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: bytes = b"application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def _error_body(message: str, code: int = -32600, raw_id: bytes = b"null") -> bytes:
    return error_frame(raw_id, message, code)


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class EventStream:
    """One open SSE response: frames pushed in, events written out, until either side ends."""

    def __init__(self) -> None:
        self._send: MemoryObjectSendStream[bytes]
        self._receive: MemoryObjectReceiveStream[bytes]
        self._send, self._receive = anyio.create_memory_object_stream[bytes](STREAM_BUFFER)

    async def push(self, frame: bytes) -> bool:
        """Queue ``frame`` as a ``message`` event; False once the stream has ended."""
        try:
            await self._send.send(encode_event(frame, "message"))
            return True
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False

    def close(self) -> None:
        self._send.close()

    async def serve(
        self, receive: Receive, send: Send, *, first: list[bytes], headers: list[tuple[bytes, bytes]]
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers})
        for event in first:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            async with self._receive:
                async for event in self._receive:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            tg.cancel_scope.cancel()
        self._send.close()
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- sessions ---------------------------------------------------------------------------------


class Admission(NamedTuple):
    """What becomes of one POST's body in its session (see :meth:`Session.admit`)."""

    #: What goes to the server: the body, or a batch of the members admitted; None: nothing.
    frame: bytes | None
    #: The requests in ``frame``, whose answers the POST waits for.
    requests: list[Head]
    #: mcpmeter's own answers: an error per batch member that is not a JSON-RPC message,
    #: and per request whose id is already in flight in the session. Never forwarded.
    own: list[bytes]
    batch: bool

    def answer(self) -> bytes:
        """mcpmeter's own answers as one body: the batch of them, or the one error."""
        return join_batch(self.own) if self.batch else self.own[0]


class Waiter:
    """A POST waiting for the answers to its requests (and anything sent its way first).

    ``frame`` is what was forwarded, read again only when mcpmeter must answer for the
    server (the exact bytes of each id). ``own`` are the answers mcpmeter gives itself,
    added to the server's. A waiter of the HTTP+SSE transport (``queue=False``) only
    tracks which ids are still in flight: its answers travel on the session's stream.

    Items wait in a deque, not a memory stream, so a reader cancelled at its deadline (or
    by a disconnect) never loses one that arrived in the same instant.
    """

    def __init__(
        self,
        requests: list[Head],
        frame: bytes,
        own: Sequence[bytes] = (),
        *,
        batch: bool = False,
        queue: bool = True,
    ) -> None:
        self.requests = requests
        self.frame = frame
        self.own = list(own)
        self.batch = batch
        self.keys = [id_key(h.id) for h in requests]
        self.pending: set[IdKey] = set(self.keys)
        self.tokens: set[IdKey] = {id_key(h.progress_token) for h in requests if h.progress_token is not None}
        #: Set once nothing more is awaited: every request answered, or :meth:`fail`.
        self.done = anyio.Event()
        self._queue = queue
        self._items: deque[tuple[bytes, bool] | str] = deque()
        self._wake = anyio.Event()
        self._closed = False

    def _push(self, item: tuple[bytes, bool] | str) -> None:
        if self._queue and not self._closed:
            self._items.append(item)
            self._wake.set()

    def put(self, frame: bytes, answered: list[IdKey]) -> None:
        for key in answered:
            self.pending.discard(key)
        if not self.pending:
            self.done.set()
        self._push((frame, not self.pending))

    def fail(self, reason: str) -> None:
        """No more answers will come, for ``reason``."""
        self.done.set()
        self._push(reason)

    async def next(self) -> tuple[bytes, bool] | str:
        """The next frame (and whether it completes the answers), or why none will come."""
        while not self._items:
            self._wake = anyio.Event()
            await self._wake.wait()
        return self._items.popleft()

    def close(self) -> None:
        self._closed = True
        self._items.clear()

    def unanswered(self) -> list[bytes]:
        """The exact id bytes of the requests still unanswered, in the order they were sent."""
        if not self.pending:
            return []
        ids = raw_ids(self.frame)
        return [ids.get(key) or encode_id(key[1]) for key in self.keys if key in self.pending]

    def with_own(self, frame: bytes) -> bytes:
        """The server's answer ``frame`` with mcpmeter's own answers added (one batch)."""
        return join_batch([frame, *self.own]) if self.own else frame

    def closing(self, errors: list[bytes]) -> bytes:
        """mcpmeter's own answers and ``errors`` as the last body or event of this POST."""
        frames = self.own + errors
        if not self.batch and len(frames) == 1:
            return frames[0]
        return join_batch(frames)


class Session:
    """One client session: its tags, its meter, its upstream and who waits for what."""

    def __init__(self, gateway: Gateway, sid: str, tenant: Tenant, transport: str, *, modern: bool) -> None:
        self.id = sid
        self.tenant = tenant
        self.modern = modern
        self.transport = transport
        self.gateway = gateway
        self.upstream: Upstream | None = None
        self.meter = CallMeter(
            tenant,
            self._sink,
            transport=transport,
            upstream=gateway.upstream_kind,
            default_server=gateway.server_name,
            record_args=gateway.options.record_args,
        )
        # 2026-07-28 exchanges (a session per request, one tag set) share the gateway's gate.
        self._own_gate = not modern
        gate_for = gateway.modern_gate if modern else gateway.budget_gate
        self.gate = gate_for(tenant, self._server_name)
        self.hints: dict[str, str] = {}  # jsonrpc_id -> X-Request-Id
        self.waiters: dict[IdKey, Waiter] = {}
        #: Ids whose POST stopped waiting before the server answered (insertion-ordered set).
        self.stale: dict[IdKey, None] = {}
        self.get_stream: EventStream | None = None
        self.legacy_stream: EventStream | None = None
        self.backlog: deque[bytes] = deque(maxlen=BACKLOG)
        self.busy = 0
        self.last_used = time.monotonic()
        self.closed = False
        self.started = anyio.Event()
        self._watch = anyio.CancelScope()

    def _sink(self, record: CallRecord) -> None:
        if self.hints and record.direction == C2S:
            hint = self.hints.pop(record.jsonrpc_id, None)
            if hint is not None and record.request_id is None:
                record = record._replace(request_id=hint)
        upstream = self.upstream
        if upstream is not None and record.upstream != upstream.kind:
            record = record._replace(upstream=upstream.kind)
        self.gateway.writer.put(record)

    async def start(self) -> None:
        try:
            self.upstream = await self.gateway.open_upstream(self.on_upstream_frame, modern=self.modern)
        finally:
            self.started.set()
        self.gateway.tg.start_soon(self._watch_upstream, self.upstream)

    async def ready(self) -> Upstream:
        """The upstream, once :meth:`start` is done; UpstreamError if it could not start."""
        await self.started.wait()
        if self.upstream is None or self.closed:
            raise UpstreamError("the server has exited")
        return self.upstream

    async def _watch_upstream(self, upstream: Upstream) -> None:
        with self._watch:
            await upstream.closed.wait()
        if not self.closed:
            await self.gateway.close_session(self)

    def _server_name(self) -> str | None:
        return self.meter.peers.server_name

    def meter_c2s(self, frame: bytes, seen: float) -> None:
        meter_frame(self.meter, C2S, frame, seen)

    async def refusal(self, body: bytes, hs: list[Head], seen: float) -> bytes | None:
        """The proxy's own answer when a budget or the loop guard refuses this tools/call."""
        if not self.gate.active or len(hs) != 1 or hs[0].kind != REQUEST or hs[0].method != "tools/call":
            return None
        verdict = await anyio.to_thread.run_sync(gate_verdict, self.gate, body)
        if verdict is None:
            return None
        rpc_id, answer = verdict
        self.meter_c2s(body, seen)
        with self.meter.lock:
            self.meter.on_refused(C2S, rpc_id, len(answer), time.perf_counter())
        return answer

    async def on_upstream_frame(self, frame: bytes, seen: float) -> None:
        meter_frame(self.meter, S2C, frame, seen)
        self.last_used = time.monotonic()
        if self.legacy_stream is not None:
            if self.waiters or self.stale:
                hs = heads(frame)
                if hs and all(h.kind == RESPONSE for h in hs):
                    self._answered(frame, hs)
            await self.legacy_stream.push(frame)
            return
        hs = heads(frame)
        if hs and all(h.kind == RESPONSE for h in hs):
            self._answered(frame, hs)
            return
        target: Waiter | None = None
        for head in hs:
            if head.method == "notifications/progress" and head.progress_token is not None:
                token = id_key(head.progress_token)
                target = next((w for w in reversed(self.waiters.values()) if token in w.tokens), None)
        if target is None and self.get_stream is not None and await self.get_stream.push(frame):
            return
        if target is None and self.waiters:
            target = next(reversed(self.waiters.values()))
        if target is not None:
            target.put(frame, [])
        elif not self.modern:
            self.backlog.append(frame)

    def _answered(self, frame: bytes, hs: list[Head]) -> None:
        """Server answers: to the POST waiting for them. With none (its client went away,
        or mcpmeter answered for the server when it timed out) the frame goes nowhere; the
        rows are written all the same, and each id is free for the client to use again."""
        keys = [id_key(h.id) for h in hs]
        waiter = next((self.waiters[k] for k in keys if k in self.waiters), None)
        for key in keys:
            self.waiters.pop(key, None)
            if self.stale:
                self.stale.pop(key, None)
        if waiter is not None:
            waiter.put(frame, keys)

    def in_flight(self, key: IdKey) -> bool:
        """Whether the server may still answer a request of this session with this id."""
        return key in self.waiters or key in self.stale

    def admit(self, body: bytes, hs: list[Head]) -> Admission:
        """Sort a POST's messages: what goes to the server, what mcpmeter answers itself.

        A request whose id is already in flight in this session is answered with a -32600
        error and not forwarded: the server would see one id twice, and one answer would
        reach the wrong POST (or neither would). So is a batch member that is not a JSON-RPC
        message. The common case (no such member) costs one set lookup per request.
        Call :meth:`wait_for` with no ``await`` in between, so a concurrent POST of the
        same id sees this one.
        """
        batch = is_batch(body)
        requests = [h for h in hs if h.kind == REQUEST]
        keys = {id_key(h.id) for h in requests}
        clean = len(keys) == len(requests) and all(is_message(h) for h in hs)
        if clean and not any(self.in_flight(key) for key in keys):
            return Admission(body, requests, [], batch)
        kept: list[bytes] = []
        admitted: list[Head] = []
        own: list[bytes] = []
        seen: set[IdKey] = set()
        for member in frame_members(body):
            head = member.head
            if not is_message(head):
                own.append(error_frame(member.raw_id, _NOT_A_MESSAGE, INVALID_REQUEST))
                continue
            if head.kind == REQUEST:
                key = id_key(head.id)
                if key in seen or self.in_flight(key):
                    shown = member.raw_id.decode(errors="replace")
                    why = f"mcpmeter: Invalid Request: id {shown} is already in flight in this session"
                    own.append(error_frame(member.raw_id, why, INVALID_REQUEST))
                    continue
                seen.add(key)
                admitted.append(head)
            kept.append(member.raw)
        if not kept:
            return Admission(None, [], own, batch)
        return Admission(join_batch(kept) if batch else body, admitted, own, batch)

    def wait_for(self, admission: Admission, *, queue: bool = True) -> Waiter:
        """Register the POST of ``admission`` as where the answers to its requests go."""
        assert admission.frame is not None
        waiter = Waiter(
            admission.requests, admission.frame, admission.own, batch=admission.batch, queue=queue
        )
        for key in waiter.pending:
            self.waiters[key] = waiter
        return waiter

    def forget(self, waiter: Waiter, *, sent: bool = True) -> None:
        """The POST of ``waiter`` stops waiting. The ids of requests it ``sent`` that are
        still unanswered stay reserved (see :data:`STALE_IDS`): the server may answer yet."""
        for key in waiter.keys:
            if self.waiters.get(key) is waiter:
                del self.waiters[key]
                if sent and not self.closed:
                    self.stale[key] = None
        while len(self.stale) > STALE_IDS:
            del self.stale[next(iter(self.stale))]
        waiter.close()

    async def close(self, reason: str = "the server has exited") -> None:
        """Answer whoever still waits, write the last rows, then end the upstream session."""
        if self.closed:
            return
        self.closed = True
        if self._own_gate:
            self.gateway.gates.discard(self.gate)
            self.gate.close()
        self._watch.cancel()
        for waiter in set(self.waiters.values()):
            waiter.fail(reason)
        self.waiters.clear()
        for stream in (self.get_stream, self.legacy_stream):
            if stream is not None:
                stream.close()
        with self.meter.lock:
            self.meter.close()
        if self.upstream is not None:
            await self.upstream.aclose()


# -- the application --------------------------------------------------------------------------


class Gateway:
    """The ASGI application behind ``--listen``."""

    def __init__(self, options: ListenOptions, writer: AuditWriter, tg: TaskGroup) -> None:
        self.options = options
        self.writer = writer
        self.tg = tg
        budgets = _BUDGETS.get(id(writer)) or _Budgets(None)
        #: Every live session's budget gate; the audit writer refreshes and settles them.
        self.gates: set[BudgetGate] = budgets.gates
        self.alerter = budgets.alerter
        self._modern_gates: dict[tuple[str | None, str | None, str, str], BudgetGate] = {}
        self.sessions: dict[str, Session] = {}  # Mcp-Session-Id or /sse session_id -> session
        #: 2026-07-28 requests in flight, one short-lived session each (clients' ids may collide).
        self.exchanges: set[Session] = set()
        self.stateless_session = options.tenant.session_id if options.fixed_session else new_session_id()
        self.draining = False
        self.inflight = 0
        self._idle = anyio.Event()
        self._idle.set()
        self.client: httpx.AsyncClient | None = None
        if options.argv is not None:
            self.server_name: str | None = os.path.basename(options.argv[0])
            self.upstream_kind = "stdio"
        else:
            assert options.url is not None
            self.server_name = urlsplit(options.url).hostname or options.url
            self.upstream_kind = "sse" if options.transport == "sse" else "http"
        shared_kind = self.upstream_kind
        self._handshake_mux = Mux(self._open_direct, tg, kind=shared_kind) if options.shared_server else None
        self._modern_mux = Mux(self._open_direct, tg, kind=shared_kind)
        self._token = options.auth_token.encode() if options.auth_token else None
        self._origins = tuple(o.strip().rstrip("/").lower() for o in options.allow_origins)
        #: Without a token, a loopback bind is only safe if the Host names it (DNS rebinding).
        self._check_host = self._token is None and is_loopback(options.host)
        self.limits = limits = options.limits
        self.notices = Notices()
        self.session_rate = SessionRate(limits.session_rate, limits.session_burst)
        #: Each handshake-era session has a server process of its own (``-- CMD``, not shared).
        self._own_servers = options.argv is not None and not options.shared_server
        #: Those processes, counted from their spawn to their exit (a closed session's may linger).
        self.servers = Slots(limits.max_servers)
        #: Those still starting (spawned, not yet heard from): a few at a time.
        self.starting = Slots(STARTING)
        self._opening = 0  # sessions admitted and still starting

    # -- upstreams -------------------------------------------------------------------------

    async def _open_direct(self, deliver: Deliver) -> Upstream:
        options = self.options
        if options.argv is not None:
            child = ChildServer(options.argv, deliver, kill_after=options.kill_after)
            await child.start(self.tg)
            return child
        assert options.url is not None and self.client is not None
        remote = HttpUpstream(
            options.url,
            deliver,
            client=self.client,
            tg=self.tg,
            mode=options.transport,
            headers=options.headers,
        )
        await remote.start()
        return remote

    async def open_upstream(self, deliver: Deliver, *, modern: bool) -> Upstream:
        if modern:
            return await self._modern_mux.channel(deliver)
        if self._handshake_mux is not None:
            return await self._handshake_mux.channel(deliver)
        return await self._open_direct(deliver)

    # -- sessions --------------------------------------------------------------------------

    def tenant_for(self, headers: Mapping[str, str], default_session: str) -> Tenant:
        base = self.options.tenant
        project, agent = base.project_id, base.agent_id
        session = base.session_id if self.options.fixed_session else default_session
        if self.options.trust_tag_headers:
            project = headers.get("x-mcpmeter-project") or project
            agent = headers.get("x-mcpmeter-agent") or agent
            session = headers.get("x-mcpmeter-session") or session
        return Tenant(project_id=project, agent_id=agent, session_id=session, tags=base.tags)

    async def new_session(
        self, headers: Mapping[str, str], transport: str, *, legacy: bool = False
    ) -> Session:
        """A handshake-era session, once the caps let it in (Refused otherwise)."""
        own_server = await self._admit()
        turn = False
        try:
            if own_server:
                await self._turn_to_start()
                turn = True
            sid = new_session_id()
            session = Session(self, sid, self.tenant_for(headers, sid), transport, modern=False)
            if legacy:
                session.legacy_stream = EventStream()
            await session.start()
        except BaseException:
            if turn:
                self.starting.give()
            if own_server:
                self.servers.give()
            raise
        finally:
            self._opening -= 1
        if own_server:
            self.tg.start_soon(self._server_slot, session.upstream)
        self.sessions[sid] = session
        return session

    async def _admit(self) -> bool:
        """Room for one more session under ``--max-sessions`` and ``--max-servers``, closing
        idle sessions for it if need be; Refused (503) when there is none. Counts the session
        as opening; True when it also took a server slot."""
        limits = self.limits
        deadline = time.monotonic() + ADMIT_WAIT_S
        while True:
            if len(self.sessions) + self._opening >= limits.max_sessions:
                if not self._evict_idle():
                    raise Refused(
                        503,
                        "sessions",
                        f"refused a new session: {limits.max_sessions} are open (--max-sessions)",
                        RETRY_S,
                    )
                continue
            if self._own_servers and self.servers.full:
                # Processes of closed sessions still exiting free their slots soon; else close one.
                exiting = self.servers.used - len(self.sessions) - self._opening
                left = deadline - time.monotonic()
                if (exiting > 0 or self._evict_idle()) and left > 0:
                    with anyio.move_on_after(left) as waited:
                        await self.servers.freed()
                    if not waited.cancelled_caught:
                        continue
                raise Refused(
                    503,
                    "servers",
                    f"refused a new session: {limits.max_servers} server processes are running "
                    "(--max-servers)",
                    RETRY_S,
                )
            break
        self._opening += 1
        if self._own_servers:
            self.servers.take()
        return self._own_servers

    def _evict_idle(self) -> bool:
        """Close the least recently used session idle for ``--evict-idle`` seconds (nothing
        in flight, no stream open); False when there is none."""
        after = self.limits.evict_idle
        if after <= 0:
            return False
        now = time.monotonic()
        victim: Session | None = None
        for session in self.sessions.values():
            if session.busy or session.waiters or session.get_stream or session.legacy_stream:
                continue
            if now - session.last_used >= after and (victim is None or session.last_used < victim.last_used):
                victim = session
        if victim is None:
            return False
        del self.sessions[victim.id]  # its place is free now; its close goes on in the background
        self.tg.start_soon(self.close_session, victim, "the session was idle and closed to make room")
        self.notices.note(
            "evict-session",
            f"closed a session idle for {now - victim.last_used:.0f} s to make room for a new one "
            "(--evict-idle)",
        )
        return True

    async def _turn_to_start(self) -> None:
        """Wait until fewer than STARTING servers are starting, and count this one: a burst
        of new sessions starts its servers a few at a time, never on every core at once.
        Refused (503) after STARTING_WAIT_S."""
        with anyio.move_on_after(STARTING_WAIT_S):
            while self.starting.full:
                await self.starting.freed()
            self.starting.take()
            return
        raise Refused(
            503,
            "starting",
            f"refused a new session: it waited {STARTING_WAIT_S:g} s for other servers to start",
            RETRY_S,
        )

    async def _server_slot(self, upstream: Upstream | None) -> None:
        """Give a session's turn to start back once its server has written something (or
        after STARTING_HOLD_S), and its server slot once its process has exited."""
        try:
            try:
                if isinstance(upstream, ChildServer):
                    with anyio.move_on_after(STARTING_HOLD_S):
                        await upstream.spoke.wait()
            finally:
                self.starting.give()
            if isinstance(upstream, ChildServer):
                await upstream.wait()
        finally:
            self.servers.give()

    async def exchange_session(self, headers: Mapping[str, str]) -> Session:
        """A session for one 2026-07-28 request: its own meter and its own share of the upstream."""
        tenant = self.tenant_for(headers, self.stateless_session)
        session = Session(self, tenant.session_id, tenant, "http", modern=True)
        await session.start()
        self.exchanges.add(session)
        return session

    def modern_gate(self, tenant: Tenant, server_name: Callable[[], str | None]) -> BudgetGate:
        """The gate 2026-07-28 requests with these tags share (each request is a session)."""
        key = (tenant.project_id, tenant.agent_id, tenant.session_id, tenant.tags_json)
        gate = self._modern_gates.get(key)
        if gate is None:
            gate = self._modern_gates[key] = self.budget_gate(tenant, server_name)
        return gate

    def budget_gate(self, tenant: Tenant, server_name: Callable[[], str | None]) -> BudgetGate:
        """A session's gate: the flag budgets of its tags, the store's, the loop guard."""
        from mcpmeter.proxy.stdio import _store_opener, resolve_db

        options = self.options
        gate = BudgetGate(
            _store_opener(resolve_db(options.db)),
            tenant,
            inject=lambda frame: None,  # refusals are the POST's answer (see Session.refusal)
            budgets=options.budgets_for(tenant) if options.budgets_for else (),
            max_repeat=options.max_repeat,
            reject_as=options.reject_as,
            server_name=server_name,
            alert=self.alerter,
        )
        self.gates.add(gate)
        return gate

    async def close_session(self, session: Session, reason: str = "the server has exited") -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        self.exchanges.discard(session)
        await session.close(reason)

    async def reap_idle(self) -> None:
        while True:
            await anyio.sleep(60)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.busy == 0 and now - session.last_used > SESSION_IDLE_S:
                    self.tg.start_soon(self.close_session, session, "the session was idle too long")

    def _begin(self) -> None:
        self.inflight += 1
        self._idle = anyio.Event()

    def _end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Refuse new requests; wait until none is in flight (the caller bounds the wait)."""
        self.draining = True
        await self._idle.wait()

    async def close_all(self) -> None:
        """Close every session at once (each answers its waiting POSTs first)."""
        sessions = [*self.sessions.values(), *self.exchanges]
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(self.close_session, session, "mcpmeter is shutting down")
            for mux in (self._handshake_mux, self._modern_mux):
                if mux is not None:
                    tg.start_soon(mux.aclose)

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        origin = headers.get("origin")
        if not origin_allowed(origin, self._origins):
            await respond(send, 403, b"Forbidden: Origin not allowed", b"text/plain")
            return
        if self._check_host and not host_is_local(headers.get("host")):
            # DNS rebinding: a page whose name now points at 127.0.0.1 still sends its own Host.
            await respond(send, 421, b"Misdirected Request: Host must be a loopback name", b"text/plain")
            return
        if origin is not None:
            send = _with_cors(send, origin)
            if scope["method"] == "OPTIONS":  # a browser's preflight
                await respond(send, 204, b"", b"text/plain", _CORS_HEADERS)
                return
        if self._token is not None and not self._authorized(headers.get("authorization")):
            await respond(send, 401, b"Unauthorized", b"text/plain", [(b"www-authenticate", b"Bearer")])
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if self.draining and method != "POST":
            await _shutting_down(send)
            return
        try:
            if method == "POST":
                length = content_length(headers.get("content-length"))
                if length is not None and length > self.limits.max_body:
                    raise BodyTooLarge(self.limits.max_body, length)
                receive = BoundedReceive(receive, self.limits.max_body, length)
            if self._opens_session(path, method, headers):
                client = scope.get("client")
                wait = self.session_rate.take(client[0] if client else None)
                if wait:
                    who = client[0] if client else "a client"
                    rate = f"{self.limits.session_rate:g} per second, {self.limits.session_burst} at once"
                    message = f"refused a new session from {who}: over {rate} (--session-rate)"
                    raise Refused(429, "rate", message, wait)
            if path == "/mcp":
                if method == "POST":
                    await self._post_mcp(raw_headers, headers, receive, send)
                elif method == "GET":
                    await self._get_mcp(headers, receive, send)
                elif method == "DELETE":
                    await self._delete_mcp(headers, send)
                else:
                    await respond(
                        send, 405, b"Method Not Allowed", b"text/plain", [(b"allow", b"GET, POST, DELETE")]
                    )
            elif path == "/sse" and method == "GET":
                await self._get_sse(headers, receive, send)
            elif path in ("/messages", "/messages/") and method == "POST":
                await self._post_messages(scope, headers, receive, send)
            else:
                await respond(send, 404, b"Not Found", b"text/plain")
        except ClientGone:
            return
        except Refused as refusal:  # raised before any answer started (see read_body, _admit)
            self.notices.note(refusal.kind, refusal.message)
            text = refusal.answer if isinstance(refusal, BodyTooLarge) else _refusal_text(refusal)
            await respond(send, refusal.status, text, b"text/plain", refusal.headers())

    @staticmethod
    def _opens_session(path: str, method: str, headers: Mapping[str, str]) -> bool:
        """Whether a request would open a handshake-era session (``--session-rate`` counts it)."""
        if path == "/sse":
            return method == "GET"
        return (
            path == "/mcp"
            and method == "POST"
            and "mcp-session-id" not in headers
            and not is_modern(headers.get("mcp-protocol-version"))
        )

    def _authorized(self, value: str | None) -> bool:
        assert self._token is not None
        scheme, _, token = (value or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token)

    async def _post_mcp(
        self, raw_headers: list[tuple[bytes, bytes]], headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        body = await read_body(receive)
        seen = time.perf_counter()
        hs = heads(body)
        refused = _refuse_body(body, hs)
        if refused is not None:
            await respond(send, 400, refused)
            return
        if self.draining and any(h.kind == REQUEST for h in hs):
            await _shutting_down(send)  # answers for the calls in flight are still welcome
            return
        if is_modern(headers.get("mcp-protocol-version")):
            await self._post_modern(raw_headers, headers, body, seen, receive, send)
            return
        sid = headers.get("mcp-session-id")
        extra: list[tuple[bytes, bytes]] = []
        if sid is None:
            if not any(h.kind == REQUEST and h.method == "initialize" for h in hs):
                message = "Bad Request: no Mcp-Session-Id; a session starts with initialize"
                await respond(send, 400, _error_body(message))
                return
            try:
                session = await self.new_session(headers, "http")
            except UpstreamError as exc:
                warn_once(f"start:{exc}", str(exc))
                await respond(send, 502, self._errors(body, str(exc)))
                return
            extra = [(b"mcp-session-id", session.id.encode())]
        else:
            found = self.sessions.get(sid)
            if found is None or found.legacy_stream is not None:
                await respond(send, 404, _error_body("Session not found"))
                return
            session = found
        await self._exchange(session, body, hs, seen, headers, receive, send, extra)

    async def _post_modern(
        self,
        raw_headers: list[tuple[bytes, bytes]],
        headers: dict[str, str],
        body: bytes,
        seen: float,
        receive: Receive,
        send: Send,
    ) -> None:
        hs = heads(body)
        if len(hs) != 1 or is_batch(body):
            await respond(send, 400, _error_body("Invalid Request: one JSON-RPC message per POST"))
            return
        head = hs[0]
        problem = _header_mismatch(raw_headers, headers, head)
        if problem is not None:
            raw_id = frame_members(body)[0].raw_id if head.kind == REQUEST else b"null"
            await respond(send, 400, _error_body(problem, HEADER_MISMATCH, raw_id))
            return
        try:
            session = await self.exchange_session(headers)
        except UpstreamError as exc:
            warn_once(f"start:{exc}", str(exc))
            await respond(send, 502, self._errors(body, str(exc)))
            return
        try:
            await self._exchange(session, body, hs, seen, headers, receive, send, [])
        finally:
            await self.close_session(session, "the request has ended")

    async def _exchange(
        self,
        session: Session,
        body: bytes,
        hs: list[Head],
        seen: float,
        headers: Mapping[str, str],
        receive: Receive,
        send: Send,
        extra: list[tuple[bytes, bytes]],
    ) -> None:
        """Forward one POST's body; answer with what comes back for its requests.

        What the session does not admit (see :meth:`Session.admit`) is answered by mcpmeter
        and never forwarded; its answers join the server's in the same body (a batch).
        """
        try:
            upstream = await session.ready()
        except UpstreamError as exc:
            await respond(send, 502, self._errors(body, str(exc)), headers=extra)
            return
        admission = session.admit(body, hs)
        if admission.frame is None:  # nothing for the server: a reused id, or junk alone
            await respond(send, 200, admission.answer(), headers=extra)
            return
        frame, requests = admission.frame, admission.requests
        waiter = session.wait_for(admission) if requests else None  # no await since admit()
        hint = headers.get("x-request-id")
        if hint:
            for head in requests:
                session.hints[str(head.id)] = hint
        answer = await session.refusal(frame, hs, seen) if frame is body else None
        if answer is not None:
            if waiter is not None:
                session.forget(waiter, sent=False)
            await respond(send, 200, answer, headers=extra)
            return
        session.busy += 1
        self._begin()
        sent = False
        try:
            session.meter_c2s(frame, seen)
            try:
                await upstream.send(frame)
            except UpstreamError as exc:
                failure = self._errors(frame, str(exc))
                if admission.own:
                    failure = join_batch([failure, *admission.own])
                await respond(send, 502, failure, headers=extra)
                return
            sent = True
            if waiter is None:
                if admission.own:  # notifications or responses relayed; junk answered
                    await respond(send, 200, admission.answer(), headers=extra)
                else:
                    await respond(send, 202, b"", headers=extra)
                return
            await self._answer(session, waiter, receive, send, extra)
        finally:
            if waiter is not None:
                session.forget(waiter, sent=sent)
            session.busy -= 1
            session.last_used = time.monotonic()
            self._end()

    async def _answer(
        self, session: Session, waiter: Waiter, receive: Receive, send: Send, extra: list[tuple[bytes, bytes]]
    ) -> None:
        """Relay what comes for ``waiter``: one JSON body, or an event stream once the server
        sends more than the answers. A batch waits :data:`BATCH_TIMEOUT_S` at most; then
        mcpmeter answers each member still unanswered (see :meth:`_give_up`)."""
        streaming = False
        timeout = self.options.batch_timeout if waiter.batch else math.inf
        deadline = anyio.current_time() + timeout
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_disconnect, receive, scope)
                while True:
                    item: tuple[bytes, bool] | str | None = None
                    with anyio.move_on_after(deadline - anyio.current_time()):
                        item = await waiter.next()
                    if item is None or isinstance(item, str):  # no (more) answers will come
                        if item is None:
                            closing, status = waiter.closing(await self._give_up(session, waiter)), 200
                        else:
                            ids = waiter.unanswered() or [b"null"]
                            failures = [error_frame(raw_id, f"mcpmeter: {item}") for raw_id in ids]
                            closing, status = waiter.closing(failures), 502
                        if streaming:
                            event = encode_event(closing, "message")
                            await send({"type": "http.response.body", "body": event})
                        else:
                            await respond(send, status, closing, headers=extra)
                        break
                    frame, complete = item
                    if complete and not streaming:
                        body = waiter.with_own(frame)
                        await respond(send, self._status(session, body), body, headers=extra)
                        break
                    if not streaming:
                        streaming = True
                        start = {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": _SSE_HEADERS + extra,
                        }
                        await send(start)
                    last = complete and not waiter.own
                    event = encode_event(frame, "message")
                    await send({"type": "http.response.body", "body": event, "more_body": not last})
                    if complete:
                        if waiter.own:
                            event = encode_event(join_batch(waiter.own), "message")
                            await send({"type": "http.response.body", "body": event})
                        break
                tg.cancel_scope.cancel()
        if scope.cancelled_caught and session.modern and waiter.pending:
            # 2026-07-28: a closed response stream is the request's cancellation.
            await self._cancel(session, waiter)

    async def _cancel(
        self, session: Session, waiter: Waiter, reason: str = "the client closed the request"
    ) -> None:
        """Tell the server the requests ``waiter`` still waits for are cancelled (one
        ``notifications/cancelled`` each, with the exact id bytes the client sent)."""
        upstream = session.upstream
        if upstream is None:
            return
        for raw_id in waiter.unanswered():
            frame = cancelled_frame(raw_id, reason)
            session.meter_c2s(frame, time.perf_counter())
            with contextlib.suppress(UpstreamError):
                await upstream.send(frame)

    async def _give_up(self, session: Session, waiter: Waiter) -> list[bytes]:
        """The batch of ``waiter`` is past its bound: a -32000 error for each member the
        server has not answered. Each is metered as that request's answer, so its row says
        ``error`` with code -32000 and this message, written now with the wait as its
        latency (a late answer from the server cannot rewrite it). The server is told the
        requests are cancelled, as MCP asks of a requester that stops waiting."""
        why = f"mcpmeter: no answer from the server within {self.options.batch_timeout:g} s"
        errors = [error_frame(raw_id, why, UPSTREAM_ERROR) for raw_id in waiter.unanswered()]
        seen = time.perf_counter()
        for frame in errors:
            meter_frame(session.meter, S2C, frame, seen)
        await self._cancel(session, waiter, why)
        return errors

    def _status(self, session: Session, frame: bytes) -> int:
        if not session.modern:
            return 200
        hs = heads(frame)
        code = hs[0].error_code if len(hs) == 1 else None
        return _ERROR_STATUS.get(code, 200) if code is not None else 200

    @staticmethod
    def _errors(frame: bytes, reason: str) -> bytes:
        """Error answers of mcpmeter's own for the requests in ``frame`` (not metered), with
        the exact id bytes the client sent."""
        frames = [
            error_frame(m.raw_id, f"mcpmeter: {reason}", UPSTREAM_ERROR)
            for m in frame_members(frame)
            if m.head.kind == REQUEST
        ]
        if not frames:
            return _error_body(f"mcpmeter: {reason}", UPSTREAM_ERROR)
        return frames[0] if len(frames) == 1 and not is_batch(frame) else join_batch(frames)

    async def _get_mcp(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        if is_modern(headers.get("mcp-protocol-version")):
            await respond(send, 405, b"Method Not Allowed", b"text/plain", [(b"allow", b"POST")])
            return
        sid = headers.get("mcp-session-id")
        session = self.sessions.get(sid) if sid is not None else None
        if session is None or session.legacy_stream is not None:
            status = 400 if sid is None else 404
            await respond(send, status, _error_body("Bad Request: no valid Mcp-Session-Id"))
            return
        if session.get_stream is not None:
            await respond(send, 409, _error_body("Conflict: this session's stream is already open"))
            return
        stream = session.get_stream = EventStream()
        first = [encode_event(frame, "message") for frame in session.backlog]
        session.backlog.clear()
        session.busy += 1
        try:
            await stream.serve(receive, send, first=first, headers=[])
        finally:
            session.busy -= 1
            session.last_used = time.monotonic()
            if session.get_stream is stream:
                session.get_stream = None

    async def _delete_mcp(self, headers: dict[str, str], send: Send) -> None:
        sid = headers.get("mcp-session-id")
        session = self.sessions.get(sid) if sid is not None else None
        if session is None or session.legacy_stream is not None:
            await respond(send, 404, _error_body("Session not found"))
            return
        await self.close_session(session)
        await respond(send, 200, b"")

    async def _get_sse(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        try:
            session = await self.new_session(headers, "sse", legacy=True)
        except UpstreamError as exc:
            warn_once(f"start:{exc}", str(exc))
            await respond(send, 502, str(exc).encode(), b"text/plain")
            return
        stream = session.legacy_stream
        assert stream is not None
        endpoint = encode_event(f"/messages?session_id={session.id}".encode(), "endpoint")
        session.busy += 1
        try:
            await stream.serve(receive, send, first=[endpoint], headers=[])
        finally:
            session.busy -= 1
            await self.close_session(session)

    async def _post_messages(
        self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        sid = (query.get("session_id") or query.get("sessionId") or [""])[0]
        session = self.sessions.get(sid)
        if session is None or session.legacy_stream is None:
            await respond(send, 404, b"Could not find session", b"text/plain")
            return
        body = await read_body(receive)
        seen = time.perf_counter()
        hs = heads(body)
        refused = _refuse_body(body, hs)
        if refused is not None:
            await respond(send, 400, refused)
            return
        if self.draining and any(h.kind == REQUEST for h in hs):
            await _shutting_down(send)
            return
        stream = session.legacy_stream
        upstream = session.upstream
        assert upstream is not None and stream is not None
        # As on /mcp, but every answer travels on the session's stream: the waiter only
        # tracks which ids are in flight, and bounds a batch's wait.
        admission = session.admit(body, hs)
        if admission.frame is None:
            await stream.push(admission.answer())
            await respond(send, 202, b"Accepted", b"text/plain")
            return
        frame, requests = admission.frame, admission.requests
        waiter = session.wait_for(admission, queue=False) if requests else None  # no await since admit()
        hint = headers.get("x-request-id")
        if hint:
            for head in requests:
                session.hints[str(head.id)] = hint
        answer = await session.refusal(frame, hs, seen) if frame is body else None
        if answer is not None:
            if waiter is not None:
                session.forget(waiter, sent=False)
            await stream.push(answer)
            await respond(send, 202, b"Accepted", b"text/plain")
            return
        session.meter_c2s(frame, seen)
        try:
            await upstream.send(frame)
        except UpstreamError as exc:
            if waiter is not None:
                session.forget(waiter, sent=False)
            await respond(send, 502, str(exc).encode(), b"text/plain")
            return
        if admission.own:
            await stream.push(join_batch(admission.own))
        if waiter is not None and waiter.batch:
            self.tg.start_soon(self._expire, session, waiter)
        session.last_used = time.monotonic()
        await respond(send, 202, b"Accepted", b"text/plain")

    async def _expire(self, session: Session, waiter: Waiter) -> None:
        """An HTTP+SSE batch past its bound: mcpmeter's answers for the members still
        unanswered go on the session's stream (see :meth:`_give_up`)."""
        with anyio.move_on_after(self.options.batch_timeout):
            await waiter.done.wait()
        stream = session.legacy_stream
        if waiter.pending and not session.closed and stream is not None:
            await stream.push(join_batch(await self._give_up(session, waiter)))
        session.forget(waiter)


def _refusal_text(refusal: Refused) -> bytes:
    status = "Too Many Requests" if refusal.status == 429 else "Service Unavailable"
    return f"{status}: mcpmeter {refusal.message}".encode()


async def _shutting_down(send: Send) -> None:
    await respond(
        send, 503, b"Service Unavailable: shutting down", b"text/plain", [(b"connection", b"close")]
    )


def _refuse_body(body: bytes, hs: list[Head]) -> bytes | None:
    """The 400 answer for a body that holds no JSON-RPC message mcpmeter can forward.

    Not JSON, empty, or nested deeper than :data:`MAX_DEPTH`: a -32700 parse error. JSON
    but no JSON-RPC message in it (a scalar, ``{}``, an empty batch, a batch of junk alone):
    -32600, one per member for a batch, as JSON-RPC answers ``[1,2,3]``. None otherwise
    (a batch with junk beside valid members is answered member by member instead). The
    depth is checked only after the decoder accepted the body, and costs two byte counts
    unless the body has more than :data:`MAX_DEPTH` brackets.
    """
    if not hs:
        code, message = body_problem(body)
        return error_frame(b"null", message, code)
    if too_deep(body):
        message = f"mcpmeter: Parse error: JSON nested deeper than {MAX_DEPTH} levels"
        return error_frame(b"null", message, PARSE_ERROR)
    if any(is_message(h) for h in hs):
        return None
    errors = [error_frame(m.raw_id, _NOT_A_MESSAGE, INVALID_REQUEST) for m in frame_members(body)]
    return join_batch(errors) if is_batch(body) else errors[0]


def _header_mismatch(
    raw_headers: list[tuple[bytes, bytes]], headers: Mapping[str, str], head: Head
) -> str | None:
    """Why a 2026-07-28 request's routing headers disagree with its body, or None."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in _ROUTING_HEADERS:
            if name in seen:
                return f"{name.decode()} header appears more than once"
            seen.add(name)
    version = headers.get("mcp-protocol-version")
    if head.version is not None and head.version != version:
        return "mcp-protocol-version header does not match the request envelope's protocol version"
    if head.method is not None:
        if headers.get("mcp-method") != head.method:
            return "mcp-method header does not match the request body's method"
        key = NAME_PARAMS.get(head.method)
        if (
            key is not None
            and head.name is not None
            and decode_header_value(headers.get("mcp-name")) != head.name
        ):
            return f"mcp-name header does not match the request body's {key!r} parameter"
    return None


# -- running it -------------------------------------------------------------------------------


def check_options(options: ListenOptions) -> None:
    """Refuse what must not start: a bare non-loopback bind, a command that is not there."""
    if not is_loopback(options.host) and not options.auth_token:
        raise UsageError(
            f"wrap: --listen {options.host} is not a loopback address: "
            "give --auth-token (or MCPMETER_AUTH_TOKEN) to serve it"
        )
    if options.argv is not None and shutil.which(options.argv[0]) is None:
        if os.path.sep in options.argv[0] and os.path.exists(options.argv[0]):
            raise MeterError(f"permission denied: {options.argv[0]}", exit_code=126)
        raise MeterError(f"command not found: {options.argv[0]}", exit_code=127)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise MeterError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class _Budgets:
    """What budgets need across the sessions of one ``--listen``: every live session's gate
    (the audit writer refreshes and settles them) and the webhook alerter they share."""

    def __init__(self, alert_webhook: str | None) -> None:
        from mcpmeter.proxy.stdio import _alerter

        self.gates: set[BudgetGate] = set()
        self.alerter = _alerter(alert_webhook)


#: The budgets of each running ``--listen``, by its audit writer's id.
_BUDGETS: dict[int, _Budgets] = {}


def run_listen(options: ListenOptions) -> int:
    """Serve until SIGTERM/SIGINT/SIGHUP; then drain, close every session, write every row."""
    from mcpmeter.proxy.stdio import start_audit_writer

    check_options(options)
    sock = _bind(options.host, options.port)
    signals = Signals().install()  # ours to the exit (see mcpmeter.proxy.shutdown)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    budgets = _Budgets(options.alert_webhook)
    gates = budgets.gates

    def on_tick(store: Store) -> None:
        for gate in list(gates):
            gate.refresh(store)

    def on_unavailable() -> None:
        for gate in list(gates):
            gate.unavailable()

    def after_write(store: Store, records: Sequence[CallRecord]) -> None:
        for gate in list(gates):
            gate.settle(store, records)

    writer = start_audit_writer(
        options.db, on_tick=on_tick, on_unavailable=on_unavailable, after_write=after_write
    )
    _BUDGETS[id(writer)] = budgets
    try:
        anyio.run(_serve, options, writer, sock, signals, backend="asyncio")
    finally:
        sock.close()
        signals.while_flushing(writer)
        writer.close(signals.flush_timeout())
        signals.done()
        _BUDGETS.pop(id(writer), None)
        if budgets.alerter is not None:
            budgets.alerter.close(timeout=0 if signals.received[1:] else 1.0)
        if verbose():
            warn(f"{writer.written} rows written, {writer.spilled} spilled")
    return 0


async def _serve(options: ListenOptions, writer: AuditWriter, sock: socket.socket, signals: Signals) -> None:
    import uvicorn

    from mcpmeter.proxy import limits as lim

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # the signals are ours to handle
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # uvicorn's backlog (lim.ACCEPT_BATCH) is also asyncio's accept batch and the
            # listen queue's length; the queue gets its full length back.
            sock.listen(lim.LISTEN_QUEUE)

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    async with anyio.create_task_group() as tg:
        gateway = Gateway(options, writer, tg)
        async with contextlib.AsyncExitStack() as stack:
            if options.url is not None:
                gateway.client = await stack.enter_async_context(new_client())
            limits = options.limits
            guard = lim.guard_for(
                limits,
                gateway.notices,
                servers=min(limits.max_servers, limits.max_sessions) if gateway._own_servers else 2,
                per_connection=1 if options.url is None else 2,  # --url: one to the server, too
            )
            stack.enter_context(lim.quiet_uvicorn(gateway.notices))
            stack.callback(gateway.notices.flush)
            config = uvicorn.Config(
                gateway,
                lifespan="off",
                log_level="warning",
                log_config=None,
                access_log=False,
                http=lim.protocol_for(guard),
                ws="none",
                interface="asgi3",
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=2,
                timeout_keep_alive=lim.KEEP_ALIVE_S,
                backlog=lim.ACCEPT_BATCH,
            )
            server = Server(config)
            served = anyio.Event()

            async def serve() -> None:
                try:
                    await server.serve(sockets=[sock])
                finally:
                    served.set()

            # Signals stay ours until the end: a second SIGTERM must not cut the shutdown short.
            stop = anyio.Event()
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lim.loop_exception_handler(gateway.notices, guard))
            signals.while_relaying(lambda sig: loop.call_soon_threadsafe(stop.set))
            signals.watch(loop)
            if signals.received:
                stop.set()
            tg.start_soon(serve)
            tg.start_soon(gateway.reap_idle)
            warn(f"listening on http://{shown}:{port}/mcp (streamable HTTP) and /sse (HTTP+SSE)")
            if guard.cap < limits.max_connections:
                warn(
                    f"the open-file limit leaves room for {guard.cap} connections: "
                    f"--max-connections {limits.max_connections} lowered to {guard.cap}"
                )
            await stop.wait()
            with anyio.move_on_after(DRAIN_S):
                await gateway.drain()
            await gateway.close_all()
            server.should_exit = True
            with anyio.move_on_after(DRAIN_S):
                await served.wait()
        tg.cancel_scope.cancel()
