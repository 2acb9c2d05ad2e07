"""A remote MCP server over HTTP: the upstream of ``wrap --url`` and ``wrap --listen --url``.

:class:`HttpUpstream` speaks to a remote MCP server over either HTTP transport:

* **streamable HTTP**: each message is POSTed to the URL with ``Accept: application/json,
  text/event-stream``; a request's answer is a JSON body or an SSE stream (requests and
  notifications from the server may come first). ``Mcp-Session-Id`` from the initialize
  response goes on every later request, with ``MCP-Protocol-Version`` (the negotiated
  version). A 2026-07-28 message (its ``_meta`` names a version outside the handshake
  era) carries its own version and the ``Mcp-Method`` / ``Mcp-Name`` headers, taken from
  the body. Once the handshake is done a GET stream is opened for messages the server
  starts (405 means it has none); DELETE ends the session on close.
* **HTTP+SSE** (2024-11-05): GET the URL as an event stream; the server's first event,
  ``endpoint``, names where to POST (resolved against the URL, same origin only).

``auto`` follows the specification's backwards-compatibility rule: the first message is
POSTed to the URL; a 4xx answer means an older server, so the URL is opened with GET as
an SSE stream and the message is sent to the endpoint it announces.

What the server sends is delivered as message bytes: a JSON body, or the ``data`` of an
SSE event, exactly as received (HTTP framing and SSE fields are not relayed). When the
server cannot answer a request (unreachable, an HTTP error without a JSON-RPC body, a
stream that ends first), mcpmeter answers it with a JSON-RPC error (code -32000, message
starting ``mcpmeter:``) so the client is never left waiting.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit

import anyio
import httpx
from anyio.abc import TaskGroup

from mcpmeter.errors import UsageError
from mcpmeter.log import warn_once
from mcpmeter.protocol.frame import S2C, Frame
from mcpmeter.protocol.rpc import (
    REQUEST,
    RESPONSE,
    Head,
    encode_header_value,
    encode_id,
    error_frame,
    heads,
    id_key,
    is_modern,
    one_line,
)
from mcpmeter.protocol.sse import SSEParser
from mcpmeter.proxy.upstream import Deliver, UpstreamError

TRANSPORTS = ("auto", "streamable-http", "sse")
ACCEPT_BOTH = "application/json, text/event-stream"
#: How long the HTTP+SSE endpoint event may take to arrive.
ENDPOINT_TIMEOUT_S = 30.0
#: GET stream reconnections in a row before giving up (the server keeps failing it).
LISTEN_ATTEMPTS = 3
DEFAULT_RETRY_MS = 1000
#: How long the session's DELETE may take on the way out.
CLOSE_TIMEOUT_S = 5.0

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_headers(values: Iterable[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``["Authorization: Bearer ${TOKEN}"]`` -> ``{"Authorization": "Bearer s3cr3t"}``.

    ``${NAME}`` is replaced by the environment variable NAME (an unset one is an error, so a
    missing secret never goes out as the literal text); nothing else is expanded.
    """
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for item in values:
        name, colon, value = item.partition(":")
        name = name.strip()
        if not colon or not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise UsageError(f"wrap: --header expects 'Name: value', got {item!r}")
        missing = [var for var in _ENV_REF.findall(value) if var not in env]
        if missing:
            raise UsageError(f"wrap: --header {name} refers to ${{{missing[0]}}}, which is not set")
        out[name] = _ENV_REF.sub(lambda match: env[match.group(1)], value.strip())
    return out


def new_client(*, verify: bool = True) -> httpx.AsyncClient:
    """The HTTP client: TLS verified, no overall timeouts (tool calls and streams are long)."""
    return httpx.AsyncClient(
        verify=verify,
        timeout=httpx.Timeout(None, connect=30.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        follow_redirects=False,
    )


def _content_type(response: httpx.Response) -> str:
    value: str = response.headers.get("content-type", "")
    return value.partition(";")[0].strip().lower()


def _same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


class HttpUpstream:
    """A remote MCP server over streamable HTTP or HTTP+SSE; an :class:`~.upstream.Upstream`.

    Request POSTs run as tasks in ``tg`` (answers may come in any order, as over stdio);
    notifications and responses are POSTed in turn. ``deliver`` gets every message the
    server sends, one at a time.
    """

    def __init__(
        self,
        url: str,
        deliver: Deliver,
        *,
        client: httpx.AsyncClient,
        tg: TaskGroup,
        mode: str = "auto",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if mode not in TRANSPORTS:
            raise ValueError(f"unknown transport {mode!r}")
        self.url = url
        self.kind = "sse" if mode == "sse" else "http"
        self.closed = anyio.Event()
        self.session_id: str | None = None
        self._deliver = deliver
        self._client = client
        self._tg = tg
        self._mode = mode
        self._decided = mode != "auto"
        self._headers = dict(headers or {})
        self._negotiated: str | None = None  # the handshake's protocol version
        self._modern: str | None = None  # the last 2026-07-28-era version a message named
        self._initializing: set[tuple[str, object]] = set()
        self._endpoint: str | None = None
        self._sse_error: str | None = None
        self._listening = False
        self._closing = False
        self._streams: set[anyio.CancelScope] = set()  # one per GET stream task
        self._inflight = 0
        self._idle = anyio.Event()
        self._idle.set()

    # -- the Upstream interface ------------------------------------------------------------

    async def start(self) -> None:
        """Connect now when that is needed first (HTTP+SSE). Raises UpstreamError."""
        if self._mode == "sse":
            await self._open_sse()

    async def send(self, message: Frame) -> None:
        hs = heads(message)
        frame = message.tobytes()
        if not self._decided:
            await self._send_first(frame, hs)
        elif self.kind == "sse":
            await self._post_sse(frame, hs)
        else:
            await self._post(frame, hs)

    async def wait_idle(self) -> None:
        """Until no request POST is in flight."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """DELETE the session (streamable HTTP), stop the GET streams. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._cancel_streams()
        if self.session_id is not None and self.kind == "http":
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True), contextlib.suppress(httpx.HTTPError):
                await self._client.delete(self.url, headers=self._base_headers())
        self.closed.set()

    def _cancel_streams(self) -> None:
        for scope in self._streams:
            scope.cancel()

    @contextlib.contextmanager
    def _stream_scope(self) -> Iterator[None]:
        with anyio.CancelScope() as scope:
            self._streams.add(scope)
            try:
                yield
            finally:
                self._streams.discard(scope)

    # -- headers ---------------------------------------------------------------------------

    def _base_headers(self, accept: str = ACCEPT_BOTH) -> dict[str, str]:
        headers = dict(self._headers)
        headers["accept"] = accept
        if self.session_id is not None:
            headers["mcp-session-id"] = self.session_id
        if self._negotiated is not None:
            headers["mcp-protocol-version"] = self._negotiated
        return headers

    def _message_headers(self, hs: list[Head]) -> dict[str, str]:
        headers = self._base_headers()
        headers["content-type"] = "application/json"
        if any(h.method == "initialize" for h in hs):
            headers.pop("mcp-protocol-version", None)
            return headers
        version = next((h.version for h in hs if is_modern(h.version)), None)
        if version is not None:
            self._modern = version
        elif self._negotiated is None:
            version = self._modern
        if version is not None and len(hs) == 1 and hs[0].method is not None:
            head = hs[0]
            headers["mcp-protocol-version"] = version
            headers["mcp-method"] = head.method or ""
            if head.name is not None:
                headers["mcp-name"] = encode_header_value(head.name)
        return headers

    # -- what comes back -------------------------------------------------------------------

    async def _receive(self, data: bytes, seen: float, pending: set[tuple[str, object]] | None) -> None:
        frame = Frame(one_line(data), S2C, seen)
        if pending or self._initializing:
            for head in heads(frame):
                if head.kind != RESPONSE:
                    continue
                key = id_key(head.id)
                if pending is not None:
                    pending.discard(key)
                if key in self._initializing:
                    self._initializing.discard(key)
                    if head.result_version is not None:
                        self._negotiated = head.result_version
        await self._deliver(frame)

    async def _fail(
        self, hs: Iterable[Head], reason: str, only: set[tuple[str, object]] | None = None
    ) -> None:
        """Answer each request in ``hs`` (or those of them in ``only``) with an error."""
        failed = False
        for head in hs:
            if head.kind == REQUEST and (only is None or id_key(head.id) in only):
                failed = True
                self._initializing.discard(id_key(head.id))
                error = error_frame(encode_id(head.id), f"mcpmeter: {reason}")
                await self._deliver(Frame(error, S2C, time.perf_counter()))
        warn_once(
            f"upstream:{reason}", f"upstream {self.url}: {reason}" + ("" if failed else " (a notification)")
        )

    def _begin(self) -> None:
        self._inflight += 1
        self._idle = anyio.Event()

    def _end(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    # -- streamable HTTP -------------------------------------------------------------------

    async def _post(self, frame: bytes, hs: list[Head]) -> None:
        headers = self._message_headers(hs)
        requests = [h for h in hs if h.kind == REQUEST]
        for head in requests:
            if head.method == "initialize":
                self._initializing.add(id_key(head.id))
        if not requests:
            await self._exchange(frame, hs, headers)
            return
        self._begin()
        self._tg.start_soon(self._exchange_task, frame, hs, headers)

    async def _exchange_task(self, frame: bytes, hs: list[Head], headers: dict[str, str]) -> None:
        try:
            await self._exchange(frame, hs, headers)
        finally:
            self._end()

    async def _exchange(self, frame: bytes, hs: list[Head], headers: dict[str, str]) -> None:
        request = self._client.build_request("POST", self.url, content=frame, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self._fail(hs, f"cannot reach the server: {exc or type(exc).__name__}")
            return
        try:
            await self._answer(response, hs)
        except httpx.HTTPError as exc:
            await self._fail(hs, f"the response broke off: {exc or type(exc).__name__}")
        finally:
            await response.aclose()

    async def _answer(self, response: httpx.Response, hs: list[Head]) -> None:
        """What a POST's response says: the answers, or why there are none."""
        pending = {id_key(h.id) for h in hs if h.kind == REQUEST}
        session = response.headers.get("mcp-session-id")
        if session and any(h.method == "initialize" for h in hs):
            self.session_id = session
        status = response.status_code
        kind = _content_type(response)
        if status >= 300:
            body = await response.aread()
            await self._answer_error(status, kind, body, hs, pending)
            return
        if kind == "text/event-stream":
            await self._read_events(response, pending)
        else:
            body = await response.aread()
            if body.strip():
                await self._receive(body, time.perf_counter(), pending)
        if pending:
            why = "202 Accepted" if status == 202 else "the response stream ended"
            await self._fail(hs, f"no answer from the server ({why})", pending)
        initialized = any(h.method == "notifications/initialized" for h in hs)
        if initialized and not self._listening and self.session_id is not None:
            self._listening = True
            self._tg.start_soon(self._listen)

    async def _answer_error(
        self, status: int, kind: str, body: bytes, hs: list[Head], pending: set[tuple[str, object]]
    ) -> None:
        if kind == "application/json" and pending:
            # A JSON-RPC error for this request (a 2026-07-28 server maps codes to statuses).
            answers = {id_key(h.id) for h in heads(Frame(body, S2C, 0.0)) if h.kind == RESPONSE}
            if answers and answers <= pending:
                await self._receive(body, time.perf_counter(), pending)
        if status == 404 and self.session_id is not None:
            reason = "the server ended the session (HTTP 404)"
        else:
            reason = f"HTTP {status} from the server"
        if pending or not any(h.kind == REQUEST for h in hs):
            await self._fail(hs, reason, pending)

    async def _read_events(self, response: httpx.Response, pending: set[tuple[str, object]] | None) -> None:
        parser = SSEParser()
        async for chunk in response.aiter_bytes():
            seen = time.perf_counter()
            for event in parser.feed(chunk):
                if event.event == "message" and event.data.strip():
                    await self._receive(event.data, seen, pending)
            if pending is not None and not pending:
                return  # every answer is in: the server would close the stream now

    async def _listen(self) -> None:
        """The GET stream: what the server starts (requests, notifications), reconnected."""
        with self._stream_scope():
            failures = 0
            last_id: str | None = None
            retry_ms = DEFAULT_RETRY_MS
            while not self._closing and failures < LISTEN_ATTEMPTS:
                headers = self._base_headers(accept="text/event-stream")
                if last_id is not None:
                    headers["last-event-id"] = last_id
                try:
                    async with self._client.stream("GET", self.url, headers=headers) as response:
                        if response.status_code != 200 or _content_type(response) != "text/event-stream":
                            return  # 405: the server offers no such stream
                        failures = 0
                        parser = SSEParser()
                        async for chunk in response.aiter_bytes():
                            seen = time.perf_counter()
                            for event in parser.feed(chunk):
                                if event.retry is not None:
                                    retry_ms = event.retry
                                if event.event == "message" and event.data.strip():
                                    await self._receive(event.data, seen, None)
                        last_id = parser.last_event_id or last_id
                except httpx.HTTPError:
                    failures += 1
                await anyio.sleep(retry_ms / 1000)

    # -- HTTP+SSE --------------------------------------------------------------------------

    async def _open_sse(self) -> None:
        ready = anyio.Event()
        self._tg.start_soon(self._sse_stream, ready)
        with anyio.move_on_after(ENDPOINT_TIMEOUT_S):
            await ready.wait()
        if self._endpoint is None:
            self._cancel_streams()
            raise UpstreamError(self._sse_error or f"no endpoint event from {self.url}")
        self.kind = "sse"
        self._decided = True

    async def _sse_stream(self, ready: anyio.Event) -> None:
        with self._stream_scope():
            try:
                headers = self._base_headers(accept="text/event-stream")
                async with self._client.stream("GET", self.url, headers=headers) as response:
                    if response.status_code != 200 or _content_type(response) != "text/event-stream":
                        self._sse_error = (
                            f"GET {self.url} answered HTTP {response.status_code}, not an event stream"
                        )
                        return
                    parser = SSEParser()
                    async for chunk in response.aiter_bytes():
                        seen = time.perf_counter()
                        for event in parser.feed(chunk):
                            if event.event == "endpoint" and self._endpoint is None:
                                endpoint = urljoin(self.url, event.data.decode("utf-8", "replace").strip())
                                if not _same_origin(endpoint, self.url):
                                    self._sse_error = f"the endpoint {endpoint} is not on {self.url}'s origin"
                                    return
                                self._endpoint = endpoint
                                ready.set()
                            elif event.event == "message" and event.data.strip():
                                await self._receive(event.data, seen, None)
            except httpx.HTTPError as exc:
                self._sse_error = f"cannot open {self.url}: {exc or type(exc).__name__}"
            finally:
                ready.set()
                if self._endpoint is not None:
                    self.closed.set()  # the server's only channel to us is gone

    async def _post_sse(self, frame: bytes, hs: list[Head]) -> None:
        assert self._endpoint is not None
        headers = dict(self._headers)
        headers["content-type"] = "application/json"
        try:
            response = await self._client.post(self._endpoint, content=frame, headers=headers)
        except httpx.HTTPError as exc:
            await self._fail(hs, f"cannot reach the server: {exc or type(exc).__name__}")
            return
        if response.status_code >= 300:
            await self._fail(hs, f"HTTP {response.status_code} from the server")

    # -- auto ------------------------------------------------------------------------------

    async def _send_first(self, frame: bytes, hs: list[Head]) -> None:
        """POST the first message; 4xx means the older transport (HTTP+SSE)."""
        headers = self._message_headers(hs)
        for head in hs:
            if head.kind == REQUEST and head.method == "initialize":
                self._initializing.add(id_key(head.id))
        request = self._client.build_request("POST", self.url, content=frame, headers=headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self._fail(hs, f"cannot reach the server: {exc or type(exc).__name__}")
            return  # undecided still: the next message tries again
        if 400 <= response.status_code < 500:
            body = await response.aread()
            await response.aclose()
            try:
                await self._open_sse()
            except UpstreamError:
                self._decided = True  # not an older server either: this was the answer
                pending = {id_key(h.id) for h in hs if h.kind == REQUEST}
                await self._answer_error(response.status_code, _content_type(response), body, hs, pending)
                return
            await self._post_sse(frame, hs)
            return
        self._decided = True
        if any(h.kind == REQUEST for h in hs):
            self._begin()
            self._tg.start_soon(self._answer_task, response, hs)
        else:
            try:
                await self._answer(response, hs)
            finally:
                await response.aclose()

    async def _answer_task(self, response: httpx.Response, hs: list[Head]) -> None:
        try:
            await self._answer(response, hs)
        except httpx.HTTPError as exc:
            await self._fail(hs, f"the response broke off: {exc or type(exc).__name__}")
        finally:
            await response.aclose()
            self._end()
