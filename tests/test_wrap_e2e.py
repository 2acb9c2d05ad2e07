"""End to end: the official MCP SDK client talks to real servers through `mcpmeter wrap`.

Every test runs real subprocesses and a real SQLite store (``MCPMETER_DB``). What the client
gets through the proxy is compared with what it gets from the same server directly; the rows
are compared with the frames seen on the wire, captured by byte-exact tees
(``tests/servers/tee.py``) placed on both sides of the proxy.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import EXAMPLES, MCPMETER, PYTHON, SERVERS, read_rows
from mcp import Client, MCPError, StdioServerParameters, types

pytestmark = pytest.mark.anyio

DEMO = (PYTHON, str(EXAMPLES / "demo_server.py"))
TIME = (PYTHON, "-m", "mcp_server_time", "--local-timezone", "UTC")
SAMPLING = (PYTHON, str(SERVERS / "sampling_server.py"))
TEE = str(SERVERS / "tee.py")

MODES = ["legacy", "2026-07-28"]
PROTOCOL = {"legacy": "2025-11-25", "2026-07-28": "2026-07-28"}
AGENT = types.Implementation(name="e2e-agent", version="9.9.9")
SESSION_S = 60  # one client session, start to finish
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

#: The demo server's tools, each a different kind of call.
DEMO_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("search", {"query": "in"}),
    ("summarize", {"text": "one two three four five six seven eight nine ten", "delay_ms": 50}),
    ("fail", {"reason": "quota exceeded"}),
    ("fetch_report", {"kilobytes": 200}),  # one line well past asyncio's 64 KiB readline limit
]
DEMO_STATUS = {"search": "ok", "summarize": "ok", "fail": "tool_error", "fetch_report": "ok"}


@dataclass
class Call:
    tool: str
    arguments: dict[str, Any]
    meta: dict[str, Any] | None = None


@dataclass
class Outcome:
    """What a client saw in one session: the tool list, then each call's result or error."""

    tools: dict[str, Any]
    results: list[dict[str, Any]]
    server_info: dict[str, Any] | None = None
    protocol_version: str | None = None


def wrapped(
    env: dict[str, str], server: Sequence[str], *options: str, tee_dir: Path | None = None
) -> StdioServerParameters:
    """`mcpmeter wrap OPTIONS -- SERVER`, optionally with a tee on each side of the proxy."""
    if tee_dir is None:
        return StdioServerParameters(command=MCPMETER, args=["wrap", *options, "--", *server], env=env)
    inner = [PYTHON, TEE, str(tee_dir / "inner"), "--", *server]
    return StdioServerParameters(
        command=PYTHON,
        args=[TEE, str(tee_dir / "outer"), "--", MCPMETER, "wrap", *options, "--", *inner],
        env=env,
    )


def direct(server: Sequence[str]) -> StdioServerParameters:
    return StdioServerParameters(command=server[0], args=list(server[1:]))


async def run_session(
    params: StdioServerParameters, mode: str, calls: Sequence[Call], **client: Any
) -> Outcome:
    """tools/list, then each call in turn; the client and the processes it started are gone after."""
    with anyio.fail_after(SESSION_S):
        async with Client(params, mode=mode, client_info=AGENT, **client) as session:
            tools = (await session.list_tools()).model_dump()
            results: list[dict[str, Any]] = []
            for call in calls:
                try:
                    result = await session.call_tool(call.tool, call.arguments, meta=call.meta)
                    results.append(result.model_dump())
                except MCPError as exc:
                    results.append({"error": {"code": exc.code, "message": exc.message}})
            info = session.server_info
            return Outcome(
                tools=tools,
                results=results,
                server_info=info.model_dump() if info is not None else None,
                protocol_version=session.protocol_version,
            )


def demo_calls() -> list[Call]:
    return [Call(tool, arguments) for tool, arguments in DEMO_CALLS]


def frames(data: bytes) -> list[bytes]:
    """The newline-delimited frames of a captured stream (line endings dropped)."""
    lines = data.split(b"\n")
    assert lines[-1] == b"", "a captured stream ended inside a frame"
    return [line.removesuffix(b"\r") for line in lines[:-1]]


def frame_sizes(data: bytes) -> dict[tuple[str, str], int]:
    """(kind, id) -> size on the wire, for each request ("request") and response ("response")."""
    sizes: dict[tuple[str, str], int] = {}
    for line in frames(data):
        message = json.loads(line)
        kind = "request" if "method" in message else "response"
        if "id" in message:
            sizes[kind, str(message["id"])] = len(line)
    return sizes


def assert_tenant(
    rows: list[dict[str, Any]], project: str | None, agent: str | None, tags: dict[str, str]
) -> None:
    assert rows
    for row in rows:
        assert row["project_id"] == project
        assert row["agent_id"] == agent
        assert json.loads(row["tags"]) == tags


# -- what the client gets ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_tool_list_and_call_results_through_mcpmeter_are_identical_to_calling_the_demo_server_directly(
    mode: str, meter_env: dict[str, str]
) -> None:
    through = await run_session(wrapped(meter_env, DEMO), mode, demo_calls())
    alone = await run_session(direct(DEMO), mode, demo_calls())

    assert through.tools == alone.tools
    assert [t["name"] for t in through.tools["tools"]] == ["search", "summarize", "fail", "fetch_report"]
    assert through.results == alone.results
    assert through.server_info == alone.server_info
    assert through.protocol_version == alone.protocol_version == PROTOCOL[mode]


@pytest.mark.parametrize("mode", MODES)
async def test_the_sdk_client_and_the_server_exchange_the_same_bytes_with_mcpmeter_between_them(
    mode: str, meter_env: dict[str, str], tmp_path: Path
) -> None:
    await run_session(wrapped(meter_env, DEMO, tee_dir=tmp_path), mode, demo_calls())

    client_sent = (tmp_path / "outer" / "c2s.bin").read_bytes()
    client_got = (tmp_path / "outer" / "s2c.bin").read_bytes()
    assert client_sent == (tmp_path / "inner" / "c2s.bin").read_bytes()
    assert client_got == (tmp_path / "inner" / "s2c.bin").read_bytes()
    assert len(frames(client_sent)) >= len(DEMO_CALLS) + 1
    assert len(client_got) > 200 * 1024


# -- what the store gets -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_every_request_of_an_sdk_session_becomes_one_row_with_method_tool_status_and_peers(
    mode: str, meter_env: dict[str, str], db_path: Path
) -> None:
    before = time.time()
    outcome = await run_session(wrapped(meter_env, DEMO), mode, demo_calls())
    after = time.time()

    rows = read_rows(db_path)
    handshake = ["initialize"] if mode == "legacy" else []
    assert [r["method"] for r in rows] == [*handshake, "tools/list", *["tools/call"] * len(DEMO_CALLS)]
    calls = [r for r in rows if r["method"] == "tools/call"]
    assert [r["tool"] for r in calls] == [tool for tool, _ in DEMO_CALLS]
    assert [r["status"] for r in calls] == [DEMO_STATUS[tool] for tool, _ in DEMO_CALLS]
    assert all(r["status"] == "ok" for r in rows if r["method"] != "tools/call")
    assert all(r["tool"] is None for r in rows if r["method"] != "tools/call")

    if mode == "legacy":
        assert outcome.server_info is not None
        server_version = outcome.server_info["version"]
    else:
        server_version = outcome.results[0]["meta"]["io.modelcontextprotocol/serverInfo"]["version"]
    for row in rows:
        assert row["direction"] == "c2s"
        assert row["transport"] == "stdio" and row["upstream"] == "stdio"
        assert row["server"] == "demo-server"
        assert row["server_version"] == server_version
        assert (row["client_name"], row["client_version"]) == ("e2e-agent", "9.9.9")
        assert row["protocol_version"] == PROTOCOL[mode]
        assert row["error_code"] is None and row["error_message"] is None
        assert row["request_id"] is None and row["trace_id"] is None
        assert row["cost_usd"] is None
        assert isinstance(row["latency_ms"], float) and row["latency_ms"] > 0
        assert row["request_bytes"] > 0 and row["response_bytes"] > 0
        assert ISO_UTC.match(str(row["ts"]))
        ts = datetime.fromisoformat(str(row["ts"]).replace("Z", "+00:00")).timestamp()
        assert before <= ts <= after
    assert [r["ts"] for r in rows] == sorted(str(r["ts"]) for r in rows)
    assert len({r["jsonrpc_id"] for r in rows}) == len(rows)
    by_tool = {r["tool"]: r for r in calls}
    assert by_tool["summarize"]["latency_ms"] >= 50
    assert by_tool["fetch_report"]["response_bytes"] > 200 * 1024


@pytest.mark.parametrize("mode", MODES)
async def test_request_and_response_bytes_are_the_exact_sizes_of_the_frames_on_the_wire(
    mode: str, meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    await run_session(wrapped(meter_env, DEMO, tee_dir=tmp_path), mode, demo_calls())

    sent = frame_sizes((tmp_path / "outer" / "c2s.bin").read_bytes())
    got = frame_sizes((tmp_path / "outer" / "s2c.bin").read_bytes())
    rows = read_rows(db_path)
    assert len(rows) == len([key for key in sent if key[0] == "request"])
    for row in rows:
        assert row["request_bytes"] == sent["request", row["jsonrpc_id"]], row["method"]
        assert row["response_bytes"] == got["response", row["jsonrpc_id"]], row["method"]
    assert sum(r["request_bytes"] for r in rows) == sum(
        n for (kind, _), n in sent.items() if kind == "request"
    )
    assert sum(r["response_bytes"] for r in rows) == sum(
        n for (kind, _), n in got.items() if kind == "response"
    )


async def test_the_2026_07_28_envelope_gives_client_and_server_info_without_an_initialize(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    await run_session(wrapped(meter_env, SAMPLING, tee_dir=tmp_path), "2026-07-28", [])

    sent = frames((tmp_path / "outer" / "c2s.bin").read_bytes())
    assert not any(json.loads(line).get("method") == "initialize" for line in sent)
    (row,) = read_rows(db_path)
    assert row["method"] == "tools/list"
    assert (row["client_name"], row["client_version"]) == ("e2e-agent", "9.9.9")
    assert (row["server"], row["server_version"]) == ("sampling-server", "0.4.2")
    assert row["protocol_version"] == "2026-07-28"


async def test_a_sampling_request_from_the_server_is_recorded_as_s2c_and_answered_through_mcpmeter(
    meter_env: dict[str, str], db_path: Path
) -> None:
    asked: list[str] = []

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)  # type: ignore[union-attr]
        text = types.TextContent(type="text", text="forty-two")
        return types.CreateMessageResult(role="assistant", content=text, model="test-model")

    async def roots(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri="file:///work", name="work")])

    calls = [Call("ask_model", {"question": "what is six times seven?"}), Call("list_roots", {})]
    outcome = await run_session(
        wrapped(meter_env, SAMPLING), "legacy", calls, sampling_callback=sampling, list_roots_callback=roots
    )

    assert asked == ["what is six times seven?"]
    assert outcome.results[0]["content"][0]["text"] == "forty-two"
    assert outcome.results[1]["structured_content"] == {"result": ["file:///work"]}
    rows = read_rows(db_path)
    s2c = [r for r in rows if r["direction"] == "s2c"]
    assert [r["method"] for r in s2c] == ["sampling/createMessage", "roots/list"]
    for row in s2c:
        assert row["status"] == "ok"
        assert row["server"] == "sampling-server"
        assert row["request_bytes"] > 0 and row["response_bytes"] > 0
        assert row["latency_ms"] > 0
    calls_rows = [r for r in rows if r["method"] == "tools/call"]
    assert [(r["tool"], r["status"], r["direction"]) for r in calls_rows] == [
        ("ask_model", "ok", "c2s"),
        ("list_roots", "ok", "c2s"),
    ]
    # The server's question was asked during the tool call, and answered before it ended.
    # (Row order is settle order, which two threads may meter either way round.)
    question, call = s2c[0], calls_rows[0]
    assert str(call["ts"]) <= str(question["ts"])
    assert float(question["latency_ms"]) < float(call["latency_ms"])  # type: ignore[arg-type]


# -- tenant tags ---------------------------------------------------------------------------


async def test_project_agent_session_and_tags_given_as_flags_are_on_every_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    flags = ["--project", "acme", "--agent", "triage-bot", "--session", "s-42"]
    flags += ["--tag", "team=growth", "--tag", "env=prod"]
    await run_session(wrapped(meter_env, DEMO, *flags), "legacy", demo_calls()[:1])

    rows = read_rows(db_path)
    assert_tenant(rows, "acme", "triage-bot", {"team": "growth", "env": "prod"})
    assert {r["session_id"] for r in rows} == {"s-42"}


async def test_project_agent_session_and_tags_given_as_env_vars_are_on_every_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    meter_env |= {
        "MCPMETER_PROJECT_ID": "acme",
        "MCPMETER_AGENT_ID": "triage-bot",
        "MCPMETER_SESSION_ID": "s-42",
        "MCPMETER_TAGS": "team=growth,env=prod",
    }
    await run_session(wrapped(meter_env, DEMO), "2026-07-28", demo_calls()[:1])

    rows = read_rows(db_path)
    assert_tenant(rows, "acme", "triage-bot", {"team": "growth", "env": "prod"})
    assert {r["session_id"] for r in rows} == {"s-42"}


async def test_mcpmeter_agent_name_is_an_alias_for_mcpmeter_agent_id(
    meter_env: dict[str, str], db_path: Path
) -> None:
    meter_env["MCPMETER_AGENT_NAME"] = "named-bot"
    await run_session(wrapped(meter_env, DEMO), "legacy", [])

    assert {r["agent_id"] for r in read_rows(db_path)} == {"named-bot"}


async def test_flags_win_over_env_vars(meter_env: dict[str, str], db_path: Path) -> None:
    meter_env |= {
        "MCPMETER_PROJECT_ID": "env-project",
        "MCPMETER_AGENT_ID": "env-agent",
        "MCPMETER_AGENT_NAME": "env-agent-name",
        "MCPMETER_SESSION_ID": "env-session",
        "MCPMETER_TAGS": "team=env-team",
    }
    flags = ["--project", "flag-project", "--agent", "flag-agent", "--session", "flag-session"]
    await run_session(wrapped(meter_env, DEMO, *flags, "--tag", "team=flag-team"), "legacy", [])

    rows = read_rows(db_path)
    assert rows
    for row in rows:
        assert (row["project_id"], row["agent_id"], row["session_id"]) == (
            "flag-project",
            "flag-agent",
            "flag-session",
        )
        assert json.loads(row["tags"])["team"] == "flag-team"


async def test_without_a_session_id_each_wrap_process_gets_its_own_uuid_shared_by_all_its_rows(
    meter_env: dict[str, str], db_path: Path
) -> None:
    await run_session(wrapped(meter_env, DEMO), "legacy", demo_calls())
    first = read_rows(db_path)
    await run_session(wrapped(meter_env, DEMO), "legacy", demo_calls()[:1])
    second = read_rows(db_path)[len(first) :]

    sessions = []
    for rows in (first, second):
        ids = {r["session_id"] for r in rows}
        assert len(ids) == 1, ids
        (session_id,) = ids
        assert str(uuid.UUID(str(session_id))) == session_id
        sessions.append(session_id)
    assert sessions[0] != sessions[1]
    assert_tenant(first + second, None, None, {})


# -- the join key --------------------------------------------------------------------------


async def test_the_join_key_and_trace_id_are_read_from_meta_first_found_wins(
    meter_env: dict[str, str], db_path: Path
) -> None:
    metas: list[tuple[dict[str, Any], str | None]] = [
        (
            {
                "dev.mcpmeter/requestId": "llm-a",
                "requestId": "llm-b",
                "request_id": "llm-c",
                "baggage": "request_id=llm-d",
            },
            "llm-a",
        ),
        ({"requestId": "llm-b", "request_id": "llm-c", "baggage": "request_id=llm-d"}, "llm-b"),
        ({"request_id": "llm-c", "baggage": "request_id=llm-d"}, "llm-c"),
        ({"baggage": "tenant=acme,request_id=llm%20d;ttl=1,user=x"}, "llm d"),
        ({"baggage": "tenant=acme"}, None),
        ({}, None),
    ]
    calls = [Call("search", {"query": "in"}, meta | {"traceparent": TRACEPARENT}) for meta, _ in metas]
    calls.append(Call("search", {"query": "in"}, {"requestId": "untraced"}))
    await run_session(wrapped(meter_env, DEMO), "legacy", calls)

    rows = [r for r in read_rows(db_path) if r["method"] == "tools/call"]
    assert [r["request_id"] for r in rows] == [expected for _, expected in metas] + ["untraced"]
    assert [r["trace_id"] for r in rows] == ["4bf92f3577b34da6a3ce929d0e0e4736"] * len(metas) + [None]


# -- a third-party server ------------------------------------------------------------------


def time_calls() -> list[Call]:
    return [
        Call("convert_time", {"source_timezone": "UTC", "time": "16:30", "target_timezone": "Asia/Tokyo"}),
        Call("convert_time", {"source_timezone": "Mars/Olympus", "time": "16:30", "target_timezone": "UTC"}),
        Call("no_such_tool", {}),
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_the_third_party_time_server_answers_the_same_through_mcpmeter_and_is_recorded_by_its_name(
    mode: str, meter_env: dict[str, str], db_path: Path
) -> None:
    through = await run_session(wrapped(meter_env, TIME), mode, time_calls())
    alone = await run_session(direct(TIME), mode, time_calls())

    assert through.tools == alone.tools
    assert through.results == alone.results
    assert through.results[0]["is_error"] is False
    assert through.results[1]["is_error"] is True
    assert through.results[2]["error"]["code"] == -32602

    rows = read_rows(db_path)
    assert {r["server"] for r in rows} == {"mcp-time"}
    assert {r["server_version"] for r in rows} == {version("mcp-server-time")}
    assert {r["protocol_version"] for r in rows} == {PROTOCOL[mode]}
    calls = [r for r in rows if r["method"] == "tools/call"]
    assert [(r["tool"], r["status"]) for r in calls] == [
        ("convert_time", "ok"),
        ("convert_time", "tool_error"),
        ("no_such_tool", "error"),
    ]
    assert calls[2]["error_code"] == -32602
    assert calls[2]["error_message"] == through.results[2]["error"]["message"]
    assert calls[2]["response_bytes"] > 0


async def test_a_third_party_server_that_refuses_to_start_fails_the_same_through_mcpmeter(
    meter_env: dict[str, str], db_path: Path
) -> None:
    server = [PYTHON, "-m", "mcp_server_time", "--local-timezone", "Mars/Olympus"]
    with anyio.fail_after(SESSION_S):
        alone = await anyio.run_process(server, env=meter_env, check=False)
        through = await anyio.run_process([MCPMETER, "wrap", "--", *server], env=meter_env, check=False)

    assert alone.returncode != 0
    assert (through.returncode, through.stdout, through.stderr) == (alone.returncode, b"", alone.stderr)
    assert b"Mars/Olympus" in through.stderr
    assert not await anyio.Path(db_path).exists() or read_rows(db_path) == []
