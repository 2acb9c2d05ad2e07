"""One client session of ``wrap --listen``, and which waiting POST each answer goes to.

A POST's body is first sorted by :meth:`Session.admit` into what goes to the server and
what mcpmeter answers itself (an :class:`Admission`); the POST then waits on a
:class:`Waiter` for the answers to its requests. Every frame the server sends comes to
:meth:`Session.on_upstream_frame`, which routes it: an answer to the POST that sent its
request; progress to the POST whose progress token it names; anything else the server
starts to the session's GET stream when one is open, else to the POST of the newest
request still waiting, else to a backlog the next GET stream starts with (a 2026-07-28
session, one request long, keeps none). On an HTTP+SSE session every frame goes to its one
stream, and its waiters only track which ids are in flight. Ids whose POST stopped
waiting stay reserved a while (:data:`STALE_IDS`), so a late answer never reaches a newer
request that reused the id.

A session reaches its :class:`~mcpmeter.proxy.listen.gateway.Gateway` for its upstream,
its budget gate and the audit writer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import anyio
import anyio.to_thread

from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.frame import C2S, Frame
from mcpmeter.protocol.rpc import (
    INVALID_REQUEST,
    REQUEST,
    RESPONSE,
    Head,
    encode_id,
    error_frame,
    frame_members,
    heads,
    id_key,
    is_batch,
    is_message,
    join_batch,
    raw_ids,
)
from mcpmeter.proxy.listen.http import NOT_A_MESSAGE, EventStream
from mcpmeter.proxy.observers import Observers
from mcpmeter.proxy.upstream import Upstream, UpstreamError
from mcpmeter.record import CallRecord

if TYPE_CHECKING:
    from mcpmeter.proxy.listen.gateway import Gateway

IdKey = tuple[str, object]

#: Messages the server starts, kept for a GET stream that is not open yet.
BACKLOG = 1024
#: Ids a session keeps reserved after their POST stopped waiting (timed out, client gone)
#: while the server may still answer them: reused too soon, a late answer would go to the
#: new request. The oldest is released past this many.
STALE_IDS = 1024


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
        self.meter = gateway.runtime.meter(
            tenant,
            transport=transport,
            upstream=gateway.upstream_kind,
            default_server=gateway.server_name,
            sink=self._sink,
        )
        # 2026-07-28 exchanges (a session per request, one tag set) share the gateway's gate.
        self._own_gate = not modern
        gate_for = gateway.modern_gate if modern else gateway.budget_gate
        self.gate = gate_for(tenant, self._server_name)
        self.observers = Observers(self.meter, self.gate)
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
        self.gateway.runtime.writer.put(record)

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

    def meter_c2s(self, frame: Frame) -> None:
        """A client's frame, just before it is sent (see :mod:`mcpmeter.proxy.observers`)."""
        self.observers.observe(frame)

    async def refusal(self, frame: Frame, hs: list[Head]) -> bytes | None:
        """The proxy's own answer when a budget or the loop guard refuses this tools/call;
        the gate runs off the event loop (a store transaction)."""
        observers = self.observers
        if not observers.gating or len(hs) != 1 or hs[0].kind != REQUEST or hs[0].method != "tools/call":
            return None
        verdict = await anyio.to_thread.run_sync(observers.verdict, frame)
        if verdict is None:
            return None
        rpc_id, answer = verdict
        with observers.lock:
            observers.seen(frame)
            observers.refused(C2S, rpc_id, len(answer), time.perf_counter())
        return answer

    async def on_upstream_frame(self, message: Frame) -> None:
        self.observers.observe(message)
        frame = message.tobytes()
        self.last_used = time.monotonic()
        if self.legacy_stream is not None:
            if self.waiters or self.stale:
                hs = heads(message)
                if hs and all(h.kind == RESPONSE for h in hs):
                    self._answered(frame, hs)
            await self.legacy_stream.push(frame)
            return
        hs = heads(message)
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
                own.append(error_frame(member.raw_id, NOT_A_MESSAGE, INVALID_REQUEST))
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
            self.gateway.runtime.budgets.forget(self.gate)
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
