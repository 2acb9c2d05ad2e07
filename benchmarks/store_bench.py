"""Store write throughput: audit rows per second through ``Store.write_calls``, batched.

For each engine (SQLite in a temp dir; Postgres in a schema of its own, dropped afterwards)
and each batch size, one writer writes ``--rows`` rows in batches (the audit writer's way:
one transaction per batch, extending the hash chain), then ``--writers`` processes write at
once into one store (the fleet's way: they take turns on the chain lock). Every run ends
with the chain verified and the row count checked. Medians of ``--rounds`` runs.

    .venv/bin/python benchmarks/store_bench.py [--quick] [--pg URL] [--json FILE]

Postgres is ``--pg`` or ``MCPMETER_BENCH_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``);
when it does not answer, its figures are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mcpmeter.record import CallRecord
from mcpmeter.store import open_store
from mcpmeter.store.integrity import verify_store

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
BATCHES = (100, 2000)

WRITER = """
import sys, time
from mcpmeter.record import CallRecord
from mcpmeter.store import open_store
location, worker, rows, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = open_store(location)
records = [
    CallRecord(1_760_000_000.0 + i / 1000, 12.5, "acme", "agent-" + worker, "s-" + worker, "{}",
               "demo-server", "stdio", "stdio", "c2s", "tools/call", "search", str(i), "req-" + str(i),
               None, 120, 480, "ok", None, None, None, "client", "1.0", "2.0", "2025-11-25")
    for i in range(rows)
]
print("ready", flush=True)
sys.stdin.readline()
for start in range(0, rows, batch):
    store.write_calls(records[start:start + batch])
store.close()
"""


def records(n: int) -> list[CallRecord]:
    fields: dict[str, Any] = dict(
        latency_ms=12.5, project_id="acme", session_id="s-1", tags='{"team":"growth"}',
        server="demo-server", transport="stdio", upstream="stdio", direction="c2s",
        method="tools/call", tool="search", trace_id=None, request_bytes=120, response_bytes=480,
        status="ok", error_code=None, error_message=None, cost_usd=None, client_name="client",
        client_version="1.0", server_version="2.0", protocol_version="2025-11-25",
    )  # fmt: skip
    return [
        CallRecord(
            ts=1_760_000_000.0 + i / 1000,
            agent_id=f"agent-{i % 7}",
            jsonrpc_id=str(i),
            request_id=f"req-{i}",
            **fields,
        )
        for i in range(n)
    ]


@contextlib.contextmanager
def sqlite_store() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mcpmeter-bench-") as tmp:
        yield str(Path(tmp) / "audit.db")


@contextlib.contextmanager
def postgres_store(url: str) -> Iterator[str]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in url else "?"
    try:
        yield f"{url}{joiner}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def check(location: str, expected: int) -> None:
    store = open_store(location)
    try:
        verdict = verify_store(store)
    finally:
        store.close()
    if verdict.broken is not None or verdict.rows != expected:
        raise SystemExit(f"{location}: {verdict.rows} rows of {expected}, broken: {verdict.broken}")


def one_writer(location: str, rows: list[CallRecord], batch: int) -> float:
    store = open_store(location)
    try:
        started = time.perf_counter()
        for start in range(0, len(rows), batch):
            store.write_calls(rows[start : start + batch])
        elapsed = time.perf_counter() - started
    finally:
        store.close()
    check(location, len(rows))
    return len(rows) / elapsed


def many_writers(location: str, writers: int, rows_each: int, batch: int) -> float:
    open_store(location).close()  # migrated before the clock starts
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, location, str(w), str(rows_each), str(batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for w in range(writers)
    ]
    for p in procs:  # every writer has imported and built its rows
        assert p.stdout is not None
        if p.stdout.readline() != b"ready\n":
            raise SystemExit("a writer did not start")
    started = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.close()
    codes = [p.wait(timeout=600) for p in procs]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"a writer failed: exit codes {codes}")
    check(location, writers * rows_each)
    return writers * rows_each / elapsed


def postgres_missing(url: str) -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'mcpmeter[postgres]')"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, one round")
    parser.add_argument("--pg", default=os.environ.get("MCPMETER_BENCH_PG", DEFAULT_PG), help="Postgres URL")
    parser.add_argument("--rows", type=int, help="rows per single-writer run (default 100000, quick 20000)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent writer processes (default 4)")
    parser.add_argument("--rounds", type=int, help="runs per figure (default 3, quick 1)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the figures to FILE")
    args = parser.parse_args(argv)
    n = args.rows or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 3)
    rows = records(n)

    engines: dict[str, Any] = {"sqlite": sqlite_store}
    missing = postgres_missing(args.pg)
    if missing is None:
        engines["postgres"] = lambda: postgres_store(args.pg)
    else:
        print(f"postgres: skipped ({missing})")

    figures: dict[str, float] = {}
    print(f"store write throughput, rows/s (median of {rounds}; {n} rows a run; chain verified)")
    for engine, make in engines.items():
        for batch in BATCHES:
            runs = []
            for _ in range(rounds):
                with make() as location:
                    runs.append(one_writer(location, rows, batch))
            figures[f"{engine}.one_writer.batch_{batch}"] = statistics.median(runs)
            print(f"  {engine:8} 1 writer, batches of {batch:5}: {statistics.median(runs):10,.0f}")
        runs = []
        for _ in range(rounds):
            with make() as location:
                runs.append(many_writers(location, args.writers, n // args.writers, 2000))
        figures[f"{engine}.{args.writers}_writers.batch_2000"] = statistics.median(runs)
        print(f"  {engine:8} {args.writers} writers, batches of  2000: {statistics.median(runs):10,.0f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
