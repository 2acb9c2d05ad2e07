"""`mcpmeter wrap` as a process: exit codes, signals, EOF, crashes, stderr and raw bytes.

The test plays the client over raw pipes and the server is ``tests/servers/raw_server.py``,
so every byte both ways is known. Every wait is bounded by ``anyio.fail_after``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from conftest import MCPMETER, PYTHON, SERVERS, eventually_async, read_rows

pytestmark = pytest.mark.anyio

RAW = str(SERVERS / "raw_server.py")
WAIT_S = 20  # any single exchange or exit
MAX_LINE = 256 * 1024 * 1024
#: Size of the single-line frame sent both ways; set MCPMETER_TEST_FRAME_MB=100 for the full check.
FRAME_MB = int(os.environ.get("MCPMETER_TEST_FRAME_MB", "20"))

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def dumps(message: object) -> bytes:
    """A frame as the raw server writes it: compact JSON."""
    return json.dumps(message, separators=(",", ":")).encode()


def request(rpc_id: object, method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
    if params is not None:
        message["params"] = params
    return dumps(message)


def tool_call(rpc_id: object, name: str, **arguments: Any) -> bytes:
    return request(rpc_id, "tools/call", {"name": name, "arguments": arguments})


def result(rpc_id: object, value: object) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": rpc_id, "result": value})


def raw_server(*options: str) -> list[str]:
    return [PYTHON, RAW, *options]


class Wrapped:
    """A running `mcpmeter wrap`, driven through its pipes as a client would."""

    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.stderr = process.stderr

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, data: bytes) -> None:
        await self.stdin.send(data)

    async def receive_line(self) -> bytes:
        """The next line mcpmeter writes, without its ``\\n``."""
        return await self.stdout.receive_until(b"\n", MAX_LINE)

    async def ask(self, frame: bytes) -> dict[str, Any]:
        """Send one request frame and read the next frame back, parsed."""
        await self.send(frame + b"\n")
        answer: dict[str, Any] = json.loads(await self.receive_line())
        return answer

    async def close_stdin(self) -> None:
        await self.stdin.aclose()

    async def read_stdout_to_eof(self) -> bytes:
        chunks = [bytes(self.stdout.buffer)]
        while True:
            try:
                chunks.append(await self.stdout.receive())
            except anyio.EndOfStream:
                return b"".join(chunks)

    async def read_stderr_to_eof(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(await self.stderr.receive())
            except anyio.EndOfStream:
                return b"".join(chunks)

    async def wait(self) -> int:
        return await self.process.wait()


@asynccontextmanager
async def wrap(server: Sequence[str], env: dict[str, str], *options: str) -> AsyncIterator[Wrapped]:
    """Start `mcpmeter wrap OPTIONS -- SERVER`; on the way out, the process is gone."""
    argv = [MCPMETER, "wrap", *options, "--", *server]
    async with await anyio.open_process(argv, env=env) as process:
        try:
            yield Wrapped(process)
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


async def run_mcpmeter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(WAIT_S):
        return await anyio.run_process([MCPMETER, *args], env=env, check=False, stdin=subprocess.DEVNULL)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


# -- exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 255])
async def test_the_servers_exit_code_becomes_mcpmeters_after_stdin_reaches_eof(
    code: int, meter_env: dict[str, str], db_path: Path
) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server("--exit-code", str(code)), meter_env) as proxy:
            assert (await proxy.ask(request(1, "ping"))) == {"jsonrpc": "2.0", "id": 1, "result": {}}
            await proxy.close_stdin()  # the server exits only if its own stdin is closed
            assert await proxy.read_stdout_to_eof() == b""
            assert await proxy.wait() == code

    (row,) = read_rows(db_path)
    assert (row["method"], row["status"], row["server"]) == ("ping", "ok", Path(PYTHON).name)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1])
async def test_a_server_killed_by_signal_n_makes_mcpmeter_exit_128_plus_n(
    sig: signal.Signals, meter_env: dict[str, str]
) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            await proxy.send(tool_call(1, "kill_self", signal=int(sig)) + b"\n")
            assert await proxy.wait() == 128 + sig


@pytest.mark.parametrize("args", [["wrap"], ["wrap", "--"], ["wrap", "--project", "acme"]])
async def test_wrap_without_a_command_exits_2_with_one_line_on_stderr(
    args: list[str], meter_env: dict[str, str]
) -> None:
    done = await run_mcpmeter(*args, env=meter_env)

    assert done.returncode == 2
    assert done.stdout == b""
    assert one_line(done.stderr).startswith("mcpmeter: ")


@pytest.mark.parametrize("command", ["/nonexistent/mcp-server", "mcpmeter-test-no-such-command"])
async def test_an_unknown_command_exits_127_with_one_line_on_stderr(
    command: str, meter_env: dict[str, str]
) -> None:
    done = await run_mcpmeter("wrap", "--", command, "--flag", env=meter_env)

    assert done.returncode == 127
    assert done.stdout == b""
    line = one_line(done.stderr)
    assert line.startswith("mcpmeter: ") and command in line


async def test_the_double_dash_may_be_left_out_when_the_command_does_not_start_with_a_dash(
    meter_env: dict[str, str],
) -> None:
    with anyio.fail_after(WAIT_S):
        argv = [MCPMETER, "wrap", "--project", "acme", PYTHON, RAW, "--exit-code", "7"]
        done = await anyio.run_process(argv, env=meter_env, input=request(1, "ping") + b"\n", check=False)

    assert done.returncode == 7
    assert done.stdout == result(1, {}) + b"\n"


# -- signals -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_sigterm_sigint_and_sighup_sent_to_mcpmeter_reach_the_server_and_no_row_is_lost(
    sig: signal.Signals, meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    signals = tmp_path / "signals.txt"
    server = raw_server("--signal-file", str(signals), "--signal-exit-code", "42")
    with anyio.fail_after(WAIT_S):
        async with wrap(server, meter_env) as proxy:
            await proxy.ask(tool_call(1, "whoami"))  # the server's handlers are in place
            await proxy.send(tool_call(2, "hang") + b"\n")
            os.kill(proxy.pid, sig)
            assert await proxy.wait() == 42

    assert signals.read_text() == f"{sig.name}\n"
    rows = read_rows(db_path)
    assert [(r["tool"], r["status"]) for r in rows] == [("whoami", "ok"), ("hang", "no_response")]


async def test_a_server_that_ignores_sigterm_is_killed_after_kill_after_seconds(
    meter_env: dict[str, str], db_path: Path
) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server("--ignore-sigterm"), meter_env, "--kill-after", "0.5") as proxy:
            me = await proxy.ask(tool_call(1, "whoami"))
            sent = time.monotonic()
            os.kill(proxy.pid, signal.SIGTERM)
            assert await proxy.wait() == 128 + signal.SIGKILL
            waited = time.monotonic() - sent

    assert 0.4 <= waited < 5.0  # --kill-after, not the default 5 s
    assert not alive(me["result"]["pid"])
    assert [r["status"] for r in read_rows(db_path)] == ["ok"]


@linux_only
async def test_when_mcpmeter_is_killed_outright_the_server_dies_with_it(meter_env: dict[str, str]) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server("--ignore-sigterm"), meter_env) as proxy:
            me = (await proxy.ask(tool_call(1, "whoami")))["result"]
            os.kill(proxy.pid, signal.SIGKILL)
            assert await proxy.wait() == -signal.SIGKILL
        await eventually_async(lambda: not alive(me["pid"]), "the server died with mcpmeter", within=5.0)


# -- the server ending ---------------------------------------------------------------------


async def test_a_server_crashing_mid_call_leaves_a_no_response_row_and_its_exit_code(
    meter_env: dict[str, str], db_path: Path
) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            await proxy.ask(tool_call(1, "whoami"))
            await proxy.send(tool_call(2, "crash", code=5) + b"\n")
            assert await proxy.read_stdout_to_eof() == b""
            assert await proxy.wait() == 5

    rows = read_rows(db_path)
    assert [(r["tool"], r["status"]) for r in rows] == [("whoami", "ok"), ("crash", "no_response")]
    crashed = rows[1]
    assert crashed["latency_ms"] is None and crashed["response_bytes"] is None
    assert crashed["request_bytes"] == len(tool_call(2, "crash", code=5))


async def test_a_partial_line_written_by_a_dying_server_reaches_the_client_unchanged(
    meter_env: dict[str, str], db_path: Path
) -> None:
    partial = '{"jsonrpc":"2.0","id":2,"result":{"content":[{"type":"te'
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            await proxy.ask(tool_call(1, "whoami"))
            await proxy.send(tool_call(2, "partial_then_die", text=partial, code=6) + b"\n")
            assert await proxy.read_stdout_to_eof() == partial.encode()
            assert await proxy.wait() == 6

    assert [(r["tool"], r["status"]) for r in read_rows(db_path)] == [
        ("whoami", "ok"),
        ("partial_then_die", "no_response"),
    ]


@linux_only
async def test_after_mcpmeter_exits_no_process_of_the_servers_group_remains(
    meter_env: dict[str, str],
) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server("--exit-code", "4"), meter_env) as proxy:
            me = (await proxy.ask(tool_call(1, "whoami")))["result"]
            child = (await proxy.ask(tool_call(2, "spawn_child")))["result"]["child_pid"]
            assert me["pgid"] == me["pid"]  # the server leads a group of its own
            assert set(group_members(me["pgid"])) == {me["pid"], child}
            await proxy.close_stdin()
            assert await proxy.wait() == 4
        await eventually_async(
            lambda: not group_members(me["pgid"]), "the server's group is empty", within=2.0
        )


@linux_only
async def test_a_grandchild_that_ignores_sigterm_does_not_outlive_mcpmeter(meter_env: dict[str, str]) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env, "--kill-after", "0.5") as proxy:
            me = (await proxy.ask(tool_call(1, "whoami")))["result"]
            await proxy.ask(tool_call(2, "spawn_child", ignore_sigterm=True))
            await proxy.close_stdin()
            assert await proxy.wait() == 0
        try:
            await eventually_async(
                lambda: not group_members(me["pgid"]), "the server's group is empty", within=3.0
            )
        finally:
            for pid in group_members(me["pgid"]):  # clean up after a failure
                os.kill(pid, signal.SIGKILL)


@linux_only
async def test_a_grandchild_holding_the_servers_stdout_does_not_keep_mcpmeter_running(
    meter_env: dict[str, str],
) -> None:
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server("--exit-code", "9"), meter_env) as proxy:
            me = (await proxy.ask(tool_call(1, "whoami")))["result"]
            await proxy.ask(tool_call(2, "spawn_child", hold_stdout=True))
            await proxy.close_stdin()
            with anyio.fail_after(
                12
            ):  # DRAIN_IDLE_S (2 s) and the group sweep, with room for a loaded machine
                assert await proxy.wait() == 9
        await eventually_async(
            lambda: not group_members(me["pgid"]), "the server's group is empty", within=2.0
        )


# -- bytes ---------------------------------------------------------------------------------


async def test_the_servers_stderr_passes_through_untouched(meter_env: dict[str, str]) -> None:
    noise = (
        b"warning: caf\xc3\xa9 \xff\xfe not utf-8\r\n\x1b[31mred\x1b[0m\n{not json}\nno newline at the end"
    )
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            await proxy.ask(tool_call(1, "stderr", hex=noise.hex()))
            await proxy.close_stdin()
            assert await proxy.wait() == 0
            assert await proxy.read_stderr_to_eof() == noise


async def test_non_json_blank_and_crlf_lines_are_relayed_byte_for_byte_both_ways(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    record = tmp_path / "server-stdin.bin"
    ping_crlf = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    ping_spaced = b'{ "jsonrpc" : "2.0",  "method": "ping", "id": "two" }'
    sent = [
        b"not json at all\n",
        b"\n",
        b"   \t \n",
        b"\r\n",
        ping_crlf + b"\r\n",
        b"\xff\xfe\x00 binary \xc3\x28\n",
        b'{"truncated": \n',
        b"42\n",
        b'"a json string"\n',
        b'{"no": "jsonrpc here"}\n',
        ping_spaced + b"\n",
        b"[\n",
        b"last line without a newline",
    ]
    # What the server writes back: non-requests echoed as they came, each ping answered
    # with the line ending it was asked with.
    expected_out = (
        b"".join(sent[:4])
        + result(1, {})
        + b"\r\n"
        + b"".join(sent[5:10])
        + result("two", {})
        + b"\n"
        + b"".join(sent[11:])
    )
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server("--record", str(record)), meter_env) as proxy:
            for line in sent:
                await proxy.send(line)
            await proxy.close_stdin()
            assert await proxy.read_stdout_to_eof() == expected_out
            assert await proxy.wait() == 0

    assert record.read_bytes() == b"".join(sent)
    rows = read_rows(db_path)
    assert [(r["method"], r["jsonrpc_id"], r["status"]) for r in rows] == [
        ("ping", "1", "ok"),
        ("ping", "two", "ok"),
    ]
    assert (rows[0]["request_bytes"], rows[0]["response_bytes"]) == (len(ping_crlf), len(result(1, {})))
    assert (rows[1]["request_bytes"], rows[1]["response_bytes"]) == (len(ping_spaced), len(result("two", {})))


async def test_a_single_line_frame_of_many_megabytes_passes_through_unchanged_both_ways(
    meter_env: dict[str, str], db_path: Path
) -> None:
    text = os.urandom(FRAME_MB * 1024 * 1024 // 2).hex()
    frame = tool_call(1, "echo", text=text)
    # The server answers with the size and digest of the line it read, and the text back.
    answer = result(1, {"bytes": len(frame), "sha256": hashlib.sha256(frame).hexdigest(), "text": text})
    got = b""
    with anyio.fail_after(WAIT_S + FRAME_MB):
        async with wrap(raw_server(), meter_env) as proxy:

            async def read_answer() -> None:
                nonlocal got
                got = await proxy.receive_line()

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_answer)
                await proxy.send(frame + b"\n")
            await proxy.close_stdin()
            assert await proxy.wait() == 0

    assert len(got) == len(answer)
    assert got == answer
    (row,) = read_rows(db_path)
    assert (row["tool"], row["status"]) == ("echo", "ok")
    assert (row["request_bytes"], row["response_bytes"]) == (len(frame), len(answer))


# -- what the meter makes of it ------------------------------------------------------------


@pytest.mark.parametrize(
    ("ask_id", "method", "answer"),
    [
        ("s1", "roots/list", {"result": {"roots": [{"uri": "file:///work", "name": "work"}]}}),
        (1, "sampling/createMessage", {"result": {"role": "assistant", "model": "m", "content": {}}}),
        (7, "elicitation/create", {"error": {"code": -32601, "message": "elicitation not supported"}}),
    ],
)
async def test_a_request_from_the_server_to_the_client_is_recorded_with_direction_s2c(
    ask_id: object, method: str, answer: dict[str, Any], meter_env: dict[str, str], db_path: Path
) -> None:
    server_request = request(ask_id, method)
    client_answer = dumps({"jsonrpc": "2.0", "id": ask_id, **answer})
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            # The client's call has id 1 too: the server's id 1 must not be mistaken for it.
            await proxy.send(tool_call(1, "ask", id=ask_id, method=method) + b"\n")
            assert await proxy.receive_line() == server_request
            reply = await proxy.ask(client_answer)
            assert reply == {"jsonrpc": "2.0", "id": 1, "result": {"answer": json.loads(client_answer)}}
            await proxy.close_stdin()
            assert await proxy.wait() == 0

    # Rows are in the order calls settled: the two threads may meter the client's answer and
    # the server's final reply in either order, so find each row by its direction.
    all_rows = read_rows(db_path)
    assert len(all_rows) == 2
    rows = {str(r["direction"]): r for r in all_rows}
    asked, call = rows["s2c"], rows["c2s"]
    assert (asked["direction"], asked["method"], asked["jsonrpc_id"]) == ("s2c", method, str(ask_id))
    assert (asked["request_bytes"], asked["response_bytes"]) == (len(server_request), len(client_answer))
    assert asked["latency_ms"] > 0
    if "error" in answer:
        assert (asked["status"], asked["error_code"]) == ("error", answer["error"]["code"])
        assert asked["error_message"] == answer["error"]["message"]
    else:
        assert asked["status"] == "ok"
    assert (call["direction"], call["method"], call["tool"], call["status"]) == (
        "c2s",
        "tools/call",
        "ask",
        "ok",
    )
    assert call["latency_ms"] > asked["latency_ms"]


async def test_a_request_the_client_cancels_is_recorded_as_cancelled(
    meter_env: dict[str, str], db_path: Path
) -> None:
    cancel = dumps(
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7, "reason": "user"}}
    )
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            await proxy.send(tool_call(7, "hang") + b"\n")
            await proxy.send(cancel + b"\n")
            assert await proxy.ask(request(8, "ping")) == {"jsonrpc": "2.0", "id": 8, "result": {}}
            await proxy.close_stdin()
            assert await proxy.wait() == 0

    rows = read_rows(db_path)
    assert [(r["jsonrpc_id"], r["tool"], r["status"]) for r in rows] == [
        ("7", "hang", "cancelled"),
        ("8", None, "ok"),
    ]
    assert rows[0]["response_bytes"] is None
    assert rows[0]["request_bytes"] == len(tool_call(7, "hang"))


async def test_a_json_rpc_error_response_is_recorded_with_its_code_and_message(
    meter_env: dict[str, str], db_path: Path
) -> None:
    long_message = "quota exceeded for customer acme; " * 40
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            first = await proxy.ask(tool_call(1, "error", code=-32602, message="bad arguments: query"))
            second = await proxy.ask(tool_call(2, "error", code=-32000, message=long_message))
            unknown = await proxy.ask(request(3, "no/such/method"))
            await proxy.close_stdin()
            assert await proxy.wait() == 0

    assert first["error"] == {"code": -32602, "message": "bad arguments: query"}
    assert second["error"]["message"] == long_message  # the client gets it whole
    rows = read_rows(db_path)
    assert [(r["method"], r["status"], r["error_code"]) for r in rows] == [
        ("tools/call", "error", -32602),
        ("tools/call", "error", -32000),
        ("no/such/method", "error", -32601),
    ]
    assert rows[0]["error_message"] == "bad arguments: query"
    assert rows[1]["error_message"] == long_message[:512]
    assert rows[2]["error_message"] == unknown["error"]["message"]
    assert all(r["response_bytes"] > 0 and r["latency_ms"] > 0 for r in rows)


async def test_rows_name_the_server_from_its_server_info_after_the_handshake(
    meter_env: dict[str, str], db_path: Path
) -> None:
    hello = request(
        0,
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw-client", "version": "0.0.1"},
        },
    )
    with anyio.fail_after(WAIT_S):
        async with wrap(raw_server(), meter_env) as proxy:
            await proxy.ask(hello)
            await proxy.send(dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + b"\n")
            await proxy.ask(tool_call(1, "whoami"))
            await proxy.close_stdin()
            assert await proxy.wait() == 0

    rows = read_rows(db_path)
    assert [r["method"] for r in rows] == ["initialize", "tools/call"]
    for row in rows:
        assert (row["server"], row["server_version"]) == ("raw-server", "1.2.3")
        assert (row["client_name"], row["client_version"]) == ("raw-client", "0.0.1")
        assert row["protocol_version"] == "2025-06-18"
