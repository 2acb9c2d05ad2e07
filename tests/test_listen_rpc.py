"""`wrap --listen` and the JSON-RPC in a POST: reused ids, batches, junk, depth, bad bodies.

Real `mcpmeter wrap --listen` processes in front of tests/servers/batch_server.py (a raw
stdio server that can hold a call until told, or drop batches), raw HTTP with httpx on
127.0.0.1, rows read from the real SQLite store. Every wait is bounded.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from anyio.streams.memory import MemoryObjectSendStream
from conftest import PYTHON, SERVERS, read_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http import HEADERS, INIT, SESSION_S, RawSession, dumps, listening

from mcpmeter.protocol.rpc import element_spans, member_spans
from mcpmeter.protocol.sse import SSEParser

pytestmark = pytest.mark.anyio

BATCH = [PYTHON, str(SERVERS / "batch_server.py")]
#: per-session server processes (the default), or one shared by every session (ids rewritten)
MODES = {"per-session": (), "shared-server": ("--shared-server",)}


def call(rpc_id: object, name: str, progress: str | None = None, **arguments: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if progress is not None:
        params["_meta"] = {"progressToken": progress}
    return {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": params}


def answers(content: bytes) -> list[tuple[bytes, dict[str, Any]]]:
    """Each answer of a body or event (one message or a batch): its id's exact bytes, and it."""
    spans = element_spans(content) if content.lstrip()[:1] == b"[" else [(0, len(content))]
    assert spans is not None, content
    out = []
    for start, end in spans:
        member = content[start:end]
        ids = member_spans(member)
        assert ids is not None and "id" in ids, member
        out.append((member[ids["id"][0] : ids["id"][1]], json.loads(member)))
    return out


def error_of(answer: dict[str, Any]) -> int:
    """The code of an error mcpmeter answered itself (its message says it is mcpmeter's)."""
    assert answer["error"]["message"].startswith("mcpmeter:"), answer
    code: int = answer["error"]["code"]
    return code


def recorded(path: Path) -> list[Any]:
    """What the server read, one decoded line each."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def calls(db: Path) -> list[tuple[str, str, str, int | None, str | None]]:
    """The tools/call rows: id, tool, status, error code, and whether the message is mcpmeter's."""
    return sorted(
        (
            str(r["jsonrpc_id"]),
            str(r["tool"]),
            str(r["status"]),
            r["error_code"],  # type: ignore[misc]
            None if r["error_message"] is None else str(r["error_message"]).split(":")[0],
        )
        for r in read_rows(db)
        if r["method"] == "tools/call"
    )


async def stream_events(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    out: MemoryObjectSendStream[bytes],
) -> None:
    """POST ``body`` and send on the data of each event of its event-stream answer, until it ends."""
    parser = SSEParser()
    async with out, http.stream("POST", url, content=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.aiter_bytes():
            for event in parser.feed(chunk):
                await out.send(event.data)


def session_headers(session: RawSession) -> dict[str, str]:
    return dict(session.headers, **{"mcp-session-id": session.session_id or ""})


# -- the same id twice in flight ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_request_whose_id_is_in_flight_is_refused_and_the_first_still_gets_its_own_answer(
    mode: str, meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.jsonl"
    server = [*BATCH, "--record", str(record)]
    async with listening(meter_env, *MODES[mode], server=server) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        send, receive = anyio.create_memory_object_stream[bytes](16)
        async with anyio.create_task_group() as tg, receive:
            held = dumps(call(5, "hold", progress="p5", text="first"))
            tg.start_soon(stream_events, http, session.url, held, session_headers(session), send)
            with anyio.fail_after(SESSION_S):
                progress = json.loads(await receive.receive())  # the call is with the server
            again = await session.post(dumps(call(5, "echo", text="second")))
            release = await session.post(dumps(call(6, "release")))
            with anyio.fail_after(SESSION_S):
                first = [event async for event in receive]
        await session.close()

    assert progress["method"] == "notifications/progress"
    assert progress["params"]["progressToken"] == "p5"
    assert again.status_code == 200
    [(raw_id, refusal)] = answers(again.content)
    assert raw_id == b"5" and error_of(refusal) == -32600
    assert "already in flight" in refusal["error"]["message"]
    assert release.json()["result"] == {"released": 1}
    [(raw_id, answer)] = answers(first[0])
    assert len(first) == 1 and raw_id == b"5" and answer["result"] == {"held": "first"}
    assert b"second" not in record.read_bytes()  # never forwarded
    assert calls(db_path) == [("5", "hold", "ok", None, None), ("6", "release", "ok", None, None)]


@pytest.mark.parametrize("mode", MODES)
async def test_a_batch_reusing_an_id_gets_the_first_members_answer_and_an_error_for_the_second(
    mode: str, meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.jsonl"
    server = [*BATCH, "--record", str(record)]
    async with listening(meter_env, *MODES[mode], server=server) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        batch = [call(5, "echo", text="a"), call(5, "echo", text="b"), call(6, "echo", text="c")]
        response = await session.post(dumps(batch))
        await session.close()

    assert response.status_code == 200
    got = answers(response.content)
    assert sorted(raw_id for raw_id, _ in got) == [b"5", b"5", b"6"]  # never an id the server saw
    results = {raw_id: a["result"]["text"] for raw_id, a in got if "result" in a}
    assert results == {b"5": "a", b"6": "c"}
    [refusal] = [a for _, a in got if "error" in a]
    assert refusal["id"] == 5 and error_of(refusal) == -32600
    forwarded = recorded(record)[-1]
    assert [m["params"]["arguments"]["text"] for m in forwarded] == ["a", "c"]
    assert calls(db_path) == [("5", "echo", "ok", None, None), ("6", "echo", "ok", None, None)]


# -- batches the server does not answer ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_batch_a_server_drops_is_answered_with_errors_after_the_batch_timeout(
    mode: str, meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.jsonl"
    server = [*BATCH, "--batches", "drop", "--record", str(record)]
    flags = (*MODES[mode], "--batch-timeout", "1")
    async with listening(meter_env, *flags, server=server) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        batch = [
            call(1, "echo", text="x"),
            call("two", "echo", text="y"),
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {}},
        ]
        started = time.monotonic()
        response = await session.post(dumps(batch))
        elapsed = time.monotonic() - started
        reused = await session.post(dumps(call(1, "echo", text="again")))  # the server may answer yet
        fresh = await session.post(dumps(call(3, "echo", text="after")))
        await session.close()

    assert response.status_code == 200 and 1.0 <= elapsed < SESSION_S
    got = answers(response.content)
    assert [raw_id for raw_id, _ in got] == [b"1", b'"two"']
    assert all(error_of(a) == -32000 and "within 1 s" in a["error"]["message"] for _, a in got)
    [(_, refusal)] = answers(reused.content)
    assert error_of(refusal) == -32600
    assert fresh.json()["result"] == {"text": "after"}
    cancelled = [
        m for m in recorded(record) if isinstance(m, dict) and m.get("method") == "notifications/cancelled"
    ]
    assert len(cancelled) == 2  # MCP: a requester that stops waiting says so
    if mode == "per-session":
        assert [m["params"]["requestId"] for m in cancelled] == [1, "two"]
    assert calls(db_path) == [
        ("1", "echo", "error", -32000, "mcpmeter"),
        ("3", "echo", "ok", None, None),
        ("two", "echo", "error", -32000, "mcpmeter"),
    ]
    assert not [r for r in read_rows(db_path) if r["status"] == "no_response"]


async def test_members_a_server_leaves_unanswered_get_errors_after_the_answers_it_gave(
    meter_env: dict[str, str], db_path: Path
) -> None:
    async with (
        listening(meter_env, "--batch-timeout", "1", server=BATCH) as (base, _),
        httpx.AsyncClient() as http,
    ):
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        send, receive = anyio.create_memory_object_stream[bytes](16)
        batch = dumps([call(1, "echo", text="x"), call(2, "hang")])
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(stream_events, http, session.url, batch, session_headers(session), send)
            with anyio.fail_after(SESSION_S):
                events = [event async for event in receive]
        await session.close()

    server_part, own_part = (answers(event) for event in events)
    assert [(raw_id, a["result"]) for raw_id, a in server_part] == [(b"1", {"text": "x"})]
    assert [(raw_id, error_of(a)) for raw_id, a in own_part] == [(b"2", -32000)]
    assert calls(db_path) == [("1", "echo", "ok", None, None), ("2", "hang", "error", -32000, "mcpmeter")]


# -- junk in a batch ---------------------------------------------------------------------------


async def test_junk_batch_members_get_an_error_each_and_the_valid_ones_are_relayed_and_answered(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.jsonl"
    server = [*BATCH, "--record", str(record)]
    notification = {"jsonrpc": "2.0", "method": "notifications/message", "params": {}}
    async with listening(meter_env, server=server) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        mixed = [
            1,
            call(7, "echo", text="kept"),
            "x",
            {},
            {"jsonrpc": "2.0", "id": 8, "method": 5},
            notification,
        ]
        response = await session.post(dumps(mixed))
        junk_only = await session.post(b"[1, 2, 3]")
        empty = await session.post(b"[]")
        await session.close()

    assert response.status_code == 200
    got = answers(response.content)
    assert [(raw_id, a["result"]) for raw_id, a in got if "result" in a] == [(b"7", {"text": "kept"})]
    assert sorted((raw_id, error_of(a)) for raw_id, a in got if "error" in a) == [
        (b"8", -32600),
        (b"null", -32600),
        (b"null", -32600),
        (b"null", -32600),
    ]
    assert record.read_bytes().splitlines()[-1] == b"[" + dumps(mixed[1]) + b"," + dumps(notification) + b"]"
    assert junk_only.status_code == 400
    assert [(raw_id, error_of(a)) for raw_id, a in answers(junk_only.content)] == [(b"null", -32600)] * 3
    assert empty.status_code == 400 and error_of(empty.json()) == -32600
    assert calls(db_path) == [("7", "echo", "ok", None, None)]


# -- bodies that are not JSON-RPC ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", -32700),
        (b"  \r\n", -32700),
        (b"not json", -32700),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping"', -32700),
        (b"5", -32600),
        (b'"ping"', -32600),
        (b"null", -32600),
        (b"{}", -32600),
        (b'{"jsonrpc":"2.0","id":1}', -32600),
    ],
)
async def test_a_body_that_is_not_json_rpc_gets_400_and_a_json_rpc_error_and_is_not_forwarded(
    body: bytes, code: int, meter_env: dict[str, str], tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.jsonl"
    server = [*BATCH, "--record", str(record)]
    async with listening(meter_env, server=server) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        no_session = await session.post(body)
        await session.initialize()
        in_session = await session.post(body)
        ping = await session.post(dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}))
        await session.close()

    for response in (no_session, in_session):
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert error_of(response.json()) == code
    assert ping.json() == {"jsonrpc": "2.0", "id": 2, "result": {}}
    assert [m.get("method") for m in recorded(record)] == ["initialize", "notifications/initialized", "ping"]


# -- nesting -------------------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    """A tools/call whose body nests ``levels`` deep (the object, params, arguments, then arrays)."""
    inner = b"[" * (levels - 3) + b"]" * (levels - 3)
    return (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"deep":'
        + inner
        + b"}}}"
    )


async def test_json_nested_past_512_levels_gets_400_and_a_parse_error_without_a_traceback(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.jsonl"
    server = [*BATCH, "--record", str(record)]
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    async with listening(meter_env, server=server) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        before = await session.post(deep)
        await session.initialize()
        refused = [await session.post(body) for body in (deep, b"[" + deep + b"]", deep_object, nested(513))]
        unclosed = await session.post(b"[" * 100_000)  # deep and not JSON either
        at_the_bound = await session.post(nested(512))
        await session.close()

    for response in (before, *refused):
        assert response.status_code == 400
        assert error_of(response.json()) == -32700
        assert "nested deeper than 512" in response.json()["error"]["message"]
    assert unclosed.status_code == 400 and error_of(unclosed.json()) == -32700
    assert at_the_bound.json() == {"jsonrpc": "2.0", "id": 1, "result": {"text": None}}
    assert len(recorded(record)) == 3  # initialize, initialized, the call at the bound
    assert calls(db_path) == [("1", "echo", "ok", None, None)]
    # (the listener's stderr is checked for a traceback when it exits)


# -- the older HTTP+SSE transport ------------------------------------------------------------------


async def test_the_sse_transport_refuses_bad_bodies_and_reused_ids_and_bounds_a_dropped_batch(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.jsonl"
    server = [*BATCH, "--batches", "drop", "--record", str(record)]
    send, receive = anyio.create_memory_object_stream[tuple[str, bytes]](64)

    async def events(http: httpx.AsyncClient, url: str) -> None:
        parser = SSEParser()
        async with send, http.stream("GET", url, headers={"accept": "text/event-stream"}) as response:
            async for chunk in response.aiter_bytes():
                for event in parser.feed(chunk):
                    await send.send((event.event, event.data))

    async def next_message() -> bytes:
        with anyio.fail_after(SESSION_S):
            kind, data = await receive.receive()
        assert kind == "message"
        return data

    flags = ("--batch-timeout", "1")
    async with (
        listening(meter_env, *flags, server=server) as (base, _),
        httpx.AsyncClient() as http,
        anyio.create_task_group() as tg,
        receive,
    ):
        tg.start_soon(events, http, f"{base}/sse")
        with anyio.fail_after(SESSION_S):
            kind, endpoint = await receive.receive()
        assert kind == "endpoint"
        url = base + endpoint.decode()

        async def post(body: bytes) -> httpx.Response:
            with anyio.fail_after(SESSION_S):
                return await http.post(url, content=body, headers=HEADERS)

        assert (
            await post(dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}))
        ).status_code == 202
        initialized = answers(await next_message())
        empty = await post(b"")
        deep = await post(b"[" * 100_000 + b"]" * 100_000)
        assert (await post(dumps(call(9, "hold", progress="p9", text="first")))).status_code == 202
        progress = json.loads(await next_message())
        assert (await post(dumps(call(9, "echo", text="second")))).status_code == 202
        [(raw_id, refusal)] = answers(await next_message())
        assert (await post(dumps(call(10, "release")))).status_code == 202
        held, released = answers(await next_message()), answers(await next_message())
        assert (await post(dumps([call(11, "echo", text="dropped"), 5]))).status_code == 202
        junk, timed_out = answers(await next_message()), answers(await next_message())
        tg.cancel_scope.cancel()

    assert initialized[0][1]["result"]["serverInfo"]["name"] == "batch-server"
    assert empty.status_code == 400 and error_of(empty.json()) == -32700
    assert deep.status_code == 400 and error_of(deep.json()) == -32700
    assert progress["params"]["progressToken"] == "p9"
    assert raw_id == b"9" and error_of(refusal) == -32600
    assert [(r, a["result"]) for r, a in held + released] == [
        (b"9", {"held": "first"}),
        (b"10", {"released": 1}),
    ]
    assert [(r, error_of(a)) for r, a in junk] == [(b"null", -32600)]
    assert [(r, error_of(a)) for r, a in timed_out] == [(b"11", -32000)]
    assert b"second" not in record.read_bytes()
    assert calls(db_path) == [
        ("10", "release", "ok", None, None),
        ("11", "echo", "error", -32000, "mcpmeter"),
        ("9", "hold", "ok", None, None),
    ]


# -- any batch -------------------------------------------------------------------------------------

_ids = (
    st.integers(min_value=-(2**53), max_value=2**53)
    | st.text(st.characters(codec="utf-8"), max_size=6)
    | st.floats(allow_nan=False, allow_infinity=False)
)
_junk = st.sampled_from([1, "x", None, True, [], [1], {}, {"jsonrpc": "2.0"}, {"id": True, "method": "m"}])
#: ("request", id), ("junk", value), ("junk-with-id", id) or ("notification", None)
_members = st.lists(
    st.tuples(st.just("request"), _ids)
    | st.tuples(st.just("junk"), _junk)
    | st.tuples(st.just("junk-with-id"), _ids)
    | st.tuples(st.just("notification"), st.none()),
    min_size=1,
    max_size=8,
)


def batch_of(
    members: list[tuple[str, Any]],
) -> tuple[bytes, Counter[tuple[bytes, int | None]], dict[bytes, str]]:
    """The batch of ``members``, the answers it must get (id bytes, error code or None for a
    result), and the text each answered request's echo must carry."""
    parts: list[bytes] = []
    expected: Counter[tuple[bytes, int | None]] = Counter()
    texts: dict[bytes, str] = {}
    seen: set[tuple[str, object]] = set()
    for n, (kind, value) in enumerate(members):
        raw = dumps(value)
        if kind == "request":
            parts.append(dumps(call(0, "echo", text=f"m{n}")).replace(b'"id":0', b'"id":' + raw, 1))
            key = (type(value).__name__, value)  # 1 and 1.0 and "1" are three ids
            expected[raw, -32600 if key in seen else None] += 1
            if key not in seen:
                texts[raw] = f"m{n}"
            seen.add(key)
        elif kind == "junk":
            parts.append(raw)
            expected[b"null", -32600] += 1
        elif kind == "junk-with-id":
            parts.append(b'{"jsonrpc":"2.0","id":' + raw + b',"method":5}')
            expected[raw, -32600] += 1
        else:
            parts.append(b'{"jsonrpc":"2.0","method":"notifications/message"}')
    return b"[" + b",".join(parts) + b"]", expected, texts


def check_any_batch(url: str) -> None:
    """Batches drawn by hypothesis, each POSTed to one session of the listener at ``url``."""
    with httpx.Client(timeout=SESSION_S) as http:
        initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}
        opened = http.post(url, content=dumps(initialize), headers=HEADERS)
        headers = dict(HEADERS, **{"mcp-session-id": opened.headers["mcp-session-id"]})
        http.post(
            url, content=dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), headers=headers
        )

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(members=_members)
        def one_batch(members: list[tuple[str, Any]]) -> None:
            body, expected, texts = batch_of(members)
            response = http.post(url, content=body, headers=headers)
            if not expected:  # notifications alone
                assert response.status_code == 202 and response.content == b""
                return
            only_junk = all(kind.startswith("junk") for kind, _ in members)
            assert response.status_code == (400 if only_junk else 200)
            got = answers(response.content)
            assert (
                Counter((raw_id, a["error"]["code"] if "error" in a else None) for raw_id, a in got)
                == expected
            )
            for raw_id, answer in got:
                if "result" in answer:
                    assert answer["result"] == {"text": texts[raw_id]}
                else:
                    error_of(answer)

        one_batch()


async def test_any_batch_gets_one_answer_per_request_and_per_junk_member_each_with_its_id_as_sent(
    meter_env: dict[str, str],
) -> None:
    # One listener (a shared server, so ids come back as the exact bytes sent) for every
    # example; the examples run in a thread, each request bounded by the client's timeout.
    async with listening(meter_env, "--shared-server", server=BATCH) as (base, _):
        await anyio.to_thread.run_sync(check_any_batch, f"{base}/mcp")
