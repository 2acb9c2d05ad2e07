"""Relay benchmark: mcpmeter wrap against no relay and against the floor relay, in one run.

Three configurations talk to the same raw stdio echo server (``echo_server.py``):

* ``direct``   - the load generator talks to the echo server's stdio itself;
* ``floor``    - through ``floor_relay.py``, the simplest correct byte relay (no parsing);
* ``mcpmeter`` - through ``mcpmeter wrap -- <echo server>``, with ``MCPMETER_DB`` in a temp dir.

Figures (each configuration runs ``--rounds`` times, interleaved; medians are reported):

a. round-trip latency p50/p99 of a small ``tools/call``, one in flight;
b. calls/s with ``--inflight`` requests outstanding (pipelined); for mcpmeter, the store is
   checked after exit for exactly one row per request;
c. MiB/s for ``--big-mb`` MiB results, one in flight;
d. peak RSS (``VmHWM``, polled from ``/proc``) of the relay process, small-call and big runs;
e. start-up: spawn to ``initialize`` response received.

The load generator uses raw bytes over pipes and a blocking loop (no SDK, no asyncio): its
own cost is the same in every configuration. Every response is checked byte for byte
(small calls) or by size, head and tail (big results): a relay must be transparent.

    .venv/bin/python benchmarks/relay_bench.py [--quick] [--json FILE] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from echo_server import MIB, PREFIX, SMALL_SUFFIX  # noqa: E402

ECHO = HERE / "echo_server.py"
FLOOR = HERE / "floor_relay.py"
CONFIGS = ("direct", "floor", "mcpmeter")
READ_CHUNK = 1 << 16
#: A phase that takes longer than this is a hang: the process group is killed.
PHASE_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0

INIT_REQUEST = (
    b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    b'"capabilities":{},"clientInfo":{"name":"relay-bench","version":"1.0"}}}\n'
)
INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n'
#: A typical small tool call, stamped with the join key as an agent runtime would.
SMALL_REQUEST = (
    b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo",'
    b'"arguments":{"text":"hello"},"_meta":{"dev.mcpmeter/requestId":"req-%d"}}}\n'
)
BIG_REQUEST = (
    b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"big","arguments":{"mb":%s}}}\n'
)
SMALL_RESPONSE_TAIL = SMALL_SUFFIX[:-1]  # the response line without its newline
BIG_TAIL = b'"}],"isError":false}}'


class BenchError(Exception):
    pass


# -- processes -------------------------------------------------------------------------------


def read_hwm_kib(pid: int) -> int | None:
    """``VmHWM`` (peak resident set) of ``pid`` in KiB, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Proc:
    """One spawned configuration: its stdin and stdout are our pipes; raw, blocking I/O."""

    def __init__(self, argv: list[str], env: dict[str, str], stderr_path: Path) -> None:
        self.argv = argv
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.t_spawn = time.perf_counter()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
            env=env,
            start_new_session=True,  # its own group: the watchdog kills the whole tree
        )
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.pid = self.popen.pid
        self.wfd = self.popen.stdin.fileno()
        self.rfd = self.popen.stdout.fileno()
        self.buf = bytearray()
        self.hwm_kib = 0
        self.killed_by_watchdog = ""
        self._exited = threading.Event()
        self._poller = threading.Thread(target=self._poll_hwm, daemon=True)
        self._poller.start()

    def _poll_hwm(self) -> None:
        while not self._exited.wait(0.02):
            self.sample_hwm()

    def sample_hwm(self) -> None:
        value = read_hwm_kib(self.pid)
        if value is not None and value > self.hwm_kib:
            self.hwm_kib = value

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view) :]

    def read_line(self) -> bytearray:
        """The next line without its newline (reads 64 KiB at a time; no size limit)."""
        buf = self.buf
        nl = buf.find(b"\n")
        while nl < 0:
            start = len(buf)
            chunk = os.read(self.rfd, READ_CHUNK)
            if not chunk:
                raise BenchError(self._eof_message())
            buf += chunk
            nl = buf.find(b"\n", start)
        line = buf[:nl]
        del buf[: nl + 1]
        return line

    def _eof_message(self) -> str:
        if self.killed_by_watchdog:
            return self.killed_by_watchdog
        return "the relay closed its stdout early"

    @contextlib.contextmanager
    def deadline(self, phase: str, seconds: float = PHASE_TIMEOUT_S) -> Iterator[None]:
        def fire() -> None:
            self.killed_by_watchdog = f"{phase}: timed out after {seconds:.0f}s (hang? killed)"
            self.kill()

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def close_and_wait(self) -> tuple[int, float, int]:
        """EOF to the relay; wait for it. Returns (exit code, seconds to exit, ru_maxrss KiB)."""
        self.sample_hwm()
        t0 = time.perf_counter()
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        with self.deadline("exit after EOF", EXIT_TIMEOUT_S):
            _, status, usage = os.wait4(self.pid, 0)
        elapsed = time.perf_counter() - t0
        self._exited.set()
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self.finish()
        if self.killed_by_watchdog:
            raise BenchError(self.killed_by_watchdog)
        return self.popen.returncode, elapsed, usage.ru_maxrss

    def finish(self) -> None:
        """Release pipes; kill what is left (only after an error)."""
        self._exited.set()
        if self.popen.returncode is None:
            self.kill()
            with contextlib.suppress(Exception):
                self.popen.wait(5)
        for f in (self.popen.stdin, self.popen.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._stderr.close()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


# -- the work --------------------------------------------------------------------------------


def handshake(proc: Proc) -> float:
    """initialize + initialized; returns seconds from spawn to the initialize response."""
    proc.send(INIT_REQUEST)
    line = proc.read_line()
    t = time.perf_counter() - proc.t_spawn
    if b'"bench-echo"' not in line or not line.startswith(PREFIX + b"0,"):
        raise BenchError(f"unexpected initialize response: {bytes(line[:200])!r}")
    proc.send(INITIALIZED)
    return t


def expected_small(i: int) -> bytes:
    return b"%s%d%s" % (PREFIX, i, SMALL_RESPONSE_TAIL)


def latency_run(proc: Proc, first_id: int, warmup: int, n: int) -> list[float]:
    """One request in flight; returns ``n`` round-trip times in seconds (after ``warmup``)."""
    samples: list[float] = []
    clock = time.perf_counter
    send = proc.send
    read_line = proc.read_line
    for k in range(warmup + n):
        i = first_id + k
        request = SMALL_REQUEST % (i, i)
        t0 = clock()
        send(request)
        line = read_line()
        t1 = clock()
        if line != expected_small(i):
            raise BenchError(f"latency: wrong response to id {i}: {bytes(line[:200])!r}")
        if k >= warmup:
            samples.append(t1 - t0)
    return samples


def pipelined_run(proc: Proc, first_id: int, total: int, inflight: int) -> float:
    """Keep ``inflight`` requests outstanding until ``total`` are answered; returns seconds."""
    if proc.buf:
        raise BenchError("pipelined: stray bytes before the run")
    rfd = proc.rfd
    send = proc.send
    buf = bytearray()
    next_id = first_id
    expect = first_id
    end_id = first_id + total
    t0 = time.perf_counter()
    burst = min(inflight, total)
    send(b"".join(SMALL_REQUEST % (i, i) for i in range(next_id, next_id + burst)))
    next_id += burst
    while expect < end_id:
        chunk = os.read(rfd, READ_CHUNK)
        if not chunk:
            raise BenchError(proc._eof_message())
        buf += chunk
        last = buf.rfind(b"\n")
        if last < 0:
            continue
        lines = buf[:last].split(b"\n")
        del buf[: last + 1]
        for line in lines:
            if line != b"%s%d%s" % (PREFIX, expect, SMALL_RESPONSE_TAIL):
                raise BenchError(f"pipelined: wrong response, expected id {expect}: {bytes(line[:200])!r}")
            expect += 1
        more = min(len(lines), end_id - next_id)
        if more > 0:
            send(b"".join(SMALL_REQUEST % (i, i) for i in range(next_id, next_id + more)))
            next_id += more
    elapsed = time.perf_counter() - t0
    if buf:
        raise BenchError("pipelined: bytes after the last response")
    return elapsed


def big_run(proc: Proc, first_id: int, n: int, mb: float) -> tuple[float, int]:
    """``n`` big results one at a time (after one untimed warm-up); returns (seconds, bytes)."""
    payload = int(mb * MIB)
    arg = repr(mb).encode()
    elapsed = 0.0
    received = 0
    for k in range(n + 1):
        i = first_id + k
        t0 = time.perf_counter()
        proc.send(BIG_REQUEST % (i, arg))
        line = proc.read_line()
        t1 = time.perf_counter()
        head = b"%s%d," % (PREFIX, i)
        if len(line) < payload or not line.startswith(head) or not line.endswith(BIG_TAIL):
            raise BenchError(f"big: wrong response to id {i} ({len(line)} bytes)")
        if k:
            elapsed += t1 - t0
            received += len(line) + 1
    return elapsed, received


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


# -- configurations --------------------------------------------------------------------------


def mcpmeter_command() -> list[str]:
    local = Path(sys.executable).with_name("mcpmeter")
    if local.exists():
        return [str(local)]
    found = shutil.which("mcpmeter")
    return [found] if found else [sys.executable, "-m", "mcpmeter"]


def server_argv() -> list[str]:
    return [sys.executable, str(ECHO)]


def config_argv(name: str) -> list[str]:
    if name == "direct":
        return server_argv()
    if name == "floor":
        return [sys.executable, str(FLOOR), *server_argv()]
    return [*mcpmeter_command(), "wrap", "--", *server_argv()]


@dataclass
class Params:
    rounds: int
    warmup: int
    latency_calls: int
    calls: int
    inflight: int
    big_calls: int
    big_mb: float
    startups: int


@dataclass
class Results:
    raw: dict[str, dict[str, list[Any]]] = field(
        default_factory=lambda: {c: {} for c in CONFIGS}
    )  # config -> figure -> per-round values
    errors: list[str] = field(default_factory=list)
    stderr_notes: dict[str, int] = field(default_factory=dict)

    def add(self, config: str, figure: str, value: Any) -> None:
        self.raw[config].setdefault(figure, []).append(value)

    def note_stderr(self, config: str, text: str) -> None:
        for line in text.splitlines():
            line = line.strip()
            if line:
                key = f"{config}: {line[:300]}"
                self.stderr_notes[key] = self.stderr_notes.get(key, 0) + 1


class Bench:
    def __init__(self, params: Params, workdir: Path, profile_dir: Path | None) -> None:
        self.p = params
        self.workdir = workdir
        self.profile_dir = profile_dir
        self.results = Results()
        self._seq = 0

    def _env(self, db: Path | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
        if db is not None:
            env["MCPMETER_DB"] = str(db)
            env["MCPMETER_LOG"] = "info"  # a one-line summary on stderr at exit
        return env

    def _spawn(self, config: str, db: Path | None) -> Proc:
        self._seq += 1
        stderr = self.workdir / f"{self._seq:04d}-{config}.stderr"
        return Proc(config_argv(config), self._env(db), stderr)

    def _profile(self, config: str, proc: Proc, label: str) -> subprocess.Popen[bytes] | None:
        if self.profile_dir is None or config != "mcpmeter":
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out = self.profile_dir / f"mcpmeter-{label}-{self._seq:04d}.txt"
        return subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(proc.pid),
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "500",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _end(self, config: str, proc: Proc, spy: subprocess.Popen[bytes] | None) -> tuple[float, int]:
        """Close, wait, check the exit code; returns (seconds to exit, peak RSS KiB)."""
        code, exit_s, _ = proc.close_and_wait()
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        if code != 0:
            raise BenchError(f"exit code {code}")
        return exit_s, proc.hwm_kib

    def _count_rows(self, db: Path) -> tuple[int, dict[str, int]]:
        conn = sqlite3.connect(db)
        try:
            total = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
            statuses = dict(conn.execute("SELECT status, count(*) FROM calls GROUP BY status").fetchall())
        finally:
            conn.close()
        return int(total), statuses

    def _guard(self, config: str, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (BenchError, OSError, sqlite3.Error) as exc:
            self.results.errors.append(f"{config} {what}: {exc}")
            print(f"    ERROR {config} {what}: {exc}", flush=True)

    # -- one run of each kind --------------------------------------------------------------

    def small(self, config: str, rnd: int) -> None:
        p = self.p
        db = self.workdir / f"small-{rnd}.db" if config == "mcpmeter" else None
        proc = self._spawn(config, db)
        try:
            with proc.deadline("small: initialize"):
                handshake(proc)
            spy = self._profile(config, proc, "small")
            with proc.deadline("small: latency"):
                samples = latency_run(proc, 1, p.warmup, p.latency_calls)
            first = 1 + p.warmup + p.latency_calls
            with proc.deadline("small: pipelined"):
                elapsed = pipelined_run(proc, first, p.calls, p.inflight)
            exit_s, hwm = self._end(config, proc, spy)
        finally:
            proc.finish()
            self.results.note_stderr(config, proc.stderr_text())
        samples.sort()
        r = self.results
        r.add(config, "p50_us", percentile(samples, 50) * 1e6)
        r.add(config, "p99_us", percentile(samples, 99) * 1e6)
        r.add(config, "calls_per_s", p.calls / elapsed)
        r.add(config, "rss_small_mib", hwm / 1024)
        r.add(config, "exit_small_ms", exit_s * 1000)
        line = (
            f"    {config:<8} small: p50 {percentile(samples, 50) * 1e6:7.1f} us  "
            f"p99 {percentile(samples, 99) * 1e6:7.1f} us  {p.calls / elapsed:8.0f} calls/s  "
            f"RSS {hwm / 1024:5.1f} MiB  exit {exit_s * 1000:5.0f} ms"
        )
        if db is not None:
            expected = 1 + p.warmup + p.latency_calls + p.calls
            rows, statuses = self._count_rows(db)
            r.add(config, "rows_small", rows)
            r.add(config, "rows_small_expected", expected)
            line += f"  rows {rows}/{expected} {statuses}"
        print(line, flush=True)

    def big(self, config: str, rnd: int) -> None:
        p = self.p
        db = self.workdir / f"big-{rnd}.db" if config == "mcpmeter" else None
        proc = self._spawn(config, db)
        try:
            with proc.deadline("big: initialize"):
                handshake(proc)
            spy = self._profile(config, proc, "big")
            with proc.deadline("big: results"):
                elapsed, received = big_run(proc, 1, p.big_calls, p.big_mb)
            exit_s, hwm = self._end(config, proc, spy)
        finally:
            proc.finish()
            self.results.note_stderr(config, proc.stderr_text())
        r = self.results
        rate = received / MIB / elapsed
        r.add(config, "big_mib_per_s", rate)
        r.add(config, "rss_big_mib", hwm / 1024)
        r.add(config, "big_frame_bytes", received // p.big_calls)
        line = (
            f"    {config:<8} big:   {rate:7.1f} MiB/s  RSS {hwm / 1024:5.1f} MiB  "
            f"exit {exit_s * 1000:5.0f} ms"
        )
        if db is not None:
            expected = 2 + p.big_calls
            rows, statuses = self._count_rows(db)
            r.add(config, "rows_big", rows)
            r.add(config, "rows_big_expected", expected)
            line += f"  rows {rows}/{expected} {statuses}"
        print(line, flush=True)

    def startup(self, config: str, count: int) -> None:
        db = self.workdir / "startup.db" if config == "mcpmeter" else None
        times = []
        for _ in range(count):
            proc = self._spawn(config, db)
            try:
                with proc.deadline("start-up"):
                    t = handshake(proc)
                _, hwm = self._end(config, proc, None)
            finally:
                proc.finish()
                self.results.note_stderr(config, proc.stderr_text())
            self.results.add(config, "startup_ms", t * 1000)
            self.results.add(config, "rss_idle_mib", hwm / 1024)
            times.append(t * 1000)
        print(f"    {config:<8} start-up: {', '.join(f'{t:.0f}' for t in times)} ms", flush=True)

    def run(self) -> None:
        p = self.p
        per_round = [
            p.startups // p.rounds + (1 if r < p.startups % p.rounds else 0) for r in range(p.rounds)
        ]
        for rnd in range(p.rounds):
            order = CONFIGS[rnd % 3 :] + CONFIGS[: rnd % 3]  # rotate to spread drift
            print(f"round {rnd + 1}/{p.rounds} ({', '.join(order)})", flush=True)
            for config in order:
                self._guard(config, f"small run {rnd + 1}", lambda c=config, r=rnd: self.small(c, r))
            for config in order:
                self._guard(config, f"big run {rnd + 1}", lambda c=config, r=rnd: self.big(c, r))
            for config in order:
                n = per_round[rnd]
                if n:
                    self._guard(config, f"start-up {rnd + 1}", lambda c=config, n=n: self.startup(c, n))


# -- the report ------------------------------------------------------------------------------


@dataclass
class Figure:
    key: str
    label: str
    fmt: str
    target: str
    check: Callable[[float | None, float | None, float | None], bool | None]
    ratio: bool = True


def median_of(values: list[Any] | None) -> float | None:
    return float(statistics.median(values)) if values else None


def summarise(results: Results, params: Params) -> dict[str, Any]:
    med = {c: {k: median_of(v) for k, v in results.raw[c].items()} for c in CONFIGS}
    for c in CONFIGS:
        big, idle = med[c].get("rss_big_mib"), med[c].get("rss_idle_mib")
        med[c]["rss_big_growth_mib"] = None if big is None or idle is None else max(0.0, big - idle)
    frame = med["mcpmeter"].get("big_frame_bytes") or med["floor"].get("big_frame_bytes") or 0.0
    rss_big_limit = 3 * frame / MIB

    def le(limit: float) -> Callable[[float | None, float | None, float | None], bool | None]:
        return lambda _d, _f, m: None if m is None else m <= limit

    def ratio_le(x: float) -> Callable[[float | None, float | None, float | None], bool | None]:
        return lambda _d, f, m: None if m is None or not f else m / f <= x

    def ratio_ge(x: float) -> Callable[[float | None, float | None, float | None], bool | None]:
        return lambda _d, f, m: None if m is None or not f else m / f >= x

    figures = [
        Figure("p50_us", "latency p50, 1 in flight (us)", "{:.1f}", "<= 1.25x floor", ratio_le(1.25)),
        Figure("p99_us", "latency p99, 1 in flight (us)", "{:.1f}", "(info)", lambda *_: None),
        Figure(
            "calls_per_s",
            f"calls/s, {params.inflight} in flight",
            "{:.0f}",
            ">= 0.6x floor",
            ratio_ge(0.6),
        ),
        Figure(
            "big_mib_per_s",
            f"{params.big_mb:g} MiB results (MiB/s)",
            "{:.1f}",
            ">= 0.8x floor",
            ratio_ge(0.8),
        ),
        Figure("rss_small_mib", "peak RSS, small calls (MiB)", "{:.1f}", "<= 60 MiB", le(60.0)),
        Figure(
            "rss_big_mib",
            f"peak RSS, {params.big_mb:g} MiB results (MiB)",
            "{:.1f}",
            f"(info; 3x frame = {rss_big_limit:.1f} MiB)",
            lambda *_: None,
        ),
        # What a big frame costs: peak RSS above the same process's start-up peak. The
        # interpreter and its modules (about 20 MiB) are not the frame's doing.
        Figure(
            "rss_big_growth_mib",
            f"RSS above idle, {params.big_mb:g} MiB results (MiB)",
            "{:.1f}",
            f"<= {rss_big_limit:.1f} MiB (3x frame)",
            le(rss_big_limit),
        ),
        Figure(
            "startup_ms",
            "start-up to initialize (ms)",
            "{:.0f}",
            "<= floor + 100 ms",
            lambda _d, f, m: None if m is None or f is None else m <= f + 100.0,
        ),
        Figure("rss_idle_mib", "peak RSS, start-up runs (MiB)", "{:.1f}", "(info)", lambda *_: None),
        Figure("exit_small_ms", "exit after stdin EOF (ms)", "{:.0f}", "(info)", lambda *_: None),
    ]
    table = []
    for fig in figures:
        d, f, m = (med[c].get(fig.key) for c in CONFIGS)
        ok = fig.check(d, f, m)
        table.append(
            {
                "figure": fig.key,
                "label": fig.label,
                "direct": d,
                "floor": f,
                "mcpmeter": m,
                "ratio": (m / f) if (m is not None and f) else None,
                "target": fig.target,
                "result": None if ok is None else ("PASS" if ok else "MISS"),
                "fmt": fig.fmt,
            }
        )
    # Rows: every run's count must equal its expectation (not a median: each run counts).
    for kind in ("small", "big"):
        got = results.raw["mcpmeter"].get(f"rows_{kind}", [])
        want = results.raw["mcpmeter"].get(f"rows_{kind}_expected", [])
        ok_rows = bool(got) and got == want
        if got and ok_rows and len(set(got)) == 1:
            cell = f"{got[0]}/{want[0]}"  # every run alike
        else:
            cell = " ".join(f"{g}/{w}" for g, w in zip(got, want, strict=False)) or None
        table.append(
            {
                "figure": f"rows_{kind}",
                "label": f"store rows after exit, {kind} runs",
                "direct": None,
                "floor": None,
                "mcpmeter": cell,
                "ratio": None,
                "target": f"1 row per request, {len(got)} runs",
                "result": "PASS" if ok_rows else "MISS",
                "fmt": "{}",
            }
        )
    return {"medians": med, "table": table}


def print_table(summary: dict[str, Any], results: Results) -> None:
    def cell(value: Any, fmt: str) -> str:
        if value is None:
            return "-"
        return fmt.format(value) if not isinstance(value, str) else value

    head = (
        f"{'figure':<36} {'direct':>10} {'floor':>10} {'mcpmeter':>12} {'mcp/floor':>10}  "
        f"{'target':<26} result"
    )
    print()
    print(head)
    print("-" * len(head))
    for row in summary["table"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(
            f"{row['label']:<36} {cell(row['direct'], row['fmt']):>10} {cell(row['floor'], row['fmt']):>10} "
            f"{cell(row['mcpmeter'], row['fmt']):>12} {ratio:>10}  {row['target']:<26} {row['result'] or ''}"
        )
    print()
    print("per-round values (direct | floor | mcpmeter):")
    for key in ("p50_us", "p99_us", "calls_per_s", "big_mib_per_s", "rss_small_mib", "rss_big_mib"):
        cols = [" ".join(f"{v:.1f}" for v in results.raw[c].get(key, [])) for c in CONFIGS]
        print(f"  {key:<14} {' | '.join(cols)}")
    print("(direct RSS is the echo server's own; mcpmeter's RSS excludes its server process)")
    if results.stderr_notes:
        print()
        print("stderr of the relays (count x line):")
        for line, count in sorted(results.stderr_notes.items()):
            print(f"  {count:3d} x {line}")
    if results.errors:
        print()
        print("ERRORS:")
        for err in results.errors:
            print(f"  {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (one round, fewer calls)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the figures to FILE")
    parser.add_argument("--rounds", type=int, help="rounds per configuration (default 5, quick 1)")
    parser.add_argument("--calls", type=int, help="pipelined calls per run (default 50000, quick 10000)")
    parser.add_argument(
        "--latency-calls", type=int, help="timed 1-in-flight calls (default 5000, quick 1000)"
    )
    parser.add_argument("--inflight", type=int, default=16, help="requests outstanding (default 16)")
    parser.add_argument("--big-calls", type=int, help="big results per run (default 25, quick 8)")
    parser.add_argument("--big-mb", type=float, default=10.0, help="size of a big result in MiB (default 10)")
    parser.add_argument("--startups", type=int, help="start-ups per configuration (default 15, quick 5)")
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        type=Path,
        help="profile mcpmeter's small and big runs with py-spy (collapsed stacks in DIR; perturbs figures)",
    )
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: int | None, full: int, short: int) -> int:
        return value if value is not None else (short if quick else full)

    params = Params(
        rounds=pick(args.rounds, 5, 1),
        warmup=200,
        latency_calls=pick(args.latency_calls, 5000, 1000),
        calls=pick(args.calls, 50_000, 10_000),
        inflight=args.inflight,
        big_calls=pick(args.big_calls, 25, 8),
        big_mb=args.big_mb,
        startups=pick(args.startups, 15, 5),
    )
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    print(
        f"relay_bench: {params.rounds} round(s); latency {params.latency_calls} calls"
        f" (+{params.warmup} warm-up);"
        f" {params.calls} calls at {params.inflight} in flight; {params.big_calls} x {params.big_mb:g} MiB;"
        f" {params.startups} start-ups; python {platform.python_version()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    print(f"mcpmeter: {' '.join(config_argv('mcpmeter'))}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        bench = Bench(params, Path(tmp), args.py_spy)
        bench.run()
    results = bench.results
    summary = summarise(results, params)
    print_table(summary, results)
    total_s = time.perf_counter() - started
    print(f"\ntotal {total_s:.0f} s")
    if args.json is not None:
        doc = {
            "params": params.__dict__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "seconds": total_s,
            "figures": [{k: v for k, v in row.items() if k != "fmt"} for row in summary["table"]],
            "medians": summary["medians"],
            "rounds": results.raw,
            "stderr": results.stderr_notes,
            "errors": results.errors,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
