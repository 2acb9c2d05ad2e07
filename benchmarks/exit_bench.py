"""How long `wrap` takes to exit after its client closes stdin, with a healthy and a stuck store.

    .venv/bin/python benchmarks/exit_bench.py [--rounds 5] [--calls 2000]

Each round pipes ``--calls`` tools/call requests into the process, closes stdin, and times
stdin EOF -> process exit for: the server alone (the floor: its own exit after EOF), `wrap`
on a healthy SQLite store, and `wrap` on a store another process holds locked (BEGIN
EXCLUSIVE), whose rows must be spilled. Rounds are interleaved, medians reported. The
contract (DESIGN.md, "Failure rules"): gone within 2 s of EOF even with the store stuck,
well inside the second or two an MCP client waits before it sends SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relay_bench import mcpmeter_command, server_argv  # noqa: E402

BOUND_S = 2.0


def requests(n: int) -> bytes:
    return b"".join(
        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo","arguments":{}}}\n' % i
        for i in range(n)
    )


def time_exit(argv: list[str], env: dict[str, str], data: bytes) -> float:
    """Seconds from stdin EOF to exit, once the first answer shows the process is up."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    eof_at: list[float] = []

    def send() -> None:  # the answers are read while the requests go in
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()
        eof_at.append(time.monotonic())

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    proc.stdout.readline()
    drain = threading.Thread(target=proc.stdout.read, daemon=True)
    drain.start()
    sender.join(60)
    eof = eof_at[0]
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - eof
    drain.join(10)
    proc.stdout.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    data = requests(args.calls)
    results: dict[str, list[float]] = {"floor": [], "healthy": [], "stuck": []}
    with tempfile.TemporaryDirectory(prefix="mcpmeter-exit-bench-") as tmp:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
        base["XDG_DATA_HOME"] = tmp
        base["MCPMETER_SPILL_DIR"] = str(Path(tmp) / "state")
        wrap = [*mcpmeter_command(), "wrap", "--", *server_argv()]
        for round_ in range(args.rounds):
            results["floor"].append(time_exit(server_argv(), base, data))
            healthy = Path(tmp) / f"healthy-{round_}.db"
            results["healthy"].append(time_exit(wrap, {**base, "MCPMETER_DB": str(healthy)}, data))
            stuck = Path(tmp) / f"stuck-{round_}.db"
            holder = sqlite3.connect(stuck, isolation_level=None)
            holder.execute("PRAGMA journal_mode=WAL")
            holder.execute("BEGIN EXCLUSIVE")
            try:
                results["stuck"].append(time_exit(wrap, {**base, "MCPMETER_DB": str(stuck)}, data))
            finally:
                holder.execute("ROLLBACK")
                holder.close()
    floor = statistics.median(results["floor"])
    print(f"exit after stdin EOF, {args.calls} pipelined calls, median of {args.rounds} rounds")
    print(f"  floor (the server alone):  {floor * 1000:8.1f} ms")
    verdict = "PASS"
    for name in ("healthy", "stuck"):
        value = statistics.median(results[name])
        worst = max(results[name])
        ok = worst < BOUND_S
        verdict = verdict if ok else "FAIL"
        print(
            f"  wrap, {name + ' store:':15} {value * 1000:8.1f} ms"
            f"  (+{(value - floor) * 1000:.1f} ms over the floor, worst {worst * 1000:.1f} ms;"
            f" bound {BOUND_S * 1000:.0f} ms: {'PASS' if ok else 'FAIL'})"
        )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
