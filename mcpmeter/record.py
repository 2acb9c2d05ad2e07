"""The audit row: one per JSON-RPC request, in either direction."""

from __future__ import annotations

import time
from typing import NamedTuple

#: The columns of table ``calls``, in the order ``mcpmeter export`` writes them.
COLUMNS: tuple[str, ...] = (
    "id",
    "ts",
    "latency_ms",
    "project_id",
    "agent_id",
    "session_id",
    "tags",
    "server",
    "transport",
    "upstream",
    "direction",
    "method",
    "tool",
    "jsonrpc_id",
    "request_id",
    "trace_id",
    "request_bytes",
    "response_bytes",
    "status",
    "error_code",
    "error_message",
    "cost_usd",
    "client_name",
    "client_version",
    "server_version",
    "protocol_version",
    "hash",
)

#: Statuses a row can have.
STATUSES = ("ok", "error", "tool_error", "rejected", "cancelled", "no_response")


class CallRecord(NamedTuple):
    """What the meter knows of one request once it is settled.

    ``ts`` is a POSIX timestamp (float seconds); the store formats it. The field order is
    the column order of ``calls`` without ``id`` and ``hash``, which the store assigns, then
    ``args``; the last field, ``traceparent``, is never stored (see :data:`STORED_FIELDS`).
    """

    ts: float
    latency_ms: float | None
    project_id: str | None
    agent_id: str | None
    session_id: str
    tags: str
    server: str | None
    transport: str
    upstream: str
    direction: str
    method: str
    tool: str | None
    jsonrpc_id: str
    request_id: str | None
    trace_id: str | None
    request_bytes: int
    response_bytes: int | None
    status: str
    error_code: int | None
    error_message: str | None
    cost_usd: float | None
    client_name: str | None
    client_version: str | None
    server_version: str | None
    protocol_version: str | None
    #: A redacted copy of the arguments, with ``wrap --record-args`` only. Not exported.
    args: str | None = None
    #: The request's W3C ``traceparent`` when it was valid, for the OTLP exporter to parent
    #: the span on (the row keeps only ``trace_id``). Travels with the record to the writer
    #: and its exporter; never stored, spilled, hashed or exported as a column.
    traceparent: str | None = None


#: How many leading fields of a CallRecord the store keeps: all but ``traceparent``.
STORED_FIELDS = CallRecord._fields.index("traceparent")

#: Columns the store inserts from a CallRecord (same order as the record's first
#: :data:`STORED_FIELDS` fields): the documented columns but ``id`` and ``hash``, then ``args``.
INSERT_COLUMNS: tuple[str, ...] = CallRecord._fields[:STORED_FIELDS]


_last_second: list[tuple[int, str]] = [(-1, "")]


def iso_utc(ts: float) -> str:
    """ISO-8601 UTC with microseconds and a ``Z``: ``2026-11-22T17:23:38.123456Z``.

    Every timestamp in the store has this exact shape, so text order is time order. The
    writer formats thousands a second, mostly within the same second: that part is cached.
    """
    secs = int(ts)
    micros = round((ts - secs) * 1_000_000)
    if micros >= 1_000_000:
        secs += 1
        micros -= 1_000_000
    cached_secs, prefix = _last_second[0]
    if cached_secs != secs:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _last_second[0] = (secs, prefix)
    return f"{prefix}.{micros:06d}Z"
