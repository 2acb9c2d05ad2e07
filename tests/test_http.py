"""HTTP both ways: `wrap --url` (stdio client, HTTP server) and `wrap --listen` (HTTP clients).

Real processes and real sockets on 127.0.0.1: the official SDK client and SDK servers (the
demo server over stdio, streamable HTTP and HTTP+SSE), `@modelcontextprotocol/server-everything`
installed with npm, and raw HTTP where a test needs every byte. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import EXAMPLES, MCPMETER, PYTHON, ROOT, SERVERS, eventually_async, read_rows, store_locked
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp import Client, StdioServerParameters, types
from mcp.client.sse import sse_client

from mcpmeter.protocol.rpc import member_spans, splice
from mcpmeter.protocol.sse import Event, SSEParser, encode_event

pytestmark = pytest.mark.anyio

DEMO = [PYTHON, str(EXAMPLES / "demo_server.py")]
RAW = [PYTHON, str(SERVERS / "raw_server.py")]
DEMO_HTTP = str(SERVERS / "demo_http.py")
START_S = 30  # a process up and listening
SESSION_S = 60  # one client session, start to finish
EXIT_S = 20  # a process gone after it was told to go
LISTENING = re.compile(rb"listening on http://([^/\s]+)/mcp")
EVERYTHING = "@modelcontextprotocol/server-everything@2026.8.31"
EVERYTHING_DIR = ROOT / ".cache" / "server-everything"
MODES = ["legacy", "2026-07-28"]
PROTOCOL = {"legacy": "2025-11-25", "2026-07-28": "2026-07-28"}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INIT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "raw-http", "version": "1.0"},
}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw-http", "version": "1.0"},
}
DEMO_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("search", {"query": "in"}),
    ("summarize", {"text": "one two three four five six seven eight nine ten", "delay_ms": 20}),
    ("fail", {"reason": "quota exceeded"}),
    ("fetch_report", {"kilobytes": 200}),
]
DEMO_STATUS = ["ok", "ok", "tool_error", "ok"]


def dumps(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


# -- processes --------------------------------------------------------------------------------


@dataclass
class Running:
    """A subprocess whose stderr is collected in the background."""

    process: Process
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return self.process.pid


#: Runs argv with the open-file limit given (soft, hard), in the same process (exec).
_WITH_NOFILE = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


async def _collect(stream: BufferedByteReceiveStream, into: bytearray) -> None:
    while True:  # receive() hands out what receive_until left in the buffer first
        try:
            into += await stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return


async def _stop(process: Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(EXIT_S):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


@asynccontextmanager
async def listening(
    env: dict[str, str],
    *options: str,
    server: Sequence[str] = DEMO,
    nofile: tuple[int, int] | None = None,
) -> AsyncIterator[tuple[str, Running]]:
    """`mcpmeter wrap --listen 127.0.0.1:0 OPTIONS [-- SERVER]`, under the open-file limit
    ``nofile`` (soft, hard) if given; yields its base URL once it listens. Its stderr is
    collected until it has exited (SIGTERM at the end) and must hold no traceback."""
    argv = [MCPMETER, "wrap", "--listen", "127.0.0.1:0", *options]
    if "--url" not in options:
        argv += ["--", *server]
    if nofile is not None:
        argv = [PYTHON, "-c", _WITH_NOFILE, str(nofile[0]), str(nofile[1]), *argv]
    async with await anyio.open_process(argv, env=env, stdin=subprocess.DEVNULL) as process:
        assert process.stderr is not None
        stderr = BufferedByteReceiveStream(process.stderr)
        running = Running(process)
        try:
            with anyio.fail_after(START_S):
                line = await stderr.receive_until(b"\n", 1 << 16)
            match = LISTENING.search(line)
            assert match, line
            async with anyio.create_task_group() as tg:
                tg.start_soon(_collect, stderr, running.stderr)
                yield f"http://{match.group(1).decode()}", running
                await _stop(process)
        finally:
            await _stop(process)
    assert b"Traceback" not in running.stderr, running.stderr.decode()


@asynccontextmanager
async def demo_over_http(transport: str, *flags: str) -> AsyncIterator[str]:
    """The demo server over HTTP (tests/servers/demo_http.py); yields its endpoint URL."""
    argv = [PYTHON, DEMO_HTTP, transport, *flags]
    async with await anyio.open_process(argv, stderr=None) as process:
        assert process.stdout is not None
        try:
            with anyio.fail_after(START_S):
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1024)
            port = int(line.split()[1])
            yield f"http://127.0.0.1:{port}/{'sse' if transport == 'sse' else 'mcp'}"
        finally:
            await _stop(process)


def wrap_url(env: dict[str, str], url: str, *options: str) -> StdioServerParameters:
    return StdioServerParameters(command=MCPMETER, args=["wrap", "--url", url, *options], env=env)


# -- clients ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    tools: list[dict[str, Any]]
    results: list[dict[str, Any]]
    server_info: dict[str, Any] | None
    protocol_version: str | None


async def sdk_session(target: Any, mode: str, calls: Sequence[tuple[str, dict[str, Any]]]) -> Outcome:
    with anyio.fail_after(SESSION_S):
        async with Client(target, mode=mode) as client:
            tools = [tool.model_dump() for tool in (await client.list_tools()).tools]
            results = [(await client.call_tool(name, arguments)).model_dump() for name, arguments in calls]
            info = client.server_info
            return Outcome(tools, results, info.model_dump() if info else None, client.protocol_version)


SAMPLING = [PYTHON, str(SERVERS / "sampling_server.py")]
SAMPLING_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("ask_model", {"question": "what is six times seven?"}),
    ("list_roots", {}),
]


async def sampling_session(target: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """A legacy session whose tools ask the client (sampling, roots); returns results and questions."""
    asked: list[str] = []

    async def sampling(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)  # type: ignore[union-attr]
        text = types.TextContent(type="text", text="forty-two")
        return types.CreateMessageResult(role="assistant", content=text, model="test-model")

    async def roots(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri="file:///work", name="work")])

    with anyio.fail_after(SESSION_S):
        async with Client(
            target, mode="legacy", sampling_callback=sampling, list_roots_callback=roots
        ) as client:
            results = [(await client.call_tool(name, args)).model_dump() for name, args in SAMPLING_CALLS]
    return results, asked


def assert_sampling_rows(rows: list[dict[str, Any]], transport: str, upstream: str) -> None:
    s2c = [r for r in rows if r["direction"] == "s2c"]
    assert [(r["method"], r["status"]) for r in s2c] == [
        ("sampling/createMessage", "ok"),
        ("roots/list", "ok"),
    ]
    calls = [r for r in rows if r["method"] == "tools/call"]
    assert [(r["tool"], r["status"]) for r in calls] == [("ask_model", "ok"), ("list_roots", "ok")]
    assert {(r["transport"], r["upstream"], r["server"]) for r in rows} == {
        (transport, upstream, "sampling-server")
    }
    assert all(r["response_bytes"] > 0 for r in rows)


class RawSession:
    """A streamable-HTTP session driven by hand with httpx: every header and byte in view."""

    def __init__(self, http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> None:
        self.http = http
        self.url = url
        self.headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        self.headers.update(headers or {})
        self.session_id: str | None = None

    async def post(self, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        all_headers = dict(self.headers)
        if self.session_id is not None:
            all_headers["mcp-session-id"] = self.session_id
        all_headers.update(headers or {})
        with anyio.fail_after(SESSION_S):
            return await self.http.post(self.url, content=body, headers=all_headers)

    async def initialize(self) -> dict[str, Any]:
        response = await self.post(dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT}))
        assert response.status_code == 200, response.text
        self.session_id = response.headers["mcp-session-id"]
        initialized = await self.post(dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        assert initialized.status_code == 202
        result: dict[str, Any] = response.json()
        return result

    async def call(
        self, rpc_id: object, name: str, headers: dict[str, str] | None = None, **args: Any
    ) -> httpx.Response:
        body = {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": "tools/call",
            "params": {"name": name, "arguments": args},
        }
        return await self.post(dumps(body), headers)

    async def close(self) -> None:
        headers = {"mcp-session-id": self.session_id or ""}
        with anyio.fail_after(SESSION_S):
            await self.http.delete(self.url, headers=headers)


def children_of(pid: int) -> set[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


# -- wrap --url ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_the_sdk_client_through_wrap_url_gets_what_it_gets_from_a_streamable_http_server_directly(
    mode: str, meter_env: dict[str, str], db_path: Path
) -> None:
    async with demo_over_http("streamable-http") as url:
        through = await sdk_session(wrap_url(meter_env, url), mode, DEMO_CALLS)
        alone = await sdk_session(url, mode, DEMO_CALLS)

    assert through == alone
    assert through.protocol_version == PROTOCOL[mode]
    rows = read_rows(db_path)
    handshake = ["initialize"] if mode == "legacy" else []
    assert [r["method"] for r in rows] == [*handshake, "tools/list", *["tools/call"] * len(DEMO_CALLS)]
    assert [r["status"] for r in rows if r["method"] == "tools/call"] == DEMO_STATUS
    for row in rows:
        assert (row["transport"], row["upstream"], row["direction"]) == ("stdio", "http", "c2s")
        assert row["server"] == "demo-server"
        assert row["protocol_version"] == PROTOCOL[mode]
        assert row["request_bytes"] > 0 and row["response_bytes"] > 0
    assert len({r["session_id"] for r in rows}) == 1
    assert max(r["response_bytes"] for r in rows) > 200 * 1024


@pytest.mark.parametrize("transport", ["auto", "sse"])
async def test_wrap_url_reaches_a_server_on_the_older_http_sse_transport(
    transport: str, meter_env: dict[str, str], db_path: Path
) -> None:
    async with demo_over_http("sse") as url:
        through = await sdk_session(wrap_url(meter_env, url, "--transport", transport), "legacy", DEMO_CALLS)
        alone = await sdk_session(sse_client(url), "legacy", DEMO_CALLS)

    assert through == alone
    rows = read_rows(db_path)
    assert [r["method"] for r in rows] == ["initialize", "tools/list", *["tools/call"] * len(DEMO_CALLS)]
    assert {(r["transport"], r["upstream"], r["server"]) for r in rows} == {("stdio", "sse", "demo-server")}
    assert [r["status"] for r in rows if r["method"] == "tools/call"] == DEMO_STATUS


async def test_a_remote_server_asking_its_client_for_sampling_and_roots_is_answered_through_wrap_url(
    meter_env: dict[str, str], db_path: Path
) -> None:
    async with demo_over_http("streamable-http", "--sampling") as url:
        through, asked = await sampling_session(wrap_url(meter_env, url))
        alone, _ = await sampling_session(url)

    assert through == alone
    assert asked == ["what is six times seven?"]
    assert through[0]["content"][0]["text"] == "forty-two"
    assert_sampling_rows(read_rows(db_path), "stdio", "http")


async def test_sigterm_to_wrap_url_lets_the_call_in_flight_finish_and_writes_every_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    init = {**INIT, "capabilities": {"sampling": {}}}
    async with demo_over_http("streamable-http", "--sampling") as url:
        argv = [MCPMETER, "wrap", "--url", url]
        async with await anyio.open_process(argv, env=meter_env) as process:
            assert process.stdin is not None and process.stdout is not None
            stdin, out = process.stdin, BufferedByteReceiveStream(process.stdout)

            async def send(message: dict[str, Any]) -> None:
                await stdin.send(dumps(message) + b"\n")

            with anyio.fail_after(SESSION_S):
                await send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
                await out.receive_until(b"\n", 1 << 20)
                await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
                ask = {"name": "ask_model", "arguments": {"question": "six times seven?"}}
                await send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": ask})
                question = json.loads(await out.receive_until(b"\n", 1 << 20))
                assert question["method"] == "sampling/createMessage"
                process.send_signal(signal.SIGTERM)  # the call is in flight: the server waits for us
                answer = {"role": "assistant", "content": {"type": "text", "text": "42"}, "model": "m"}
                await send({"jsonrpc": "2.0", "id": question["id"], "result": answer})
                result = json.loads(await out.receive_until(b"\n", 1 << 20))
                assert await process.wait() == 0

    assert result["id"] == 2 and result["result"]["content"][0]["text"] == "42"
    rows = read_rows(db_path)
    assert [(r["method"], r["direction"], r["status"]) for r in rows] == [
        ("initialize", "c2s", "ok"),
        ("sampling/createMessage", "s2c", "ok"),
        ("tools/call", "c2s", "ok"),
    ]


async def test_wrap_url_writes_each_answer_as_the_exact_bytes_of_the_servers_json_body(
    meter_env: dict[str, str], db_path: Path
) -> None:
    request = dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT})
    async with demo_over_http("streamable-http", "--json-response", "--stateless") as url:
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        async with httpx.AsyncClient() as http:
            with anyio.fail_after(SESSION_S):
                direct = (await http.post(url, content=request, headers=headers)).content
        argv = [MCPMETER, "wrap", "--url", url]
        async with await anyio.open_process(argv, env=meter_env) as process:
            assert process.stdin is not None and process.stdout is not None
            with anyio.fail_after(SESSION_S):
                await process.stdin.send(request + b"\n")
                line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1 << 20)
                await process.stdin.aclose()
                assert await process.wait() == 0

    assert line == direct
    (row,) = read_rows(db_path)
    assert (row["request_bytes"], row["response_bytes"]) == (len(request), len(direct))


async def test_a_request_the_server_cannot_answer_gets_a_json_rpc_error_from_mcpmeter(
    meter_env: dict[str, str], db_path: Path
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    request = dumps({"jsonrpc": "2.0", "id": "r-1", "method": "tools/call", "params": {"name": "search"}})
    argv = [MCPMETER, "wrap", "--url", url, "--transport", "streamable-http"]
    async with await anyio.open_process(argv, env=meter_env) as process:
        assert process.stdin is not None and process.stdout is not None
        with anyio.fail_after(SESSION_S):
            await process.stdin.send(request + b"\n")
            answer = json.loads(await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 1 << 16))
            await process.stdin.aclose()
            assert await process.wait() == 0

    assert answer["id"] == "r-1"
    assert answer["error"]["code"] == -32000
    assert answer["error"]["message"].startswith("mcpmeter: cannot reach the server")
    (row,) = read_rows(db_path)
    assert (row["status"], row["error_code"], row["tool"]) == ("error", -32000, "search")


async def test_headers_are_sent_with_env_vars_expanded_and_an_unset_one_is_a_usage_error(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    listen_env = dict(meter_env, MCPMETER_DB=str(tmp_path / "listen.db"))
    async with listening(listen_env, "--auth-token", "s3cr3t") as (base, _):
        meter_env["MCP_TOKEN"] = "s3cr3t"
        header = "Authorization: Bearer ${MCP_TOKEN}"
        through = await sdk_session(
            wrap_url(meter_env, f"{base}/mcp", "--header", header), "legacy", DEMO_CALLS[:1]
        )
        assert through.results[0]["content"][0]["text"] == "invoices"

    del meter_env["MCP_TOKEN"]
    argv = [MCPMETER, "wrap", "--url", "http://127.0.0.1:9/mcp", "--header", header]
    with anyio.fail_after(EXIT_S):
        done = await anyio.run_process(argv, env=meter_env, check=False)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "mcpmeter: wrap: --header Authorization refers to ${MCP_TOKEN}, which is not set"
    ]


def _install_everything() -> Path:
    """@modelcontextprotocol/server-everything, installed once into .cache/ (gitignored)."""
    entry = (
        EVERYTHING_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
    )
    if not entry.exists():
        npm = shutil.which("npm")
        assert npm is not None
        EVERYTHING_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(EVERYTHING_DIR), EVERYTHING],
            check=True,
            timeout=600,
            capture_output=True,
        )
    return entry


@pytest.mark.skipif(
    shutil.which("npm") is None or shutil.which("node") is None, reason="npm and node are not installed"
)
async def test_wrap_url_meters_the_reference_everything_server_in_streamable_http_mode(
    meter_env: dict[str, str], db_path: Path
) -> None:
    entry = await anyio.to_thread.run_sync(_install_everything)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    node = shutil.which("node")
    assert node is not None
    env = dict(os.environ, PORT=str(port))
    calls = [("echo", {"message": "through mcpmeter"}), ("get-sum", {"a": 2, "b": 40})]
    argv = [node, str(entry), "streamableHttp"]
    async with await anyio.open_process(argv, env=env, stdout=subprocess.DEVNULL) as server:
        assert server.stderr is not None
        try:
            stderr = BufferedByteReceiveStream(server.stderr)
            with anyio.fail_after(START_S):
                await stderr.receive_until(b"listening on port", 1 << 16)
            url = f"http://127.0.0.1:{port}/mcp"
            through = await sdk_session(wrap_url(meter_env, url), "legacy", calls)
            alone = await sdk_session(url, "legacy", calls)
        finally:
            await _stop(server)

    assert through.results == alone.results
    assert [t["name"] for t in through.tools] == [t["name"] for t in alone.tools]
    assert through.results[1]["content"][0]["text"] == "The sum of 2 and 40 is 42."
    rows = read_rows(db_path)
    assert [r["method"] for r in rows] == ["initialize", "tools/list", "tools/call", "tools/call"]
    assert [r["tool"] for r in rows[2:]] == ["echo", "get-sum"]
    for row in rows:
        assert (row["status"], row["transport"], row["upstream"]) == ("ok", "stdio", "http")
        assert row["server"] == rows[0]["server"] != "127.0.0.1"
        assert row["response_bytes"] > 0


# -- wrap --listen --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_the_sdk_client_over_streamable_http_through_listen_gets_what_the_stdio_server_gives_directly(
    mode: str, meter_env: dict[str, str], db_path: Path
) -> None:
    async with listening(meter_env) as (base, _):
        through = await sdk_session(f"{base}/mcp", mode, DEMO_CALLS)
    alone = await sdk_session(StdioServerParameters(command=DEMO[0], args=DEMO[1:]), mode, DEMO_CALLS)

    assert through == alone
    rows = read_rows(db_path)
    handshake = ["initialize"] if mode == "legacy" else []
    assert [r["method"] for r in rows] == [*handshake, "tools/list", *["tools/call"] * len(DEMO_CALLS)]
    assert [r["status"] for r in rows if r["method"] == "tools/call"] == DEMO_STATUS
    for row in rows:
        assert (row["transport"], row["upstream"], row["server"]) == ("http", "stdio", "demo-server")
        assert row["protocol_version"] == PROTOCOL[mode]
        assert row["client_name"] == "mcp"
    assert len({r["session_id"] for r in rows}) == 1


async def test_the_sdk_client_over_the_older_sse_transport_through_listen_gets_what_the_stdio_server_gives(
    meter_env: dict[str, str], db_path: Path
) -> None:
    async with listening(meter_env) as (base, _):
        through = await sdk_session(sse_client(f"{base}/sse"), "legacy", DEMO_CALLS)
    alone = await sdk_session(StdioServerParameters(command=DEMO[0], args=DEMO[1:]), "legacy", DEMO_CALLS)

    assert through == alone
    rows = read_rows(db_path)
    assert [r["method"] for r in rows] == ["initialize", "tools/list", *["tools/call"] * len(DEMO_CALLS)]
    assert {(r["transport"], r["upstream"]) for r in rows} == {("sse", "stdio")}
    assert [r["status"] for r in rows if r["method"] == "tools/call"] == DEMO_STATUS


@pytest.mark.parametrize("mode", MODES)
async def test_listen_in_front_of_a_remote_server_gives_the_sdk_client_what_the_server_gives_directly(
    mode: str, meter_env: dict[str, str], db_path: Path
) -> None:
    async with demo_over_http("streamable-http") as url:
        async with listening(meter_env, "--url", url) as (base, _):
            through = await sdk_session(f"{base}/mcp", mode, DEMO_CALLS)
        alone = await sdk_session(url, mode, DEMO_CALLS)

    assert through == alone
    rows = read_rows(db_path)
    handshake = ["initialize"] if mode == "legacy" else []
    assert [r["method"] for r in rows] == [*handshake, "tools/list", *["tools/call"] * len(DEMO_CALLS)]
    assert {(r["transport"], r["upstream"], r["server"]) for r in rows} == {("http", "http", "demo-server")}
    assert [r["status"] for r in rows if r["method"] == "tools/call"] == DEMO_STATUS


async def test_frames_of_many_megabytes_cross_listen_and_url_both_ways(
    meter_env: dict[str, str], db_path: Path
) -> None:
    text = "x" * (6 << 20)  # past the 4 MiB body caps of common HTTP stacks
    async with listening(meter_env, server=RAW) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        echoed = await session.call(1, "echo", text=text)
        big = dumps(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": text}},
            }
        )
        await session.close()
        async with demo_over_http("streamable-http") as url:
            argv = [MCPMETER, "wrap", "--url", url]
            async with await anyio.open_process(argv, env=meter_env) as process:
                assert process.stdin is not None and process.stdout is not None
                out = BufferedByteReceiveStream(process.stdout)
                with anyio.fail_after(SESSION_S):
                    for message in (
                        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT},
                        {"jsonrpc": "2.0", "method": "notifications/initialized"},
                        {
                            "jsonrpc": "2.0",
                            "id": 2,
                            "method": "tools/call",
                            "params": {"name": "fetch_report", "arguments": {"kilobytes": 6 * 1024}},
                        },
                    ):
                        await process.stdin.send(dumps(message) + b"\n")
                    await out.receive_until(b"\n", 1 << 20)
                    report = await out.receive_until(b"\n", 64 << 20)
                    await process.stdin.aclose()
                    assert await process.wait() == 0

    assert echoed.json()["result"]["bytes"] == len(big)
    assert json.loads(report)["result"]["content"][0]["text"].startswith("row,amount")
    rows = {(r["upstream"], r["jsonrpc_id"], r["method"]): r for r in read_rows(db_path)}
    assert rows["stdio", "1", "tools/call"]["request_bytes"] == len(big)
    assert rows["http", "2", "tools/call"]["response_bytes"] == len(report) > 6 << 20


async def test_an_http_sse_server_that_cannot_be_reached_is_one_line_and_exit_1(
    meter_env: dict[str, str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/sse"
    argv = [MCPMETER, "wrap", "--url", url, "--transport", "sse"]
    with anyio.fail_after(EXIT_S):
        done = await anyio.run_process(argv, env=meter_env, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith(f"mcpmeter: cannot open {url}")


@pytest.mark.parametrize("transport", ["streamable-http", "sse"])
async def test_a_stdio_server_asking_its_client_for_sampling_and_roots_is_answered_through_listen(
    transport: str, meter_env: dict[str, str], db_path: Path
) -> None:
    async with listening(meter_env, server=SAMPLING) as (base, _):
        target = f"{base}/mcp" if transport == "streamable-http" else sse_client(f"{base}/sse")
        through, asked = await sampling_session(target)
    alone, _ = await sampling_session(StdioServerParameters(command=SAMPLING[0], args=SAMPLING[1:]))

    assert through == alone
    assert asked == ["what is six times seven?"]
    assert_sampling_rows(read_rows(db_path), "http" if transport == "streamable-http" else "sse", "stdio")


async def test_each_http_session_gets_its_own_server_process_and_session_id(
    meter_env: dict[str, str], db_path: Path
) -> None:
    async with listening(meter_env, server=RAW) as (base, _), httpx.AsyncClient() as http:
        sessions = [RawSession(http, f"{base}/mcp") for _ in range(2)]
        pids = []
        for session in sessions:
            await session.initialize()
            pids.append((await session.call(1, "whoami")).json()["result"]["pid"])
        for session in sessions:
            await session.close()

    assert pids[0] != pids[1]
    rows = read_rows(db_path)
    by_session: dict[str, list[str]] = {}
    for row in rows:
        by_session.setdefault(row["session_id"], []).append(row["method"])
    assert sorted(by_session) == sorted(s.session_id for s in sessions if s.session_id)
    assert all(methods == ["initialize", "tools/call"] for methods in by_session.values())


async def test_fifty_concurrent_http_sessions_are_all_answered_and_recorded_under_their_own_session(
    meter_env: dict[str, str], db_path: Path
) -> None:
    answers: dict[str, list[str]] = {}

    async def one(http: httpx.AsyncClient, url: str, n: int) -> None:
        session = RawSession(http, url)
        await session.initialize()
        assert session.session_id is not None
        for i in range(2):
            response = await session.call(i, "echo", text=f"session {n} call {i}")
            answers.setdefault(session.session_id, []).append(response.json()["result"]["text"])
        await session.close()

    limits = httpx.Limits(max_connections=100)
    # Servers start one or a few at a time (``STARTING``): the last of fifty sessions waits
    # for the others' servers. The promise is that all are answered, not how fast: the wait
    # is bounded by the test's own timeout, not httpx's 5 s default.
    async with (
        listening(meter_env, server=RAW) as (base, _),
        httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as http,
        anyio.create_task_group() as tg,
    ):
        for n in range(50):
            tg.start_soon(one, http, f"{base}/mcp", n)

    assert len(answers) == 50
    for texts in answers.values():
        n = texts[0].split()[1]
        assert texts == [f"session {n} call 0", f"session {n} call 1"]
    rows = read_rows(db_path)
    assert len(rows) == 150
    assert all(r["status"] == "ok" and r["transport"] == "http" for r in rows)
    by_session: dict[str, list[str]] = {}
    for row in rows:
        by_session.setdefault(row["session_id"], []).append(row["method"])
    assert set(by_session) == set(answers)
    assert all(sorted(m) == ["initialize", "tools/call", "tools/call"] for m in by_session.values())


async def test_tag_headers_override_the_tags_only_with_trust_tag_headers(
    meter_env: dict[str, str], db_path: Path
) -> None:
    tags = {"x-mcpmeter-project": "acme", "x-mcpmeter-agent": "bot-7", "x-mcpmeter-session": "s-9"}
    meter_env |= {"MCPMETER_PROJECT_ID": "base", "MCPMETER_AGENT_ID": "base-agent"}
    for trust in (True, False):
        options = ["--trust-tag-headers"] if trust else []
        async with listening(meter_env, *options, server=RAW) as (base, _), httpx.AsyncClient() as http:
            session = RawSession(http, f"{base}/mcp", tags)
            await session.initialize()
            await session.close()
            if not trust:
                untrusted_session = session.session_id

    trusted, untrusted = read_rows(db_path)
    assert (trusted["project_id"], trusted["agent_id"], trusted["session_id"]) == ("acme", "bot-7", "s-9")
    assert (untrusted["project_id"], untrusted["agent_id"]) == ("base", "base-agent")
    assert untrusted["session_id"] == untrusted_session


async def test_x_request_id_is_the_join_key_of_a_request_whose_meta_names_none(
    meter_env: dict[str, str], db_path: Path
) -> None:
    async with listening(meter_env, server=RAW) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        await session.call(1, "echo", {"x-request-id": "llm-call-1"}, text="a")
        stamped = {"name": "echo", "arguments": {}, "_meta": {"requestId": "from-meta"}}
        body = dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": stamped})
        await session.post(body, {"x-request-id": "llm-call-2"})
        await session.call(3, "echo", text="c")
        await session.close()

    rows = read_rows(db_path)
    assert [(r["jsonrpc_id"], r["request_id"]) for r in rows] == [
        ("0", None),
        ("1", "llm-call-1"),
        ("2", "from-meta"),
        ("3", None),
    ]


async def test_a_shared_server_sees_fresh_ids_and_each_client_gets_its_own_id_bytes_back(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.bin"
    ids = [b"1", b'"a"', b"1.50", b"-7"]

    async def client(session: RawSession, tag: str) -> list[tuple[bytes, dict[str, Any]]]:
        await session.initialize()
        got = []
        for raw_id in ids:
            body = (
                b'{"jsonrpc":"2.0","id":'
                + raw_id
                + b',"method":"tools/call","params":{"name":"echo","arguments":{"text":"'
                + tag.encode()
                + b'"}}}'
            )
            response = await session.post(body)
            got.append((response.content, response.json()))
        return got

    results: dict[str, list[tuple[bytes, dict[str, Any]]]] = {}

    async def run(session: RawSession, tag: str) -> None:
        results[tag] = await client(session, tag)

    server = [*RAW, "--record", str(record)]
    async with (
        listening(meter_env, "--shared-server", server=server) as (base, _),
        httpx.AsyncClient() as http,
    ):
        sessions = {tag: RawSession(http, f"{base}/mcp") for tag in ("left", "right")}
        async with anyio.create_task_group() as tg:
            for tag, session in sessions.items():
                tg.start_soon(run, session, tag)
        pids = {tag: (await s.call(99, "whoami")).json()["result"]["pid"] for tag, s in sessions.items()}
        for session in sessions.values():
            await session.close()

    assert pids["left"] == pids["right"]  # one server process
    for tag, got in results.items():
        for raw_id, (content, answer) in zip(ids, got, strict=True):
            assert content.startswith(b'{"jsonrpc":"2.0","id":' + raw_id + b',"result":{')
            assert answer["result"]["text"] == tag
    seen_ids = [json.loads(line)["id"] for line in record.read_bytes().splitlines() if b'"id"' in line]
    assert len(seen_ids) == len(set(seen_ids)) == 2 * (1 + len(ids) + 1)
    assert all(type(i) is int for i in seen_ids)
    rows = read_rows(db_path)
    calls = [r for r in rows if r["method"] == "tools/call" and r["jsonrpc_id"] != "99"]
    assert sorted(r["jsonrpc_id"] for r in calls) == sorted(["1", "a", "1.5", "-7"] * 2)
    assert len({r["session_id"] for r in rows}) == 2


@pytest.mark.parametrize("mode", MODES)
async def test_sdk_clients_sharing_one_server_process_each_get_what_the_server_gives_directly(
    mode: str, meter_env: dict[str, str], db_path: Path
) -> None:
    outcomes: list[Outcome] = []

    async def one(url: str) -> None:
        outcomes.append(await sdk_session(url, mode, DEMO_CALLS))

    async with listening(meter_env, "--shared-server") as (base, running):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one, f"{base}/mcp")
        if sys.platform.startswith("linux"):
            assert len(children_of(running.pid)) == 1
    alone = await sdk_session(StdioServerParameters(command=DEMO[0], args=DEMO[1:]), mode, DEMO_CALLS)

    assert outcomes == [alone] * 3
    rows = read_rows(db_path)
    assert len(rows) == 3 * (len(DEMO_CALLS) + 1 + (mode == "legacy"))
    assert all(r["status"] in ("ok", "tool_error") for r in rows)
    if mode == "legacy":
        assert len({r["session_id"] for r in rows}) == 3


async def test_a_non_loopback_bind_without_a_token_refuses_to_start(meter_env: dict[str, str]) -> None:
    argv = [MCPMETER, "wrap", "--listen", "0.0.0.0:0", "--", *RAW]
    with anyio.fail_after(EXIT_S):
        done = await anyio.run_process(argv, env=meter_env, check=False)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("mcpmeter: wrap: --listen 0.0.0.0 is not a loopback address")


async def test_listen_with_a_command_that_does_not_exist_is_one_line_and_exit_127(
    meter_env: dict[str, str],
) -> None:
    argv = [MCPMETER, "wrap", "--listen", "127.0.0.1:0", "--", "no-such-mcp-server-command"]
    with anyio.fail_after(EXIT_S):
        done = await anyio.run_process(argv, env=meter_env, check=False)
    assert done.returncode == 127
    assert done.stderr.decode().splitlines() == ["mcpmeter: command not found: no-such-mcp-server-command"]


async def test_a_missing_or_wrong_token_gets_401_and_the_right_one_is_served(
    meter_env: dict[str, str],
) -> None:
    meter_env["MCPMETER_AUTH_TOKEN"] = "right-token"
    async with listening(meter_env, server=RAW) as (base, _), httpx.AsyncClient() as http:
        url = f"{base.replace('127.0.0.1', '127.0.0.1')}/mcp"
        statuses = []
        for auth in (None, "Bearer wrong-token", "Basic right-token", "Bearer right-token"):
            headers = {"authorization": auth} if auth else {}
            session = RawSession(http, url, headers)
            body = dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
            response = await session.post(body)
            statuses.append(response.status_code)
            if response.status_code == 401:
                assert response.headers["www-authenticate"] == "Bearer"
    assert statuses == [401, 401, 401, 200]


async def test_a_non_loopback_bind_with_a_token_serves_authorized_clients(meter_env: dict[str, str]) -> None:
    argv = [MCPMETER, "wrap", "--listen", "0.0.0.0:0", "--auth-token", "t0k3n", "--", *RAW]
    async with await anyio.open_process(argv, env=meter_env) as process:
        assert process.stderr is not None
        try:
            with anyio.fail_after(START_S):
                line = await BufferedByteReceiveStream(process.stderr).receive_until(b"\n", 1 << 16)
            port = int(line.rsplit(b":", 1)[1].split(b"/")[0])
            async with httpx.AsyncClient() as http:
                url = f"http://127.0.0.1:{port}/mcp"
                session = RawSession(http, url, {"authorization": "Bearer t0k3n"})
                assert (await session.initialize())["result"]["serverInfo"]["name"] == "raw-server"
                session.headers.pop("authorization")
                assert (await session.call(1, "whoami")).status_code == 401
        finally:
            await _stop(process)


async def test_a_foreign_origin_gets_403_while_localhost_and_allowed_origins_are_served(
    meter_env: dict[str, str],
) -> None:
    body = dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
    statuses: dict[str | None, int] = {}
    allowed = ("--allow-origin", "https://app.example.com")
    async with listening(meter_env, *allowed, server=RAW) as (base, _), httpx.AsyncClient() as http:
        for origin in ("https://evil.example", "http://localhost:3000", "https://app.example.com", None):
            session = RawSession(http, f"{base}/mcp", {"origin": origin} if origin else {})
            statuses[origin] = (await session.post(body)).status_code
        with anyio.fail_after(SESSION_S):
            sse = await http.get(f"{base}/sse", headers={"origin": "http://evil.example:8080"})

    assert statuses == {
        "https://evil.example": 403,
        "http://localhost:3000": 200,
        "https://app.example.com": 200,
        None: 200,
    }
    assert sse.status_code == 403


async def test_a_rebound_host_name_gets_421_and_allowed_browser_origins_get_cors_headers(
    meter_env: dict[str, str],
) -> None:
    body = dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})
    async with listening(meter_env, server=RAW) as (base, _), httpx.AsyncClient() as http:
        with anyio.fail_after(SESSION_S):
            rebound = await http.post(
                f"{base}/mcp", content=body, headers={**HEADERS, "host": "evil.example:80"}
            )
            preflight = await http.options(
                f"{base}/mcp",
                headers={"origin": "http://localhost:6274", "access-control-request-method": "POST"},
            )
            allowed = await http.post(
                f"{base}/mcp", content=body, headers={**HEADERS, "origin": "http://localhost:6274"}
            )

    assert rebound.status_code == 421
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:6274"
    assert "mcp-session-id" in preflight.headers["access-control-allow-headers"]
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:6274"
    assert "mcp-session-id" in allowed.headers["access-control-expose-headers"]


async def test_2026_requests_whose_method_or_name_headers_disagree_with_the_body_get_400(
    meter_env: dict[str, str], db_path: Path
) -> None:
    params = {"name": "echo", "arguments": {"text": "x"}, "_meta": MODERN_META}
    body = dumps({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": params})
    good = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "echo"}
    bad = [
        {**good, "mcp-method": "tools/list"},
        {**good, "mcp-name": "whoami"},
        {k: v for k, v in good.items() if k != "mcp-method"},
        {**good, "mcp-name": "=?base64?d2hvYW1p?="},  # "whoami", encoded
    ]
    async with listening(meter_env, server=RAW) as (base, _), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        answers = [await session.post(body, headers) for headers in bad]
        encoded_ok = await session.post(body, {**good, "mcp-name": "=?base64?ZWNobw==?="})
        ok = await session.post(body, good)

    for answer in answers:
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == -32020
        assert answer.json()["id"] == 5
    assert encoded_ok.status_code == ok.status_code == 200
    assert ok.json()["result"]["text"] == "x"
    rows = read_rows(db_path)
    assert len(rows) == 2  # the rejected requests never reached the server
    assert all(r["protocol_version"] == "2026-07-28" and r["transport"] == "http" for r in rows)


async def _ask_and_wait_for_the_question(
    session: RawSession, rpc_id: str, seen: anyio.Event, events: list[Event]
) -> None:
    """tools/call ``ask``: the server asks the client a ping first, which comes on this POST's stream."""
    arguments = {"id": f"q-{rpc_id}", "method": "ping"}
    body = {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "tools/call",
        "params": {"name": "ask", "arguments": arguments},
    }
    headers = dict(session.headers, **{"mcp-session-id": session.session_id or ""})
    parser = SSEParser()
    with contextlib.suppress(httpx.HTTPError):
        async with session.http.stream("POST", session.url, content=dumps(body), headers=headers) as response:
            async for chunk in response.aiter_bytes():
                events.extend(parser.feed(chunk))
                if events:
                    seen.set()
    seen.set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_sigterm_lets_a_call_in_flight_finish_writes_every_row_and_leaves_no_child(
    meter_env: dict[str, str], db_path: Path
) -> None:
    events: list[Event] = []
    async with listening(meter_env, server=RAW) as (base, running), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        children = children_of(running.pid)
        asked = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_ask_and_wait_for_the_question, session, "call-1", asked, events)
            with anyio.fail_after(SESSION_S):
                await asked.wait()  # the call is with the server, which waits for our answer
            running.process.send_signal(signal.SIGTERM)
            answer = await session.post(dumps({"jsonrpc": "2.0", "id": "q-call-1", "result": {}}))
            assert answer.status_code == 202  # answers to calls in flight are taken while draining
            late = await session.call("late", "whoami")
            assert late.status_code == 503  # new calls are not
        with anyio.fail_after(EXIT_S):
            assert await running.process.wait() == 0

    question, result = (json.loads(e.data) for e in events)
    assert question == {"jsonrpc": "2.0", "id": "q-call-1", "method": "ping"}
    assert result["id"] == "call-1" and result["result"]["answer"]["id"] == "q-call-1"
    assert children and not any(alive(pid) for pid in children)
    rows = read_rows(db_path)
    assert [(r["method"], r["direction"], r["status"]) for r in rows] == [
        ("initialize", "c2s", "ok"),
        ("ping", "s2c", "ok"),
        ("tools/call", "c2s", "ok"),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_after_sigterm_the_drain_waits_for_every_call_in_flight_and_one_never_answered_is_no_response(
    meter_env: dict[str, str], db_path: Path
) -> None:
    """The drain's length (DRAIN_S, 5 s) is a figure of benchmarks/http_bench.py; here, its order."""
    events: dict[str, list[Event]] = {"call-1": [], "call-2": []}
    asked = {rpc_id: anyio.Event() for rpc_id in events}
    done = {rpc_id: anyio.Event() for rpc_id in events}
    async with listening(meter_env, server=RAW) as (base, running), httpx.AsyncClient() as http:
        session = RawSession(http, f"{base}/mcp")
        await session.initialize()
        children = children_of(running.pid)

        async def ask(rpc_id: str) -> None:
            await _ask_and_wait_for_the_question(session, rpc_id, asked[rpc_id], events[rpc_id])
            done[rpc_id].set()

        async def draining() -> bool:  # a GET anywhere is refused once the drain has begun
            return (await http.get(f"{base}/drain")).status_code == 503

        async with anyio.create_task_group() as tg:
            for rpc_id in events:  # one after the other: each question on its own call's stream
                tg.start_soon(ask, rpc_id)
                with anyio.fail_after(SESSION_S):
                    await asked[rpc_id].wait()
            running.process.send_signal(signal.SIGTERM)  # call-1's question is never answered
            await eventually_async(draining, "the drain begun", EXIT_S)
            assert (await session.call("late", "whoami")).status_code == 503
            answer = await session.post(dumps({"jsonrpc": "2.0", "id": "q-call-2", "result": {}}))
            assert answer.status_code == 202
            with anyio.fail_after(SESSION_S):
                await done["call-2"].wait()  # answered while the drain waits for call-1 ...
            assert not done["call-1"].is_set() and running.process.returncode is None
            with anyio.fail_after(EXIT_S):
                await done["call-1"].wait()  # ... which it gives up on in the end
                assert await running.process.wait() == 0

    first, second = ([json.loads(e.data) for e in events[rpc_id]] for rpc_id in events)
    assert first[0] == {"jsonrpc": "2.0", "id": "q-call-1", "method": "ping"}
    assert not any("result" in m for m in first), first  # no answer was made up for it
    assert second[0] == {"jsonrpc": "2.0", "id": "q-call-2", "method": "ping"}
    assert second[1]["id"] == "call-2" and second[1]["result"]["answer"]["id"] == "q-call-2"
    assert len(second) == 2
    assert children and not any(alive(pid) for pid in children)
    rows = read_rows(db_path)
    assert sorted((r["method"], r["jsonrpc_id"], r["status"]) for r in rows) == [
        ("initialize", "0", "ok"),
        ("ping", "q-call-1", "no_response"),
        ("ping", "q-call-2", "ok"),
        ("tools/call", "call-1", "no_response"),
        ("tools/call", "call-2", "ok"),
    ]


# -- framing and id surgery -----------------------------------------------------------------------


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


_data = st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b)
_events = st.lists(
    st.tuples(st.sampled_from([None, "message", "endpoint"]), st.lists(_data, min_size=1, max_size=3)),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    events=_events,
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    ending=st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_the_sse_parser_yields_the_same_events_however_the_stream_is_cut(
    events: list[tuple[str | None, list[bytes]]], cuts: list[int], ending: bytes
) -> None:
    stream = b": a comment" + ending
    expected = []
    for name, lines in events:
        encoded = encode_event(b"\n".join(lines), name)
        stream += encoded.replace(b"\n", ending) if ending != b"\n" else encoded
        expected.append(Event(name or "message", b"\n".join(lines)))
    parser = SSEParser()
    got = [event for chunk in _chunks(stream, cuts) for event in parser.feed(chunk)]
    assert [(e.event, e.data) for e in got] == [(e.event, e.data) for e in expected]


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return inner | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


# Two levels of arrays and objects, spelled out (st.recursive's check that ``extend`` uses its
# argument fails at random on some draws of this shape).
_json_values = _nested(_nested(st.none() | st.booleans() | st.integers() | st.text(max_size=8)))


@settings(max_examples=300, deadline=None)
@given(
    members=st.dictionaries(st.text(max_size=6), _json_values, max_size=5),
    rpc_id=st.integers() | st.text(max_size=6),
    spaces=st.sampled_from(["", " ", "\n  "]),
)
def test_an_id_is_swapped_in_place_leaving_every_other_byte_of_the_frame_as_it_was(
    members: dict[str, Any], rpc_id: object, spaces: str
) -> None:
    members["id"] = rpc_id
    frame = (
        "{"
        + spaces
        + ("," + spaces).join(
            json.dumps(k) + spaces + ":" + spaces + json.dumps(v, indent=1 if spaces else None)
            for k, v in members.items()
        )
        + spaces
        + "}"
    ).encode()
    spans = member_spans(frame)
    assert spans is not None
    start, end = spans["id"]
    assert msgspec.json.decode(frame[start:end]) == rpc_id
    swapped = splice(frame, [(start, end, b"12345")])
    assert swapped[:start] == frame[:start] and swapped[start + 5 :] == frame[end:]
    assert json.loads(swapped) == {**members, "id": 12345}


async def test_a_budget_on_wrap_url_answers_calls_past_it_itself_and_records_them_rejected(
    meter_env: dict[str, str], db_path: Path
) -> None:
    calls = [("search", {"query": f"q{i}"}) for i in range(4)]
    async with demo_over_http("streamable-http") as url:
        outcome = await sdk_session(wrap_url(meter_env, url, "--max-calls", "2"), "legacy", calls)
    assert [r["is_error"] for r in outcome.results] == [False, False, True, True]
    assert "Budget exhausted" in outcome.results[2]["content"][0]["text"]
    rows = [r for r in read_rows(db_path) if r["method"] == "tools/call"]
    assert sorted(str(r["status"]) for r in rows) == ["ok", "ok", "rejected", "rejected"]
    assert all(r["upstream"] == "http" for r in rows)


async def test_a_budget_on_listen_answers_calls_past_it_itself_per_session_and_records_them_rejected(
    meter_env: dict[str, str], db_path: Path
) -> None:
    calls = [("search", {"query": f"q{i}"}) for i in range(3)]
    async with listening(meter_env, "--max-calls", "2") as (url, _running):
        first = await sdk_session(f"{url}/mcp", "legacy", calls)
        second = await sdk_session(f"{url}/mcp", "legacy", calls[:1])
    assert [r["is_error"] for r in first.results] == [False, False, True]
    assert "Budget exhausted" in first.results[2]["content"][0]["text"]
    assert [r["is_error"] for r in second.results] == [False]  # a session budget: its own count
    rows = [r for r in read_rows(db_path) if r["method"] == "tools/call"]
    assert sorted(str(r["status"]) for r in rows) == ["ok", "ok", "ok", "rejected"]


# -- the exit with a stuck store (DESIGN.md, "Failure rules") ------------------------------------

#: Gone within 2 s of the end (stdin EOF, or SIGTERM for --listen once its drain is done).
EXIT_BOUND_S = 2.0


def recover_rows(env: dict[str, str], db: Path) -> list[dict[str, Any]]:
    result = subprocess.run([MCPMETER, "store", "recover"], capture_output=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return read_rows(db)


async def test_wrap_url_with_the_store_locked_exits_in_bound_after_eof_and_loses_no_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    async with demo_over_http("streamable-http") as url:
        with store_locked(db_path):
            process = await anyio.open_process([MCPMETER, "wrap", "--url", url], env=meter_env)
            async with process:
                assert process.stdin is not None and process.stdout is not None
                out = BufferedByteReceiveStream(process.stdout)
                with anyio.fail_after(SESSION_S):
                    await process.stdin.send(
                        dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT}) + b"\n"
                    )
                    await out.receive_until(b"\n", 1 << 20)
                    await process.stdin.send(
                        dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + b"\n"
                    )
                    call = {"name": "search", "arguments": {"query": "in"}}
                    await process.stdin.send(
                        dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}) + b"\n"
                    )
                    await out.receive_until(b"\n", 1 << 20)
                    await process.stdin.aclose()
                    eof = time.monotonic()
                    assert await process.wait() == 0
                    exited = time.monotonic() - eof
    assert exited < EXIT_BOUND_S
    rows = recover_rows(meter_env, db_path)
    assert [(r["method"], r["status"]) for r in rows] == [("initialize", "ok"), ("tools/call", "ok")]


async def test_listen_stopped_with_the_store_locked_exits_in_bound_and_loses_no_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    argv = [MCPMETER, "wrap", "--listen", "127.0.0.1:0", "--", *DEMO]
    with store_locked(db_path):
        async with await anyio.open_process(argv, env=meter_env, stdin=subprocess.DEVNULL) as process:
            try:
                assert process.stderr is not None
                stderr = BufferedByteReceiveStream(process.stderr)
                with anyio.fail_after(START_S):
                    match = LISTENING.search(await stderr.receive_until(b"\n", 1 << 16))
                assert match
                outcome = await sdk_session(f"http://{match.group(1).decode()}/mcp", "legacy", DEMO_CALLS[:1])
                assert outcome.results[0]["is_error"] is False
                process.send_signal(signal.SIGTERM)
                stopped = time.monotonic()
                with anyio.fail_after(EXIT_S):
                    assert await process.wait() == 0
                exited = time.monotonic() - stopped
            finally:
                await _stop(process)
    assert exited < EXIT_BOUND_S
    rows = recover_rows(meter_env, db_path)
    assert [r["status"] for r in rows if r["method"] == "tools/call"] == ["ok"]
    seen = [(r["session_id"], r["method"], r["jsonrpc_id"]) for r in rows]
    assert len(seen) == len(set(seen))
