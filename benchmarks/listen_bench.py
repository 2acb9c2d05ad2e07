"""Abuse benchmark: well-behaved clients of ``mcpmeter wrap --listen`` while others abuse it.

One ``mcpmeter wrap --listen 127.0.0.1:0 -- echo_server.py`` with its default limits, in
one run:

* ``idle``  - ``--clients`` well-behaved clients (default 8), each with its own session and
  one ``tools/call`` in flight, for ``--seconds``;
* ``abuse`` - the same clients, the same calls, while an abuser process (this script with
  ``--abuse URL``, from 127.0.0.2, another client address) holds ``--half-open`` connections
  that sent half a request head, ``--idle`` connections that sent nothing (each reopened as
  soon as mcpmeter closes it), and opens sessions at ``--flood-rate`` per second without
  ever closing them. During it, a new well-behaved session is opened every second.

Figures: the well-behaved round-trip p50/p99 of each phase, p99 under abuse / p99 idle
(target <= 2x), calls that failed (must be 0), the time a new session takes under abuse,
what the abuser got (statuses, connections closed on it), and the wrapper's server
processes, descriptors and peak memory after the abuse.

    .venv/bin/python benchmarks/listen_bench.py [--quick] [--json FILE]

The requests, the environment and the process helper are ``http_bench.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from http_bench import (  # noqa: E402
    EXPECTED,
    HEADERS,
    INIT,
    INITIALIZED,
    LISTENING,
    MCPMETER,
    PYTHON,
    call,
    machine,
    meter_env,
    process,
)

HALF_HEAD = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
ABUSER_ADDRESS = "127.0.0.2"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the abuser -------------------------------------------------------------------------------


class Abuse:
    def __init__(self, host: str, port: int, seconds: float) -> None:
        self.host, self.port = host, port
        self.end = time.monotonic() + seconds
        self.counts: Counter[str] = Counter()
        self.capped = False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, local_addr=(ABUSER_ADDRESS, 0))

    async def hold(self, first: bytes, kind: str, ready: asyncio.Event) -> None:
        """One connection at a time, sending ``first`` and nothing more, reopened when closed."""
        opened = False
        while time.monotonic() < self.end:
            try:
                reader, writer = await self._connect()
                if first:
                    writer.write(first)
                self.counts[f"{kind} opened"] += 1
                if not opened:
                    opened = True
                    ready.set()
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(64), self.end - time.monotonic())
                    status = answer[9:12].decode(errors="replace") if answer.startswith(b"HTTP/") else "none"
                    self.counts[f"{kind} closed by mcpmeter ({status})"] += 1
                writer.close()
            except OSError as exc:
                self.counts[f"{kind} {type(exc).__name__}"] += 1
                await asyncio.sleep(0.05)
        ready.set()

    async def flood(self, rate: float) -> None:
        """A new session every 1/rate s, never closed (each on a connection of its own)."""
        request = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        request += b"accept: application/json, text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (
            len(INIT),
            INIT,
        )
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                reader, writer = await self._connect()
                writer.write(request)
                answer = await asyncio.wait_for(reader.read(64), 30)
                status = answer[9:12].decode(errors="replace") or "closed"
                self.counts[f"session flood {status}"] += 1
                if status == "503" and not self.capped:  # the sessions it holds fill a cap
                    self.capped = True
                    print("capped", flush=True)
                writer.close()
            except (OSError, TimeoutError) as exc:
                self.counts[f"session flood {type(exc).__name__}"] += 1

        while time.monotonic() < self.end:
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(1 / rate)
        if pending:
            await asyncio.wait(pending, timeout=30)

    async def run(self, half_open: int, idle: int, rate: float) -> None:
        """Until ``seconds`` have passed or SIGTERM comes."""
        main = asyncio.current_task()
        assert main is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        readies = [asyncio.Event() for _ in range(half_open + idle)]
        tasks = [asyncio.create_task(self.hold(HALF_HEAD, "half-open", e)) for e in readies[:half_open]]
        tasks += [asyncio.create_task(self.hold(b"", "idle", e)) for e in readies[half_open:]]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*(e.wait() for e in readies))
            print("abusing", flush=True)
            if rate > 0:
                tasks.append(asyncio.create_task(self.flood(rate)))
            await asyncio.gather(*tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def abuse_main(options: argparse.Namespace) -> int:
    raise_nofile()
    host, port = options.abuse.removeprefix("http://").split("/")[0].rsplit(":", 1)
    abuse = Abuse(host, int(port), options.seconds)
    asyncio.run(abuse.run(options.half_open, options.idle, options.flood_rate))
    print(json.dumps(dict(sorted(abuse.counts.items()))), flush=True)
    return 0


# -- the well-behaved clients -----------------------------------------------------------------


async def open_session(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    """A new session's headers (HTTPStatusError when refused)."""
    response = await client.post(url, content=INIT, headers=HEADERS)
    response.raise_for_status()
    headers = dict(HEADERS, **{"mcp-session-id": response.headers["mcp-session-id"]})
    await client.post(url, content=INITIALIZED, headers=headers)
    return headers


async def phase(
    url: str,
    pool: list[tuple[httpx.AsyncClient, dict[str, str]]],
    seconds: float,
    *,
    newcomers: bool,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """The sessions of ``pool`` doing round trips for ``seconds`` or until ``stop`` is set
    (and, with ``newcomers``, a new session opened every second): latencies (ms), failures."""
    samples: list[float] = []
    failures: Counter[str] = Counter()
    opened: list[float] = []
    refused: Counter[str] = Counter()
    began = time.perf_counter()
    end = began + seconds
    if stop is not None:

        async def stopper() -> None:
            nonlocal end
            await stop.wait()
            end = time.perf_counter()

        watch = asyncio.create_task(stopper())

    async def one(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        i = 0
        while time.perf_counter() < end:
            i += 1
            started = time.perf_counter()
            try:
                answer = await client.post(url, content=call(i), headers=headers)
            except httpx.HTTPError as exc:
                failures[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - started
            if answer.status_code != 200 or not answer.content.endswith(EXPECTED):
                failures[f"HTTP {answer.status_code}"] += 1
            else:
                samples.append(elapsed * 1000)

    async def newcomer() -> None:
        while time.perf_counter() < end - 1:
            await asyncio.sleep(1)
            started = time.perf_counter()
            async with httpx.AsyncClient(timeout=30) as client:
                try:
                    await open_session(client, url)
                    opened.append(round((time.perf_counter() - started) * 1000, 1))
                except httpx.HTTPStatusError as exc:
                    refused[f"HTTP {exc.response.status_code}"] += 1
                except httpx.HTTPError as exc:
                    refused[type(exc).__name__] += 1

    jobs = [one(client, headers) for client, headers in pool]
    if newcomers:
        jobs.append(newcomer())
    await asyncio.gather(*jobs)
    if stop is not None:
        watch.cancel()
    samples.sort()
    return {
        "seconds": round(time.perf_counter() - began, 2),
        "calls": len(samples),
        "p50_ms": statistics.median(samples),
        "p99_ms": samples[max(0, int(len(samples) * 0.99) - 1)],
        "failures": dict(failures),
        "new_sessions_ms": opened,
        "new_sessions_refused": dict(refused),
    }


async def run(url: str, pid: int, max_servers: int, options: argparse.Namespace) -> dict[str, Any]:
    """Both phases, over the same sessions: opened before the abuse, as established clients."""
    async with contextlib.AsyncExitStack() as stack:
        pool = []
        for _ in range(options.clients):
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            pool.append((client, await open_session(client, url)))
        idle = await phase(url, pool, options.seconds, newcomers=False)
        abuser = await asyncio.create_subprocess_exec(
            PYTHON,
            __file__,
            "--abuse",
            url,
            "--seconds",
            str(options.seconds + 60),  # SIGTERM ends it when the phase is over
            "--half-open",
            str(options.half_open),
            "--idle",
            str(options.idle),
            "--flood-rate",
            str(options.flood_rate),
            stdout=subprocess.PIPE,
        )
        assert abuser.stdout is not None
        if (await abuser.stdout.readline()).strip() != b"abusing":
            raise RuntimeError("the abuser did not start")
        ramped = asyncio.Event()

        async def until_ramped() -> None:
            assert abuser.stdout is not None
            if (await abuser.stdout.readline()).strip() != b"capped":
                raise RuntimeError("the abuser's sessions were never refused")
            while server_processes(pid) < max_servers:  # noqa: ASYNC110 (/proc: nothing to wait on)
                await asyncio.sleep(0.05)
            ramped.set()

        watcher = asyncio.create_task(until_ramped())
        # The ramp: the flood's sessions take every server slot and their servers start.
        ramp = await phase(url, pool, 120, newcomers=False, stop=ramped)
        await watcher
        abused = await phase(url, pool, options.seconds, newcomers=True)
        state = wrapper_state(pid)
        abuser.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(abuser.stdout.read(), 60)
        await abuser.wait()
    lines = out.decode().strip().splitlines()
    counts = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"idle": idle, "ramp": ramp, "abuse": abused, "wrapper_after_abuse": state, "abuser": counts}


# -- the run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def wrapper(db: Path, flags: list[str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    argv = [MCPMETER, "wrap", "--listen", "127.0.0.1:0", *flags, "--", PYTHON, str(HERE / "echo_server.py")]
    with process(argv, meter_env(db), pattern=LISTENING, stream="stderr", stop_timeout=60) as started:
        yield started


def server_processes(pid: int) -> int:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum(len((task / "children").read_text().split()) for task in tasks)


def max_servers(flags: list[str]) -> int:
    """The wrapper's --max-servers: the flag's value when given, else the default."""
    from mcpmeter.proxy.listen.limits import ListenLimits

    if "--max-servers" in flags:
        return int(flags[flags.index("--max-servers") + 1])
    return ListenLimits().max_servers


def wrapper_state(pid: int) -> dict[str, int]:
    children = server_processes(pid)
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "server_processes": children,
        "open_fds": len(os.listdir(f"/proc/{pid}/fd")),
        "peak_rss_mb": int(status["VmHWM"].split()[0]) // 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--half-open", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--flood-rate", type=float, default=100.0, help="session opens per second")
    parser.add_argument("--quick", action="store_true", help="4 s phases")
    parser.add_argument(
        "--wrap-flags", default="", help="more wrap flags, e.g. '--max-servers 20' (default: none)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--abuse", metavar="URL", help=argparse.SUPPRESS)  # the abuser's own mode
    options = parser.parse_args()
    if options.abuse:
        return abuse_main(options)
    if options.quick:
        options.seconds = 4.0
    raise_nofile()

    with (
        tempfile.TemporaryDirectory() as tmp,
        wrapper(Path(tmp) / "bench.db", options.wrap_flags.split()) as (url, proc),
    ):
        figures = asyncio.run(run(url, proc.pid, max_servers(options.wrap_flags.split()), options))
    idle, ramp, abused = figures["idle"], figures["ramp"], figures["abuse"]
    state, abuser_counts = figures["wrapper_after_abuse"], figures["abuser"]

    ratio = abused["p99_ms"] / idle["p99_ms"]
    summary = {
        "machine": machine(),
        "options": {k: str(v) for k, v in vars(options).items() if k != "abuse"},
        "idle": idle,
        "ramp": ramp,
        "abuse": abused,
        "p99_ratio": ratio,
        "wrapper_after_abuse": state,
        "abuser": abuser_counts,
    }
    print(f"{'phase':<8} {'seconds':>8} {'calls':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for name, figures in (("idle", idle), ("ramp", ramp), ("abuse", abused)):
        failed = sum(figures["failures"].values())
        print(
            f"{name:<8} {figures['seconds']:>8.1f} {figures['calls']:>8} {figures['p50_ms']:>8.2f} "
            f"{figures['p99_ms']:>8.2f} {failed:>7}"
        )
    print("(ramp: from the abuse's start until its session flood holds every server slot, all started)")
    verdict = "ok" if ratio <= 2 else "over the 2x target"
    print(f"p99 under abuse / idle: {ratio:.2f}x ({verdict})")
    print(
        f"new sessions under abuse: opened in {abused['new_sessions_ms']} ms, "
        f"refused {abused['new_sessions_refused'] or 'none'}"
    )
    print(f"abuse: {options.half_open} half-open heads, {options.idle} idle connections, ", end="")
    print(f"{options.flood_rate:g} session opens/s from {ABUSER_ADDRESS}; the abuser got:")
    for key, value in abuser_counts.items():
        print(f"  {key}: {value}")
    print(
        f"wrapper after the abuse: {state['server_processes']} server processes, "
        f"{state['open_fds']} open descriptors, peak RSS {state['peak_rss_mb']} MB"
    )
    if options.json is not None:
        options.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
