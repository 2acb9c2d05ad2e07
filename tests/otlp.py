"""A test OTLP/HTTP receiver: a real HTTP server on 127.0.0.1 that decodes what it is sent.

It accepts ``POST /v1/traces`` and ``POST /v1/metrics`` (protobuf, gzip or not), decodes
them with opentelemetry-proto and keeps the spans and histogram points. Tests wait for
what they expect with :meth:`Receiver.wait_for`, a bounded wait on a condition.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    """A repeated KeyValue as a dict."""
    found: dict[str, Any] = {}
    item: KeyValue
    for item in pairs:
        found[item.key] = value_of(item.value)
    return found


@dataclass
class Received:
    spans: list[Any] = field(default_factory=list)  # opentelemetry.proto.trace.v1.Span
    span_resources: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)  # opentelemetry.proto.metrics.v1.Metric
    headers: list[dict[str, str]] = field(default_factory=list)
    posts: int = 0


class Receiver:
    """What a running receiver got; ``url`` is its base (``http://127.0.0.1:PORT``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.got = Received()
        self.status = 200
        self._cond = threading.Condition()

    def record(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        with self._cond:
            self.got.posts += 1
            self.got.headers.append(headers)
            if self.status != 200:
                return self.status, b""
            if path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    resource = attributes(resource_spans.resource.attributes)
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            self.got.spans.append(span)
                            self.got.span_resources.append(resource)
                reply = ExportTraceServiceResponse().SerializeToString()
            elif path == "/v1/metrics":
                metrics_request = ExportMetricsServiceRequest.FromString(body)
                for resource_metrics in metrics_request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        self.got.metrics.extend(scope_metrics.metrics)
                reply = ExportMetricsServiceResponse().SerializeToString()
            else:
                return 404, b""
            self._cond.notify_all()
            return 200, reply

    def wait_for(self, ready: Callable[[Received], bool], timeout: float = 20.0) -> Received:
        """Block until ``ready(got)`` holds (at most ``timeout`` seconds), then return what came."""
        with self._cond:
            if not self._cond.wait_for(lambda: ready(self.got), timeout):
                raise AssertionError(f"the receiver did not get what was expected in {timeout} s: {self.got}")
            return self.got

    def spans_named(self, name: str) -> list[Any]:
        with self._cond:
            return [span for span in self.got.spans if span.name == name]


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    """A receiver on a free port of 127.0.0.1, stopped on exit."""
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            status, reply = holder[0].record(self.path, body, {k.lower(): v for k, v in self.headers.items()})
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
