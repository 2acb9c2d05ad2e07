"""The ASGI application of ``wrap --listen``: each request checked, then to its handler.

* ``/mcp``: streamable HTTP. A POST without ``Mcp-Session-Id`` carrying ``initialize``
  opens a session; its answer carries the session's id, and later requests name it. GET
  opens the session's stream for messages the server starts; DELETE ends the session.
  A POST whose ``MCP-Protocol-Version`` is outside the handshake era (2026-07-28) needs no
  session: its ``Mcp-Method`` and ``Mcp-Name`` headers must agree with its body (400 and
  a -32020 error otherwise).
* ``/sse`` + ``/messages?session_id=...``: the HTTP+SSE transport (2024-11-05). GET
  ``/sse`` opens a session and its event stream, whose first event announces where to
  POST; every answer comes on the stream.

A request's answer goes back on its POST: a JSON body, or an event stream when the server
sends something for that request first (its progress, a question for the client). What the
server starts itself goes to the session's GET stream when one is open, else to the POST
of the newest request still waiting (switched to an event stream), else waits for a GET
stream. Every frame either way is metered by the session's :class:`CallMeter` (all sharing
one audit writer); ``X-Request-Id`` becomes the join key of the requests it came with, when
their ``_meta`` has none (the session's record sink fills it in).

Before any handler runs, :meth:`ListenApp.__call__` applies the security policy
(:mod:`mcpmeter.proxy.listen.security`), the body limit and the session rate; the
sessions themselves are the :class:`~mcpmeter.proxy.listen.gateway.Gateway`'s.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from urllib.parse import parse_qs

import anyio

from mcpmeter.log import warn_once
from mcpmeter.protocol.frame import C2S, S2C, Frame
from mcpmeter.protocol.rpc import (
    HEADER_MISMATCH,
    NAME_PARAMS,
    REQUEST,
    UPSTREAM_ERROR,
    Head,
    cancelled_frame,
    decode_header_value,
    error_frame,
    frame_members,
    heads,
    is_batch,
    is_modern,
    join_batch,
)
from mcpmeter.protocol.sse import encode_event
from mcpmeter.proxy.listen.gateway import Gateway
from mcpmeter.proxy.listen.http import (
    SSE_HEADERS,
    ClientGone,
    EventStream,
    Receive,
    Scope,
    Send,
    error_body,
    read_body,
    refusal_text,
    refuse_body,
    respond,
    shutting_down,
    watch_disconnect,
)
from mcpmeter.proxy.listen.limits import BodyTooLarge, BoundedReceive, Refused, SessionRate, content_length
from mcpmeter.proxy.listen.security import (
    CORS_HEADERS,
    authorized,
    host_is_local,
    is_loopback,
    origin_allowed,
    with_cors,
)
from mcpmeter.proxy.listen.sessions import Session, Waiter
from mcpmeter.proxy.upstream import UpstreamError

#: The HTTP status of a 2026-07-28 answer that is a JSON-RPC error with this code.
_ERROR_STATUS = {-32700: 400, -32600: 400, -32602: 400, -32601: 404, -32020: 400, -32021: 400, -32022: 400}
_ROUTING_HEADERS = (b"mcp-protocol-version", b"mcp-method", b"mcp-name")


class ListenApp:
    """The ASGI application behind ``--listen``: the HTTP face of a :class:`Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.options = options = gateway.options
        self.limits = limits = gateway.limits
        self.notices = gateway.notices
        self.session_rate = SessionRate(limits.session_rate, limits.session_burst)
        self._token = options.auth_token.encode() if options.auth_token else None
        self._origins = tuple(o.strip().rstrip("/").lower() for o in options.allow_origins)
        #: Without a token, a loopback bind is only safe if the Host names it (DNS rebinding).
        self._check_host = self._token is None and is_loopback(options.host)

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
            send = with_cors(send, origin)
            if scope["method"] == "OPTIONS":  # a browser's preflight
                await respond(send, 204, b"", b"text/plain", CORS_HEADERS)
                return
        if self._token is not None and not authorized(headers.get("authorization"), self._token):
            await respond(send, 401, b"Unauthorized", b"text/plain", [(b"www-authenticate", b"Bearer")])
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if self.gateway.draining and method != "POST":
            await shutting_down(send)
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
        except Refused as refusal:  # raised before any answer started (see read_body, Gateway._admit)
            self.notices.note(refusal.kind, refusal.message)
            text = refusal.answer if isinstance(refusal, BodyTooLarge) else refusal_text(refusal)
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

    async def _post_mcp(
        self, raw_headers: list[tuple[bytes, bytes]], headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        body = await read_body(receive)
        message = Frame(body, C2S, time.perf_counter())  # decoded once: routing, gate, meter
        hs = heads(message)
        refused = refuse_body(body, hs)
        if refused is not None:
            await respond(send, 400, refused)
            return
        if self.gateway.draining and any(h.kind == REQUEST for h in hs):
            await shutting_down(send)  # answers for the calls in flight are still welcome
            return
        if is_modern(headers.get("mcp-protocol-version")):
            await self._post_modern(raw_headers, headers, message, hs, receive, send)
            return
        sid = headers.get("mcp-session-id")
        extra: list[tuple[bytes, bytes]] = []
        if sid is None:
            if not any(h.kind == REQUEST and h.method == "initialize" for h in hs):
                problem = "Bad Request: no Mcp-Session-Id; a session starts with initialize"
                await respond(send, 400, error_body(problem))
                return
            try:
                session = await self.gateway.new_session(headers, "http")
            except UpstreamError as exc:
                warn_once(f"start:{exc}", str(exc))
                await respond(send, 502, self._errors(body, str(exc)))
                return
            extra = [(b"mcp-session-id", session.id.encode())]
        else:
            found = self.gateway.sessions.get(sid)
            if found is None or found.legacy_stream is not None:
                await respond(send, 404, error_body("Session not found"))
                return
            session = found
        await self._exchange(session, message, hs, headers, receive, send, extra)

    async def _post_modern(
        self,
        raw_headers: list[tuple[bytes, bytes]],
        headers: dict[str, str],
        message: Frame,
        hs: list[Head],
        receive: Receive,
        send: Send,
    ) -> None:
        body = message.tobytes()
        if len(hs) != 1 or is_batch(body):
            await respond(send, 400, error_body("Invalid Request: one JSON-RPC message per POST"))
            return
        head = hs[0]
        problem = _header_mismatch(raw_headers, headers, head)
        if problem is not None:
            raw_id = frame_members(body)[0].raw_id if head.kind == REQUEST else b"null"
            await respond(send, 400, error_body(problem, HEADER_MISMATCH, raw_id))
            return
        try:
            session = await self.gateway.exchange_session(headers)
        except UpstreamError as exc:
            warn_once(f"start:{exc}", str(exc))
            await respond(send, 502, self._errors(body, str(exc)))
            return
        try:
            await self._exchange(session, message, hs, headers, receive, send, [])
        finally:
            await self.gateway.close_session(session, "the request has ended")

    async def _exchange(
        self,
        session: Session,
        message: Frame,
        hs: list[Head],
        headers: Mapping[str, str],
        receive: Receive,
        send: Send,
        extra: list[tuple[bytes, bytes]],
    ) -> None:
        """Forward one POST's body; answer with what comes back for its requests.

        What the session does not admit (see :meth:`Session.admit`) is answered by mcpmeter
        and never forwarded; its answers join the server's in the same body (a batch).
        """
        body = message.tobytes()
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
        # What goes to the server: the body as decoded, or what is left of a batch once the
        # members mcpmeter answers itself are taken out.
        forwarded = message if frame is body else Frame(frame, C2S, message.seen)
        answer = await session.refusal(forwarded, hs) if frame is body else None
        if answer is not None:
            if waiter is not None:
                session.forget(waiter, sent=False)
            await respond(send, 200, answer, headers=extra)
            return
        session.busy += 1
        self.gateway.begin()
        sent = False
        try:
            session.meter_c2s(forwarded)
            try:
                await upstream.send(forwarded)
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
            self.gateway.end()

    async def _answer(
        self, session: Session, waiter: Waiter, receive: Receive, send: Send, extra: list[tuple[bytes, bytes]]
    ) -> None:
        """Relay what comes for ``waiter``: one JSON body, or an event stream once the server
        sends more than the answers. A batch waits ``--batch-timeout`` at most; then
        mcpmeter answers each member still unanswered (see :meth:`_give_up`)."""
        streaming = False
        timeout = self.options.batch_timeout if waiter.batch else math.inf
        deadline = anyio.current_time() + timeout
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_disconnect, receive, scope)
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
                            "headers": SSE_HEADERS + extra,
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
            frame = Frame(cancelled_frame(raw_id, reason), C2S, time.perf_counter())
            session.meter_c2s(frame)
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
            session.observers.observe(Frame(frame, S2C, seen))
        await self._cancel(session, waiter, why)
        return errors

    def _status(self, session: Session, frame: bytes) -> int:
        if not session.modern:
            return 200
        hs = heads(Frame(frame, S2C, 0.0))
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
            return error_body(f"mcpmeter: {reason}", UPSTREAM_ERROR)
        return frames[0] if len(frames) == 1 and not is_batch(frame) else join_batch(frames)

    async def _get_mcp(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        if is_modern(headers.get("mcp-protocol-version")):
            await respond(send, 405, b"Method Not Allowed", b"text/plain", [(b"allow", b"POST")])
            return
        sid = headers.get("mcp-session-id")
        session = self.gateway.sessions.get(sid) if sid is not None else None
        if session is None or session.legacy_stream is not None:
            status = 400 if sid is None else 404
            await respond(send, status, error_body("Bad Request: no valid Mcp-Session-Id"))
            return
        if session.get_stream is not None:
            await respond(send, 409, error_body("Conflict: this session's stream is already open"))
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
        session = self.gateway.sessions.get(sid) if sid is not None else None
        if session is None or session.legacy_stream is not None:
            await respond(send, 404, error_body("Session not found"))
            return
        await self.gateway.close_session(session)
        await respond(send, 200, b"")

    async def _get_sse(self, headers: dict[str, str], receive: Receive, send: Send) -> None:
        try:
            session = await self.gateway.new_session(headers, "sse", legacy=True)
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
            await self.gateway.close_session(session)

    async def _post_messages(
        self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        sid = (query.get("session_id") or query.get("sessionId") or [""])[0]
        session = self.gateway.sessions.get(sid)
        if session is None or session.legacy_stream is None:
            await respond(send, 404, b"Could not find session", b"text/plain")
            return
        body = await read_body(receive)
        message = Frame(body, C2S, time.perf_counter())
        hs = heads(message)
        refused = refuse_body(body, hs)
        if refused is not None:
            await respond(send, 400, refused)
            return
        if self.gateway.draining and any(h.kind == REQUEST for h in hs):
            await shutting_down(send)
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
        forwarded = message if frame is body else Frame(frame, C2S, message.seen)
        answer = await session.refusal(forwarded, hs) if frame is body else None
        if answer is not None:
            if waiter is not None:
                session.forget(waiter, sent=False)
            await stream.push(answer)
            await respond(send, 202, b"Accepted", b"text/plain")
            return
        session.meter_c2s(forwarded)
        try:
            await upstream.send(forwarded)
        except UpstreamError as exc:
            if waiter is not None:
                session.forget(waiter, sent=False)
            await respond(send, 502, str(exc).encode(), b"text/plain")
            return
        if admission.own:
            await stream.push(join_batch(admission.own))
        if waiter is not None and waiter.batch:
            self.gateway.tg.start_soon(self._expire, session, waiter)
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
