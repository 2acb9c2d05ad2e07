"""Property tests: framing never changes a byte, and the meter never trips on what it reads.

Three promises (DESIGN.md: "wrap is transparent", "a frame that is not JSON ... never kills the
relay", "one audit row per JSON-RPC request"):

- :class:`~mcpmeter.protocol.frame.LineSplitter` hands out exactly the input's lines, whatever the chunking;
- ``mcpmeter wrap -- cat`` gives back exactly the bytes it was given;
- :class:`~mcpmeter.metering.calls.CallMeter` never raises and writes one row per request, and only then.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MCPMETER, read_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcpmeter.metering.calls import CallMeter
from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.frame import LineSplitter
from mcpmeter.record import CallRecord

# -- strategies ------------------------------------------------------------------------------

#: Byte sequences that are not valid UTF-8: a lone continuation byte, a truncated sequence,
#: an encoded surrogate, an overlong encoding, bytes that never appear in UTF-8.
INVALID_UTF8 = st.sampled_from([b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xff\xfe"])

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
ID_VALUES = (
    st.sampled_from([0, 1, 2, "1", "2", "", "a"])
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.text(max_size=8)
    | JSON_VALUES
)
#: Objects shaped more or less like JSON-RPC messages: requests, notifications, responses,
#: and everything in between (ids of every JSON type, methods that are not strings, ...).
JSONRPC_ISH = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | JSON_VALUES,
        "id": ID_VALUES,
        "method": st.sampled_from(["tools/call", "initialize", "notifications/cancelled", "ping"])
        | st.text(max_size=12)
        | JSON_VALUES,
        "params": st.fixed_dictionaries(
            {}, optional={"name": JSON_VALUES, "_meta": JSON_VALUES, "requestId": ID_VALUES}
        )
        | JSON_VALUES,
        "result": st.fixed_dictionaries({}, optional={"isError": JSON_VALUES}) | JSON_VALUES,
        "error": st.fixed_dictionaries({}, optional={"code": JSON_VALUES, "message": JSON_VALUES})
        | JSON_VALUES,
    },
)
JSON_MESSAGES = JSONRPC_ISH | st.lists(JSONRPC_ISH | JSON_VALUES, max_size=4) | JSON_VALUES


def _no_newline(data: bytes) -> bytes:
    return data.replace(b"\n", b"")


#: One frame's content, without its newline: empty, JSON, text, garbage, invalid UTF-8, long.
FRAME_BODIES = st.one_of(
    st.just(b""),
    JSON_MESSAGES.map(orjson.dumps),
    st.text(max_size=40).map(lambda s: _no_newline(s.encode())),
    st.binary(max_size=40).map(_no_newline),
    st.lists(st.binary(max_size=6).map(_no_newline) | INVALID_UTF8, max_size=6).map(b"".join),
    st.integers(min_value=60_000, max_value=300_000).map(lambda n: b'{"big":"' + b"x" * n + b'"}'),
)
#: A frame with, sometimes, the \r of a \r\n line ending.
FRAMES = st.tuples(FRAME_BODIES, st.booleans()).map(lambda t: t[0] + b"\r" if t[1] else t[0])
#: A stream of newline-terminated frames and, sometimes, an unterminated last one.
STREAMS = st.tuples(st.lists(FRAMES, max_size=12), FRAMES | st.just(b"")).map(
    lambda t: b"".join(frame + b"\n" for frame in t[0]) + t[1]
)
#: Streams built from frames, and plain byte soup (newlines anywhere).
ANY_STREAM = STREAMS | st.binary(max_size=400)


def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=24)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(ANY_STREAM)
    return data, chunked(draw, data)


# -- LineSplitter ----------------------------------------------------------------------------


def split_all(chunks: Sequence[bytes]) -> tuple[list[tuple[bytes, float]], list[tuple[bytes, float]], bool]:
    """Feed ``chunks`` (chunk i at time i); returns (lines from feed, lines from finish, finish())."""
    lines: list[tuple[bytes, float]] = []
    splitter = LineSplitter(lambda line, now: lines.append((bytes(line), now)))
    for i, chunk in enumerate(chunks):
        splitter.feed(chunk, float(i))
    fed = list(lines)
    lines.clear()
    had_tail = splitter.finish(-1.0)
    return fed, lines, had_tail


@given(chunked_streams())
def test_the_lines_handed_out_are_exactly_the_input_lines_whatever_the_chunking(
    case: tuple[bytes, list[bytes]],
) -> None:
    data, chunks = case
    *complete, tail = data.split(b"\n")
    fed, finished, had_tail = split_all(chunks)
    assert [line for line, _ in fed] == complete
    assert had_tail == bool(tail)
    assert [line for line, _ in finished] == ([tail] if tail else [])


@given(chunked_streams())
def test_each_line_is_handed_out_with_the_time_of_the_chunk_that_ended_it(
    case: tuple[bytes, list[bytes]],
) -> None:
    _data, chunks = case
    ends: list[float] = []
    for i, chunk in enumerate(chunks):
        ends.extend(float(i) for byte in chunk if byte == 0x0A)
    fed, finished, _ = split_all(chunks)
    assert [now for _, now in fed] == ends
    assert all(now == -1.0 for _, now in finished)


@given(chunked_streams())
def test_pending_bytes_is_the_length_of_the_unterminated_tail(case: tuple[bytes, list[bytes]]) -> None:
    data, chunks = case
    splitter = LineSplitter(lambda line, now: None)
    for chunk in chunks:
        splitter.feed(chunk, 0.0)
    assert splitter.pending_bytes == len(data.split(b"\n")[-1])
    splitter.finish(0.0)
    assert splitter.pending_bytes == 0


def test_a_20_mb_line_fed_in_64_kib_chunks_comes_out_as_one_line() -> None:
    line = b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"blob":"' + b"y" * (20 << 20) + b'"}}'
    data = line + b"\n" + line[:1000]
    fed, finished, had_tail = split_all([data[i : i + 65536] for i in range(0, len(data), 65536)])
    assert len(fed) == 1 and fed[0][0] == line
    assert had_tail and finished[0][0] == line[:1000]


def test_finish_on_a_clean_end_hands_out_nothing_and_says_so() -> None:
    fed, finished, had_tail = split_all([b"a\nb\n", b"", b"c\r\n"])
    assert [line for line, _ in fed] == [b"a", b"b", b"c\r"]
    assert finished == [] and had_tail is False


# -- the relay, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment for `mcpmeter wrap` runs shared by a module's examples (one store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(tmp_path_factory.mktemp("relay") / "audit.db")
    return env


def _write_chunks(fd: int, chunks: Sequence[bytes]) -> None:
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    except OSError:
        pass  # the relay is gone; the test reports what came back
    finally:
        os.close(fd)


def relay_through_cat(
    chunks: Sequence[bytes], env: dict[str, str], timeout: float = 60.0
) -> tuple[bytes, bytes, int]:
    """Write ``chunks`` one ``write`` at a time into `mcpmeter wrap -- cat`, then close its stdin.

    Returns (stdout, stderr, exit code). Every wait is bounded by ``timeout``.
    """
    read_fd, write_fd = os.pipe()
    with subprocess.Popen(
        [MCPMETER, "wrap", "--", "cat"],
        stdin=read_fd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        os.close(read_fd)
        writer = threading.Thread(target=_write_chunks, args=(write_fd, list(chunks)), daemon=True)
        writer.start()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            writer.join(timeout)
    return out, err, proc.returncode


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=chunked_streams())
def test_wrap_gives_back_exactly_the_bytes_it_was_given(
    relay_env: dict[str, str], case: tuple[bytes, list[bytes]]
) -> None:
    data, chunks = case
    out, err, code = relay_through_cat(chunks, relay_env)
    assert code == 0, err
    assert out == data, err


def test_wrap_relays_a_20_mb_line_byte_for_byte_and_meters_its_exact_size(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(tmp_path / "audit.db")
    line = (
        b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"big","arguments":{"blob":"'
        + b"z" * (20 << 20)
        + b'"}}}'
    )
    data = line + b"\n" + b"not json \xff\n" + line
    out, err, code = relay_through_cat([data[:1_000_003], data[1_000_003:]], env, timeout=120)
    assert code == 0, err
    assert len(out) == len(data) and out == data
    c2s = [row for row in read_rows(tmp_path / "audit.db") if row["direction"] == "c2s"]
    assert [(row["tool"], row["jsonrpc_id"], row["request_bytes"]) for row in c2s] == [
        ("big", "7", len(line)),
        ("big", "7", len(line)),
    ]


# -- CallMeter: never raises, never invents a row --------------------------------------------


def new_meter(rows: list[CallRecord]) -> CallMeter:
    return CallMeter(
        Tenant(project_id="p", agent_id="a", session_id="s"),
        rows.append,
        transport="stdio",
        upstream="stdio",
        default_server="srv",
    )


def is_request(value: Any) -> bool:
    """A JSON-RPC request by the spec: an object with a string method and a string or number id."""
    if not isinstance(value, dict) or not isinstance(value.get("method"), str):
        return False
    rpc_id = value.get("id")
    return isinstance(rpc_id, (str, int, float)) and not isinstance(rpc_id, bool)


def requests_in(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        yield from (member for member in value if is_request(member))
    elif is_request(value):
        yield value


@given(
    st.lists(st.tuples(st.sampled_from(["c2s", "s2c"]), JSON_MESSAGES), max_size=20),
)
def test_the_meter_writes_one_row_per_request_in_any_json_and_none_for_anything_else(
    messages: list[tuple[str, Any]],
) -> None:
    rows: list[CallRecord] = []
    meter = new_meter(rows)
    expected: list[tuple[str, str]] = []
    for seen, (direction, message) in enumerate(messages):
        meter.on_frame(direction, orjson.dumps(message), float(seen))
        expected.extend((direction, request["method"]) for request in requests_in(message))
    meter.close()
    assert sorted((row.direction, row.method) for row in rows) == sorted(expected)


@given(st.lists(st.tuples(st.sampled_from(["c2s", "s2c"]), FRAMES | INVALID_UTF8), max_size=20))
def test_the_meter_never_raises_on_garbage_frames(frames: list[tuple[str, bytes]]) -> None:
    rows: list[CallRecord] = []
    meter = new_meter(rows)
    expected = 0
    for seen, (direction, frame) in enumerate(frames):
        meter.on_frame(direction, frame, float(seen))
        with contextlib.suppress(orjson.JSONDecodeError):
            expected += sum(1 for _ in requests_in(orjson.loads(frame)))
    meter.close()
    assert len(rows) == expected


# -- CallMeter: request/response pairing -----------------------------------------------------

OPPOSITE = {"c2s": "s2c", "s2c": "c2s"}
PAIR_IDS = st.sampled_from([0, 1, 2, "1", "2", "", "01"]) | st.integers(-(2**53), 2**53) | st.text(max_size=6)
OUTCOMES = st.sampled_from(["ok", "tool_error", "error", "cancelled", "no_response"])


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Requests with unique (direction, id), each with an outcome, and an order of events.

    The order is a list of (request index, "request" | "settle"); a request always comes
    before what settles it. Ids 1 and "1" may both be pending at once.
    """
    calls = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "direction": st.sampled_from(["c2s", "s2c"]),
                    "id": PAIR_IDS,
                    "method": st.sampled_from(["tools/call", "sampling/createMessage", "ping"])
                    | st.text(min_size=1, max_size=10),
                    "outcome": OUTCOMES,
                    "crlf": st.booleans(),
                    "padding": st.integers(min_value=0, max_value=300),
                    "code": st.integers(min_value=-33000, max_value=33000),
                }
            ),
            max_size=12,
            unique_by=lambda c: (c["direction"], type(c["id"]).__name__, c["id"]),
        )
    )
    tokens = draw(st.permutations([i for i in range(len(calls)) for _ in range(2)]))
    seen: set[int] = set()
    order: list[tuple[int, str]] = []
    for i in tokens:
        order.append((i, "settle" if i in seen else "request"))
        seen.add(i)
    return calls, order


def line(message: dict[str, Any], crlf: bool) -> bytes:
    return orjson.dumps(message) + (b"\r" if crlf else b"")


@given(conversations())
def test_every_request_gets_exactly_one_row_with_its_status_id_direction_and_sizes(
    conversation: tuple[list[dict[str, Any]], list[tuple[int, str]]],
) -> None:
    calls, order = conversation
    rows: list[CallRecord] = []
    meter = CallMeter(
        Tenant(project_id=None, agent_id=None, session_id="s"),
        rows.append,
        transport="stdio",
        upstream="stdio",
        default_server="srv",
        wall_clock=lambda: 1000.0,
        mono_clock=lambda: 0.0,
    )
    sizes: dict[int, tuple[int, int | None]] = {}
    for step, (i, event) in enumerate(order):
        call = calls[i]
        if event == "request":
            request = {
                "jsonrpc": "2.0",
                "id": call["id"],
                "method": f"{call['method']}#{i}",
                "params": {"pad": "p" * call["padding"]},
            }
            frame = line(request, call["crlf"])
            meter.on_frame(call["direction"], frame, float(step))
            sizes[i] = (len(orjson.dumps(request)), None)
            continue
        outcome = call["outcome"]
        if outcome == "cancelled":
            notice = {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": call["id"]},
            }
            meter.on_frame(call["direction"], line(notice, call["crlf"]), float(step))
        elif outcome != "no_response":
            response: dict[str, Any] = {"jsonrpc": "2.0", "id": call["id"]}
            if outcome == "ok":
                response["result"] = {"content": [{"type": "text", "text": "r" * call["padding"]}]}
            elif outcome == "tool_error":
                response["result"] = {"content": [], "isError": True}
            else:
                response["error"] = {"code": call["code"], "message": "m" * call["padding"]}
            meter.on_frame(OPPOSITE[call["direction"]], line(response, call["crlf"]), float(step))
            sizes[i] = (sizes[i][0], len(orjson.dumps(response)))
    meter.close()

    assert len(rows) == len(calls)
    by_key = {(row.direction, row.jsonrpc_id, row.method): row for row in rows}
    # ids 1 and "1" are both written "1": the method's suffix tells the calls apart.
    assert len(by_key) == len(rows)
    for i, call in enumerate(calls):
        row = by_key[(call["direction"], str(call["id"]), f"{call['method']}#{i}")]
        assert row.status == call["outcome"]
        assert row.jsonrpc_id == str(call["id"])
        assert (row.request_bytes, row.response_bytes) == sizes[i]
        assert (row.latency_ms is None) == (call["outcome"] in ("cancelled", "no_response"))
        if call["outcome"] == "error":
            assert row.error_code == call["code"]
            assert row.error_message == ("m" * call["padding"])[:512]
        else:
            assert row.error_code is None and row.error_message is None


@given(st.sampled_from(["c2s", "s2c"]), st.booleans())
def test_a_response_to_id_1_never_settles_a_request_with_id_string_1(direction: str, int_first: bool) -> None:
    rows: list[CallRecord] = []
    meter = new_meter(rows)
    first, second = (1, "1") if int_first else ("1", 1)
    for n, rpc_id in enumerate((first, second)):
        request = {"jsonrpc": "2.0", "id": rpc_id, "method": f"m{n}"}
        meter.on_frame(direction, orjson.dumps(request), 0.0)
    meter.on_frame(OPPOSITE[direction], orjson.dumps({"jsonrpc": "2.0", "id": second, "result": {}}), 1.0)
    assert [(row.method, row.status) for row in rows] == [("m1", "ok")]
    meter.close()
    assert [(row.method, row.status) for row in rows] == [("m1", "ok"), ("m0", "no_response")]


def test_a_batch_nested_too_deep_to_reserialise_does_not_cost_the_rows_of_the_frames_after_it(
    tmp_path: Path,
) -> None:
    # orjson reads 1024 levels of nesting but writes only 254: a batch member is re-serialised
    # to size it, and that must not lose it or the frames read in the same chunk after it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(tmp_path / "audit.db")
    deep = b"[" * 300 + b"]" * 300
    data = (
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"deep","arguments":{"x":'
        + deep
        + b"}}}]\n"
        + b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"after"}}\n'
        + b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"third"}}\n'
    )
    out, err, code = relay_through_cat([data], env)
    assert code == 0, err
    assert out == data
    c2s = [row["tool"] for row in read_rows(tmp_path / "audit.db") if row["direction"] == "c2s"]
    assert c2s == ["deep", "after", "third"], err
