"""OpenTelemetry: a span per audit row and the ``mcp.client.operation.duration`` histogram, as OTLP.

Rows become spans with the OTel MCP semantic conventions (DESIGN.md, "OpenTelemetry"), sent
as OTLP/HTTP protobuf. The protobuf is written here, field by field (the OTLP messages
are small and stable), not with the OpenTelemetry SDK or opentelemetry-proto's classes: a
span's trace id, parent and times come from the row, which the SDK's tracer would only take
through a custom id generator and a fake parent context per span; its meter cannot record
durations seen in the past (``export --format otlp``); and building the messages with
opentelemetry-proto costs about 58 us a span against 6 us here, CPU the exporter's thread
takes from the relay's threads (they share the GIL). Nothing needs installing; the tests
decode every request with opentelemetry-proto.

Two ways in:

* :class:`SpanExporter`, for ``wrap``: the audit writer hands it each batch
  (:class:`mcpmeter.metering.audit.BatchExporter`); it queues them (bounded: a collector that
  is down or slow costs spans, counted and warned about once, never a wait on the relay's
  path or the writer's) and one thread of its own POSTs them in batches of 512.
* :func:`replay`, for ``export --format otlp``: stored rows, streamed, in batches, retried.

``wrap`` imports this module only when OTLP is configured. Requests go out with
:mod:`http.client` (keep-alive; a tenth of httpx's import time, paid on the relay's GIL).
"""

from __future__ import annotations

import bisect
import gzip
import random
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

import msgspec

from mcpmeter import __version__
from mcpmeter.errors import MeterError, UsageError
from mcpmeter.log import verbose, warn, warn_once
from mcpmeter.metering.redact import scrub_text
from mcpmeter.record import CallRecord
from mcpmeter.threads import quiet_thread

if TYPE_CHECKING:
    import http.client
    import ssl

#: The semantic conventions' advice for ``mcp.client.operation.duration`` (seconds).
DURATION_BOUNDS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
DURATION_METRIC = "mcp.client.operation.duration"
DURATION_DESCRIPTION = (
    "The duration of the MCP request as observed on the sender from the time it was sent until "
    "the response is received."
)
#: Spans per POST (the SDK's batch span processor sends 512).
EXPORT_BATCH = 512
#: Spans waiting for the exporter's thread at most; past it, new ones are dropped.
MAX_QUEUE = 8192
#: How long a span may wait for its batch to fill.
SCHEDULE_DELAY_S = 1.0
#: After a failed POST, the next waits this long, doubling up to BACKOFF_MAX_S.
BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0
#: At exit, how long what is still queued may take to send.
CLOSE_TIMEOUT_S = 5.0
#: Attribute sets the histogram keeps; further ones go to one overflow series.
MAX_SERIES = 2000
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})

_NETWORK = {"stdio": "pipe", "http": "tcp", "sse": "tcp"}
#: OTLP span flags: the W3C trace flags, plus "whether the parent is remote is known" and "it is".
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_TRUE = frozenset({"true", "1", "yes"})


# -- configuration -----------------------------------------------------------------------


class OtlpConfig(NamedTuple):
    """Where and how to send. A signal whose URL is None is not sent."""

    traces_url: str | None
    metrics_url: str | None
    traces_headers: tuple[tuple[str, str], ...] = ()
    metrics_headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    gzip: bool = False
    resource: tuple[tuple[str, str], ...] = ()
    #: How often ``wrap`` sends the histogram (it always sends it at exit too).
    metrics_interval: float = 60.0


def signal_url(base: str, signal: str) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` semantics: the base URL plus ``/v1/traces`` or ``/v1/metrics``."""
    return base.rstrip("/") + "/v1/" + signal


def _check_url(url: str, source: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{source} must be an http:// or https:// URL, got {url!r}")
    return url


def parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """A W3C-baggage-like ``k=v,k2=v2`` list (``OTEL_EXPORTER_OTLP_HEADERS``), values percent-decoded."""
    pairs: list[tuple[str, str]] = []
    for member in text.split(","):
        key, sep, value = member.partition("=")
        if sep and key.strip():
            pairs.append((key.strip(), unquote(value.strip())))
    return tuple(pairs)


def config_from(
    endpoint: str | None, environ: Mapping[str, str], *, source: str = "--otlp-endpoint"
) -> OtlpConfig | None:
    """The OTLP set-up from a flag (a base URL, like ``OTEL_EXPORTER_OTLP_ENDPOINT``) and the env.

    Spans are sent when the flag, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (a full URL) names a collector; the histogram
    when the flag, ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``
    does. The flag wins over the env. ``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none``
    and ``OTEL_METRICS_EXPORTER=none`` turn them off. None when nothing is to be sent.
    """
    env = environ.get
    if env("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE and endpoint is None:
        return None
    if endpoint is not None:
        base = _check_url(endpoint, source)
        traces: str | None = signal_url(base, "traces")
        metrics: str | None = signal_url(base, "metrics")
    else:
        base = env("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if base:
            base = _check_url(base, "OTEL_EXPORTER_OTLP_ENDPOINT")
        traces = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or None
        metrics = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip() or None
        traces = _check_url(traces, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") if traces else None
        metrics = _check_url(metrics, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") if metrics else None
        traces = traces or (signal_url(base, "traces") if base else None)
        metrics = metrics or (signal_url(base, "metrics") if base else None)
        if env("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            traces = None
        if env("OTEL_METRICS_EXPORTER", "").strip().lower() == "none":
            metrics = None
    if traces is None and metrics is None:
        return None
    for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        protocol = env(name, "").strip()
        if protocol and protocol != "http/protobuf":
            warn_once("otlp-protocol", f"{name}={protocol} ignored: mcpmeter sends OTLP/HTTP protobuf")
    common = parse_pairs(env("OTEL_EXPORTER_OTLP_HEADERS", ""))
    try:
        timeout_ms = float(env("OTEL_EXPORTER_OTLP_TIMEOUT", "") or 10_000)
        interval_ms = float(env("OTEL_METRIC_EXPORT_INTERVAL", "") or 60_000)
    except ValueError as exc:
        raise UsageError(f"OTEL_EXPORTER_OTLP_TIMEOUT / OTEL_METRIC_EXPORT_INTERVAL: {exc}") from None
    return OtlpConfig(
        traces_url=traces,
        metrics_url=metrics,
        traces_headers=common + parse_pairs(env("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")),
        metrics_headers=common + parse_pairs(env("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "")),
        timeout=max(timeout_ms, 1.0) / 1000.0,
        gzip=env("OTEL_EXPORTER_OTLP_COMPRESSION", "").strip().lower() == "gzip",
        resource=_resource(environ),
        metrics_interval=max(interval_ms, 100.0) / 1000.0,
    )


def _resource(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``service.name`` (``OTEL_SERVICE_NAME``, default ``mcpmeter``), ``OTEL_RESOURCE_ATTRIBUTES``.

    ``service.instance.id`` is a new UUID per process unless given: each ``wrap`` sends its
    own cumulative histogram, and two processes must not look like one series.
    """
    attributes = dict(parse_pairs(environ.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    service = environ.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        attributes["service.name"] = service
    attributes.setdefault("service.name", "mcpmeter")
    attributes.setdefault("service.version", __version__)
    attributes.setdefault("service.instance.id", str(uuid.uuid4()))
    return tuple(attributes.items())


# -- what a row says, in the conventions' words ----------------------------------------------


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


def _common_attributes(record: CallRecord) -> list[tuple[str, Any]]:
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


def _shared_attributes(record: CallRecord) -> list[tuple[str, Any]]:
    """Span attributes that repeat from span to span (encoded once per distinct set)."""
    attrs = _common_attributes(record)
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


def _shared_key(record: CallRecord) -> tuple[Any, ...]:
    """Everything :func:`_shared_attributes` reads."""
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


def _own_attributes(record: CallRecord) -> list[tuple[str, Any]]:
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


def _nanos(ts: float) -> int:
    """Whole microseconds, as nanoseconds: the instant the store writes (see ``record.iso_utc``)."""
    secs = int(ts)
    return (secs * 1_000_000 + round((ts - secs) * 1_000_000)) * 1000


def record_of_row(row: Sequence[Any]) -> CallRecord:
    """A stored row (``record.COLUMNS`` order) as the record it was written from."""
    ts = datetime.fromisoformat(row[1]).timestamp()
    return CallRecord(ts, *row[2:26])


class SpanSource(NamedTuple):
    """A record and what its span needs besides: the client's ``traceparent``, fixed ids."""

    record: CallRecord
    traceparent: str | None = None
    #: Set for replayed rows, so replaying twice sends the same ids.
    span_id: bytes | None = None
    trace_id: bytes | None = None


def _random_id(size: int) -> bytes:
    value = random.getrandbits(size * 8) or 1
    return value.to_bytes(size, "big")


def _trace_id_of(text: str | None) -> bytes | None:
    if text is None or len(text) != 32:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def _parent_of(traceparent: str | None) -> tuple[bytes, int] | None:
    """The parent span id and the W3C flags of a (valid) ``traceparent``."""
    if traceparent is None:
        return None
    parts = traceparent.strip().lower().split("-")
    try:
        return bytes.fromhex(parts[2]), int(parts[3], 16)
    except (IndexError, ValueError):
        return None


# -- encoding: OTLP protobuf, written directly ------------------------------------------------


# Field keys, (number << 3) | wire type, of the OTLP messages written here (opentelemetry-proto's
# trace.proto, metrics.proto, common.proto, resource.proto and the two collector services).
_LEN = 2
_F64 = 1
_F32 = 5


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((n,)) for n in range(0x80)]


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _field(key: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its key, the payload's length, the payload."""
    size = len(payload)
    return key + (_SMALL[size] if size < 0x80 else _varint(size)) + payload


_pack_u64 = struct.Struct("<Q").pack
_pack_u32 = struct.Struct("<I").pack
_pack_f64 = struct.Struct("<d").pack

# KeyValue {key = 1, value = 2}; AnyValue {string = 1, bool = 2, int = 3, double = 4}
_KV_KEY = _key(1, _LEN)
_KV_VALUE = _key(2, _LEN)
_ANY_STRING = _key(1, _LEN)
_ANY_BOOL = _key(2, 0)
_ANY_INT = _key(3, 0)
_ANY_DOUBLE = _key(4, _F64)
# Span
_SPAN_TRACE_ID = _key(1, _LEN)
_SPAN_ID = _key(2, _LEN)
_SPAN_PARENT = _key(4, _LEN)
_SPAN_NAME = _key(5, _LEN)
_SPAN_KIND_CLIENT = _key(6, 0) + _varint(3)
_SPAN_START = _key(7, _F64)
_SPAN_END = _key(8, _F64)
_SPAN_ATTRIBUTE = _key(9, _LEN)
_SPAN_STATUS = _key(15, _LEN)
_SPAN_FLAGS = _key(16, _F32)
_STATUS_MESSAGE = _key(2, _LEN)
_STATUS_ERROR = _key(3, 0) + _varint(2)
# Containers: ExportTraceServiceRequest.resource_spans = 1, ResourceSpans {resource = 1,
# scope_spans = 2}, ScopeSpans {scope = 1, spans = 2}; the metrics side is shaped the same.
_REQUEST_ITEM = _key(1, _LEN)
_RESOURCE = _key(1, _LEN)
_SCOPE_ITEMS = _key(2, _LEN)
_SCOPE = _key(1, _LEN)
_ITEM = _key(2, _LEN)
_RESOURCE_ATTRIBUTE = _key(1, _LEN)
_SCOPE_NAME = _key(1, _LEN)
_SCOPE_VERSION = _key(2, _LEN)
# Metric {name = 1, description = 2, unit = 3, histogram = 9}; Histogram {data_points = 1,
# aggregation_temporality = 2}; HistogramDataPoint {start = 2, time = 3, count = 4, sum = 5,
# bucket_counts = 6 (packed), explicit_bounds = 7 (packed), attributes = 9, min = 11, max = 12}
_METRIC_NAME = _key(1, _LEN)
_METRIC_DESCRIPTION = _key(2, _LEN)
_METRIC_UNIT = _key(3, _LEN)
_METRIC_HISTOGRAM = _key(9, _LEN)
_HISTOGRAM_POINT = _key(1, _LEN)
_HISTOGRAM_CUMULATIVE = _key(2, 0) + _varint(2)
_POINT_START = _key(2, _F64)
_POINT_TIME = _key(3, _F64)
_POINT_COUNT = _key(4, _F64)
_POINT_SUM = _key(5, _F64)
_POINT_BUCKETS = _key(6, _LEN)
_POINT_BOUNDS = _key(7, _LEN)
_POINT_ATTRIBUTE = _key(9, _LEN)
_POINT_MIN = _key(11, _F64)
_POINT_MAX = _key(12, _F64)
#: Encoded attributes kept for reuse (method, tool, tenant ... repeat on every span).
_CACHE_LIMIT = 8192


def _utf8(text: str) -> bytes:
    """Protobuf strings are UTF-8: a lone surrogate (JSON allows ``\\ud800``) becomes ``?``."""
    return text.encode("utf-8", "replace")


def _any_value(value: Any) -> bytes:
    if isinstance(value, str):
        return _field(_ANY_STRING, _utf8(value))
    if isinstance(value, bool):
        return _ANY_BOOL + _SMALL[int(value)]
    if isinstance(value, int):
        return _ANY_INT + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    return _ANY_DOUBLE + _pack_f64(float(value))


_key_fields: dict[str, bytes] = {}


def key_value(key: str, value: Any) -> bytes:
    """One ``KeyValue`` message."""
    key_field = _key_fields.get(key)
    if key_field is None:
        key_field = _field(_KV_KEY, _utf8(key))
        if len(_key_fields) < _CACHE_LIMIT:
            _key_fields[key] = key_field
    return key_field + _field(_KV_VALUE, _any_value(value))


class Encoder:
    """Writes ExportTraceServiceRequest / ExportMetricsServiceRequest bytes (OTLP protobuf).

    Written by hand rather than through opentelemetry-proto's message classes: a span costs
    about a tenth of the time (the exporter shares the GIL with the relay's threads), and
    nothing needs installing. The tests decode every request with opentelemetry-proto.
    """

    def __init__(self, resource: Sequence[tuple[str, str]]) -> None:
        self._resource = b"".join(_field(_RESOURCE_ATTRIBUTE, key_value(k, v)) for k, v in resource)
        self._scope = _field(_SCOPE_NAME, b"mcpmeter") + _field(_SCOPE_VERSION, __version__.encode())
        #: Keyed by (key, type, value): 1, 1.0 and True are equal keys but not equal attributes.
        self._cache: dict[tuple[str, type, Any], bytes] = {}
        self._blocks: dict[tuple[Any, ...], bytes] = {}

    def _attribute(self, key: str, value: Any, field_key: bytes) -> bytes:
        cache = self._cache
        cache_key = (key, type(value), value)
        encoded = cache.get(cache_key)
        if encoded is None:
            encoded = _field(field_key, key_value(key, value))
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            cache[cache_key] = encoded
        return encoded

    def _request(self, items: bytes) -> bytes:
        scoped = _field(_SCOPE, self._scope) + items
        resourced = _field(_RESOURCE, self._resource) + _field(_SCOPE_ITEMS, scoped)
        return _field(_REQUEST_ITEM, resourced)

    def spans(self, sources: Iterable[SpanSource]) -> tuple[bytes, int]:
        """The request for ``sources`` (children of unsampled parents left out), and its span count."""
        attribute = self._attribute
        blocks = self._blocks
        encoded: list[bytes] = []
        for source in sources:
            record = source.record
            parent = _parent_of(source.traceparent)
            flags = _HAS_IS_REMOTE
            parent_field = b""
            if parent is not None:
                parent_id, trace_flags = parent
                if not trace_flags & 0x01:
                    continue  # the client did not sample this trace: neither do we
                flags |= _IS_REMOTE | trace_flags
                parent_field = _SPAN_PARENT + b"\x08" + parent_id
            else:
                flags |= 0x01
            trace_id = source.trace_id or _trace_id_of(record.trace_id) or _random_id(16)
            start = _nanos(record.ts)
            latency = record.latency_ms
            end = start + (round(latency * 1000) * 1000 if latency is not None and latency > 0 else 0)
            parts = [
                _SPAN_TRACE_ID + b"\x10" + trace_id,
                _SPAN_ID + b"\x08" + (source.span_id or _random_id(8)),
                parent_field,
                _field(_SPAN_NAME, _utf8(span_name(record.method, record.tool))),
                _SPAN_KIND_CLIENT,
                _SPAN_START + _pack_u64(start),
                _SPAN_END + _pack_u64(end),
            ]
            shared_key = _shared_key(record)
            shared = blocks.get(shared_key)
            if shared is None:
                shared = b"".join(attribute(k, v, _SPAN_ATTRIBUTE) for k, v in _shared_attributes(record))
                if len(blocks) >= _CACHE_LIMIT:
                    blocks.clear()
                blocks[shared_key] = shared
            parts.append(shared)
            for key, value in _own_attributes(record):
                parts.append(_field(_SPAN_ATTRIBUTE, key_value(key, value)))
            if error_type(record.status, record.error_code) is not None:
                status = _STATUS_ERROR
                if record.error_message:
                    message = scrub_text(record.error_message)
                    status = _field(_STATUS_MESSAGE, _utf8(message)) + status
                parts.append(_field(_SPAN_STATUS, status))
            parts.append(_SPAN_FLAGS + _pack_u32(flags))
            encoded.append(_field(_ITEM, b"".join(parts)))
        return self._request(b"".join(encoded)), len(encoded)

    def histogram(self, snapshot: HistogramSnapshot) -> bytes:
        bounds = b"".join(_pack_f64(bound) for bound in DURATION_BOUNDS)
        points = []
        for attributes, series in snapshot.series:
            point = [self._attribute(k, v, _POINT_ATTRIBUTE) for k, v in attributes]
            point += [
                _POINT_START + _pack_u64(snapshot.start_ns),
                _POINT_TIME + _pack_u64(snapshot.time_ns),
                _POINT_COUNT + _pack_u64(series.count),
                _POINT_SUM + _pack_f64(series.total),
                _field(_POINT_BUCKETS, b"".join(_pack_u64(n) for n in series.buckets)),
                _field(_POINT_BOUNDS, bounds),
                _POINT_MIN + _pack_f64(series.low),
                _POINT_MAX + _pack_f64(series.high),
            ]
            points.append(_field(_HISTOGRAM_POINT, b"".join(point)))
        histogram = b"".join(points) + _HISTOGRAM_CUMULATIVE
        metric = (
            _field(_METRIC_NAME, DURATION_METRIC.encode())
            + _field(_METRIC_DESCRIPTION, DURATION_DESCRIPTION.encode())
            + _field(_METRIC_UNIT, b"s")
            + _field(_METRIC_HISTOGRAM, histogram)
        )
        return self._request(_field(_ITEM, metric))


# -- the histogram -------------------------------------------------------------------------


class _Series:
    """One attribute set's count, sum, min, max and bucket counts."""

    __slots__ = ("attributes", "buckets", "count", "high", "low", "total")

    def __init__(self, attributes: tuple[tuple[str, Any], ...]) -> None:
        self.attributes = attributes
        self.count = 0
        self.total = 0.0
        self.low = float("inf")
        self.high = float("-inf")
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)

    def copy(self) -> _Series:
        twin = _Series(self.attributes)
        twin.count, twin.total, twin.low, twin.high = self.count, self.total, self.low, self.high
        twin.buckets = list(self.buckets)
        return twin


class HistogramSnapshot(NamedTuple):
    start_ns: int
    time_ns: int
    series: list[tuple[tuple[tuple[str, Any], ...], _Series]]


class DurationHistogram:
    """``mcp.client.operation.duration``, cumulative since ``start``, one series per attribute set.

    Rows without a latency (no response came) are not durations and are left out. Past
    :data:`MAX_SERIES` attribute sets, rows go to one series marked ``otel.metric.overflow``.
    """

    _OVERFLOW: tuple[tuple[str, Any], ...] = (("otel.metric.overflow", True),)

    def __init__(self, start: float | None = None) -> None:
        #: Keyed by the record fields the attributes come from (cheaper than the attributes).
        self._series: dict[tuple[Any, ...], _Series] = {}
        self._lock = threading.Lock()
        self.start_ns = _nanos(start if start is not None else time.time())
        self.last_ns = self.start_ns

    def add(self, records: Iterable[CallRecord]) -> None:
        with self._lock:
            series_of = self._series
            last = self.last_ns
            for record in records:
                latency = record.latency_ms
                if latency is None:
                    continue
                seconds = latency / 1000.0
                key: tuple[Any, ...] = (
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
                )
                series = series_of.get(key)
                if series is None:
                    attributes = tuple(_common_attributes(record))
                    if len(series_of) >= MAX_SERIES:
                        key = attributes = self._OVERFLOW
                        series = series_of.get(key)
                    if series is None:
                        series = series_of[key] = _Series(attributes)
                series.count += 1
                series.total += seconds
                if seconds < series.low:
                    series.low = seconds
                if seconds > series.high:
                    series.high = seconds
                series.buckets[bisect.bisect_left(DURATION_BOUNDS, seconds)] += 1
                end = _nanos(record.ts) + round(latency * 1000) * 1000
                if end > last:
                    last = end
            self.last_ns = last

    def __len__(self) -> int:
        return len(self._series)

    def snapshot(self, now_ns: int | None = None) -> HistogramSnapshot | None:
        """A copy of every series, stamped ``now_ns`` (default: now); None while empty."""
        with self._lock:
            if not self._series:
                return None
            copied = [(s.attributes, s.copy()) for s in self._series.values()]
        return HistogramSnapshot(self.start_ns, now_ns if now_ns is not None else time.time_ns(), copied)


# -- sending -----------------------------------------------------------------------------


class ExportFailed(Exception):
    """A POST that did not land: ``retryable`` when the collector may take it later."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Poster:
    """POSTs OTLP requests over kept-alive connections (http.client: a fraction of httpx's import).

    TLS is verified with the default context (``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured);
    proxy env vars are not used: a collector is reached directly.
    """

    def __init__(self, timeout: float, *, compress: bool = False) -> None:
        self._timeout = timeout
        self._compress = compress
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._tls: ssl.SSLContext | None = None

    def _connection(self, scheme: str, netloc: str) -> tuple[http.client.HTTPConnection, bool]:
        """The connection to ``netloc`` and whether it is new."""
        import http.client  # on the exporter's thread, not wrap's start-up path

        found = self._connections.get((scheme, netloc))
        if found is not None:
            return found, False
        if scheme == "https":
            import ssl

            if self._tls is None:
                self._tls = ssl.create_default_context()
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                netloc, timeout=self._timeout, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(netloc, timeout=self._timeout)
        self._connections[scheme, netloc] = connection
        return connection, True

    def _forget(self, scheme: str, netloc: str) -> None:
        connection = self._connections.pop((scheme, netloc), None)
        if connection is not None:
            connection.close()

    def post(
        self, url: str, body: bytes, headers: Sequence[tuple[str, str]], timeout: float | None = None
    ) -> None:
        """POST one OTLP/HTTP protobuf request; raise :class:`ExportFailed` unless it is accepted."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = {"Content-Type": "application/x-protobuf", "User-Agent": f"mcpmeter/{__version__}"}
        sent.update(headers)
        if self._compress:
            body = gzip.compress(body, compresslevel=5)
            sent["Content-Encoding"] = "gzip"
        import http.client

        for attempt in (1, 2):
            connection, fresh = self._connection(parts.scheme, parts.netloc)
            connection.timeout = timeout if timeout is not None else self._timeout
            if connection.sock is not None:
                connection.sock.settimeout(connection.timeout)
            try:
                connection.request("POST", target, body=body, headers=sent)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._forget(parts.scheme, parts.netloc)
                # A kept-alive connection the collector closed meanwhile: once more, on a new one.
                if not fresh and attempt == 1 and not isinstance(exc, TimeoutError):
                    continue
                raise ExportFailed(f"{type(exc).__name__}: {exc}", retryable=True) from None
            if response.will_close:
                self._forget(parts.scheme, parts.netloc)
            if response.status // 100 != 2:
                text = data[:200].decode(errors="replace")
                raise ExportFailed(
                    f"HTTP {response.status} {text!r}", retryable=response.status in RETRYABLE_STATUS
                )
            return

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


class SpanExporter:
    """``wrap``'s exporter: a bounded queue fed by the audit writer, drained by one thread.

    :meth:`submit` (on the writer's thread) adds a batch to the histogram, takes each
    record's ``traceparent`` from the meter's table and queues the records, or drops what
    does not fit when :data:`MAX_QUEUE` spans already wait. The thread POSTs
    :data:`EXPORT_BATCH` spans at a time (or what waited :data:`SCHEDULE_DELAY_S`), and the
    histogram every ``metrics_interval`` and at exit. A POST that fails drops its batch and
    holds the next one back (0.5 s doubling to 30 s); the first loss is one line on stderr.
    The rows are in the store whatever happens here.
    """

    def __init__(
        self,
        config: OtlpConfig,
        *,
        max_queue: int = MAX_QUEUE,
        batch: int = EXPORT_BATCH,
        delay: float = SCHEDULE_DELAY_S,
        close_timeout: float = CLOSE_TIMEOUT_S,
    ) -> None:
        from mcpmeter.metering.calls import keep_traceparents

        self._config = config
        self._max_queue = max_queue
        self._batch = batch
        self._delay = delay
        self._close_timeout = close_timeout
        self._queue: deque[SpanSource] = deque()
        self._traceparents = keep_traceparents() if config.traces_url else None
        self._histogram = DurationHistogram() if config.metrics_url else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcpmeter-otlp-exporter", daemon=True)
        self._deadline: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_S
        self._count_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0

    def start(self) -> SpanExporter:
        self._thread.start()
        return self

    # -- the writer's side ---------------------------------------------------------------

    def submit(self, records: Sequence[CallRecord]) -> None:
        if self._histogram is not None:
            self._histogram.add(records)
        parents = self._traceparents
        if parents is None:
            return
        queue = self._queue
        append = queue.append
        room = self._max_queue - len(queue)
        new = tuple.__new__
        pop = parents.pop
        lost = 0
        for record in records:
            traceparent = None
            if record.trace_id is not None:
                traceparent = pop((record.session_id, record.direction, record.jsonrpc_id, record.ts), None)
            if room > 0:
                append(new(SpanSource, (record, traceparent, None, None)))
                room -= 1
            else:
                lost += 1
        if lost:
            self._drop(lost, "the exporter's queue is full")
        if len(queue) >= self._batch:
            self._wake.set()

    def close(self) -> None:
        """Send what is queued (for up to ``close_timeout`` seconds) and the histogram, then stop."""
        self._deadline = time.monotonic() + self._close_timeout
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self._close_timeout + 1.0)
        if self._queue:
            self._drop(len(self._queue), "mcpmeter was exiting")
            self._queue.clear()
        if verbose():
            warn(f"OTLP: {self.sent} spans sent, {self.dropped} dropped")

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        quiet_thread()
        encoder = Encoder(self._config.resource)
        poster = Poster(self._config.timeout, compress=self._config.gzip)
        next_metrics = time.monotonic() + self._config.metrics_interval
        try:
            while not self._stop.is_set():
                self._wake.wait(self._delay)
                self._wake.clear()
                self._send_spans(encoder, poster, final=False)
                if time.monotonic() >= next_metrics:
                    self._send_metrics(encoder, poster)
                    next_metrics = time.monotonic() + self._config.metrics_interval
            self._send_spans(encoder, poster, final=True)
            self._send_metrics(encoder, poster)
        except Exception as exc:  # never seen; the relay goes on without spans
            from mcpmeter.metering import calls

            warn(f"OTLP export stopped: {type(exc).__name__}: {exc}")
            self._traceparents = calls.traceparents = None  # the meters stop keeping them
        finally:
            poster.close()

    def _timeout(self) -> float | None:
        """While closing, no POST may outlive the close deadline."""
        if self._deadline is None:
            return None
        return max(0.05, min(self._config.timeout, self._deadline - time.monotonic()))

    def _expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _send_spans(self, encoder: Encoder, poster: Poster, *, final: bool) -> None:
        url = self._config.traces_url
        queue = self._queue
        if url is None:
            return
        while queue and not self._expired():
            if not final and time.monotonic() < self._retry_at:
                return  # backing off: the queue holds (up to its bound) meanwhile
            batch: list[SpanSource] = []
            popleft = queue.popleft
            try:
                while len(batch) < self._batch:
                    batch.append(popleft())
            except IndexError:
                pass
            try:
                body, count = encoder.spans(batch)
            except Exception as exc:  # a row the encoder cannot take: lose its batch, not the thread
                self._drop(len(batch), f"cannot encode spans: {exc}")
                continue
            if count == 0:
                continue
            try:
                poster.post(url, body, self._config.traces_headers, self._timeout())
            except ExportFailed as exc:
                self._failed(exc)
                self._drop(count, f"POST {url} failed: {exc}")
                if final:  # the collector is down: do not try each remaining batch
                    self._drop(len(queue), "the collector failed at exit")
                    queue.clear()
                continue
            self.sent += count
            self._backoff = BACKOFF_S
            if not final and len(queue) < self._batch:
                return

    def _send_metrics(self, encoder: Encoder, poster: Poster) -> None:
        url = self._config.metrics_url
        if url is None or self._histogram is None or self._expired():
            return
        snapshot = self._histogram.snapshot()
        if snapshot is None:
            return
        try:
            poster.post(url, encoder.histogram(snapshot), self._config.metrics_headers, self._timeout())
        except ExportFailed as exc:
            self._failed(exc)
            warn_once(
                "otlp-failed",
                f"cannot export to {url} ({exc}); the audit rows are kept",
            )

    def _failed(self, exc: ExportFailed) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _drop(self, count: int, why: str) -> None:
        if count <= 0:
            return
        with self._count_lock:
            self.dropped += count
        warn_once(
            "otlp-failed",
            f"OTLP export is dropping spans ({why}); the audit rows are kept. "
            "MCPMETER_LOG=info counts them at exit",
        )


# -- replaying stored rows -----------------------------------------------------------------


REPLAY_BATCH = 1000
REPLAY_ATTEMPTS = 4


def replay_source(row: Sequence[Any]) -> SpanSource:
    """The span of a stored row: ids derived from the row, so a second replay sends the same."""
    import hashlib

    record = record_of_row(row)
    seed = row[26] or f"{row[0]}|{row[1]}|{record.session_id}|{record.direction}|{record.jsonrpc_id}"
    digest = hashlib.blake2b(str(seed).encode(), digest_size=24).digest()
    trace_id = None if record.trace_id is not None else digest[8:24]
    return SpanSource(record, None, digest[:8], trace_id)


class ReplayResult:
    """What a replay sent: spans, and histogram series."""

    def __init__(self) -> None:
        self.spans = 0
        self.series = 0


def replay(rows: Iterable[Sequence[Any]], config: OtlpConfig) -> ReplayResult:
    """Send stored rows as spans (batches of 1,000) and their histogram (one cumulative point per series).

    A request that fails is retried (4 attempts, backing off from 0.5 s) unless the collector
    refused it for good (a 4xx); then the replay stops with a :class:`MeterError` saying how
    many spans were sent.
    """
    encoder = Encoder(config.resource)
    poster = Poster(config.timeout, compress=config.gzip)
    result = ReplayResult()
    histogram: DurationHistogram | None = None
    traces_url, metrics_url = config.traces_url, config.metrics_url
    try:
        batch: list[SpanSource] = []
        for row in rows:
            source = replay_source(row)
            if metrics_url is not None:
                if histogram is None:
                    histogram = DurationHistogram(start=source.record.ts)
                histogram.add((source.record,))
            if traces_url is not None:
                batch.append(source)
                if len(batch) >= REPLAY_BATCH:
                    result.spans += _replay_spans(poster, encoder, traces_url, config, batch, result.spans)
                    batch = []
        if batch and traces_url is not None:
            result.spans += _replay_spans(poster, encoder, traces_url, config, batch, result.spans)
        snapshot = histogram.snapshot(now_ns=histogram.last_ns) if histogram is not None else None
        if snapshot is not None and metrics_url is not None:
            body = encoder.histogram(snapshot)
            _retrying(
                lambda: poster.post(metrics_url, body, config.metrics_headers), metrics_url, result.spans
            )
            result.series = len(snapshot.series)
    finally:
        poster.close()
    return result


def _replay_spans(
    poster: Poster, encoder: Encoder, url: str, config: OtlpConfig, batch: list[SpanSource], sent: int
) -> int:
    body, count = encoder.spans(batch)
    _retrying(lambda: poster.post(url, body, config.traces_headers), url, sent)
    return count


def _retrying(send: Callable[[], None], url: str, sent: int) -> None:
    delay = BACKOFF_S
    for attempt in range(REPLAY_ATTEMPTS):
        try:
            send()
            return
        except ExportFailed as exc:
            if not exc.retryable or attempt == REPLAY_ATTEMPTS - 1:
                raise MeterError(f"cannot export to {url}: {exc} ({sent} spans sent before)") from None
        time.sleep(delay)
        delay *= 2
