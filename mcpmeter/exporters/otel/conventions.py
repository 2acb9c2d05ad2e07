"""What an audit row says, in the words of the OpenTelemetry MCP semantic conventions.

The span's name, its attributes and the histogram's attributes come from a
:class:`~mcpmeter.record.CallRecord` (DESIGN.md, "OpenTelemetry"); the span's trace id and
parent from the row's ``trace_id`` and the request's W3C ``traceparent``. Nothing here
encodes or sends: :mod:`.protobuf` writes what these functions return.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import msgspec

from mcpmeter.metering.redact import scrub_text
from mcpmeter.record import CallRecord

#: The semantic conventions' advice for ``mcp.client.operation.duration`` (seconds).
DURATION_BOUNDS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
DURATION_METRIC = "mcp.client.operation.duration"
DURATION_DESCRIPTION = (
    "The duration of the MCP request as observed on the sender from the time it was sent until "
    "the response is received."
)

_NETWORK = {"stdio": "pipe", "http": "tcp", "sse": "tcp"}


def error_type(status: str, error_code: int | None) -> str | None:
    """``error.type``: the JSON-RPC code as text, ``tool_error`` for ``isError``, else the status."""
    if status == "ok":
        return None
    if status == "error":
        return str(error_code) if error_code is not None else "_OTHER"
    return status  # tool_error, rejected, cancelled, no_response


def span_name(method: str, tool: str | None) -> str:
    """``{mcp.method.name} {target}``: the tool or prompt; a resource URI is not a low-cardinality target."""
    if tool and method in ("tools/call", "prompts/get"):
        return f"{method} {tool}"
    return method


def _network_transport(record: CallRecord) -> str | None:
    # The span times the round trip on the side the request travels to: the upstream for a
    # client's request, the client's transport for a request the server starts.
    leg = record.upstream if record.direction == "c2s" else record.transport
    return _NETWORK.get(leg)


def common_attributes(record: CallRecord) -> list[tuple[str, Any]]:
    """Attributes of both the span and the histogram (low cardinality)."""
    method = record.method
    attrs: list[tuple[str, Any]] = [("mcp.method.name", method)]
    tool = record.tool
    if tool is not None:
        if method == "tools/call":
            attrs.append(("gen_ai.tool.name", tool))
            attrs.append(("gen_ai.operation.name", "execute_tool"))
        elif method == "prompts/get":
            attrs.append(("gen_ai.prompt.name", tool))
    error = error_type(record.status, record.error_code)
    if error is not None:
        attrs.append(("error.type", error))
    if record.error_code is not None:
        attrs.append(("rpc.response.status_code", str(record.error_code)))
    if record.protocol_version is not None:
        attrs.append(("mcp.protocol.version", record.protocol_version))
    transport = _network_transport(record)
    if transport is not None:
        attrs.append(("network.transport", transport))
        if transport == "tcp":
            attrs.append(("network.protocol.name", "http"))
    if record.project_id is not None:
        attrs.append(("mcpmeter.project_id", record.project_id))
    if record.agent_id is not None:
        attrs.append(("mcpmeter.agent_id", record.agent_id))
    if record.server is not None:
        attrs.append(("mcpmeter.server", record.server))
    return attrs


_tag_cache: dict[str, list[tuple[str, Any]]] = {}


def _tag_attributes(tags: str) -> list[tuple[str, Any]]:
    """``mcpmeter.tag.<key>`` per tenant tag (the JSON object of the row's ``tags``)."""
    cached = _tag_cache.get(tags)
    if cached is None:
        try:
            decoded = msgspec.json.decode(tags)
        except msgspec.DecodeError:
            decoded = None
        items = decoded.items() if isinstance(decoded, dict) else ()
        cached = [(f"mcpmeter.tag.{k}", str(v)) for k, v in items]
        if len(_tag_cache) < 1024:
            _tag_cache[tags] = cached
    return cached


def shared_attributes(record: CallRecord) -> list[tuple[str, Any]]:
    """Span attributes that repeat from span to span (encoded once per distinct set)."""
    attrs = common_attributes(record)
    if record.tool is not None and record.method.startswith("resources/"):
        # Rows stored before URIs were scrubbed may still carry credentials (export replays them).
        attrs.append(("mcp.resource.uri", scrub_text(record.tool)))
    attrs.append(("mcp.session.id", record.session_id))
    attrs.append(("mcpmeter.status", record.status))
    attrs.append(("mcpmeter.direction", record.direction))
    if record.client_name is not None:
        attrs.append(("mcpmeter.client.name", record.client_name))
    if record.tags and record.tags != "{}":
        attrs.extend(_tag_attributes(record.tags))
    return attrs


def shared_key(record: CallRecord) -> tuple[Any, ...]:
    """Everything :func:`shared_attributes` reads."""
    return (
        record.method,
        record.tool,
        record.status,
        record.error_code,
        record.protocol_version,
        record.direction,
        record.transport,
        record.upstream,
        record.project_id,
        record.agent_id,
        record.server,
        record.session_id,
        record.client_name,
        record.tags,
    )


def own_attributes(record: CallRecord) -> list[tuple[str, Any]]:
    """Span attributes of this request alone."""
    attrs: list[tuple[str, Any]] = [("jsonrpc.request.id", record.jsonrpc_id)]
    if record.request_id is not None:
        attrs.append(("mcpmeter.request_id", record.request_id))
    attrs.append(("mcpmeter.request_bytes", record.request_bytes))
    if record.response_bytes is not None:
        attrs.append(("mcpmeter.response_bytes", record.response_bytes))
    if record.cost_usd is not None:
        attrs.append(("mcpmeter.cost_usd", float(record.cost_usd)))
    return attrs


def nanos(ts: float) -> int:
    """Whole microseconds, as nanoseconds: the instant the store writes (see ``record.iso_utc``)."""
    secs = int(ts)
    return (secs * 1_000_000 + round((ts - secs) * 1_000_000)) * 1000


# -- trace context -----------------------------------------------------------------------------


class SpanSource(NamedTuple):
    """A record and the ids its span must have, if any (the parent is the record's ``traceparent``)."""

    record: CallRecord
    #: Set for replayed rows, so replaying twice sends the same ids.
    span_id: bytes | None = None
    trace_id: bytes | None = None


def random_id(size: int) -> bytes:
    """A new span id (8 bytes) or trace id (16), never all zeros."""
    value = random.getrandbits(size * 8) or 1
    return value.to_bytes(size, "big")


def trace_id_bytes(text: str | None) -> bytes | None:
    """The 16 bytes of a row's ``trace_id`` (32 hex digits), None when there is none."""
    if text is None or len(text) != 32:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def parent_of(traceparent: str | None) -> tuple[bytes, int] | None:
    """The parent span id and the W3C flags of a (valid) ``traceparent``."""
    if traceparent is None:
        return None
    parts = traceparent.strip().lower().split("-")
    try:
        return bytes.fromhex(parts[2]), int(parts[3], 16)
    except (IndexError, ValueError):
        return None
