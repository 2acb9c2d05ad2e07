"""HTTP benchmark: a server's own streamable-HTTP endpoint against the same calls through
``mcpmeter wrap --listen``, in one run.

Configurations (the answers are the same bytes in each):

* ``direct``     - the client POSTs to ``http_echo_server.py`` (raw ASGI on uvicorn/h11, JSON
  answers): the server's own streamable-HTTP endpoint;
* ``listen``     - the client POSTs to ``mcpmeter wrap --listen 127.0.0.1:0 -- echo_server.py``
  (the same echo, over stdio, one process per session): what a stdio server costs to put on
  HTTP with metering;
* ``listen-url`` - the client POSTs to ``mcpmeter wrap --listen 127.0.0.1:0 --url <direct>``:
  an extra HTTP hop in front of the HTTP server (two HTTP exchanges per call).

Figures (each configuration runs ``--rounds`` times, interleaved; medians are reported):

a. round-trip latency p50/p99 of a small ``tools/call``, one in flight, over one session, and
   the latency added against ``direct``;
b. calls/s with ``--sessions`` sessions (default 16) each keeping one call in flight, and the
   ratio to ``direct``. After each mcpmeter run the store is checked for one row per call;
c. the drain (once, after the rounds): seconds from SIGTERM to the exit of ``wrap --listen``
   with one ``tools/call`` its server never answers, less the same with nothing in flight (the
   floor, measured in the same run). The drain waits up to ``DRAIN_S`` (5 s) for the calls in
   flight: the exit with the call in flight must come no sooner than DRAIN_S - 0.5 s after
   SIGTERM and the figure must be at most DRAIN_S + 1.5 s; the call's row is checked to be
   ``no_response``. (``tests/test_http.py`` checks the drain's order of events.)

The load generator is the same in every configuration (httpx; a blocking client for a, an
asyncio one for b), so its own cost cancels out of the comparison.

    .venv/bin/python benchmarks/http_bench.py [--quick] [--no-drain] [--json FILE]

``listen_bench.py`` shares this module's requests and process helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MCPMETER = str(Path(sys.executable).with_name("mcpmeter"))
CONFIGS = ("direct", "listen", "listen-url")
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INIT = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench"}},
    }
).encode()
INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
EXPECTED = b',"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}'
START_TIMEOUT_S = 30.0
LISTENING = rb"listening on (http://\S+/mcp)"
#: How long ``wrap --listen`` waits for the calls in flight after SIGTERM (its ``DRAIN_S``).
DRAIN_S = 5.0
#: A stdio server that answers ``initialize`` only; it says on stderr when a call has come.
SILENT_SERVER = """
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("method") == "initialize":
        info = {"name": "bench-silent", "version": "1.0.0"}
        result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": info}
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
    elif message.get("method") == "tools/call":
        print("silent-server: a call came", file=sys.stderr, flush=True)
"""


def call(rpc_id: int) -> bytes:
    return b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo","arguments":{}}}' % rpc_id


def meter_env(db: Path) -> dict[str, str]:
    """This environment without MCPMETER_* settings, writing to the store ``db``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(db)
    return env


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}


@contextlib.contextmanager
def process(
    argv: list[str],
    env: dict[str, str] | None = None,
    *,
    pattern: bytes,
    stream: str,
    stop_timeout: float = 30.0,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``argv``; yield the first match of ``pattern`` on its ``stream`` and the process;
    SIGTERM it after (SIGKILL if it is still there ``stop_timeout`` seconds later)."""
    pipe = {"stdout": subprocess.PIPE} if stream == "stdout" else {"stderr": subprocess.PIPE}
    proc = subprocess.Popen(argv, env=env, **pipe)  # type: ignore[call-overload]
    try:
        out = proc.stdout if stream == "stdout" else proc.stderr
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            line = out.readline()
            match = re.search(pattern, line)
            if match:
                break
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[1]} did not start: {line!r}")
        yield match.group(1).decode(), proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def open_session(client: httpx.Client, url: str) -> dict[str, str]:
    response = client.post(url, content=INIT, headers=HEADERS)
    headers = dict(HEADERS, **{"mcp-session-id": response.headers["mcp-session-id"]})
    client.post(url, content=INITIALIZED, headers=headers)
    return headers


def latency(url: str, calls: int, warmup: int) -> tuple[float, float]:
    samples: list[float] = []
    with httpx.Client() as client:
        headers = open_session(client, url)
        for i in range(1, calls + warmup + 1):
            started = time.perf_counter()
            response = client.post(url, content=call(i), headers=headers)
            elapsed = time.perf_counter() - started
            if not response.content.endswith(EXPECTED):
                raise RuntimeError(f"unexpected answer: {response.content[:200]!r}")
            if i > warmup:
                samples.append(elapsed * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def throughput(url: str, sessions: int, seconds: float) -> tuple[float, int]:
    done = 0
    limits = httpx.Limits(max_connections=sessions * 2, max_keepalive_connections=sessions * 2)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one() -> None:
            nonlocal done
            response = await client.post(url, content=INIT, headers=HEADERS)
            headers = dict(HEADERS, **{"mcp-session-id": response.headers["mcp-session-id"]})
            await client.post(url, content=INITIALIZED, headers=headers)
            await barrier.wait()
            end = time.perf_counter() + seconds
            i = 0
            while time.perf_counter() < end:
                i += 1
                answer = await client.post(url, content=call(i), headers=headers)
                if not answer.content.endswith(EXPECTED):
                    raise RuntimeError(f"unexpected answer: {answer.content[:200]!r}")
                done += 1

        barrier = asyncio.Barrier(sessions)
        await asyncio.gather(*(one() for _ in range(sessions)))
    return done / seconds, done


def rows(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM calls WHERE method = 'tools/call'").fetchone()[0])
    finally:
        con.close()


def run_config(
    config: str, direct_url: str, options: argparse.Namespace, tmp: Path, n: int
) -> dict[str, Any]:
    if config == "direct":
        p50, p99 = latency(direct_url, options.calls, options.warmup)
        rate, _ = asyncio.run(throughput(direct_url, options.sessions, options.seconds))
        return {"p50_ms": p50, "p99_ms": p99, "calls_per_s": rate}
    db = tmp / f"{config}-{n}.db"
    upstream = (
        ["--url", direct_url] if config == "listen-url" else ["--", PYTHON, str(HERE / "echo_server.py")]
    )
    argv = [MCPMETER, "wrap", "--listen", "127.0.0.1:0", *upstream]
    with process(argv, meter_env(db), pattern=LISTENING, stream="stderr") as (url, _):
        p50, p99 = latency(url, options.calls, options.warmup)
        rate, made = asyncio.run(throughput(url, options.sessions, options.seconds))
    recorded = rows(db)
    expected = options.calls + options.warmup + made
    if recorded != expected:
        raise RuntimeError(f"{config}: {recorded} tools/call rows for {expected} calls")
    return {"p50_ms": p50, "p99_ms": p99, "calls_per_s": rate, "rows_checked": recorded}


def exit_after_sigterm(db: Path, *, in_flight: bool) -> float:
    """Seconds from SIGTERM to the exit of ``wrap --listen`` in front of the silent server,
    with one ``tools/call`` in flight (sent, and seen by the server) or none."""
    argv = [MCPMETER, "wrap", "--listen", "127.0.0.1:0", "--", PYTHON, "-c", SILENT_SERVER]
    with process(argv, meter_env(db), pattern=LISTENING, stream="stderr") as (url, proc):
        with httpx.Client(timeout=30) as client:
            headers = open_session(client, url)
        held = None
        if in_flight:  # by hand: no client waits for the answer, the socket just stays open
            host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
            body = call(1)
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            held = socket.create_connection((host, int(port)), timeout=30)
            held.sendall(
                b"POST /mcp HTTP/1.1\r\nhost: %b\r\n%bcontent-length: %d\r\n\r\n%b"
                % (host.encode(), head.encode(), len(body), body)
            )
            assert proc.stderr is not None
            deadline = time.monotonic() + START_TIMEOUT_S
            while b"silent-server: a call came" not in proc.stderr.readline():
                if time.monotonic() > deadline:
                    raise RuntimeError("the call did not reach the server")
        try:
            started = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            if proc.wait(60) != 0:
                raise RuntimeError(f"wrap --listen exited {proc.returncode} after SIGTERM")
            return time.perf_counter() - started
        finally:
            if held is not None:
                held.close()


def drain(tmp: Path) -> dict[str, Any]:
    floor = exit_after_sigterm(tmp / "drain-floor.db", in_flight=False)
    db = tmp / "drain.db"
    waited = exit_after_sigterm(db, in_flight=True)
    con = sqlite3.connect(db)
    try:
        statuses = [row[0] for row in con.execute("SELECT status FROM calls WHERE method = 'tools/call'")]
    finally:
        con.close()
    if statuses != ["no_response"]:
        raise RuntimeError(f"drain: the unanswered call's rows are {statuses}, not ['no_response']")
    figure = waited - floor
    return {
        "exit_s_nothing_in_flight": floor,
        "exit_s_call_in_flight": waited,
        "drain_s": figure,
        "within_bounds": waited >= DRAIN_S - 0.5 and figure <= DRAIN_S + 1.5,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3000, help="latency samples per round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--quick", action="store_true", help="1 round, fewer calls")
    parser.add_argument("--no-drain", action="store_true", help="skip the drain figure (c)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    options = parser.parse_args()
    if options.quick:
        options.rounds, options.calls, options.warmup, options.seconds = 1, 500, 100, 2.0

    results: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    echo = [PYTHON, str(HERE / "http_echo_server.py")]
    drained: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        with process(echo, pattern=rb"PORT (\d+)", stream="stdout") as (port, _):
            direct_url = f"http://127.0.0.1:{port}/mcp"
            for n in range(options.rounds):
                for config in CONFIGS:
                    results[config].append(run_config(config, direct_url, options, Path(tmp), n))
        if not options.no_drain:
            drained = drain(Path(tmp))

    def median(config: str, key: str) -> float:
        return statistics.median(r[key] for r in results[config])

    summary: dict[str, Any] = {
        "machine": machine(),
        "options": {k: str(v) for k, v in vars(options).items()},
        "configs": {},
    }
    base_p50, base_p99, base_rate = (median("direct", k) for k in ("p50_ms", "p99_ms", "calls_per_s"))
    columns = ("p50 ms", "p99 ms", "added p50", "added p99", "calls/s", "vs direct")
    print(f"{'config':<12} " + " ".join(f"{c:>10}" for c in columns))
    for config in CONFIGS:
        p50, p99, rate = (median(config, k) for k in ("p50_ms", "p99_ms", "calls_per_s"))
        figures = {
            "p50_ms": p50,
            "p99_ms": p99,
            "added_p50_ms": p50 - base_p50,
            "added_p99_ms": p99 - base_p99,
            "calls_per_s": rate,
            "throughput_vs_direct": rate / base_rate,
        }
        summary["configs"][config] = figures
        print(
            f"{config:<12} {p50:>10.3f} {p99:>10.3f} {p50 - base_p50:>+10.3f} {p99 - base_p99:>+10.3f} "
            f"{rate:>10.0f} {rate / base_rate:>10.0%}"
        )
    print(f"({options.rounds} rounds, medians; {options.sessions} sessions for calls/s; rows checked)")
    if drained is not None:
        summary["drain"] = drained
        bounds = f"{DRAIN_S - 0.5:g} s after SIGTERM .. floor + {DRAIN_S + 1.5:g} s"
        verdict = "ok" if drained["within_bounds"] else f"outside {bounds}"
        print(
            f"drain: exit {drained['exit_s_call_in_flight']:.2f} s after SIGTERM with a call in flight, "
            f"{drained['exit_s_nothing_in_flight']:.2f} s with none: {drained['drain_s']:.2f} s ({verdict}); "
            "the call recorded no_response"
        )
    if options.json is not None:
        options.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if drained is None or drained["within_bounds"] else 1


if __name__ == "__main__":
    sys.exit(main())
