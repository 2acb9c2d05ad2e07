"""OpenTelemetry: `wrap --otlp-endpoint` and `export --format otlp`, checked by a real OTLP receiver.

The receiver (``tests/otlp.py``) is an HTTP server on 127.0.0.1 that decodes the protobuf
with opentelemetry-proto. `wrap` runs as users run it: a subprocess in front of
``examples/demo_server.py``, driven by the official MCP SDK client (which puts a
``traceparent`` in ``_meta``), or over raw pipes in front of ``tests/servers/raw_server.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import EXAMPLES, MCPMETER, PYTHON, SERVERS, read_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp import Client, StdioServerParameters, types
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp import Received, attributes, otlp_receiver

from mcpmeter.exporters.otel import (
    DURATION_BOUNDS,
    DurationHistogram,
    Encoder,
    SpanSource,
    config_from,
    error_type,
    span_name,
)
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.store import SQLiteStore

DEMO = (PYTHON, str(EXAMPLES / "demo_server.py"))
RAW = (PYTHON, str(SERVERS / "raw_server.py"))
AGENT = types.Implementation(name="otel-agent", version="1.2.3")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
UNSAMPLED = f"00-{TRACE_ID}-{'b7ad6b7169203331'}-00"
WAIT_S = 30


def otel_env(meter_env: dict[str, str], **extra: str) -> dict[str, str]:
    """The test's store and tags, and no OTEL_* from the environment the tests run in."""
    env = {k: v for k, v in meter_env.items() if not k.startswith("OTEL_")}
    env.update(MCPMETER_PROJECT_ID="acme", MCPMETER_AGENT_ID="planner", MCPMETER_TAGS="team=growth")
    env.update(extra)
    return env


def find_attribute(span: Any, key: str) -> Any:
    return attributes(span.attributes).get(key)


# -- wrap with the SDK client ----------------------------------------------------------------


async def sdk_session(env: dict[str, str], *options: str) -> None:
    """initialize, tools/list, then search (traced, sampled), fail (traced), summarize (unsampled)."""
    params = StdioServerParameters(command=MCPMETER, args=["wrap", *options, "--", *DEMO], env=env)
    with anyio.fail_after(WAIT_S):
        async with Client(params, mode="legacy", client_info=AGENT) as session:
            await session.list_tools()
            await session.call_tool("search", {"query": "in"}, meta={"traceparent": TRACEPARENT})
            await session.call_tool("fail", {"reason": "quota"}, meta={"traceparent": TRACEPARENT})
            await session.call_tool(
                "summarize", {"text": "a b c", "delay_ms": 1}, meta={"traceparent": UNSAMPLED}
            )


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Received, list[dict[str, Any]]]]:
    """One SDK session through `wrap --otlp-endpoint`: what the receiver got and the rows stored."""
    db = tmp_path_factory.mktemp("otel") / "audit.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCPMETER_", "OTEL_"))}
    env.update(MCPMETER_DB=str(db), MCPMETER_PROJECT_ID="acme", MCPMETER_AGENT_ID="planner")
    env["MCPMETER_TAGS"] = "team=growth"
    with otlp_receiver() as receiver:
        anyio.run(sdk_session, env, "--otlp-endpoint", receiver.url)
        got = receiver.wait_for(lambda got: len(got.spans) >= 4 and bool(got.metrics))
        yield got, read_rows(db)


def spans_by_name(got: Received) -> dict[str, Any]:
    return {span.name: span for span in got.spans}


def test_each_request_through_wrap_becomes_a_span_named_method_and_tool(
    traced: tuple[Received, list[dict[str, Any]]],
) -> None:
    got, rows = traced
    assert sorted(span.name for span in got.spans) == [
        "initialize",
        "tools/call fail",
        "tools/call search",
        "tools/list",
    ]
    # The unsampled call is a row but not a span; every other row has its span.
    assert len(rows) == 5


def test_a_tool_call_span_carries_the_mcp_semantic_convention_attributes_and_the_tenant(
    traced: tuple[Received, list[dict[str, Any]]],
) -> None:
    got, rows = traced
    span = spans_by_name(got)["tools/call search"]
    row = next(r for r in rows if r["tool"] == "search")
    found = attributes(span.attributes)
    assert span.kind == span.SPAN_KIND_CLIENT
    assert found["mcp.method.name"] == "tools/call"
    assert found["gen_ai.tool.name"] == "search"
    assert found["gen_ai.operation.name"] == "execute_tool"
    assert found["jsonrpc.request.id"] == row["jsonrpc_id"]
    assert found["mcp.session.id"] == row["session_id"]
    assert found["mcp.protocol.version"] == row["protocol_version"] == "2025-11-25"
    assert found["network.transport"] == "pipe"
    assert found["mcpmeter.project_id"] == "acme"
    assert found["mcpmeter.agent_id"] == "planner"
    assert found["mcpmeter.tag.team"] == "growth"
    assert found["mcpmeter.server"] == "demo-server"
    assert "error.type" not in found
    assert span.status.code == span.status.STATUS_CODE_UNSET
    assert got.span_resources[0]["service.name"] == "mcpmeter"


def test_a_span_starts_at_the_rows_time_and_lasts_its_latency(
    traced: tuple[Received, list[dict[str, Any]]],
) -> None:
    got, rows = traced
    span = spans_by_name(got)["tools/call search"]
    row = next(r for r in rows if r["tool"] == "search")
    start = ts_nanos(str(row["ts"]))
    assert span.start_time_unix_nano == start
    assert span.end_time_unix_nano - span.start_time_unix_nano == pytest.approx(
        float(row["latency_ms"]) * 1e6, abs=1000
    )


def ts_nanos(iso: str) -> int:
    """Nanoseconds of a stored ``ts`` (microsecond precision), computed without floats."""
    from datetime import UTC, datetime

    moment = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    whole = int(moment.replace(microsecond=0).timestamp())
    return (whole * 1_000_000 + moment.microsecond) * 1000


def test_a_span_is_parented_on_the_traceparent_the_client_put_in_meta(
    traced: tuple[Received, list[dict[str, Any]]],
) -> None:
    got, _ = traced
    by_name = spans_by_name(got)
    for name in ("tools/call search", "tools/call fail"):
        span = by_name[name]
        assert span.trace_id.hex() == TRACE_ID
        assert span.parent_span_id.hex() == PARENT_ID
        assert span.span_id.hex() not in (PARENT_ID, "0" * 16)
        assert span.flags & 0x300 == 0x300  # the parent is known to be remote
    # Requests without a traceparent are roots of traces of their own.
    assert by_name["tools/list"].parent_span_id == b""
    assert by_name["tools/list"].trace_id.hex() != TRACE_ID


def test_a_tool_error_has_error_type_tool_error_and_an_error_status(
    traced: tuple[Received, list[dict[str, Any]]],
) -> None:
    got, _ = traced
    span = spans_by_name(got)["tools/call fail"]
    assert find_attribute(span, "error.type") == "tool_error"
    assert span.status.code == span.status.STATUS_CODE_ERROR


def test_the_duration_histogram_counts_every_answered_request_in_seconds(
    traced: tuple[Received, list[dict[str, Any]]],
) -> None:
    got, rows = traced
    metric = got.metrics[-1]
    assert metric.name == "mcp.client.operation.duration"
    assert metric.unit == "s"
    assert metric.histogram.aggregation_temporality == 2  # cumulative
    points = list(metric.histogram.data_points)
    assert sum(point.count for point in points) == len(rows)
    assert sum(point.sum for point in points) == pytest.approx(
        sum(float(r["latency_ms"]) for r in rows) / 1000, rel=1e-6
    )
    assert all(tuple(point.explicit_bounds) == DURATION_BOUNDS for point in points)
    assert all(sum(point.bucket_counts) == point.count for point in points)
    fail = next(p for p in points if attributes(p.attributes).get("gen_ai.tool.name") == "fail")
    assert attributes(fail.attributes)["error.type"] == "tool_error"
    # The unsampled call is in the histogram all the same.
    assert any(attributes(p.attributes).get("gen_ai.tool.name") == "summarize" for p in points)


@asynccontextmanager
async def demo_over_http() -> AsyncIterator[str]:
    """The demo server over streamable HTTP (tests/servers/demo_http.py); yields its URL."""
    argv = [PYTHON, str(SERVERS / "demo_http.py"), "streamable-http"]
    async with await anyio.open_process(argv, stderr=None) as process:
        assert process.stdout is not None
        try:
            with anyio.fail_after(WAIT_S):
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1024)
            yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
        finally:
            process.terminate()
            with anyio.CancelScope(shield=True), anyio.fail_after(WAIT_S):
                await process.wait()


@pytest.mark.anyio
async def test_spans_of_wrap_url_say_the_transport_is_tcp_and_keep_their_parent(
    meter_env: dict[str, str],
) -> None:
    env = otel_env(meter_env)
    with otlp_receiver() as receiver:
        async with demo_over_http() as url:
            params = StdioServerParameters(
                command=MCPMETER, args=["wrap", "--otlp-endpoint", receiver.url, "--url", url], env=env
            )
            with anyio.fail_after(WAIT_S):
                async with Client(params, mode="legacy", client_info=AGENT) as session:
                    await session.call_tool("search", {"query": "in"}, meta={"traceparent": TRACEPARENT})
        got = await anyio.to_thread.run_sync(
            lambda: receiver.wait_for(lambda got: any(s.name == "tools/call search" for s in got.spans))
        )
    span = next(s for s in got.spans if s.name == "tools/call search")
    assert find_attribute(span, "network.transport") == "tcp"
    assert find_attribute(span, "network.protocol.name") == "http"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID


def test_each_span_is_parented_on_the_traceparent_its_own_record_carries(db_path: Path) -> None:
    """The traceparent travels on the record, meter to writer to exporter: nothing is kept aside."""
    from mcpmeter.exporters.otel import SpanExporter
    from mcpmeter.metering.audit import AuditWriter, Exporting
    from mcpmeter.metering.calls import CallMeter
    from mcpmeter.metering.tags import resolve_tenant
    from mcpmeter.store import open_store

    carried: list[str | None] = []
    with otlp_receiver() as receiver:
        config = config_from(receiver.url, {})
        assert config is not None
        exporter = SpanExporter(config).start()
        writer = AuditWriter(lambda: open_store(str(db_path)), listeners=(Exporting(exporter),)).start()

        def sink(record: CallRecord) -> None:
            carried.append(record.traceparent)
            writer.put(record)

        meter = CallMeter(
            resolve_tenant(session="s-1"), sink, transport="stdio", upstream="stdio", default_server="x"
        )
        for n in range(300):
            parent = f"{n + 1:016x}"
            meta = {"traceparent": f"00-{TRACE_ID}-{parent}-01"}
            meter.on_frame("c2s", tool_call(n, "search", meta=meta), time.perf_counter())
            meter.on_frame("s2c", dumps({"jsonrpc": "2.0", "id": n, "result": {}}), time.perf_counter())
        meter.close()
        writer.close()
        got = receiver.wait_for(lambda got: len(got.spans) == 300)
    assert carried == [f"00-{TRACE_ID}-{n + 1:016x}-01" for n in range(300)]
    parents = {find_attribute(span, "jsonrpc.request.id"): span.parent_span_id.hex() for span in got.spans}
    assert parents == {str(n): f"{n + 1:016x}" for n in range(300)}
    rows = read_rows(db_path)
    assert len(rows) == 300 and all(row["trace_id"] == TRACE_ID for row in rows)
    assert "traceparent" not in rows[0]


def test_a_records_traceparent_is_never_stored_spilled_or_hashed(tmp_path: Path) -> None:
    from mcpmeter.store.spill import encode_lines

    plain = record(1.7e9, "1", trace_id=TRACE_ID)
    traced = plain._replace(traceparent=TRACEPARENT)
    assert encode_lines("w-1", 7, [traced]) == encode_lines("w-1", 7, [plain])
    stored = []
    for name, written in (("plain", plain), ("traced", traced)):
        store = SQLiteStore(str(tmp_path / f"{name}.db"))
        try:
            store.write_calls([written])
        finally:
            store.close()
        stored.append(read_rows(tmp_path / f"{name}.db"))
    assert stored[0] == stored[1]  # the same columns, values and hash


# -- wrap over raw pipes -------------------------------------------------------------------


def dumps(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def tool_call(rpc_id: int, name: str, meta: dict[str, str] | None = None, **arguments: Any) -> bytes:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if meta is not None:
        params["_meta"] = meta
    return dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": params})


class Wrapped:
    def __init__(self, process: Process) -> None:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self.process = process
        self.stdout = BufferedByteReceiveStream(process.stdout)

    async def ask(self, frame: bytes) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send(frame + b"\n")
        answer: dict[str, Any] = json.loads(await self.stdout.receive_until(b"\n", 1 << 20))
        return answer

    async def finish(self) -> tuple[int, str]:
        """Close stdin; the exit code and everything mcpmeter wrote on stderr."""
        assert self.process.stdin is not None and self.process.stderr is not None
        await self.process.stdin.aclose()
        chunks = []
        async for chunk in self.process.stderr:
            chunks.append(chunk)
        return await self.process.wait(), b"".join(chunks).decode()


@asynccontextmanager
async def raw_wrap(env: dict[str, str], *options: str) -> AsyncIterator[Wrapped]:
    async with await anyio.open_process([MCPMETER, "wrap", *options, "--", *RAW], env=env) as process:
        try:
            yield Wrapped(process)
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


class BlackHole:
    """A collector that accepts connections and reads requests but never answers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.got_request = threading.Event()
        self.held: list[socket.socket] = []

    def still_waiting(self) -> bool:
        """Whether the exporter is still in its first POST: one connection, still open."""
        if len(self.held) != 1:
            return False
        conn = self.held[0]
        conn.setblocking(False)
        try:
            while conn.recv(65536):  # whatever of the request is still unread
                pass
        except BlockingIOError:
            return True  # open, and nothing more has come
        except OSError:
            return False
        return False  # the exporter closed it: it gave up


@contextmanager
def black_hole() -> Iterator[BlackHole]:
    server = socket.create_server(("127.0.0.1", 0))
    hole = BlackHole(f"http://127.0.0.1:{server.getsockname()[1]}")
    done = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            hole.held.append(conn)
            conn.settimeout(10)
            try:
                if conn.recv(65536):
                    hole.got_request.set()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield hole
    finally:
        done.set()
        thread.join(5)
        for conn in hole.held:
            conn.close()
        server.close()


def closed_port() -> str:
    """A URL nobody listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.anyio
async def test_a_collector_that_never_answers_does_not_slow_the_relay_and_every_row_is_stored(
    meter_env: dict[str, str], db_path: Path
) -> None:
    env = otel_env(meter_env, OTEL_EXPORTER_OTLP_TIMEOUT="30000")
    with black_hole() as collector:
        async with raw_wrap(env, "--otlp-endpoint", collector.url) as wrapped:
            with anyio.fail_after(WAIT_S):
                await wrapped.ask(tool_call(0, "whoami", meta={"traceparent": TRACEPARENT}))
                # The exporter's thread is now stuck in a POST that will wait 30 s ...
                await anyio.to_thread.run_sync(collector.got_request.wait, 20)
                assert collector.got_request.is_set()
                # ... while the relay answers every call: all of them before that POST ends.
                for rpc_id in range(1, 201):
                    answer = await wrapped.ask(tool_call(rpc_id, "echo", text="x"))
                    assert answer["id"] == rpc_id
                assert collector.still_waiting(), "the relay waited for the exporter to give up"
                code, stderr = await wrapped.finish()
    assert code == 0
    assert len(read_rows(db_path)) == 201
    assert [line for line in stderr.splitlines() if "OTLP" in line] == [
        line for line in stderr.splitlines() if line.startswith("mcpmeter:")
    ]


@pytest.mark.anyio
async def test_a_collector_that_is_down_costs_spans_with_one_warning_line_and_no_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    env = otel_env(meter_env)
    async with raw_wrap(env, "--otlp-endpoint", closed_port()) as wrapped:
        with anyio.fail_after(WAIT_S):
            for rpc_id in range(50):
                answer = await wrapped.ask(tool_call(rpc_id, "echo", text="x"))
                assert answer["id"] == rpc_id
            code, stderr = await wrapped.finish()
    assert code == 0
    assert len(read_rows(db_path)) == 50
    warnings = [line for line in stderr.splitlines() if line.startswith("mcpmeter:")]
    assert len(warnings) == 1, stderr
    assert "OTLP export is dropping spans" in warnings[0]
    assert "audit rows are kept" in warnings[0]


@pytest.mark.anyio
async def test_the_standard_otel_env_vars_set_the_endpoints_headers_compression_and_service_name(
    meter_env: dict[str, str],
) -> None:
    with otlp_receiver() as receiver:
        env = otel_env(
            meter_env,
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{receiver.url}/v1/traces",
            OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"{receiver.url}/v1/metrics",
            OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20t0k,x-tenant=acme",
            OTEL_EXPORTER_OTLP_COMPRESSION="gzip",
            OTEL_SERVICE_NAME="agent-fleet",
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        )
        async with raw_wrap(env) as wrapped:
            with anyio.fail_after(WAIT_S):
                await wrapped.ask(tool_call(1, "error", code=-32602, message="bad args"))
                code, _ = await wrapped.finish()
        assert code == 0
        got = receiver.wait_for(lambda got: len(got.spans) == 1 and bool(got.metrics))
    span = got.spans[0]
    assert span.name == "tools/call error"
    assert find_attribute(span, "error.type") == "-32602"
    assert find_attribute(span, "rpc.response.status_code") == "-32602"
    assert span.status.message == "bad args"
    assert got.span_resources[0]["service.name"] == "agent-fleet"
    assert got.span_resources[0]["deployment.environment"] == "test"
    assert all(h["authorization"] == "Bearer t0k" and h["x-tenant"] == "acme" for h in got.headers)
    assert all(h["content-encoding"] == "gzip" for h in got.headers)


def test_wrap_without_otlp_imports_nothing_of_opentelemetry(meter_env: dict[str, str]) -> None:
    env = otel_env(meter_env)
    result = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "mcpmeter", "wrap", "true"],
        env=env,
        capture_output=True,
        timeout=WAIT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    imported = result.stderr.decode()
    for module in ("opentelemetry", "google.protobuf", "mcpmeter.exporters.otel", "httpx"):
        assert f" {module}" not in imported, f"wrap imported {module} without OTLP configured"


def test_wrap_otlp_endpoint_must_be_an_http_url() -> None:
    result = subprocess.run(
        [MCPMETER, "wrap", "--otlp-endpoint", "localhost:4318", "--", "true"],
        capture_output=True,
        timeout=WAIT_S,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "mcpmeter: wrap: --otlp-endpoint must be an http:// or https:// URL, got 'localhost:4318'"
    ]


def test_the_flag_wins_over_the_env_and_signal_endpoints_are_taken_as_they_are() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example/custom",
    }
    from_env = config_from(None, env)
    assert from_env is not None
    assert from_env.traces_url == "https://traces.example/custom"
    assert from_env.metrics_url == "http://collector:4318/v1/metrics"
    from_flag = config_from("http://127.0.0.1:4318", env)
    assert from_flag is not None
    assert from_flag.traces_url == "http://127.0.0.1:4318/v1/traces"
    assert config_from(None, {}) is None
    assert config_from(None, {**env, "OTEL_SDK_DISABLED": "true"}) is None
    metrics_only = config_from(None, {**env, "OTEL_TRACES_EXPORTER": "none"})
    assert metrics_only is not None and metrics_only.traces_url is None


# -- the protobuf mcpmeter writes, read by opentelemetry-proto -------------------------------

TEXT = st.text(max_size=40)
OPTIONAL_TEXT = st.none() | TEXT
RECORDS = st.builds(
    CallRecord,
    ts=st.floats(min_value=1e9, max_value=4e9),
    latency_ms=st.none() | st.floats(min_value=0, max_value=1e7),
    project_id=OPTIONAL_TEXT,
    agent_id=OPTIONAL_TEXT,
    session_id=TEXT,
    tags=st.dictionaries(TEXT, TEXT, max_size=3).map(lambda tags: json.dumps(tags)),
    server=OPTIONAL_TEXT,
    transport=st.sampled_from(["stdio", "http", "sse"]),
    upstream=st.sampled_from(["stdio", "http", "sse"]),
    direction=st.sampled_from(["c2s", "s2c"]),
    method=st.sampled_from(["tools/call", "prompts/get", "resources/read", "ping", "sampling/createMessage"]),
    tool=OPTIONAL_TEXT,
    jsonrpc_id=TEXT,
    request_id=OPTIONAL_TEXT,
    trace_id=st.none() | st.binary(min_size=16, max_size=16).map(bytes.hex),
    request_bytes=st.integers(min_value=0, max_value=2**62),
    response_bytes=st.none() | st.integers(min_value=0, max_value=2**62),
    status=st.sampled_from(["ok", "error", "tool_error", "rejected", "cancelled", "no_response"]),
    error_code=st.none() | st.integers(min_value=-(2**31), max_value=2**31),
    error_message=OPTIONAL_TEXT,
    cost_usd=st.none() | st.floats(min_value=0, max_value=1e6),
    client_name=OPTIONAL_TEXT,
    client_version=OPTIONAL_TEXT,
    server_version=OPTIONAL_TEXT,
    protocol_version=OPTIONAL_TEXT,
)


@settings(max_examples=200, deadline=None)
@given(records=st.lists(RECORDS, min_size=1, max_size=5))
def test_the_spans_mcpmeter_encodes_decode_with_opentelemetry_proto_to_the_rows_values(
    records: list[CallRecord],
) -> None:
    body, count = Encoder((("service.name", "mcpmeter"),)).spans(SpanSource(r) for r in records)
    request = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    assert attributes(resource_spans.resource.attributes) == {"service.name": "mcpmeter"}
    spans = list(resource_spans.scope_spans[0].spans)
    assert count == len(spans) == len(records)
    for span, record in zip(spans, records, strict=True):
        found = attributes(span.attributes)
        assert span.name == span_name(record.method, record.tool)
        assert found["mcp.method.name"] == record.method
        assert found["jsonrpc.request.id"] == record.jsonrpc_id
        assert found["mcp.session.id"] == record.session_id
        assert found["mcpmeter.request_bytes"] == record.request_bytes
        assert found.get("mcpmeter.response_bytes") == record.response_bytes
        assert found.get("mcpmeter.cost_usd") == record.cost_usd
        assert found.get("error.type") == error_type(record.status, record.error_code)
        assert found.get("mcpmeter.agent_id") == record.agent_id
        for key, value in json.loads(record.tags).items():
            assert found[f"mcpmeter.tag.{key}"] == value
        if record.trace_id is not None:
            assert span.trace_id.hex() == record.trace_id
        assert len(span.trace_id) == 16 and len(span.span_id) == 8
        assert span.start_time_unix_nano == ts_nanos(iso_utc(record.ts))  # the instant the row says
        assert span.end_time_unix_nano >= span.start_time_unix_nano
        if found.get("error.type") is not None:
            assert span.status.code == span.status.STATUS_CODE_ERROR
            assert span.status.message == (record.error_message or "")


def test_a_lone_surrogate_in_a_row_is_replaced_in_its_span_not_a_lost_batch() -> None:
    broken = record(1.7e9, "1", tool="bad\ud800tool", status="error", error_message="x\udfff", error_code=-1)
    body, count = Encoder(()).spans([SpanSource(broken)])
    [span] = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert count == 1
    assert span.name == "tools/call bad?tool"
    assert find_attribute(span, "gen_ai.tool.name") == "bad?tool"
    assert span.status.message == "x?"


@settings(max_examples=100, deadline=None)
@given(records=st.lists(RECORDS, min_size=1, max_size=20))
def test_the_histogram_mcpmeter_encodes_decodes_with_opentelemetry_proto_to_the_same_counts(
    records: list[CallRecord],
) -> None:
    histogram = DurationHistogram(start=1e9)
    histogram.add(records)
    answered = [r for r in records if r.latency_ms is not None]
    snapshot = histogram.snapshot(now_ns=5 * 10**18)
    if not answered:
        assert snapshot is None
        return
    assert snapshot is not None
    request = ExportMetricsServiceRequest.FromString(Encoder(()).histogram(snapshot))
    [metric] = request.resource_metrics[0].scope_metrics[0].metrics
    points = list(metric.histogram.data_points)
    assert sum(p.count for p in points) == len(answered)
    assert sum(p.sum for p in points) == pytest.approx(sum(r.latency_ms or 0 for r in answered) / 1000)
    for point in points:
        assert sum(point.bucket_counts) == point.count
        assert point.min <= point.max
        assert point.start_time_unix_nano == 10**18 and point.time_unix_nano == 5 * 10**18


# -- export --format otlp ------------------------------------------------------------------


def record(ts: float, jsonrpc_id: str, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "ts": ts,
        "latency_ms": 40.0,
        "project_id": "acme",
        "agent_id": "planner",
        "session_id": "s-1",
        "tags": "{}",
        "server": "demo-server",
        "transport": "http",
        "upstream": "http",
        "direction": "c2s",
        "method": "tools/call",
        "tool": "search",
        "jsonrpc_id": jsonrpc_id,
        "request_id": None,
        "trace_id": None,
        "request_bytes": 100,
        "response_bytes": 200,
        "status": "ok",
        "error_code": None,
        "error_message": None,
        "cost_usd": 0.002,
        "client_name": "claude-code",
        "client_version": "2.1.0",
        "server_version": "1.0",
        "protocol_version": "2025-11-25",
    }
    values.update(fields)
    return CallRecord(**values)


@pytest.fixture
def stored(db_path: Path) -> Path:
    now = time.time()
    store = SQLiteStore(str(db_path))
    try:
        store.write_calls(
            [
                record(now - 30, "1", trace_id=TRACE_ID),
                record(
                    now - 20, "2", status="error", error_code=-32000, error_message="down", latency_ms=5.0
                ),
                record(now - 10, "3", agent_id="critic", method="prompts/get", tool="review"),
                record(now - 5, "4", method="resources/read", tool="file:///a.txt", latency_ms=None),
            ]
        )
    finally:
        store.close()
    return db_path


def export_otlp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MCPMETER, "export", "--format", "otlp", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


def test_export_format_otlp_replays_stored_rows_as_spans_and_the_histogram(
    stored: Path, meter_env: dict[str, str]
) -> None:
    env = otel_env(meter_env)
    with otlp_receiver() as receiver:
        result = export_otlp(env, "--endpoint", receiver.url)
        assert result.returncode == 0, result.stderr
        got = receiver.wait_for(lambda got: len(got.spans) == 4 and bool(got.metrics))
    assert result.stdout == ""
    assert "4 spans" in result.stderr
    names = sorted(span.name for span in got.spans)
    assert names == ["prompts/get review", "resources/read", "tools/call search", "tools/call search"]
    traced = next(s for s in got.spans if find_attribute(s, "jsonrpc.request.id") == "1")
    assert traced.trace_id.hex() == TRACE_ID and traced.parent_span_id == b""
    failed = next(s for s in got.spans if find_attribute(s, "jsonrpc.request.id") == "2")
    assert find_attribute(failed, "error.type") == "-32000"
    assert find_attribute(failed, "network.transport") == "tcp"
    resource = next(s for s in got.spans if s.name == "resources/read")
    assert find_attribute(resource, "mcp.resource.uri") == "file:///a.txt"
    assert find_attribute(traced, "mcpmeter.cost_usd") == pytest.approx(0.002)
    points = list(got.metrics[0].histogram.data_points)
    assert sum(p.count for p in points) == 3  # the row without a latency is not a duration


def test_replaying_twice_sends_the_same_span_ids_and_filters_apply(
    stored: Path, meter_env: dict[str, str]
) -> None:
    env = otel_env(meter_env)
    with otlp_receiver() as receiver:
        assert export_otlp(env, "--endpoint", receiver.url, "--agent", "planner").returncode == 0
        first = receiver.wait_for(lambda got: len(got.spans) == 3)
        ids = [span.span_id for span in first.spans]
        assert export_otlp(env, "--endpoint", receiver.url, "--agent", "planner").returncode == 0
        both = receiver.wait_for(lambda got: len(got.spans) == 6)
    assert [span.span_id for span in both.spans[3:]] == ids
    assert all(find_attribute(span, "mcpmeter.agent_id") == "planner" for span in both.spans)


def test_export_format_otlp_reads_the_endpoint_from_the_env(stored: Path, meter_env: dict[str, str]) -> None:
    with otlp_receiver() as receiver:
        env = otel_env(meter_env, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
        result = export_otlp(env, "--status", "error")
        assert result.returncode == 0, result.stderr
        got = receiver.wait_for(lambda got: len(got.spans) == 1)
    assert got.spans[0].name == "tools/call search"


def test_export_format_otlp_without_an_endpoint_is_a_one_line_usage_error(
    stored: Path, meter_env: dict[str, str]
) -> None:
    result = export_otlp(otel_env(meter_env))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "--endpoint" in result.stderr


def test_export_format_otlp_to_a_collector_that_refuses_fails_in_one_line(
    stored: Path, meter_env: dict[str, str]
) -> None:
    with otlp_receiver() as receiver:
        receiver.status = 400
        result = export_otlp(otel_env(meter_env), "--endpoint", receiver.url)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "HTTP 400" in lines[0] and "0 spans sent" in lines[0]


def test_protobuf_stays_out_of_the_wrap_fast_path_module_list() -> None:
    # mcpmeter.exporters.otel itself imports neither protobuf nor httpx at module level.
    code = (
        "import sys, mcpmeter.exporters.otel; "
        "print(any(m.startswith(('google.protobuf', 'httpx')) for m in sys.modules))"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=WAIT_S, check=True)
    assert result.stdout.strip() == "False"
