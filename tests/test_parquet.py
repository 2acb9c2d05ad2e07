"""`mcpmeter export --format parquet`: a file pyarrow, pandas and DuckDB read with the right types.

Each test runs the command as users do (a subprocess on a real SQLite store) and reads the
file back with the libraries people load it with.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MCPMETER, PYTHON, call_record

from mcpmeter.record import COLUMNS, CallRecord
from mcpmeter.store import SQLiteStore

WAIT_S = 120
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def record(ts: float, jsonrpc_id: str, **fields: Any) -> CallRecord:
    return call_record(**{"ts": ts, "jsonrpc_id": jsonrpc_id, "protocol_version": "2025-11-25", **fields})


@pytest.fixture
def stored(db_path: Path) -> Path:
    """Four rows with nulls, an error code, a cost, a non-ASCII message and a trace id."""
    now = time.time()
    store = SQLiteStore(str(db_path))
    try:
        store.write_calls(
            [
                record(now - 3600, "a", request_id="chatcmpl-1", trace_id=TRACE_ID, cost_usd=0.0025),
                record(now - 600, "b", agent_id="critic", tool="fetch", response_bytes=None, latency_ms=None),
                record(
                    now - 60,
                    "c",
                    status="error",
                    error_code=-32602,
                    error_message='bad "args", über\nnext line',
                ),
                record(now - 1.5, "d", project_id=None, method="ping", tool=None, tags="{}"),
            ]
        )
    finally:
        store.close()
    return db_path


def export(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MCPMETER, "export", "--db", str(db), *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


def parquet(db: Path, out: Path, *args: str) -> pa.Table:
    result = export(db, "--format", "parquet", "-o", str(out), *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    return pq.read_table(out)


def jsonl(db: Path, *args: str) -> list[dict[str, Any]]:
    result = export(db, *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_parquet_file_has_every_column_in_order_with_explicit_types(stored: Path, tmp_path: Path) -> None:
    table = parquet(stored, tmp_path / "calls.parquet")
    types = {field.name: field.type for field in table.schema}
    assert list(types) == list(COLUMNS)
    assert types["ts"] == pa.timestamp("us", tz="UTC")
    for name in ("id", "request_bytes", "response_bytes", "error_code"):
        assert types[name] == pa.int64(), name
    for name in ("latency_ms", "cost_usd"):
        assert types[name] == pa.float64(), name
    texts = set(COLUMNS) - {
        "ts",
        "id",
        "request_bytes",
        "response_bytes",
        "error_code",
        "latency_ms",
        "cost_usd",
    }
    assert all(types[name] == pa.string() for name in texts)


def test_every_value_round_trips_through_pyarrow_as_jsonl_exports_it(stored: Path, tmp_path: Path) -> None:
    rows = parquet(stored, tmp_path / "calls.parquet").to_pylist()
    expected = jsonl(stored)
    assert len(rows) == len(expected) == 4
    for got, want in zip(rows, expected, strict=True):
        assert got["ts"] == datetime.strptime(want["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert got["ts"].tzinfo is not None
        assert {k: v for k, v in got.items() if k != "ts"} == {k: v for k, v in want.items() if k != "ts"}


def test_pandas_reads_utc_timestamps_int64_counts_and_strings(stored: Path, tmp_path: Path) -> None:
    out = tmp_path / "calls.parquet"
    parquet(stored, out)
    frame = pd.read_parquet(out)
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]"
    # Nullable integer columns stay integers (Int64), not floats with NaN.
    for name in ("id", "request_bytes", "response_bytes", "error_code"):
        assert str(frame[name].dtype) == "Int64", name
    assert frame["error_code"].dropna().tolist() == [-32602]
    assert frame["response_bytes"].isna().tolist() == [False, True, False, False]
    assert str(frame["latency_ms"].dtype) == "float64"
    assert pd.api.types.is_string_dtype(frame["tool"])
    assert frame.loc[2, "error_message"] == 'bad "args", über\nnext line'


def test_duckdb_reads_timestamp_with_time_zone_bigint_double_and_varchar(
    stored: Path, tmp_path: Path
) -> None:
    out = tmp_path / "calls.parquet"
    parquet(stored, out)
    described = {row[0]: row[1] for row in duckdb.sql(f"DESCRIBE SELECT * FROM '{out}'").fetchall()}
    assert described["ts"] == "TIMESTAMP WITH TIME ZONE"
    assert described["request_bytes"] == "BIGINT"
    assert described["latency_ms"] == "DOUBLE"
    assert described["agent_id"] == "VARCHAR"
    by_agent = duckdb.sql(
        f"SELECT agent_id, count(*), sum(request_bytes) FROM '{out}' GROUP BY agent_id ORDER BY agent_id"
    ).fetchall()
    assert by_agent == [("critic", 1, 120), ("planner", 3, 360)]


def test_filters_apply_to_parquet_as_to_every_format(stored: Path, tmp_path: Path) -> None:
    table = parquet(stored, tmp_path / "f.parquet", "--agent", "planner", "--since", "30m")
    assert table.column("jsonrpc_id").to_pylist() == ["c", "d"]
    assert [r["jsonrpc_id"] for r in jsonl(stored, "--agent", "planner", "--since", "30m")] == ["c", "d"]


def test_an_empty_selection_writes_a_valid_file_with_no_rows(stored: Path, tmp_path: Path) -> None:
    table = parquet(stored, tmp_path / "empty.parquet", "--project", "nobody")
    assert table.num_rows == 0
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")


def test_parquet_without_an_output_file_is_a_one_line_usage_error(stored: Path) -> None:
    result = export(stored, "--format", "parquet")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["mcpmeter: --format parquet needs -o FILE"]
    assert result.stdout == ""


# -- a large export ------------------------------------------------------------------------

FILL_SQL = """
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < ?)
INSERT INTO calls (ts, latency_ms, project_id, agent_id, session_id, tags, server, transport,
    upstream, direction, method, tool, jsonrpc_id, request_id, trace_id, request_bytes,
    response_bytes, status, error_code, error_message, cost_usd, client_name, client_version,
    server_version, protocol_version)
SELECT strftime('%Y-%m-%dT%H:%M:%S', 1700000000 + i / 10, 'unixepoch') || printf('.%06dZ', (i % 10) * 100000),
    (i % 997) * 1.5, 'project-' || (i % 7), 'agent-' || (i % 13), 'session-' || (i / 100), '{"team":"t"}',
    'demo-server', 'stdio', 'stdio', 'c2s', 'tools/call', 'tool_' || (i % 20), CAST(i AS TEXT),
    'chatcmpl-' || i, NULL, 100 + i % 50, CASE WHEN i % 10 = 0 THEN NULL ELSE 200 + i % 1000 END,
    CASE WHEN i % 10 = 0 THEN 'error' ELSE 'ok' END, CASE WHEN i % 10 = 0 THEN -32000 END,
    NULL, 0.001, 'claude-code', '2.1.0', '1.0', '2025-11-25'
FROM seq
"""

#: Runs `mcpmeter export` in this process and reports its peak RSS (KiB) on the last stderr line.
PEAK_RSS = """
import resource, sys
from mcpmeter.__main__ import main
code = main(sys.argv[1:])
sys.stderr.write(f"peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n")
sys.exit(code)
"""


def filled(db: Path, rows: int) -> Path:
    """A store of ``rows`` generated rows (inserted by SQL: the chain is not what is tested here)."""
    SQLiteStore(str(db)).close()
    con = sqlite3.connect(db)
    try:
        con.execute(FILL_SQL, (rows - 1,))
        con.commit()
    finally:
        con.close()
    return db


def peak_rss_mib(db: Path, out: Path) -> float:
    result = subprocess.run(
        [PYTHON, "-c", PEAK_RSS, "export", "--db", str(db), "--format", "parquet", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    kib = int(result.stderr.splitlines()[-1].split()[1])
    return kib / 1024


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_million_row_export_streams_in_row_groups_with_the_memory_of_a_small_one(tmp_path: Path) -> None:
    small = peak_rss_mib(filled(tmp_path / "small.db", 100_000), tmp_path / "small.parquet")
    large_out = tmp_path / "large.parquet"
    large = peak_rss_mib(filled(tmp_path / "large.db", 1_000_000), large_out)
    meta = pq.ParquetFile(large_out).metadata
    assert meta.num_rows == 1_000_000
    assert meta.num_row_groups == 16  # 65,536 rows a group
    assert large - small < 32, f"peak RSS grew from {small:.0f} MiB (100k rows) to {large:.0f} MiB (1M rows)"
    [counts] = duckdb.sql(
        f"SELECT count(*), count(error_code), epoch_us(min(ts)) FROM '{large_out}'"
    ).fetchall()
    assert counts[:2] == (1_000_000, 100_000)
    assert counts[2] == 1_700_000_000 * 1_000_000
