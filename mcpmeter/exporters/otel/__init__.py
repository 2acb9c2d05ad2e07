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

The modules, in the order a row travels:

* :mod:`.config`: :class:`OtlpConfig` from ``--otlp-endpoint`` and the ``OTEL_*`` env vars.
* :mod:`.conventions`: span names and attributes from a :class:`~mcpmeter.record.CallRecord`,
  and the trace context (the record's ``trace_id`` and ``traceparent``).
* :mod:`.histogram`: :class:`DurationHistogram`, the rows' latencies.
* :mod:`.protobuf`: :class:`Encoder`, the OTLP request bytes.
* :mod:`.poster`: :class:`Poster`, the POST over kept-alive :mod:`http.client` connections.
* :mod:`.exporter`: :class:`SpanExporter`, ``wrap``'s queue and thread.
* :mod:`.replay`: :func:`replay`, ``export --format otlp``.

``wrap`` imports this package only when OTLP is configured. Requests go out with
:mod:`http.client` (keep-alive; a tenth of httpx's import time, paid on the relay's GIL).
"""

from mcpmeter.exporters.otel.config import OtlpConfig, config_from
from mcpmeter.exporters.otel.conventions import DURATION_BOUNDS, SpanSource, error_type, span_name
from mcpmeter.exporters.otel.exporter import SpanExporter
from mcpmeter.exporters.otel.histogram import DurationHistogram, HistogramSnapshot
from mcpmeter.exporters.otel.poster import ExportFailed, Poster
from mcpmeter.exporters.otel.protobuf import Encoder
from mcpmeter.exporters.otel.replay import ReplayResult, replay

__all__ = [
    "DURATION_BOUNDS",
    "DurationHistogram",
    "Encoder",
    "ExportFailed",
    "HistogramSnapshot",
    "OtlpConfig",
    "Poster",
    "ReplayResult",
    "SpanExporter",
    "SpanSource",
    "config_from",
    "error_type",
    "replay",
    "span_name",
]
