"""What the HTTP side of mcpmeter sees of a server, whatever carries it.

An :class:`Upstream` takes client-to-server frames with :meth:`~Upstream.send` and hands
every server-to-client frame to the ``deliver`` callback it was built with, in the order
the server sent them. A frame is one JSON-RPC message or batch, its bytes without a
newline, as a :class:`~mcpmeter.protocol.frame.Frame`: decoded once, by whoever reads it
first (the routing, the meter, the id rewriter). Implementations:
:class:`mcpmeter.proxy.child.ChildServer` (a stdio subprocess),
:class:`mcpmeter.proxy.http_upstream.HttpUpstream` (a remote server over
streamable HTTP or HTTP+SSE) and :class:`mcpmeter.proxy.mux.MuxChannel` (one client's
share of a multiplexed upstream).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from mcpmeter.protocol.frame import Frame

#: Receives one server-to-client frame (``seen`` is the ``time.perf_counter()`` it was read at).
Deliver = Callable[[Frame], Awaitable[None]]


class UpstreamError(Exception):
    """The upstream cannot be reached or refused the connection; ``str()`` says why."""


class Upstream(Protocol):
    @property
    def kind(self) -> str:
        """``stdio``, ``http`` or ``sse``: the ``upstream`` column of the rows."""

    #: Set once no more frames will be delivered (the server exited, the stream ended).
    closed: anyio.Event

    async def send(self, frame: Frame) -> None:
        """Forward one client-to-server frame (a message or a batch)."""

    async def aclose(self) -> None:
        """End the session with the server (DELETE, stdin EOF, ...); idempotent."""
