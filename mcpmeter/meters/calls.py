"""Pairs JSON-RPC requests with their responses and turns each pair into a :class:`CallRecord`.

The meter sees frames after the relay has forwarded them. It never raises into the relay
(the tap that calls it counts its errors) and it does no I/O: settled records go to
``sink`` (the audit writer's queue). Everything here is constant time per frame apart from
``orjson.loads``, which only runs on complete frames.

Directions: ``c2s`` frames travel client -> server, ``s2c`` server -> client. A request is
keyed by the direction it travelled and its id, so the client's id 1 and the server's id 1
(a sampling request) never collide; a response travelling ``s2c`` settles the ``c2s``
request with its id, and the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from mcpmeter.record import CallRecord
from mcpmeter.tags import Tenant

C2S = "c2s"
S2C = "s2c"
_OPPOSITE = {C2S: S2C, S2C: C2S}

_CLIENT_INFO = "io.modelcontextprotocol/clientInfo"
_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
_PROTOCOL_VERSION = "io.modelcontextprotocol/protocolVersion"
_REQUEST_ID_KEYS = ("dev.mcpmeter/requestId", "requestId", "request_id")
_NAMED_METHODS = frozenset({"tools/call", "prompts/get"})
_URI_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})
_MAX_ERROR_MESSAGE = 512
_HEX = frozenset("0123456789abcdef")


@dataclass(slots=True)
class Peers:
    """What the handshake (or the 2026-07-28 ``_meta``) told us about both ends."""

    client_name: str | None = None
    client_version: str | None = None
    server_name: str | None = None
    server_version: str | None = None
    protocol_version: str | None = None


@dataclass(slots=True)
class FrameStats:
    """Counters for what the meter saw; reported at exit, never stored per frame."""

    frames: int = 0
    requests: int = 0
    notifications: int = 0
    responses: int = 0
    blank: int = 0
    not_json: int = 0
    not_jsonrpc: int = 0
    unmatched_responses: int = 0
    duplicate_ids: int = 0
    meter_errors: int = 0


class _Pending:
    __slots__ = (
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
        self.client_name: str | None = None
        self.client_version: str | None = None
        self.protocol_version: str | None = None


def frame_size(line: bytes | bytearray) -> int:
    """Bytes of a frame on the wire, its line ending (``\\n`` or ``\\r\\n``) excluded."""
    n = len(line)
    if n and line[n - 1] == 0x0D:
        return n - 1
    return n


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
            return unquote(value) or None
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


def _member_size(member: dict[str, Any], share: int) -> int:
    """A batch member's compact JSON size; its share of the batch when it cannot be serialised
    (orjson reads deeper nesting than it writes)."""
    try:
        return len(orjson.dumps(member))
    except TypeError:
        return share


def _valid_id(rpc_id: object) -> bool:
    """JSON-RPC ids are strings or numbers (``true`` is not ``1``)."""
    return isinstance(rpc_id, (str, int, float)) and not isinstance(rpc_id, bool)


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
    ) -> None:
        self._sink = sink
        self._project_id = tenant.project_id
        self._agent_id = tenant.agent_id
        self._session_id = tenant.session_id
        self._tags = tenant.tags_json
        self._transport = transport
        self._upstream = upstream
        self._default_server = default_server
        self._pending: dict[tuple[str, object], _Pending] = {}
        # Wall time of a frame = wall time at start + monotonic time elapsed since.
        self._wall0 = wall_clock()
        self._mono0 = mono_clock()
        self.peers = Peers()
        self.stats = FrameStats()

    # -- the entry point -------------------------------------------------------------------

    def on_frame(self, direction: str, line: bytes | bytearray, seen: float) -> None:
        """One complete frame (without its ``\\n``) seen travelling ``direction`` at ``seen``."""
        stats = self.stats
        stats.frames += 1
        size = frame_size(line)
        if size == 0 or not line.strip():
            stats.blank += 1
            return
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            stats.not_json += 1
            return
        if isinstance(message, dict):
            self._on_message(direction, message, size, seen)
        elif isinstance(message, list) and message:
            # A JSON-RPC batch: each member is metered with its compact serialised size,
            # since a member has no frame of its own on the wire.
            share = size // len(message)
            for member in message:
                if isinstance(member, dict):
                    self._on_message(direction, member, _member_size(member, share), seen)
                else:
                    stats.not_jsonrpc += 1
        else:
            stats.not_jsonrpc += 1

    def close(self, seen: float | None = None) -> None:
        """The stream ended: every request still waiting becomes a ``no_response`` row."""
        pending = self._pending
        self._pending = {}
        for p in pending.values():
            self._emit(p, None, None, "no_response", None, None)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    # -- message kinds ---------------------------------------------------------------------

    def _on_message(self, direction: str, msg: dict[str, Any], size: int, seen: float) -> None:
        method = msg.get("method")
        if isinstance(method, str):
            if "id" in msg and msg["id"] is not None:
                self._on_request(direction, msg, method, size, seen)
            else:
                self.stats.notifications += 1
                if method == "notifications/cancelled":
                    self._on_cancelled(direction, msg)
            return
        if "id" in msg and ("result" in msg or "error" in msg):
            self._on_response(direction, msg, size, seen)
            return
        self.stats.not_jsonrpc += 1

    def _on_request(self, direction: str, msg: dict[str, Any], method: str, size: int, seen: float) -> None:
        rpc_id = msg["id"]
        if not _valid_id(rpc_id):
            self.stats.not_jsonrpc += 1
            return
        self.stats.requests += 1
        p = _Pending(direction, method, str(rpc_id), size, seen, self._wall0 + (seen - self._mono0))
        params = msg.get("params")
        if isinstance(params, dict):
            if method in _NAMED_METHODS:
                p.tool = _text(params.get("name"))
            elif method in _URI_METHODS:
                p.tool = _text(params.get("uri"))
            elif method == "initialize" and direction == C2S:
                self._on_initialize_request(params, p)
            meta = params.get("_meta")
            if isinstance(meta, dict):
                self._read_request_meta(meta, p)
        key = (direction, rpc_id)
        if key in self._pending:
            # The same id reused before its response: settle the older one as unanswered.
            self.stats.duplicate_ids += 1
            self._emit(self._pending.pop(key), None, None, "no_response", None, None)
        self._pending[key] = p

    def _on_initialize_request(self, params: dict[str, Any], p: _Pending) -> None:
        info = params.get("clientInfo")
        if isinstance(info, dict):
            self.peers.client_name = _text(info.get("name"))
            self.peers.client_version = _text(info.get("version"))
        p.protocol_version = _text(params.get("protocolVersion"))

    def _read_request_meta(self, meta: dict[str, Any], p: _Pending) -> None:
        p.request_id = request_id_of(meta)
        traceparent = meta.get("traceparent")
        if traceparent is not None:
            p.trace_id = trace_id_of(traceparent)
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

    def _on_cancelled(self, direction: str, msg: dict[str, Any]) -> None:
        params = msg.get("params")
        if not isinstance(params, dict):
            return
        rpc_id = params.get("requestId")
        if not _valid_id(rpc_id):
            return
        p = self._pending.pop((direction, rpc_id), None)
        if p is not None:
            self._emit(p, None, None, "cancelled", None, None)

    def _on_response(self, direction: str, msg: dict[str, Any], size: int, seen: float) -> None:
        self.stats.responses += 1
        rpc_id = msg["id"]
        p = self._pending.pop((_OPPOSITE[direction], rpc_id), None) if _valid_id(rpc_id) else None
        if p is None:
            self.stats.unmatched_responses += 1
            return
        latency_ms = (seen - p.seen) * 1000.0
        error = msg.get("error")
        if error is not None:
            code = message = None
            if isinstance(error, dict):
                raw_code = error.get("code")
                code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else None
                text = error.get("message")
                message = text[:_MAX_ERROR_MESSAGE] if isinstance(text, str) else None
            self._emit(p, latency_ms, size, "error", code, message)
            return
        result = msg.get("result")
        status = "ok"
        if isinstance(result, dict):
            if result.get("isError") is True:
                status = "tool_error"
            if p.method == "initialize":
                self._on_initialize_result(result)
            meta = result.get("_meta")
            if isinstance(meta, dict):
                info = meta.get(_SERVER_INFO)
                if isinstance(info, dict):
                    self.peers.server_name = _text(info.get("name")) or self.peers.server_name
                    self.peers.server_version = _text(info.get("version"))
        self._emit(p, latency_ms, size, status, None, None)

    def _on_initialize_result(self, result: dict[str, Any]) -> None:
        info = result.get("serverInfo")
        if isinstance(info, dict):
            self.peers.server_name = _text(info.get("name")) or self.peers.server_name
            self.peers.server_version = _text(info.get("version"))
        version = result.get("protocolVersion")
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
        peers = self.peers
        self._sink(
            CallRecord(
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
                p.tool,
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
            )
        )
