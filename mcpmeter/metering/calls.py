"""Pairs JSON-RPC requests with their responses and turns each pair into a :class:`CallRecord`.

The meter sees frames after the relay has forwarded them. It never raises into the relay
(the tap that calls it counts its errors) and it does no I/O: settled records go to
``sink`` (the audit writer's queue). Everything here is constant time per frame apart from
decoding the envelope (:mod:`mcpmeter.protocol.envelope`), which only runs on complete frames.

The relay runs one thread per direction and calls the meter under one lock per connection,
in whatever order the threads get there: a response can be metered a moment before the
request it answers. Such a response waits as an *orphan* until its request arrives (it
pairs only if it was seen after the request, so a stale unknown id never does).

One id may be in flight more than once (a client that reuses ids, or pipelines calls that
share one): the requests of an id wait in arrival order, and its responses settle them
first come, first served, as a server that answers in order does. A cancellation settles
the oldest; a refusal by the proxy the newest (the one it was just asked about).

Directions: ``c2s`` frames travel client -> server, ``s2c`` server -> client. A request is
keyed by the direction it travelled and its id, so the client's id 1 and the server's id 1
(a sampling request) never collide; a response travelling ``s2c`` settles the ``c2s``
request with its id, and the other way round.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from mcpmeter.metering.redact import redacted_json, scrub_text
from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.envelope import UNSET, Buffer, DecodeError, Error, Message, Params, Result, valid_id
from mcpmeter.protocol.frame import BATCH, C2S, MESSAGE, NOT_JSON, NOT_JSONRPC, S2C, Frame
from mcpmeter.record import CallRecord

_OPPOSITE = {C2S: S2C, S2C: C2S}

_CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
_PROTOCOL_VERSION = "io.modelcontextprotocol/protocolVersion"
_REQUEST_ID_KEYS = ("dev.mcpmeter/requestId", "requestId", "request_id")
_NAMED_METHODS = frozenset({"tools/call", "prompts/get"})
_URI_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})
_MAX_ERROR_MESSAGE = 512
#: An error text is scrubbed of credentials over this much of it before being cut (a DSN
#: cut before its ``@`` would no longer look like one and leak the start of its password).
_SCRUB_WINDOW = 4 * _MAX_ERROR_MESSAGE
_HEX = frozenset("0123456789abcdef")
#: Responses metered before their request (or never claimed) kept at most.
_MAX_ORPHANS = 1024
decode_json = msgspec.json.decode
#: Builds a CallRecord from a tuple without NamedTuple's Python-level ``__new__``.
_new_record = tuple.__new__


class Peers:
    """What the handshake (or the 2026-07-28 ``_meta``) told us about both ends."""

    __slots__ = ("client_name", "client_version", "protocol_version", "server_name", "server_version")

    def __init__(self) -> None:
        self.client_name: str | None = None
        self.client_version: str | None = None
        self.server_name: str | None = None
        self.server_version: str | None = None
        self.protocol_version: str | None = None


class FrameStats:
    """Counters for what the meter saw; reported at exit, never stored per frame."""

    __slots__ = (
        "blank",
        "duplicate_ids",
        "frames",
        "meter_errors",
        "not_json",
        "not_jsonrpc",
        "notifications",
        "requests",
        "responses",
        "unmatched_responses",
    )

    def __init__(self) -> None:
        self.frames = 0
        self.requests = 0
        self.notifications = 0
        self.responses = 0
        self.blank = 0
        self.not_json = 0
        self.not_jsonrpc = 0
        self.unmatched_responses = 0
        self.duplicate_ids = 0
        self.meter_errors = 0


class _Pending:
    __slots__ = (
        "args",
        "client_name",
        "client_version",
        "direction",
        "jsonrpc_id",
        "method",
        "protocol_version",
        "request_bytes",
        "request_id",
        "seen",
        "tool",
        "trace_id",
        "traceparent",
        "ts",
    )

    def __init__(
        self, direction: str, method: str, jsonrpc_id: str, request_bytes: int, seen: float, ts: float
    ) -> None:
        self.direction = direction
        self.method = method
        self.jsonrpc_id = jsonrpc_id
        self.request_bytes = request_bytes
        self.seen = seen
        self.ts = ts
        self.tool: str | None = None
        self.request_id: str | None = None
        self.trace_id: str | None = None
        #: The whole valid ``traceparent`` (for the span's parent id), None when invalid.
        self.traceparent: str | None = None
        self.client_name: str | None = None
        self.client_version: str | None = None
        self.protocol_version: str | None = None
        self.args: str | None = None


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and set(text) <= _HEX


def trace_id_of(traceparent: object) -> str | None:
    """The trace id of a valid W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), else None.

    Invalid headers are ignored, as W3C Trace Context requires: a wrong length, non-hex
    digits, version ``ff``, or an all-zero trace id or parent id.
    """
    if not isinstance(traceparent, str):
        return None
    parts = traceparent.strip().lower().split("-")
    if len(parts) < 4:
        return None
    version, trace, parent, flags = parts[0], parts[1], parts[2], parts[3]
    if not (_is_hex(version, 2) and _is_hex(trace, 32) and _is_hex(parent, 16) and _is_hex(flags, 2)):
        return None
    if version == "ff" or (version == "00" and len(parts) != 4):
        return None
    if trace == "0" * 32 or parent == "0" * 16:
        return None
    return trace


def baggage_member(baggage: object, key: str) -> str | None:
    """The value of ``key`` in a W3C ``baggage`` string (``k=v;prop,k2=v2``), percent-decoded."""
    if not isinstance(baggage, str):
        return None
    for member in baggage.split(","):
        name, sep, rest = member.partition("=")
        if sep and name.strip() == key:
            value = rest.split(";", 1)[0].strip()
            if "%" in value:
                from urllib.parse import unquote

                value = unquote(value)
            return value or None
    return None


def request_id_of(meta: dict[str, Any]) -> str | None:
    """The join key, first found wins (DESIGN.md, "The join key")."""
    for key in _REQUEST_ID_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return baggage_member(meta.get("baggage"), "request_id")


def _seen(p: _Pending) -> float:
    return p.seen


def _valid_code(code: object) -> bool:
    return isinstance(code, int) and not isinstance(code, bool)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class CallMeter:
    """Turns the frames of one connection (client <-> server) into audit records.

    ``default_server`` names the server until its ``serverInfo`` arrives (the command's
    basename or the URL host). ``sink`` receives every settled record.
    """

    def __init__(
        self,
        tenant: Tenant,
        sink: Callable[[CallRecord], None],
        *,
        transport: str,
        upstream: str,
        default_server: str | None,
        wall_clock: Callable[[], float] = time.time,
        mono_clock: Callable[[], float] = time.perf_counter,
        record_args: bool = False,
    ) -> None:
        self._sink = sink
        #: ``wrap --record-args``: keep a redacted copy of tools/call and prompts/get arguments.
        self._record_args = record_args
        self._project_id = tenant.project_id
        self._agent_id = tenant.agent_id
        self._session_id = tenant.session_id
        self._tags = tenant.tags_json
        self._transport = transport
        self._upstream = upstream
        self._default_server = default_server
        #: The oldest unanswered request of each (direction, id): what its next response settles.
        self._pending: dict[tuple[str, object], _Pending] = {}
        #: The later requests of an id already pending, oldest first (empty in the usual case).
        self._later: dict[tuple[str, object], deque[_Pending]] = {}
        #: Responses waiting for their request, oldest first per key; ``_orphan_count`` in all.
        self._orphans: dict[tuple[str, object], deque[tuple[float, int, Message]]] = {}
        self._orphan_count = 0
        # Wall time of a frame = wall time at start + monotonic time elapsed since.
        self._wall0 = wall_clock()
        self._mono0 = mono_clock()
        self.peers = Peers()
        self.stats = FrameStats()
        #: Held by whoever feeds or closes the meter (the relay's two pump threads).
        self.lock = threading.Lock()

    # -- the entry point -------------------------------------------------------------------

    def on_frame(self, direction: str, line: Buffer, seen: float) -> None:
        """One complete frame (without its ``\\n``) seen travelling ``direction`` at ``seen``."""
        self.seen(Frame(line, direction, seen))

    def seen(self, frame: Frame) -> None:
        """One complete frame, after (or, on HTTP, as) it is forwarded; decoded at most once
        whoever else reads it."""
        stats = self.stats
        stats.frames += 1
        kind = frame.kind
        if kind is MESSAGE:
            message = frame.message
            assert message is not None
            self._on_message(frame.direction, message, frame.size, frame.seen)
        elif kind is BATCH:
            direction = frame.direction
            seen = frame.seen
            for raw, member in frame.members:
                if member is None:
                    stats.not_jsonrpc += 1
                else:
                    self._on_message(direction, member, len(raw), seen)
        elif kind is NOT_JSONRPC:
            stats.not_jsonrpc += 1
        elif kind is NOT_JSON:
            stats.not_json += 1
        else:
            stats.blank += 1

    def close(self) -> None:
        """The stream ended: every request still waiting becomes a ``no_response`` row."""
        waiting = list(self._pending.values())
        for later in self._later.values():
            waiting.extend(later)
        self._pending = {}
        self._later = {}
        if len(waiting) > 1:
            waiting.sort(key=_seen)  # in the order they were seen (a stable sort)
        for p in waiting:
            self._emit(p, None, None, "no_response", None, None)
        self.stats.unmatched_responses += self._orphan_count
        self._orphans.clear()
        self._orphan_count = 0

    @property
    def pending_count(self) -> int:
        return len(self._pending) + sum(len(later) for later in self._later.values())

    # -- message kinds ---------------------------------------------------------------------

    def _on_message(self, direction: str, msg: Message, size: int, seen: float) -> None:
        method = msg.method
        if isinstance(method, str):
            if msg.id is not UNSET and msg.id is not None:
                self._on_request(direction, msg, method, size, seen)
            else:
                self.stats.notifications += 1
                if method == "notifications/cancelled":
                    self._on_cancelled(direction, msg)
            return
        if msg.id is not UNSET and (msg.result is not UNSET or msg.error is not UNSET):
            self._on_response(direction, msg, size, seen)
            return
        self.stats.not_jsonrpc += 1

    def _on_request(self, direction: str, msg: Message, method: str, size: int, seen: float) -> None:
        rpc_id = msg.id
        if not valid_id(rpc_id):
            self.stats.not_jsonrpc += 1
            return
        self.stats.requests += 1
        p = _Pending(direction, method, str(rpc_id), size, seen, self._wall0 + (seen - self._mono0))
        params = msg.params
        if isinstance(params, Params):
            if method in _NAMED_METHODS:
                p.tool = _text(params.name)
                if self._record_args:
                    try:
                        p.args = redacted_json(decode_json(params.arguments))
                    except (DecodeError, RecursionError):  # too deep to copy: the row goes without
                        p.args = None
            elif method in _URI_METHODS:
                p.tool = _text(params.uri)
            elif method == "initialize" and direction == C2S:
                self._on_initialize_request(params, p)
            if isinstance(params.meta, dict):
                self._read_request_meta(params.meta, p)
        key = (direction, rpc_id)
        if self._orphans:
            orphan = self._claim_orphan(key, seen)
            if orphan is not None:
                # Its response was metered first (the other direction's thread won the race).
                self._settle(p, orphan[2], orphan[1], orphan[0])
                return
        pending = self._pending
        if key in pending:
            # The same id again before its earlier request was answered: it waits its turn.
            self.stats.duplicate_ids += 1
            later = self._later.get(key)
            if later is None:
                self._later[key] = deque((p,))
            else:
                later.append(p)
            return
        pending[key] = p

    def _claim_orphan(self, key: tuple[str, object], seen: float) -> tuple[float, int, Message] | None:
        """The oldest response to ``key`` metered before a request seen at ``seen``, if any.

        Responses older than the request cannot answer it: they are dropped as unmatched.
        """
        orphans = self._orphans.get(key)
        if orphans is None:
            return None
        claimed = None
        while orphans:
            orphan = orphans.popleft()
            self._orphan_count -= 1
            if orphan[0] >= seen:
                claimed = orphan
                break
            self.stats.unmatched_responses += 1  # a stale response, older than this request
        if not orphans:
            del self._orphans[key]
        return claimed

    def _next(self, key: tuple[str, object]) -> _Pending | None:
        """Take the oldest request waiting for ``key``; the next in line takes its place."""
        p = self._pending.pop(key, None)
        if p is not None and self._later:
            self._promote(key)
        return p

    def _promote(self, key: tuple[str, object]) -> None:
        later = self._later.get(key)
        if later:
            self._pending[key] = later.popleft()
            if not later:
                del self._later[key]

    def _on_initialize_request(self, params: Params, p: _Pending) -> None:
        info = params.clientInfo
        if isinstance(info, dict):
            self.peers.client_name = _text(info.get("name"))
            self.peers.client_version = _text(info.get("version"))
        p.protocol_version = _text(params.protocolVersion)

    def _read_request_meta(self, meta: dict[str, Any], p: _Pending) -> None:
        p.request_id = request_id_of(meta)
        traceparent = meta.get("traceparent")
        if traceparent is not None:
            p.trace_id = trace_id_of(traceparent)
            if p.trace_id is not None:
                p.traceparent = traceparent
        version = meta.get(_PROTOCOL_VERSION)
        if isinstance(version, str):
            p.protocol_version = version
            self.peers.protocol_version = version
        info = meta.get(_CLIENT_INFO)
        if isinstance(info, dict):
            p.client_name = _text(info.get("name"))
            p.client_version = _text(info.get("version"))
            self.peers.client_name = p.client_name
            self.peers.client_version = p.client_version

    def _on_cancelled(self, direction: str, msg: Message) -> None:
        params = msg.params
        if not isinstance(params, Params):
            return
        rpc_id = params.requestId
        if not valid_id(rpc_id):
            return
        p = self._next((direction, rpc_id))
        if p is not None:
            self._emit(p, None, None, "cancelled", None, None)

    def _on_response(self, direction: str, msg: Message, size: int, seen: float) -> None:
        self.stats.responses += 1
        rpc_id = msg.id
        if not valid_id(rpc_id):
            self.stats.unmatched_responses += 1
            return
        key = (_OPPOSITE[direction], rpc_id)
        p = self._pending.pop(key, None)  # _next(), inlined for the usual case
        if p is None:
            # Unknown id, or a response metered before its request (the two directions run
            # in two threads): keep it briefly for the request to claim.
            if isinstance(msg.params, Params):  # kept past the frame: no view of its bytes
                msg.params = None
            self._keep_orphan(key, (seen, size, msg))
            return
        if self._later:
            self._promote(key)
        self._settle(p, msg, size, seen)

    def _keep_orphan(self, key: tuple[str, object], orphan: tuple[float, int, Message]) -> None:
        if self._orphan_count >= _MAX_ORPHANS:  # drop the oldest key's oldest response
            oldest_key = next(iter(self._orphans))
            oldest = self._orphans[oldest_key]
            oldest.popleft()
            if not oldest:
                del self._orphans[oldest_key]
            self._orphan_count -= 1
            self.stats.unmatched_responses += 1
        orphans = self._orphans.get(key)
        if orphans is None:
            self._orphans[key] = deque((orphan,))
        else:
            orphans.append(orphan)
        self._orphan_count += 1

    def _settle(self, p: _Pending, msg: Message, size: int, seen: float) -> None:
        latency_ms = (seen - p.seen) * 1000.0
        error = msg.error
        if error is not UNSET:
            code = message = None
            if isinstance(error, Error):
                code = error.code if _valid_code(error.code) else None
                text = error.message
                if isinstance(text, str):
                    message = scrub_text(text[:_SCRUB_WINDOW])[:_MAX_ERROR_MESSAGE]
            self._emit(p, latency_ms, size, "error", code, message)
            return
        result = msg.result
        status = "ok"
        if isinstance(result, Result):
            if result.isError is True:
                status = "tool_error"
            if p.method == "initialize":
                self._on_initialize_result(result)
            meta = result.meta
            if isinstance(meta, dict):
                info = meta.get(_SERVER_INFO)
                if isinstance(info, dict):
                    self.peers.server_name = _text(info.get("name")) or self.peers.server_name
                    self.peers.server_version = _text(info.get("version"))
        self._emit(p, latency_ms, size, status, None, None)

    def on_refused(self, direction: str, rpc_id: object, answer_bytes: int, seen: float) -> None:
        """The proxy answered request ``rpc_id`` itself (a budget or the loop guard).

        The refused request is the newest with that id: the caller meters each request
        before it asks about it, and reports a refusal before metering the next frame.
        """
        if not valid_id(rpc_id):
            return
        key = (direction, rpc_id)
        later = self._later.get(key) if self._later else None
        if later:
            p: _Pending | None = later.pop()
            if not later:
                del self._later[key]
        else:
            p = self._pending.pop(key, None)
        if p is not None:
            self._emit(p, (seen - p.seen) * 1000.0, answer_bytes, "rejected", None, None)

    def _on_initialize_result(self, result: Result) -> None:
        info = result.serverInfo
        if isinstance(info, dict):
            self.peers.server_name = _text(info.get("name")) or self.peers.server_name
            self.peers.server_version = _text(info.get("version"))
        version = result.protocolVersion
        if isinstance(version, str):
            self.peers.protocol_version = version

    def _emit(
        self,
        p: _Pending,
        latency_ms: float | None,
        response_bytes: int | None,
        status: str,
        error_code: int | None,
        error_message: str | None,
    ) -> None:
        tool = p.tool
        uri = tool is not None and p.method in _URI_METHODS
        if uri or error_message is not None:
            # A resource URI and a server's error text are recorded whatever the options and
            # may carry credentials (a DSN's password, a presigned URL's signature).
            if uri and tool is not None:
                tool = scrub_text(tool)
            if error_message is not None:
                error_message = scrub_text(error_message)
        peers = self.peers
        self._sink(
            _new_record(
                CallRecord,
                (
                    p.ts,
                    latency_ms,
                    self._project_id,
                    self._agent_id,
                    self._session_id,
                    self._tags,
                    peers.server_name or self._default_server,
                    self._transport,
                    self._upstream,
                    p.direction,
                    p.method,
                    tool,
                    p.jsonrpc_id,
                    p.request_id,
                    p.trace_id,
                    p.request_bytes,
                    response_bytes,
                    status,
                    error_code,
                    error_message,
                    None,
                    p.client_name or peers.client_name,
                    p.client_version or peers.client_version,
                    peers.server_version,
                    p.protocol_version or peers.protocol_version,
                    p.args,
                    p.traceparent,  # set only when valid; for the OTLP exporter, never stored
                ),
            )
        )
