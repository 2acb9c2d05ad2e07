"""Soak: many `mcpmeter wrap` processes, a million calls, random faults; nothing may be lost.

    .venv/bin/python benchmarks/soak.py [--wrappers 50] [--calls 1000000] [--seconds 60]

Each of ``--wrappers`` client threads runs `mcpmeter wrap -- <raw server>` with its own
session id and pipelines tool calls through it in bursts. Faults, at random:

* a server crashes mid-burst (its wrapper records the unanswered calls as ``no_response``
  and exits with the server's code; the client starts a new wrapper and goes on);
* the store is locked for longer than the writers' busy timeout (they spill rows to the
  JSONL file beside it; later writers load them back).

At the end (all on loopback, bounded by ``--seconds`` plus a drain), it checks that every
call that got a response has an ``ok`` row, that no row is duplicated, and that
`mcpmeter verify` finds the hash chain intact. It prints the figures and exits 1 on a loss.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MCPMETER = str(Path(sys.executable).with_name("mcpmeter"))
SERVER = r"""
import os, sys
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if b'"crash"' in line:
        os._exit(3)
    i = line.find(b'"id":')
    if i < 0 or b'"method"' not in line:
        continue
    j = line.find(b",", i)
    out.write(b'{"jsonrpc":"2.0","id":' + line[i + 5 : j] + b',"result":{"content":[],"isError":false}}\n')
    out.flush()
"""
BURST = 64


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answered: dict[str, set[str]] = field(default_factory=dict)  # session -> ids with a response
    sent: int = 0
    crashes: int = 0
    wrappers: int = 0

    def add(self, session: str, ids: set[str], sent: int) -> None:
        with self.lock:
            self.answered.setdefault(session, set()).update(ids)
            self.sent += sent


def client(
    n: int, env: dict[str, str], tally: Tally, deadline: float, budget: int, crash_rate: float
) -> None:
    rng = random.Random(n)
    generation = 0
    remaining = budget
    while remaining > 0 and time.monotonic() < deadline:
        session = f"soak-{n}-{generation}"
        generation += 1
        proc = subprocess.Popen(
            [
                MCPMETER,
                "wrap",
                "--session",
                session,
                "--agent",
                f"agent-{n % 10}",
                "--",
                sys.executable,
                "-c",
                SERVER,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        with tally.lock:
            tally.wrappers += 1
        next_id = 0
        answered: set[str] = set()
        sent = 0
        crashed = False
        try:
            while remaining > 0 and time.monotonic() < deadline:
                burst = min(BURST, remaining)
                crash_at = rng.randrange(burst) if rng.random() < crash_rate else -1
                frames = []
                for k in range(burst):
                    name = "crash" if k == crash_at else "echo"
                    frames.append(
                        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s"}}\n'
                        % (next_id, name.encode())
                    )
                    next_id += 1
                proc.stdin.write(b"".join(frames))
                proc.stdin.flush()
                sent += burst
                remaining -= burst
                expected = burst if crash_at < 0 else crash_at
                for _ in range(expected):
                    line = proc.stdout.readline()
                    if not line:
                        break
                    i = line.find(b'"id":')
                    answered.add(line[i + 5 : line.find(b",", i)].decode())
                if crash_at >= 0:
                    crashed = True
                    break
        except (BrokenPipeError, OSError):
            crashed = True
        finally:
            if not crashed:
                proc.stdin.close()
            proc.wait(timeout=60)
            if crashed:
                with tally.lock:
                    tally.crashes += 1
            tally.add(session, answered, sent)


def lock_store(db: Path, at: float, hold: float, stop: threading.Event) -> None:
    """Hold the store's write lock longer than the writers' busy timeout, once."""
    if stop.wait(at):
        return
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    stop.wait(hold)
    con.execute("ROLLBACK")
    con.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wrappers", type=int, default=50)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--crash-rate", type=float, default=0.002, help="chance a burst crashes its server")
    parser.add_argument("--lock-at", type=float, default=10.0, help="seconds in, lock the store (0: never)")
    parser.add_argument("--lock-for", type=float, default=11.0, help="how long (writers wait 10 s)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mcpmeter-soak-"))
    db = work / "audit.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(db)
    subprocess.run([MCPMETER, "store", "recover", "--db", str(db)], check=True, capture_output=True)

    tally = Tally()
    stop = threading.Event()
    started = time.monotonic()
    deadline = started + args.seconds
    locker = None
    if args.lock_at > 0:
        locker = threading.Thread(
            target=lock_store, args=(db, args.lock_at, args.lock_for, stop), daemon=True
        )
        locker.start()
    per_client = args.calls // args.wrappers
    threads = [
        threading.Thread(target=client, args=(n, env, tally, deadline, per_client, args.crash_rate))
        for n in range(args.wrappers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    stop.set()
    if locker is not None:
        locker.join()
    recovered = subprocess.run(
        [MCPMETER, "store", "recover", "--db", str(db)], check=True, capture_output=True, text=True
    ).stdout.strip()

    con = sqlite3.connect(db)
    ok: dict[str, set[str]] = {}
    rows = duplicates = 0
    for session, rpc_id, status in con.execute("SELECT session_id, jsonrpc_id, status FROM calls"):
        rows += 1
        if status == "ok":
            ids = ok.setdefault(session, set())
            duplicates += rpc_id in ids
            ids.add(rpc_id)
    con.close()
    answered = sum(len(v) for v in tally.answered.values())
    lost = sum(len(ids - ok.get(session, set())) for session, ids in tally.answered.items())
    verify = subprocess.run([MCPMETER, "verify", "--db", str(db)], capture_output=True, text=True)

    print(f"soak: {args.wrappers} concurrent wrappers, {tally.wrappers} wrapper processes in all")
    print(f"  calls sent         {tally.sent:,} in {elapsed:.1f} s ({tally.sent / elapsed:,.0f} calls/s)")
    print(f"  answered           {answered:,}")
    print(f"  server crashes     {tally.crashes}")
    print(
        f"  store locked       {args.lock_for:.0f} s at {args.lock_at:.0f} s"
        if args.lock_at
        else "  store locked  no"
    )
    print(f"  rows in the store  {rows:,} ({recovered} at the end)")
    print(f"  answered calls without an ok row: {lost}; duplicated ok rows: {duplicates}")
    print(f"  verify: {verify.stdout.strip() or verify.stderr.strip()}")
    failed = lost or duplicates or verify.returncode != 0
    print("  result: " + ("FAIL" if failed else "PASS"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
