"""The HTTP plumbing of ``wrap --listen``: request bodies under ``--max-body``, plain
answers, mcpmeter's own error bodies, and the SSE event stream of a response.

Nothing here knows of sessions: these are the pieces the handlers
(:mod:`mcpmeter.proxy.listen.asgi`) answer with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mcpmeter.protocol.rpc import (
    INVALID_REQUEST,
    MAX_DEPTH,
    PARSE_ERROR,
    Head,
    body_problem,
    error_frame,
    frame_members,
    is_batch,
    is_message,
    join_batch,
    too_deep,
)
from mcpmeter.protocol.sse import encode_event
from mcpmeter.proxy.listen.limits import BodyTooLarge, BoundedReceive, Refused

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Events queued for one SSE stream before the server's output waits for the client.
STREAM_BUFFER = 1024
#: mcpmeter's answer to a batch member (or a body) that is not a JSON-RPC message.
NOT_A_MESSAGE = "mcpmeter: Invalid Request: not a JSON-RPC message"


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


async def read_body(receive: Receive) -> bytes:
    """The whole request body; BodyTooLarge as soon as it passes ``--max-body``.

    The limit comes with ``receive`` (a :class:`BoundedReceive`, made by
    :meth:`~mcpmeter.proxy.listen.asgi.ListenApp.__call__`). A body that arrives in one
    piece is returned as it came; a longer one is gathered in one bytearray that grows
    with what actually arrived (never sized from ``Content-Length`` alone, which a client
    may announce and not send), and nothing past the limit is kept: memory stays near the
    body's size (twice it at the final copy into bytes).
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
    """A whole answer at once: ``status``, ``body`` and its length, ``headers`` after them."""
    head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, code: int = -32600, raw_id: bytes = b"null") -> bytes:
    """mcpmeter's own JSON-RPC error answer (Invalid Request unless ``code`` says otherwise)."""
    return error_frame(raw_id, message, code)


#: The head of an event-stream answer (``text/event-stream``, never cached or buffered).
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


async def watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the client disconnects (the rest of what it sends is dropped)."""
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
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + headers})
        for event in first:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_disconnect, receive, tg.cancel_scope)
            async with self._receive:
                async for event in self._receive:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            tg.cancel_scope.cancel()
        self._send.close()
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def refusal_text(refusal: Refused) -> bytes:
    """The plain-text body of a 429 or 503 for a limit."""
    status = "Too Many Requests" if refusal.status == 429 else "Service Unavailable"
    return f"{status}: mcpmeter {refusal.message}".encode()


async def shutting_down(send: Send) -> None:
    """The 503 of a request that comes once the shutdown has begun."""
    await respond(
        send, 503, b"Service Unavailable: shutting down", b"text/plain", [(b"connection", b"close")]
    )


def refuse_body(body: bytes, hs: list[Head]) -> bytes | None:
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
    errors = [error_frame(m.raw_id, NOT_A_MESSAGE, INVALID_REQUEST) for m in frame_members(body)]
    return join_batch(errors) if is_batch(body) else errors[0]
