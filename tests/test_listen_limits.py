"""`wrap --listen` under abuse: every limit holds, and the clients it serves stay served.

Real `mcpmeter wrap --listen` processes in front of the raw test server, real sockets on
127.0.0.1 (raw ones where a test plays the abuser, byte by byte), processes and memory read
from /proc. Small flag values keep each test short; every wait has a deadline.
"""

from __future__ import annotations

import re
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from conftest import PYTHON, SERVERS, eventually_async
from test_http import INIT, RawSession, Running, children_of, dumps, listening

from mcpmeter.proxy.listen.limits import ListenLimits

pytestmark = pytest.mark.anyio

RAW = [PYTHON, str(SERVERS / "raw_server.py")]
WAIT_S = 30  # anything a test waits for (a refusal, a closed socket, a freed slot)
HALF_HEAD = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
MiB = 1 << 20


def address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(base: str, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(address(base), timeout=WAIT_S)
    if first:
        sock.sendall(first)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = WAIT_S) -> bytes:
    """What the server sends until it closes the connection (bounded by ``timeout``)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        except TimeoutError:
            raise AssertionError(f"the connection was still open after {timeout} s") from None
        if not chunk:
            return bytes(data)
        data += chunk


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def vm_hwm(pid: int) -> int:
    """The peak resident memory of ``pid`` so far, in bytes (/proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def init_body() -> bytes:
    return dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT})


async def open_session(
    http: httpx.AsyncClient, base: str, headers: dict[str, str] | None = None
) -> RawSession:
    session = RawSession(http, f"{base}/mcp", headers)
    await session.initialize()
    return session


async def admitted(http: httpx.AsyncClient, base: str, headers: dict[str, str] | None = None) -> RawSession:
    """A session opened as soon as the wrapper lets one in (503 or a refused connection
    until then), within WAIT_S."""
    session = RawSession(http, f"{base}/mcp", headers)

    async def let_in() -> httpx.Response | None:
        try:
            answer = await session.post(init_body())
        except httpx.TransportError:
            return None
        if answer.status_code == 200:
            return answer
        assert answer.status_code == 503, answer.text
        return None

    answer = await eventually_async(let_in, "a session let in", WAIT_S, poll=0.1)
    session.session_id = answer.headers["mcp-session-id"]
    return session


#: The line the wrapper's exit adds for a notice it left out while serving (``Notices.flush``).
AT_EXIT = re.compile(r" \(and \d+ more like it\)$")


def stderr_lines(running: Running) -> list[str]:
    """What the wrapper wrote to stderr while it served. ``listening`` collects stderr to the
    exit (and checks all of it for a traceback); the exit's summaries are left out here."""
    return [line for line in running.stderr.decode(errors="replace").splitlines() if not AT_EXIT.search(line)]


# -- the fd limit -------------------------------------------------------------------------------


async def test_the_open_file_soft_limit_is_raised_to_the_hard_one_and_the_server_keeps_its_own(
    meter_env: dict[str, str],
) -> None:
    async with (
        listening(meter_env, server=RAW, nofile=(256, 4096)) as (base, running),
        httpx.AsyncClient() as http,
    ):
        session = await open_session(http, base)
        server_pid = (await session.call(1, "whoami")).json()["result"]["pid"]
        assert open_files_limit(running.pid) == (4096, 4096)
        assert open_files_limit(server_pid) == (256, 4096)


# -- sessions -----------------------------------------------------------------------------------


async def test_past_max_sessions_a_new_session_gets_503_and_no_server_process_starts(
    meter_env: dict[str, str],
) -> None:
    async with (
        listening(meter_env, "--max-sessions", "3", server=RAW) as (base, running),
        httpx.AsyncClient() as http,
    ):
        sessions = [await open_session(http, base) for _ in range(3)]
        assert len(children_of(running.pid)) == 3
        refused = await RawSession(http, f"{base}/mcp").post(init_body())
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "--max-sessions" in refused.text
        assert len(children_of(running.pid)) == 3
        assert (await sessions[0].call(1, "whoami")).status_code == 200  # the open ones are served

        await sessions[1].close()
        again = await open_session(http, base)  # a closed session's place is free at once
        assert (await again.call(1, "whoami")).status_code == 200
        await eventually_async(
            lambda: len(children_of(running.pid)) == 3, "the closed session's server exited", WAIT_S
        )
    assert sum("--max-sessions" in line for line in stderr_lines(running)) == 1


async def test_past_max_servers_a_new_session_gets_503_while_no_session_is_idle_long_enough(
    meter_env: dict[str, str],
) -> None:
    options = ("--max-servers", "2", "--max-sessions", "10")
    async with listening(meter_env, *options, server=RAW) as (base, running), httpx.AsyncClient() as http:
        for _ in range(2):
            await open_session(http, base)
        for _ in range(3):
            refused = await RawSession(http, f"{base}/mcp").post(init_body())
            assert refused.status_code == 503
            assert "--max-servers" in refused.text and int(refused.headers["retry-after"]) >= 1
        assert len(children_of(running.pid)) == 2
    assert sum("--max-servers" in line for line in stderr_lines(running)) == 1


async def test_at_max_servers_the_least_recently_used_idle_session_is_closed_to_make_room(
    meter_env: dict[str, str],
) -> None:
    options = ("--max-servers", "2", "--evict-idle", "0.3", "--session-rate", "0")
    async with listening(meter_env, *options, server=RAW) as (base, running), httpx.AsyncClient() as http:
        oldest = await open_session(http, base)
        started = time.monotonic()  # `oldest` is idle from about now
        recent = await open_session(http, base)
        assert (await recent.call(1, "whoami")).status_code == 200
        newcomer = RawSession(http, f"{base}/mcp")

        async def let_in() -> httpx.Response | None:  # 503 until `oldest` has been idle for 0.3 s
            answer = await newcomer.post(init_body())
            if answer.status_code == 200:
                return answer
            assert answer.status_code == 503
            return None

        answer = await eventually_async(let_in, "the idle session evicted", WAIT_S, poll=0.05)
        assert time.monotonic() - started >= 0.25
        newcomer.session_id = answer.headers["mcp-session-id"]
        assert (await newcomer.call(1, "whoami")).status_code == 200
        assert (await oldest.call(2, "whoami")).status_code == 404  # it must start a new session
        assert (await recent.call(2, "whoami")).status_code == 200
        assert len(children_of(running.pid)) <= 2
    assert any("idle" in line and "make room" in line for line in stderr_lines(running))


async def test_past_the_session_rate_a_client_gets_429_and_its_open_sessions_are_still_served(
    meter_env: dict[str, str],
) -> None:
    options = ("--session-rate", "1", "--session-burst", "3")
    async with listening(meter_env, *options, server=RAW) as (base, running), httpx.AsyncClient() as http:
        sessions = [await open_session(http, base) for _ in range(3)]
        refused = await RawSession(http, f"{base}/mcp").post(init_body())
        assert refused.status_code == 429
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 2
        assert len(children_of(running.pid)) == 3
        for n, session in enumerate(sessions):
            assert (await session.call(n, "whoami")).status_code == 200

        later = RawSession(http, f"{base}/mcp")

        async def past_the_rate() -> httpx.Response | None:  # a token a second
            answer = await later.post(init_body())
            return None if answer.status_code == 429 else answer

        answer = await eventually_async(past_the_rate, "a token for a new session", WAIT_S, poll=0.1)
        assert answer.status_code == 200
    assert sum("--session-rate" in line for line in stderr_lines(running)) == 1


# -- bodies -------------------------------------------------------------------------------------


async def test_a_body_past_max_body_gets_413_without_the_wrapper_holding_it(
    meter_env: dict[str, str],
) -> None:
    assert ListenLimits().max_body >= 100 * 10**6  # the default still lets a 100 MB frame pass
    limit = 4 * MiB
    async with (
        listening(meter_env, "--max-body", "4MiB", server=RAW) as (base, running),
        httpx.AsyncClient() as http,
    ):
        session = await open_session(http, base)
        sid = f"mcp-session-id: {session.session_id}\r\n".encode()
        head = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n" + sid
        before = vm_hwm(running.pid)

        # Announced: refused from the head alone.
        with connect(base, head + b"content-length: %d\r\n\r\n" % (512 * MiB)) as sock:
            announced = read_until_closed(sock)
        assert status_of(announced) == 413
        assert b"--max-body" in announced

        # Not announced (chunked): refused once the bytes read pass the limit.
        sent = 0
        chunk = b"%x\r\n%s\r\n" % (MiB, b" " * MiB)
        with connect(base, head + b"transfer-encoding: chunked\r\n\r\n") as sock:
            try:
                while sent < 64 * MiB:
                    sock.sendall(chunk)
                    sent += MiB
            except (BrokenPipeError, ConnectionResetError):
                pass
            streamed = read_until_closed(sock)
        assert status_of(streamed) == 413
        assert limit < sent < 64 * MiB  # it stopped reading soon after the limit
        assert vm_hwm(running.pid) - before < 3 * limit  # well below the 128 MiB of body x 2

        # Up to the limit, a frame crosses as before.
        text = "x" * (limit - 4096)
        echoed = await session.call(1, "echo", text=text)
        assert echoed.status_code == 200
        assert echoed.json()["result"]["text"] == text
    assert sum("--max-body" in line for line in stderr_lines(running)) <= 2


# -- connections --------------------------------------------------------------------------------


async def test_a_request_head_still_incomplete_after_header_timeout_is_answered_408_and_closed(
    meter_env: dict[str, str],
) -> None:
    async with (
        listening(meter_env, "--header-timeout", "0.5", server=RAW) as (base, running),
        httpx.AsyncClient() as http,
    ):
        session = await open_session(http, base)
        with connect(base, HALF_HEAD) as sock:
            started = time.monotonic()
            closed = False
            while time.monotonic() - started < WAIT_S:  # one header line every 0.1 s: slowloris
                try:
                    sock.sendall(b"x-slow: 1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                sock.settimeout(0.1)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        closed = True
                        break
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    closed = True
                    break
            elapsed = time.monotonic() - started
            answer = read_until_closed(sock)
        assert closed and 0.4 <= elapsed < 5, elapsed
        assert status_of(answer) in (408, 0)  # 0: the reset came before we read the 408
        with connect(base) as silent:  # a connection that sends nothing at all
            started = time.monotonic()
            assert status_of(read_until_closed(silent)) == 408
            assert time.monotonic() - started < 5
        assert (await session.call(1, "whoami")).status_code == 200
    assert sum("--header-timeout" in line for line in stderr_lines(running)) == 1


async def test_a_connection_silent_mid_body_is_closed_after_idle_timeout_but_a_slow_call_is_not(
    meter_env: dict[str, str],
) -> None:
    options = ("--idle-timeout", "0.5")
    async with listening(meter_env, *options, server=RAW) as (base, running), httpx.AsyncClient() as http:
        session = await open_session(http, base)
        sid = f"mcp-session-id: {session.session_id}\r\n".encode()
        head = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n" + sid

        with connect(base, head + b"content-length: 1000\r\n\r\n" + b"{" * 10) as sock:
            started = time.monotonic()
            read_until_closed(sock)
            assert 0.4 <= time.monotonic() - started < 5

        # A call the server takes long to answer: no byte either way, but the wait is the server's.
        hang = dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "hang"}})
        request = head + b"content-length: %d\r\n\r\n%s" % (len(hang), hang)
        with connect(base, request) as sock:
            sock.settimeout(1.5)  # three idle timeouts
            with pytest.raises(TimeoutError):
                sock.recv(1)
        assert (await session.call(1, "whoami")).status_code == 200
    assert sum("--idle-timeout" in line for line in stderr_lines(running)) == 1


async def test_clients_with_the_token_are_served_while_an_abuser_holds_hundreds_of_half_sent_heads(
    meter_env: dict[str, str],
) -> None:
    token = {"authorization": "Bearer s3cret"}
    options = ("--auth-token", "s3cret", "--max-servers", "4", "--header-timeout", "60")
    async with (
        listening(meter_env, *options, server=RAW, nofile=(200, 200)) as (base, running),
        httpx.AsyncClient() as established,
        httpx.AsyncClient() as newcomer,
    ):
        served = await open_session(established, base, token)
        assert (await served.call(1, "whoami")).status_code == 200
        with ExitStack() as held:
            for _ in range(400):  # twice the wrapper's open-file limit
                sock = held.enter_context(socket.create_connection(address(base), timeout=WAIT_S))
                sock.sendall(HALF_HEAD)
            # The client already connected is served at once ...
            assert (await served.call(2, "whoami")).status_code == 200
            # ... and a new one gets in, as soon as the oldest half-sent heads may go.
            fresh = await admitted(newcomer, base, token)
            assert (await fresh.call(1, "whoami")).status_code == 200
            assert (await served.call(3, "whoami")).status_code == 200
            assert open_fds(running.pid) <= 200
    lines = stderr_lines(running)
    assert len(lines) <= 8, lines


async def test_stderr_stays_a_few_lines_under_a_flood_of_connections(meter_env: dict[str, str]) -> None:
    # 64 descriptors: too few for the connection cap (16) and a whole accept batch, so
    # accept() runs out of descriptors too (asyncio's report: a traceback per failed accept).
    async with (
        listening(meter_env, "--max-servers", "2", server=RAW, nofile=(64, 64)) as (base, running),
        httpx.AsyncClient() as http,
    ):
        for _ in range(2):  # waves of connections, each far past the open-file limit
            with ExitStack() as held:
                for _ in range(200):
                    sock = held.enter_context(socket.create_connection(address(base), timeout=WAIT_S))
                    sock.sendall(HALF_HEAD)
        session = await admitted(http, base)  # once the flood has gone, it serves again
        assert (await session.call(1, "whoami")).status_code == 200
    lines = stderr_lines(running)
    assert len(lines) <= 8, lines
    assert 1 <= sum("cannot accept connections: Too many open files" in line for line in lines) <= 2, lines
    assert 1 <= sum("--max-connections 16" in line for line in lines) <= 3, lines
    assert not any("socket.accept() out of system resource" in line for line in lines)
