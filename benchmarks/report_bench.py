"""Report benchmark: ``mcpmeter report`` over 1M tool rows and 200k ledger rows on SQLite.

Generates a fleet in a temp store with ``executemany`` (50 agents in 10 projects, 4 models
with dated prices, 5 tools, 3% of tool rows without a request_id or with one the ledger
lacks, 3% of LLM calls without a tool call), then times ``mcpmeter report`` as a subprocess,
as users run it: start-up, the queries (aggregates, exact p50/p95, unmatched counts) and
the output. One warm-up run (it also loads the bundled price table), then ``--rounds``
timed runs; the median is the figure. Target for ``report --by agent``: under 2 s.

    .venv/bin/python benchmarks/report_bench.py [--quick] [--tool-rows N] [--ledger-rows N] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mcpmeter.record import iso_utc
from mcpmeter.store import open_store

MCPMETER = str(Path(sys.executable).with_name("mcpmeter"))
TARGET_S = 2.0
#: CPU seconds (user + system) of each run, in order: on a shared machine, the cost itself.
CPU_S: list[float] = []
REPORTS = (
    ("report --by agent", ["report", "--by", "agent"]),
    ("report --by project,model --format json", ["report", "--by", "project,model", "--format", "json"]),
    ("report --by day", ["report", "--by", "day"]),
    ("report invocations --top 20", ["report", "invocations", "--top", "20"]),
)
TOOL_COLUMNS = (
    "ts, latency_ms, project_id, agent_id, session_id, tags, server, transport, upstream, direction,"
    " method, tool, jsonrpc_id, request_id, request_bytes, response_bytes, status, cost_usd"
)
LLM_COLUMNS = (
    "ts, agent_id, project_id, request_id, model, prompt_tokens, completion_tokens, cached_tokens, source,"
    " tags"
)
MODELS = (
    ("claude-sonnet-4-5", 3.0, 15.0, 0.3),
    ("gpt-4.1", 2.0, 8.0, 0.5),
    ("gemini-2.5-pro", 1.25, 10.0, None),
)
TOOLS = (("github", "search_issues", 0.002), ("github", "get_file", 0.001), ("web", "fetch", 0.005))
TOOLS += (("fs", "read_file", None), ("db", "query", None))
STATUSES = ("ok",) * 92 + ("error",) * 3 + ("tool_error",) * 3 + ("rejected", "no_response")


def generate(location: str, tool_rows: int, ledger_rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    start = time.time() - 30 * 86400
    span = 30 * 86400
    agents = [(f"agent-{i:02d}", f"project-{i % 10}") for i in range(50)]
    models = [m[0] for m in MODELS] + ["local-llama"]  # the last has no price: counted unpriced
    ledger = []
    for i in range(ledger_rows):
        agent, project = agents[rng.randrange(50)]
        prompt = rng.randrange(200, 30_000)
        ledger.append(
            (
                iso_utc(start + span * i / ledger_rows),
                agent,
                project,
                f"req-{i:07d}",
                models[rng.randrange(len(models))],
                prompt,
                rng.randrange(20, 3000),
                rng.randrange(0, prompt // 2),
                "bench",
                f'{{"team": "team-{i % 5}"}}',
            )
        )
    deciders = [row for row in ledger if rng.random() >= 0.03]
    calls = []
    for j in range(tool_rows):
        parent = deciders[j * len(deciders) // tool_rows]
        server, tool, price = TOOLS[rng.randrange(len(TOOLS))]
        status = STATUSES[rng.randrange(len(STATUSES))]
        r = rng.random()
        request_id = parent[3] if r < 0.97 else (None if r < 0.985 else f"orphan-{j}")
        calls.append(
            (
                parent[0],
                None if status == "no_response" else rng.lognormvariate(3.0, 1.0),
                parent[2],
                parent[1],
                f"s-{parent[1]}-{j // 5000}",
                parent[9],
                server,
                "stdio",
                "stdio",
                "c2s",
                "tools/call",
                tool,
                str(j),
                request_id,
                rng.randrange(100, 2000),
                None if status == "no_response" else rng.randrange(100, 60_000),
                status,
                None if status == "rejected" else price,
            )
        )
    store = open_store(location)
    try:
        with store.transaction():
            store.executemany(f"INSERT INTO calls ({TOOL_COLUMNS}) VALUES ({', '.join('?' * 18)})", calls)
            store.executemany(f"INSERT INTO llm_calls ({LLM_COLUMNS}) VALUES ({', '.join('?' * 10)})", ledger)
            store.executemany(
                "INSERT INTO model_prices (model, effective_from, input_per_mtok, output_per_mtok,"
                " cached_per_mtok, source) VALUES (?, ?, ?, ?, ?, 'manual')",
                [(m, "2020-01-01", i, o, c) for m, i, o, c in MODELS],
            )
    finally:
        store.close()


def time_command(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall time of one run (and its output); the run's CPU time is added to ``CPU_S``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    result = subprocess.run(
        [MCPMETER, *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    elapsed = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_S.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(f"mcpmeter {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return elapsed, result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k tool rows, 20k ledger rows, one round")
    parser.add_argument("--tool-rows", type=int, help="audit rows (default 1,000,000)")
    parser.add_argument("--ledger-rows", type=int, help="LLM ledger rows (default 200,000)")
    parser.add_argument("--rounds", type=int, help="timed runs per report (default 3, quick 1)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the figures to FILE")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        nargs="?",
        const="postgresql://postgres@127.0.0.1:5432/test",
        help="run on Postgres (a schema of its own in this database, dropped after)",
    )
    args = parser.parse_args(argv)
    tool_rows = args.tool_rows or (100_000 if args.quick else 1_000_000)
    ledger_rows = args.ledger_rows or (20_000 if args.quick else 200_000)
    rounds = args.rounds or (1 if args.quick else 3)

    with (
        tempfile.TemporaryDirectory(prefix="mcpmeter-report-bench-") as tmp,
        _location(args.postgres, tmp) as location,
    ):
        engine = "Postgres" if args.postgres else "SQLite"
        began = time.perf_counter()
        generate(location, tool_rows, ledger_rows)
        print(
            f"report bench: {tool_rows:,} tool rows + {ledger_rows:,} ledger rows generated"
            f" in {time.perf_counter() - began:.1f} s ({engine}, {os.cpu_count()} cores)",
            flush=True,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
        env["MCPMETER_DB"] = location
        figures: dict[str, float] = {}
        # On Postgres only the headline report: the per-row model lookup of the others is
        # still slow there (minutes on 1M rows).
        for name, command in REPORTS[:1] if args.postgres else REPORTS:
            time_command(command, env)  # warm-up: page cache, bundled prices
            times = [time_command(command, env)[0] for _ in range(rounds)]
            cpu = statistics.median(CPU_S[-rounds:])
            figures[name] = statistics.median(times)
            print(
                f"  {name:<42} {figures[name]:6.2f} s  (median of {rounds}; runs {_list(times)};"
                f" CPU {cpu:.2f} s)",
                flush=True,
            )
        _, table = time_command(["report", "--by", "agent", "--top", "3"], env)
        print("  " + "\n  ".join(table.rstrip().splitlines()))
    headline = figures["report --by agent"]
    verdict = "under" if headline < TARGET_S else "OVER"
    print(f"report --by agent: {headline:.2f} s, {verdict} the {TARGET_S:.0f} s target")
    if args.json:
        args.json.write_text(
            json.dumps({"tool_rows": tool_rows, "ledger_rows": ledger_rows, **figures}, indent=2)
        )
    return 0


@contextlib.contextmanager
def _location(postgres: str | None, tmp: str) -> Iterator[str]:
    """A fresh store: a SQLite file in ``tmp``, or a new schema in the Postgres database."""
    if postgres is None:
        yield str(Path(tmp) / "audit.db")
        return
    import psycopg

    schema = f"report_bench_{os.getpid()}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{postgres}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def _list(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    sys.exit(main())
