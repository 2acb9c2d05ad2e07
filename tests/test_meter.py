"""The call meter, by example: what each kind of frame turns into. Also tenant tags and times.

A :class:`CallMeter` is fed frames (bytes, without their ``\\n``) as the relay would feed
them, and its rows are collected with ``list.append``. The clocks are fixed so a frame seen
at monotonic time ``t`` has wall time ``1_000 + t``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcpmeter.errors import UsageError
from mcpmeter.metering.calls import CallMeter
from mcpmeter.metering.tags import Tenant, resolve_tenant
from mcpmeter.protocol.envelope import decode_message, read_envelope
from mcpmeter.record import CallRecord
from mcpmeter.timeparse import parse_when

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


class Wire:
    """One connection's frames into a meter; the rows it settles."""

    def __init__(self, tenant: Tenant | None = None) -> None:
        self.rows: list[CallRecord] = []
        self.meter = CallMeter(
            tenant
            or Tenant(project_id="acme", agent_id="planner", session_id="s-1", tags={"team": "growth"}),
            self.rows.append,
            transport="stdio",
            upstream="stdio",
            default_server="server.py",
            wall_clock=lambda: 1_000.0,
            mono_clock=lambda: 0.0,
        )

    def send(self, direction: str, message: Any, at: float = 0.0, *, crlf: bool = False) -> bytes:
        frame = orjson.dumps(message) + (b"\r" if crlf else b"")
        self.meter.on_frame(direction, frame, at)
        return frame

    def request(
        self, rpc_id: Any, method: str, params: Any = None, *, at: float = 0.0, d: str = "c2s"
    ) -> bytes:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
        if params is not None:
            message["params"] = params
        return self.send(d, message, at)

    def result(self, rpc_id: Any, result: Any = None, *, at: float = 0.0, d: str = "s2c") -> bytes:
        return self.send(d, {"jsonrpc": "2.0", "id": rpc_id, "result": {} if result is None else result}, at)

    def error(self, rpc_id: Any, code: Any, message: Any, *, at: float = 0.0) -> bytes:
        return self.send(
            "s2c", {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": code, "message": message}}, at
        )

    def only_row(self) -> CallRecord:
        assert len(self.rows) == 1, self.rows
        return self.rows[0]


def meta_call(meta: dict[str, Any]) -> CallRecord:
    """The row of one tools/call carrying ``meta`` as ``params._meta``."""
    wire = Wire()
    wire.request(1, "tools/call", {"name": "search", "arguments": {}, "_meta": meta})
    wire.result(1)
    return wire.only_row()


# -- what a request is called -----------------------------------------------------------------


def test_a_tools_call_row_names_the_tool_and_carries_the_tenant_and_timing() -> None:
    wire = Wire()
    request = wire.request(5, "tools/call", {"name": "search", "arguments": {"q": "invoices"}}, at=2.0)
    response = wire.result(5, {"content": [{"type": "text", "text": "hits"}]}, at=2.25)
    row = wire.only_row()
    assert (row.method, row.tool, row.jsonrpc_id, row.status) == ("tools/call", "search", "5", "ok")
    assert (row.project_id, row.agent_id, row.session_id, row.tags) == (
        "acme",
        "planner",
        "s-1",
        '{"team":"growth"}',
    )
    assert (row.transport, row.upstream, row.direction, row.server) == ("stdio", "stdio", "c2s", "server.py")
    assert (row.request_bytes, row.response_bytes) == (len(request), len(response))
    assert row.ts == 1_002.0
    assert row.latency_ms == pytest.approx(250.0)
    assert (row.error_code, row.error_message, row.request_id, row.trace_id) == (None, None, None, None)


def test_a_prompts_get_row_names_the_prompt() -> None:
    wire = Wire()
    wire.request(1, "prompts/get", {"name": "summarise-ticket", "arguments": {}})
    wire.result(1, {"messages": []})
    assert wire.only_row().tool == "summarise-ticket"


def test_a_resources_read_row_names_the_resource_uri() -> None:
    wire = Wire()
    wire.request(1, "resources/read", {"uri": "file:///var/log/app.log"})
    wire.result(1, {"contents": []})
    assert wire.only_row().tool == "file:///var/log/app.log"


def test_other_methods_have_no_tool() -> None:
    wire = Wire()
    wire.request(1, "tools/list", {"name": "not-a-tool"})
    wire.result(1, {"tools": []})
    row = wire.only_row()
    assert (row.method, row.tool) == ("tools/list", None)


# -- who is talking -------------------------------------------------------------------------


def test_the_initialize_handshake_names_client_server_and_protocol_on_later_rows() -> None:
    wire = Wire()
    wire.request(
        0,
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "claude-code", "version": "2.1.0"},
        },
    )
    wire.result(
        0,
        {
            "protocolVersion": "2025-03-26",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "demo-server", "version": "1.4.2"},
        },
    )
    wire.send("c2s", {"jsonrpc": "2.0", "method": "notifications/initialized"})
    wire.request(1, "tools/call", {"name": "search", "arguments": {}})
    wire.result(1)
    init, call = wire.rows
    assert (init.method, init.status, init.server) == ("initialize", "ok", "demo-server")
    assert (init.client_name, init.client_version, init.server_version) == ("claude-code", "2.1.0", "1.4.2")
    assert (call.server, call.client_name, call.client_version) == ("demo-server", "claude-code", "2.1.0")
    assert (call.server_version, call.protocol_version) == ("1.4.2", "2025-03-26")


def test_a_2026_request_names_its_client_and_protocol_in_meta_and_its_result_names_the_server() -> None:
    wire = Wire()
    wire.request(
        1,
        "tools/call",
        {
            "name": "search",
            "arguments": {},
            "_meta": {
                "io.modelcontextprotocol/clientInfo": {"name": "agent-sdk", "version": "0.9"},
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            },
        },
    )
    wire.result(
        1,
        {
            "content": [],
            "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "weather", "version": "3.0.1"}},
        },
    )
    row = wire.only_row()
    assert (row.client_name, row.client_version, row.protocol_version) == ("agent-sdk", "0.9", "2026-07-28")
    assert (row.server, row.server_version) == ("weather", "3.0.1")


def test_the_server_is_the_command_name_until_the_server_names_itself() -> None:
    wire = Wire()
    wire.request(1, "ping")
    wire.result(1)
    assert wire.only_row().server == "server.py"


# -- how a request ends -----------------------------------------------------------------------


def test_a_result_with_is_error_true_is_a_tool_error() -> None:
    wire = Wire()
    wire.request(1, "tools/call", {"name": "fail"})
    wire.result(1, {"content": [{"type": "text", "text": "quota exceeded"}], "isError": True})
    row = wire.only_row()
    assert (row.status, row.error_code, row.error_message) == ("tool_error", None, None)


def test_a_jsonrpc_error_is_an_error_with_its_code_and_message() -> None:
    wire = Wire()
    wire.request(1, "tools/call", {"name": "nope"})
    response = wire.error(1, -32602, "Unknown tool: nope", at=0.5)
    row = wire.only_row()
    assert (row.status, row.error_code, row.error_message) == ("error", -32602, "Unknown tool: nope")
    assert row.response_bytes == len(response)
    assert row.latency_ms == pytest.approx(500.0)


def test_an_error_message_is_cut_at_512_characters() -> None:
    wire = Wire()
    wire.request(1, "tools/call", {"name": "x"})
    wire.error(1, -32000, "é" * 511 + "xyz" + "w" * 2000)
    assert wire.only_row().error_message == "é" * 511 + "x"


def test_an_error_message_is_scrubbed_before_it_is_cut() -> None:
    # Cut first, the DSN would end before its "@" and no longer look like one.
    wire = Wire()
    wire.request(1, "tools/call", {"name": "x"})
    wire.error(1, -32000, "e" * 470 + " postgresql://admin:hunter2secret@db.internal/app failed")
    message = wire.only_row().error_message
    assert message is not None and len(message) <= 512
    assert "hunter" not in message and message.startswith("e" * 470 + " postgresql://admin:")


def test_a_cancelled_request_is_recorded_cancelled_and_its_late_response_is_ignored() -> None:
    wire = Wire()
    wire.request(7, "tools/call", {"name": "slow"})
    wire.send("c2s", {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}})
    row = wire.only_row()
    assert (row.status, row.tool, row.latency_ms, row.response_bytes) == ("cancelled", "slow", None, None)
    wire.result(7)
    wire.meter.close()
    assert len(wire.rows) == 1


def test_closing_the_stream_records_every_pending_request_as_no_response() -> None:
    wire = Wire()
    wire.request(1, "tools/call", {"name": "a"})
    wire.request(2, "tools/call", {"name": "b"})
    wire.request(3, "tools/call", {"name": "c"})
    wire.result(2)
    assert wire.meter.pending_count == 2
    wire.meter.close()
    assert [(r.tool, r.status, r.latency_ms, r.response_bytes) for r in wire.rows] == [
        ("b", "ok", 0.0, len(orjson.dumps({"jsonrpc": "2.0", "id": 2, "result": {}}))),
        ("a", "no_response", None, None),
        ("c", "no_response", None, None),
    ]
    assert wire.meter.pending_count == 0


def test_an_id_reused_before_its_response_waits_its_turn_and_responses_settle_in_order() -> None:
    wire = Wire()
    wire.request(1, "tools/call", {"name": "first"}, at=0.0)
    wire.request(1, "tools/call", {"name": "second"}, at=1.0)
    wire.result(1, at=1.5)
    assert [(r.tool, r.status) for r in wire.rows] == [("first", "ok")]
    assert wire.rows[0].latency_ms == pytest.approx(1500.0)
    wire.error(1, -32000, "boom", at=2.0)
    assert [(r.tool, r.status) for r in wire.rows] == [("first", "ok"), ("second", "error")]
    assert wire.rows[1].latency_ms == pytest.approx(1000.0)
    assert wire.meter.stats.duplicate_ids == 1
    assert wire.meter.pending_count == 0


def test_a_cancellation_of_an_id_in_flight_twice_cancels_the_oldest_and_a_refusal_the_newest() -> None:
    wire = Wire()
    for name in ("a", "b", "c"):
        wire.request(4, "tools/call", {"name": name})
    wire.meter.on_refused("c2s", 4, 10, 0.0)  # the proxy answered the one it was just asked about
    wire.send("c2s", {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 4}})
    wire.result(4)
    assert [(r.tool, r.status) for r in wire.rows] == [("c", "rejected"), ("a", "cancelled"), ("b", "ok")]


def test_closing_the_stream_records_every_request_of_a_shared_id_as_no_response_in_order() -> None:
    wire = Wire()
    wire.request(2, "tools/call", {"name": "a"}, at=0.0)
    wire.request(3, "tools/call", {"name": "b"}, at=1.0)
    wire.request(2, "tools/call", {"name": "c"}, at=2.0)
    wire.request(2, "tools/call", {"name": "d"}, at=3.0)
    wire.result(2, at=4.0)
    assert wire.meter.pending_count == 3
    wire.meter.close()
    assert [(r.tool, r.status) for r in wire.rows] == [
        ("a", "ok"),
        ("b", "no_response"),
        ("c", "no_response"),
        ("d", "no_response"),
    ]


def test_responses_metered_before_their_requests_pair_in_order_when_an_id_is_shared() -> None:
    # The server->client thread may meter a response before the client->server thread has
    # metered its request; responses seen before a request cannot answer it.
    wire = Wire()
    wire.result(5, {"isError": True}, at=0.5)  # stale: older than any request below
    wire.result(5, {}, at=2.0)
    wire.result(5, {"isError": True}, at=3.0)
    wire.request(5, "tools/call", {"name": "a"}, at=1.0)
    wire.request(5, "tools/call", {"name": "b"}, at=1.5)
    assert [(r.tool, r.status, r.latency_ms) for r in wire.rows] == [
        ("a", "ok", pytest.approx(1000.0)),
        ("b", "tool_error", pytest.approx(1500.0)),
    ]
    assert wire.meter.stats.unmatched_responses == 1


def test_an_id_reused_after_its_response_is_a_new_call() -> None:
    wire = Wire()
    for name in ("first", "second"):
        wire.request(1, "tools/call", {"name": name})
        wire.result(1)
    assert [(r.tool, r.status) for r in wire.rows] == [("first", "ok"), ("second", "ok")]


def test_a_response_nobody_asked_for_writes_no_row() -> None:
    wire = Wire()
    wire.result(99)
    wire.meter.close()
    assert wire.rows == []
    assert wire.meter.stats.unmatched_responses == 1


def test_a_response_whose_id_is_true_does_not_settle_request_1() -> None:
    # true is not a JSON-RPC id, and it is not 1 (Python's True == 1 must not leak into pairing).
    wire = Wire()
    wire.request(1, "tools/call", {"name": "search"})
    wire.send("s2c", {"jsonrpc": "2.0", "id": True, "result": {}})
    wire.meter.close()
    assert [(r.tool, r.status) for r in wire.rows] == [("search", "no_response")]


# -- batches and server requests --------------------------------------------------------------


def test_each_member_of_a_batch_is_metered_on_its_own() -> None:
    wire = Wire()
    wire.send(
        "c2s",
        [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a"}},
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "b"}},
            {"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": "mem://c"}},
        ],
    )
    wire.send(
        "s2c",
        [
            {"jsonrpc": "2.0", "id": 2, "result": {"isError": True}},
            {"jsonrpc": "2.0", "id": 1, "result": {}},
            {"jsonrpc": "2.0", "id": 3, "error": {"code": -32002, "message": "not found"}},
        ],
    )
    assert [(r.tool, r.jsonrpc_id, r.status, r.error_code) for r in wire.rows] == [
        ("b", "2", "tool_error", None),
        ("a", "1", "ok", None),
        ("mem://c", "3", "error", -32002),
    ]
    assert all(r.request_bytes > 0 and r.response_bytes for r in wire.rows)


def test_a_server_request_is_an_s2c_row_answered_by_the_client() -> None:
    wire = Wire()
    wire.request(1, "tools/call", {"name": "ask"}, at=0.0)
    wire.request(1, "sampling/createMessage", {"messages": [], "maxTokens": 10}, at=1.0, d="s2c")
    wire.result(1, {"role": "assistant", "content": {"type": "text", "text": "hi"}}, at=3.0, d="c2s")
    wire.result(1, {"content": []}, at=4.0, d="s2c")
    sampling, call = wire.rows
    assert (sampling.direction, sampling.method, sampling.jsonrpc_id) == (
        "s2c",
        "sampling/createMessage",
        "1",
    )
    assert sampling.latency_ms == pytest.approx(2000.0)
    assert (call.direction, call.tool, call.latency_ms) == ("c2s", "ask", pytest.approx(4000.0))


def test_a_cancellation_only_cancels_the_request_of_its_own_direction() -> None:
    wire = Wire()
    wire.request(1, "tools/call", {"name": "mine"})
    wire.request(1, "elicitation/create", {"message": "?"}, d="s2c")
    wire.send("s2c", {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
    assert [(r.direction, r.method, r.status) for r in wire.rows] == [
        ("s2c", "elicitation/create", "cancelled")
    ]


# -- the join key and the trace ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        (
            {
                "dev.mcpmeter/requestId": "chatcmpl-1",
                "requestId": "r2",
                "request_id": "r3",
                "baggage": "request_id=r4",
            },
            "chatcmpl-1",
        ),
        ({"requestId": "r2", "request_id": "r3", "baggage": "request_id=r4"}, "r2"),
        ({"request_id": "r3", "baggage": "request_id=r4"}, "r3"),
        ({"baggage": "userId=alice,request_id=msg_01%2Fabc%20d;ttl=60,env=prod"}, "msg_01/abc d"),
        ({"baggage": " request_id = r5 "}, "r5"),
        ({"requestId": 42}, "42"),
        ({"dev.mcpmeter/requestId": "", "requestId": "r2"}, "r2"),
        ({"baggage": "userId=alice"}, None),
        ({"requestId": None, "progressToken": 3}, None),
    ],
)
def test_the_request_id_is_the_first_found_of_the_documented_keys(
    meta: dict[str, Any], expected: str | None
) -> None:
    assert meta_call(meta).request_id == expected


def test_a_valid_traceparent_gives_the_trace_id() -> None:
    row = meta_call({"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"})
    assert row.trace_id == TRACE


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        "hello",
        42,
        None,
        ["00", TRACE],
        f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",  # trace id one digit short
        f"00-{TRACE}0-00f067aa0ba902b7-01",  # one digit long
        f"00-{TRACE[:-1]}g-00f067aa0ba902b7-01",  # not hex
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # the all-zero trace id is invalid
        f"00-{TRACE}-01",  # a part missing
        f"00-{TRACE}-00f067aa0ba902-01",  # parent id too short
        f"00-{TRACE}-{'0' * 16}-01",  # the all-zero parent id is invalid
        f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
    ],
)
def test_an_invalid_traceparent_gives_no_trace_id(traceparent: object) -> None:
    assert meta_call({"traceparent": traceparent}).trace_id is None


def test_the_frame_size_excludes_the_carriage_return_of_a_crlf_line() -> None:
    wire = Wire()
    request = wire.send("c2s", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, crlf=True)
    response = wire.send("s2c", {"jsonrpc": "2.0", "id": 1, "result": {}}, crlf=True)
    row = wire.only_row()
    assert (row.request_bytes, row.response_bytes) == (len(request) - 1, len(response) - 1)


def test_a_frame_with_surrounding_whitespace_counts_every_byte_but_the_line_ending() -> None:
    wire = Wire()
    frame = b'  {"jsonrpc":"2.0","id":1,"method":"ping"}  '
    wire.meter.on_frame("c2s", frame + b"\r", 0.0)
    wire.result(1)
    assert wire.only_row().request_bytes == len(frame)


def test_frames_that_are_not_jsonrpc_requests_write_no_rows_and_are_counted() -> None:
    wire = Wire()
    for frame in (b"", b"\r", b"   ", b"not json", b"\xff\xfe", b"[]", b"42", b'{"hello":"world"}'):
        wire.meter.on_frame("c2s", frame, 0.0)
    wire.request(True, "tools/call")  # a boolean is not an id
    wire.request([1], "tools/call")
    wire.send("c2s", {"jsonrpc": "2.0", "id": None, "method": "x"})  # a notification
    wire.meter.close()
    assert wire.rows == []
    stats = wire.meter.stats
    assert (stats.frames, stats.blank, stats.not_json, stats.requests) == (11, 3, 2, 0)


def test_a_batch_member_nested_deeper_than_orjson_writes_is_metered_without_raising() -> None:
    # orjson reads up to 1024 levels but writes at most 254; a batch member is re-serialised
    # to measure it, and the meter must not raise into the relay (that loses later frames).
    wire = Wire()
    deep = b"[" * 300 + b"0" + b"]" * 300
    frame = b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"deep","a":' + deep + b"}}]"
    wire.meter.on_frame("c2s", frame, 0.0)
    wire.meter.close()
    assert [(r.tool, r.status) for r in wire.rows] == [("deep", "no_response")]


# -- frames nested deeper than msgspec recurses -----------------------------------------------

DEEP = 100_000


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_a_call_nested_100k_deep_in_its_arguments_and_its_deep_result_make_one_row() -> None:
    wire = Wire()
    request = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"a":'
        + nested(DEEP)
        + b'},"name":"deep","_meta":{"requestId":"r-1","traceparent":"'
        + TRACEPARENT.encode()
        + b'"}}}'
    )
    response = b'{"jsonrpc":"2.0","id":1,"result":{"content":' + nested(DEEP) + b',"isError":true}}'
    wire.meter.on_frame("c2s", request, 0.0)
    wire.meter.on_frame("s2c", response, 0.5)
    row = wire.only_row()
    assert (row.tool, row.status, row.request_id, row.trace_id) == ("deep", "tool_error", "r-1", TRACE)
    assert (row.request_bytes, row.response_bytes) == (len(request), len(response))
    assert wire.meter.stats.meter_errors == 0


def test_a_batch_nested_100k_deep_is_metered_member_by_member() -> None:
    wire = Wire()
    member = b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"b","arguments":' + nested(DEEP)
    frame = b'[{"jsonrpc":"2.0","id":1,"method":"ping"}, ' + member + b"}}, " + nested(DEEP) + b"]"
    wire.meter.on_frame("c2s", frame, 0.0)
    wire.meter.close()
    assert [(r.method, r.tool, r.status) for r in wire.rows] == [
        ("ping", None, "no_response"),
        ("tools/call", "b", "no_response"),
    ]
    assert wire.rows[1].request_bytes == len(member) + 2
    assert wire.meter.stats.not_jsonrpc == 1  # the bare nested array is no message


def test_a_deep_frame_that_is_not_json_counts_as_not_json_and_writes_no_row() -> None:
    wire = Wire()
    for frame in (b"[" * DEEP, b'{"id":1,"a":' + b"[" * DEEP + b"}" * DEEP, b'{"id":' + nested(DEEP) + b"}"):
        wire.meter.on_frame("c2s", frame, 0.0)
    wire.meter.close()
    assert wire.rows == []
    assert (wire.meter.stats.not_json, wire.meter.stats.not_jsonrpc, wire.meter.stats.meter_errors) == (
        2,
        1,
        0,
    )


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
ENVELOPE_KEYS = st.sampled_from(
    [
        "id",
        "method",
        "params",
        "result",
        "error",
        "jsonrpc",
        "name",
        "uri",
        "_meta",
        "isError",
        "code",
        "message",
    ]
)


def envelope_like() -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like JSON-RPC messages: envelope keys, any values, nested envelopes."""
    member = st.one_of(JSON_VALUES, st.dictionaries(ENVELOPE_KEYS, JSON_VALUES, max_size=5))
    return st.dictionaries(st.one_of(ENVELOPE_KEYS, st.text(max_size=4)), member, max_size=6)


@settings(max_examples=300, deadline=None)
@given(message=envelope_like(), spaces=st.booleans(), ascii=st.booleans())
def test_the_bounded_reader_reads_what_msgspec_reads(
    message: dict[str, Any], spaces: bool, ascii: bool
) -> None:
    import json

    separators = (", ", ": ") if spaces else (",", ":")
    frame = json.dumps(message, separators=separators, ensure_ascii=ascii).encode()
    envelope, arguments = read_envelope(frame)
    assert envelope == decode_message(frame)
    params = message.get("params")
    if isinstance(params, dict) and "arguments" in params:
        assert arguments is not None
        assert orjson.loads(frame[arguments[0] : arguments[1]]) == params["arguments"]


# -- one id in flight more than once ----------------------------------------------------------

IDS = (1, 2, "1", "x")
OUTCOMES = ("ok", "error", "tool_error")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_interleaving_of_requests_sharing_ids_gives_one_row_per_request_with_its_status(
    data: st.DataObject,
) -> None:
    """A server answers each id's requests in the order they came, and may stop answering
    (the stream ends). Whatever order the two relay threads meter the frames in, each
    request gets one row with its own status, latency and sizes."""
    ids = data.draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=12), label="ids")
    outcomes = [data.draw(st.sampled_from(OUTCOMES)) for _ in ids]
    # Per id, how many of its requests the server answers (the first ones: answers in order).
    answered_per_id = {rpc_id: data.draw(st.integers(0, ids.count(rpc_id))) for rpc_id in set(ids)}
    queue: dict[object, list[int]] = {rpc_id: [] for rpc_id in set(ids)}  # sent, not yet answered
    budget = dict(answered_per_id)
    # The timeline: send the next request, or answer the oldest sent request of some id.
    c2s: list[tuple[float, int]] = []  # (time, request index)
    s2c: list[tuple[float, int]] = []  # (time, index of the request answered)
    sent = 0
    clock = 0.0
    while True:
        choices = ["send"] if sent < len(ids) else []
        choices += [f"answer {i}" for i, rpc_id in enumerate(IDS) if queue.get(rpc_id) and budget[rpc_id]]
        if not choices:
            break
        choice = data.draw(st.sampled_from(choices))
        clock += 1.0
        if choice == "send":
            c2s.append((clock, sent))
            queue[ids[sent]].append(sent)
            sent += 1
        else:
            rpc_id = IDS[int(choice.split()[1])]
            s2c.append((clock, queue[rpc_id].pop(0)))
            budget[rpc_id] -= 1
    # The meter sees each direction in order, the two directions merged any way.
    wire = Wire()
    request_bytes: dict[int, int] = {}
    response_bytes: dict[int, int] = {}
    while c2s or s2c:
        if c2s and (not s2c or data.draw(st.booleans())):
            at, index = c2s.pop(0)
            request_bytes[index] = len(wire.request(ids[index], "tools/call", {"name": f"t{index}"}, at=at))
        else:
            at, index = s2c.pop(0)
            rpc_id, outcome = ids[index], outcomes[index]
            if outcome == "error":
                frame = wire.error(rpc_id, -32000, "failed", at=at)
            else:
                frame = wire.result(rpc_id, {"isError": outcome == "tool_error"}, at=at)
            response_bytes[index] = len(frame)
    wire.meter.close()
    rows = {row.tool: row for row in wire.rows}
    assert len(wire.rows) == len(ids) == len(rows)
    for index, rpc_id in enumerate(ids):
        row = rows[f"t{index}"]
        answered = index in response_bytes
        assert row.status == (outcomes[index] if answered else "no_response")
        assert row.jsonrpc_id == str(rpc_id)
        assert row.request_bytes == request_bytes[index]
        assert row.response_bytes == response_bytes.get(index)
    assert wire.meter.pending_count == 0


# -- tenant tags ------------------------------------------------------------------------------


def test_flags_win_over_env_vars() -> None:
    env = {
        "MCPMETER_PROJECT_ID": "env-project",
        "MCPMETER_AGENT_ID": "env-agent",
        "MCPMETER_SESSION_ID": "env-session",
        "MCPMETER_TAGS": "team=env,env=prod",
    }
    tenant = resolve_tenant(project="p", agent="a", session="s", tags=["team=flag"], env=env)
    assert (tenant.project_id, tenant.agent_id, tenant.session_id) == ("p", "a", "s")
    assert dict(tenant.tags) == {"team": "flag", "env": "prod"}


def test_env_vars_apply_when_no_flag_is_given() -> None:
    env = {"MCPMETER_PROJECT_ID": "acme", "MCPMETER_AGENT_ID": "planner", "MCPMETER_SESSION_ID": "s-9"}
    tenant = resolve_tenant(env=env)
    assert (tenant.project_id, tenant.agent_id, tenant.session_id) == ("acme", "planner", "s-9")
    assert dict(tenant.tags) == {}


def test_mcpmeter_agent_name_is_an_alias_that_mcpmeter_agent_id_overrides() -> None:
    assert resolve_tenant(env={"MCPMETER_AGENT_NAME": "alias"}).agent_id == "alias"
    assert resolve_tenant(env={"MCPMETER_AGENT_NAME": "alias", "MCPMETER_AGENT_ID": "id"}).agent_id == "id"
    assert resolve_tenant(agent="flag", env={"MCPMETER_AGENT_NAME": "alias"}).agent_id == "flag"


def test_empty_values_count_as_not_given_and_a_new_session_id_is_made_per_tenant() -> None:
    env = {"MCPMETER_PROJECT_ID": "", "MCPMETER_AGENT_ID": "", "MCPMETER_SESSION_ID": "", "MCPMETER_TAGS": ""}
    first, second = resolve_tenant(project="", env=env), resolve_tenant(env=env)
    assert (first.project_id, first.agent_id, dict(first.tags)) == (None, None, {})
    assert uuid.UUID(first.session_id) != uuid.UUID(second.session_id)


def test_mcpmeter_tags_is_a_comma_separated_list_of_pairs() -> None:
    tenant = resolve_tenant(env={"MCPMETER_TAGS": " team = growth ,feature=search,, url=a=b,empty="})
    assert dict(tenant.tags) == {"team": "growth", "feature": "search", "url": "a=b", "empty": ""}
    assert tenant.tags_json == '{"empty":"","feature":"search","team":"growth","url":"a=b"}'


@pytest.mark.parametrize(
    ("tags", "env"),
    [
        (["no-equals"], {}),
        (["=value"], {}),
        ([], {"MCPMETER_TAGS": "team=a,broken"}),
        ([], {"MCPMETER_TAGS": "=x"}),
    ],
)
def test_a_tag_that_is_not_k_equals_v_is_a_usage_error(tags: list[str], env: dict[str, str]) -> None:
    with pytest.raises(UsageError) as caught:
        resolve_tenant(tags=tags, env=env)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


# -- --since / --until --------------------------------------------------------------------------

NOW = 1_790_000_000.0


def utc_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize(
    ("span", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        (" 7d ", 7 * 86400),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
        ("0s", 0),
    ],
)
def test_a_span_is_that_long_before_now(span: str, seconds: int) -> None:
    assert parse_when(span, now=NOW) == utc_text(NOW - seconds)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", "2026-11-01T00:00:00.000000Z"),
        ("2026-11-01T09:30Z", "2026-11-01T09:30:00.000000Z"),
        ("2026-11-01T09:30:15.25z", "2026-11-01T09:30:15.250000Z"),
        ("2026-11-01T09:30:00+02:00", "2026-11-01T07:30:00.000000Z"),
        ("2026-11-01T09:30:00.123456", "2026-11-01T09:30:00.123456Z"),
        ("2026-11-01 09:30", "2026-11-01T09:30:00.000000Z"),
    ],
)
def test_an_iso_date_or_time_is_read_as_utc_unless_it_says_otherwise(text: str, expected: str) -> None:
    assert parse_when(text, now=NOW) == expected


@pytest.mark.parametrize("junk", ["yesterday", "", "10 minutes", "7x", "2026-13-01", "-1h"])
def test_a_time_that_is_neither_iso_nor_a_span_is_a_usage_error(junk: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_when(junk, now=NOW)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2
