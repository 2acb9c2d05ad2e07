"""Many clients, one server: request ids rewritten so they never collide.

Two clients both send ``{"id":1,...}``; one server must tell the answers apart. Each
request a :class:`MuxChannel` sends gets a fresh integer id from one counter, written over
the original id's bytes (every other byte of the frame is left alone; see
:func:`mcpmeter.protocol.rpc.member_spans`). A table maps the new id to the channel and
the original id's exact bytes; when the answer comes back its id is written back with
those bytes, so the client reads exactly what the server wrote but for the id, which is
exactly what it sent. ``notifications/cancelled`` has its ``requestId`` rewritten the
same way.

What the server starts itself is routed by a best guess, since one server cannot say
which client a message is meant for: a progress notification to the channel whose
request carries its token, a request (sampling, elicitation, roots) to the channel of
the newest request still waiting, a notification to that channel too, or to every
channel when none is waiting. A server that asks its client things mid-call is better
run one per session (the default of ``--listen``).
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

from mcpmeter.protocol.frame import Frame
from mcpmeter.protocol.rpc import (
    NOTIFICATION,
    REQUEST,
    RESPONSE,
    Head,
    heads,
    id_key,
    member_spans,
    message_spans,
    splice,
)
from mcpmeter.proxy.upstream import Deliver, Upstream, UpstreamError

#: Opens the shared upstream, given where its frames go.
OpenUpstream = Callable[[Deliver], Awaitable[Upstream]]


class MuxChannel:
    """One client's view of a shared upstream; an :class:`~.upstream.Upstream`."""

    def __init__(self, mux: Mux, deliver: Deliver) -> None:
        self.closed = anyio.Event()
        self.deliver = deliver
        #: original id key -> the id the server sees (the newest, should a client reuse one)
        self.pending: dict[tuple[str, object], int] = {}
        #: every id the server sees for this channel and has not answered
        self.sent: set[int] = set()
        self.tokens: set[tuple[str, object]] = set()
        self._mux = mux

    @property
    def kind(self) -> str:
        return self._mux.kind

    async def send(self, frame: Frame) -> None:
        if self.closed.is_set():
            raise UpstreamError("the server has exited")
        await self._mux.send(self, frame)

    async def aclose(self) -> None:
        self._mux.detach(self)
        self.closed.set()


class Mux:
    """A shared upstream, opened on first use and again after it ends."""

    def __init__(self, open_upstream: OpenUpstream, tg: TaskGroup, *, kind: str) -> None:
        self.kind = kind
        self._open = open_upstream
        self._tg = tg
        self._upstream: Upstream | None = None
        self._lock = anyio.Lock()
        self._channels: dict[MuxChannel, None] = {}  # insertion-ordered set
        #: server-side id -> (channel, original id bytes, original id key)
        self._table: dict[int, tuple[MuxChannel, bytes, tuple[str, object]]] = {}
        self._ids = itertools.count(1)
        self.unrouted = 0

    async def channel(self, deliver: Deliver) -> MuxChannel:
        async with self._lock:
            if self._upstream is None:
                upstream = await self._open(self._on_frame)
                self._upstream = upstream
                self.kind = upstream.kind
                self._tg.start_soon(self._watch, upstream)
        channel = MuxChannel(self, deliver)
        self._channels[channel] = None
        return channel

    async def _watch(self, upstream: Upstream) -> None:
        await upstream.closed.wait()
        if self._upstream is upstream:
            self._upstream = None
            channels = list(self._channels)
            self._channels.clear()
            self._table.clear()
            for channel in channels:
                channel.closed.set()

    def detach(self, channel: MuxChannel) -> None:
        self._channels.pop(channel, None)
        for upstream_id in channel.sent:
            self._table.pop(upstream_id, None)
        channel.pending.clear()
        channel.sent.clear()

    async def aclose(self) -> None:
        upstream = self._upstream
        if upstream is not None:
            await upstream.aclose()

    # -- client -> server ------------------------------------------------------------------

    async def send(self, channel: MuxChannel, frame: Frame) -> None:
        upstream = self._upstream
        if upstream is None:
            raise UpstreamError("the server has exited")
        await upstream.send(self._rewrite(channel, frame))

    def _rewrite(self, channel: MuxChannel, message: Frame) -> Frame:
        """The frame with the ids of its requests (and of the requests it cancels) replaced
        by the server-side ones; the same frame when there is nothing to replace."""
        hs = heads(message)
        if not any(h.kind == REQUEST or h.cancelled_id is not None for h in hs):
            return message
        frame = message.tobytes()
        messages = message_spans(frame)
        if messages is None or len(messages) != len(hs):
            return message  # duplicate keys or the like: relayed as it is
        replacements: list[tuple[int, int, bytes]] = []
        for head, (_, members) in zip(hs, messages, strict=True):
            if head.kind == REQUEST and "id" in members:
                start, end = members["id"]
                upstream_id = next(self._ids)
                key = id_key(head.id)
                # The same id again before its answer (``--listen`` refuses that, but a mux
                # must not rely on it): each keeps its entry, so both answers go back with
                # the client's id; never with one the server saw.
                self._table[upstream_id] = (channel, frame[start:end], key)
                channel.pending[key] = upstream_id
                channel.sent.add(upstream_id)
                if head.progress_token is not None:
                    channel.tokens.add(id_key(head.progress_token))
                replacements.append((start, end, str(upstream_id).encode()))
            elif head.kind == NOTIFICATION and head.cancelled_id is not None and "params" in members:
                upstream_id_or_none = channel.pending.get(id_key(head.cancelled_id))
                params = members["params"]
                spans = member_spans(frame[: params[1]], params[0])
                if upstream_id_or_none is not None and spans is not None and "requestId" in spans:
                    start, end = spans["requestId"]
                    replacements.append((start, end, str(upstream_id_or_none).encode()))
        return Frame(splice(frame, replacements), message.direction, message.seen)

    # -- server -> client ------------------------------------------------------------------

    async def _on_frame(self, frame: Frame) -> None:
        hs = heads(frame)
        if hs and all(h.kind == RESPONSE for h in hs):
            await self._on_answer(frame, hs)
            return
        target = self._route(hs)
        if target is not None:
            await target.deliver(frame)
            return
        if any(h.kind == REQUEST for h in hs) or not self._channels:
            self.unrouted += 1
            return
        for channel in list(self._channels):  # a notification nobody asked for: to everyone
            await channel.deliver(frame)

    async def _on_answer(self, message: Frame, hs: list[Head]) -> None:
        frame = message.tobytes()
        messages = message_spans(frame)
        if messages is None or len(messages) != len(hs):
            self.unrouted += 1
            return
        owner: MuxChannel | None = None
        replacements: list[tuple[int, int, bytes]] = []
        for head, (_, members) in zip(hs, messages, strict=True):
            entry = self._table.pop(head.id, None) if type(head.id) is int else None
            if entry is None or "id" not in members:
                continue
            channel, raw_id, key = entry
            channel.sent.discard(head.id)
            if channel.pending.get(key) == head.id:
                del channel.pending[key]
            start, end = members["id"]
            replacements.append((start, end, raw_id))
            owner = channel
        if owner is None:
            self.unrouted += 1  # its client has gone
            return
        if not owner.sent:
            owner.tokens.clear()
        await owner.deliver(Frame(splice(frame, replacements), message.direction, message.seen))

    def _route(self, hs: list[Head]) -> MuxChannel | None:
        for head in hs:
            if head.method == "notifications/progress" and head.progress_token is not None:
                token = id_key(head.progress_token)
                for channel in reversed(list(self._channels)):
                    if token in channel.tokens:
                        return channel
        if self._table:
            newest = next(reversed(self._table.values()))
            return newest[0]
        return None
