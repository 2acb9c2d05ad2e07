"""What a budget costs a call: p50/p99 round trip of `wrap` with and without a budget.

    .venv/bin/python benchmarks/budget_bench.py [--rounds 5] [--calls 2000]

Both configurations wrap the raw echo server and write to a SQLite store; with a budget
(`--budget` plus a tool price, so every tools/call reserves its price in one store
transaction before it is forwarded), the difference is the budget check. Rounds are
interleaved, medians reported. Target: p50 added <= 0.5 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relay_bench import Proc, handshake, latency_run, mcpmeter_command, percentile, server_argv  # noqa: E402

TARGET_MS = 0.5


def run(db: Path, budget: bool, calls: int, workdir: Path) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(db)
    flags = ["--budget", "1000000", "--agent", "bench"] if budget else []
    proc = Proc([*mcpmeter_command(), "wrap", *flags, "--", *server_argv()], env, workdir / "stderr.txt")
    try:
        with proc.deadline("initialize"):
            handshake(proc)
        with proc.deadline("latency"):
            samples = sorted(latency_run(proc, 1, 200, calls))
        proc.close_and_wait()
    finally:
        proc.finish()
    return percentile(samples, 50) * 1e6, percentile(samples, 99) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mcpmeter-budget-bench-"))
    db = work / "audit.db"
    mcpmeter = mcpmeter_command()
    subprocess.run(
        [*mcpmeter, "prices", "set", "tool", "*/*", "--per-call", "0.0001", "--db", str(db)], check=True
    )
    figures: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for rnd in range(args.rounds):
        for budget in (rnd % 2 == 0, rnd % 2 == 1):
            figures[budget].append(run(db, budget, args.calls, work))
    p50 = {k: statistics.median(v[0] for v in vals) for k, vals in figures.items()}
    p99 = {k: statistics.median(v[1] for v in vals) for k, vals in figures.items()}
    added_ms = (p50[True] - p50[False]) / 1000
    print(f"budget check, {args.rounds} rounds x {args.calls} calls, one in flight (SQLite store):")
    print(f"  p50 without a budget {p50[False]:8.1f} us   with a budget {p50[True]:8.1f} us")
    print(f"  p99 without a budget {p99[False]:8.1f} us   with a budget {p99[True]:8.1f} us")
    verdict = "PASS" if added_ms <= TARGET_MS else "MISS"
    print(f"  added p50 {added_ms:.3f} ms (target <= {TARGET_MS} ms)  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
