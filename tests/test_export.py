"""``mcpmeter export``, run as users run it: a subprocess reading a real store."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import MCPMETER, PYTHON, call_record

from mcpmeter.record import INSERT_COLUMNS, CallRecord
from mcpmeter.store import SQLiteStore

#: The columns of an exported row, in the order DESIGN.md gives them.
COLUMNS = [
    "id",
    "ts",
    "latency_ms",
    "project_id",
    "agent_id",
    "session_id",
    "tags",
    "server",
    "transport",
    "upstream",
    "direction",
    "method",
    "tool",
    "jsonrpc_id",
    "request_id",
    "trace_id",
    "request_bytes",
    "response_bytes",
    "status",
    "error_code",
    "error_message",
    "cost_usd",
    "client_name",
    "client_version",
    "server_version",
    "protocol_version",
    "hash",
]
HOUR = 3600.0


def record(ts: float, jsonrpc_id: str, **fields: Any) -> CallRecord:
    return call_record(**{"ts": ts, "jsonrpc_id": jsonrpc_id, **fields})


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def filled(db_path: Path, now: float) -> Path:
    """A store of five calls: a day, five hours, three hours, one hour and a minute old."""
    store = SQLiteStore(str(db_path))
    try:
        store.write_calls(
            [
                record(
                    now - 24 * HOUR, "a", request_id="chatcmpl-1", trace_id="4bf92f3577b34da6a3ce929d0e0e4736"
                ),
                record(now - 5 * HOUR, "b", agent_id="critic", session_id="s-2", tool="fetch"),
                record(
                    now - 3 * HOUR,
                    "c",
                    status="error",
                    error_code=-32602,
                    error_message='bad "args", über\nnext line',
                    latency_ms=None,
                ),
                record(
                    now - 1 * HOUR, "d", project_id="globex", tool=None, method="ping", response_bytes=None
                ),
                record(now - 60.0, "e", project_id=None, status="tool_error", tags="{}"),
            ]
        )
    finally:
        store.close()
    return db_path


def export(*args: str, env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [MCPMETER, "export", *args], capture_output=True, env=env, timeout=timeout, check=False
    )


def jsonl(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n") or data == b""
    return [json.loads(line) for line in data.splitlines()]


def ids(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [row["jsonrpc_id"] for row in jsonl(result.stdout)]


# -- formats -------------------------------------------------------------------------------


def test_jsonl_writes_one_object_per_row_with_every_column_in_design_order(
    filled: Path, meter_env: dict[str, str]
) -> None:
    result = export("--format", "jsonl", env=meter_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    rows = jsonl(result.stdout)
    assert [list(row) for row in rows] == [COLUMNS] * 5
    assert [row["id"] for row in rows] == [1, 2, 3, 4, 5]
    first, _, error, ping, tool_error = rows
    assert first["request_id"] == "chatcmpl-1" and first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert json.loads(first["tags"]) == {"team": "growth"}
    assert (error["status"], error["error_code"], error["error_message"]) == (
        "error",
        -32602,
        'bad "args", über\nnext line',
    )
    assert error["latency_ms"] is None
    assert (ping["method"], ping["tool"], ping["response_bytes"]) == ("ping", None, None)
    assert (tool_error["status"], tool_error["project_id"]) == ("tool_error", None)


def test_jsonl_is_the_default_format_and_timestamps_are_iso_utc_with_microseconds(
    filled: Path, meter_env: dict[str, str], now: float
) -> None:
    result = export(env=meter_env)
    rows = jsonl(result.stdout)
    assert len(rows) == 5
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 60.0))
    assert rows[-1]["ts"][:19] == expected
    for row in rows:
        assert len(row["ts"]) == len("2026-11-22T17:23:38.123456Z") and row["ts"].endswith("Z")


def test_csv_writes_a_header_then_one_line_per_row_with_nulls_as_empty_cells(
    filled: Path, meter_env: dict[str, str]
) -> None:
    result = export("--format", "csv", env=meter_env)
    assert result.returncode == 0, result.stderr
    table = list(csv.reader(io.StringIO(result.stdout.decode(), newline="")))
    assert table[0] == COLUMNS
    assert len(table) == 6
    by_column = [dict(zip(COLUMNS, line, strict=True)) for line in table[1:]]
    assert [row["jsonrpc_id"] for row in by_column] == ["a", "b", "c", "d", "e"]
    assert by_column[2]["error_message"] == 'bad "args", über\nnext line'
    assert by_column[2]["latency_ms"] == "" and by_column[2]["error_code"] == "-32602"
    assert by_column[3]["tool"] == "" and by_column[3]["response_bytes"] == ""
    assert by_column[0]["request_bytes"] == "120" and by_column[0]["tags"] == '{"team":"growth"}'


def test_csv_and_jsonl_agree_on_every_value(filled: Path, meter_env: dict[str, str]) -> None:
    as_json = jsonl(export(env=meter_env).stdout)
    as_csv = list(
        csv.DictReader(io.StringIO(export("--format", "csv", env=meter_env).stdout.decode(), newline=""))
    )
    assert len(as_csv) == len(as_json)
    for c, j in zip(as_csv, as_json, strict=True):
        assert list(c) == COLUMNS
        for column in COLUMNS:
            value = j[column]
            assert c[column] == ("" if value is None else str(value)), column


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_dash_o_writes_the_file_and_nothing_to_stdout(
    filled: Path, meter_env: dict[str, str], tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"calls.{fmt}"
    result = export("--format", fmt, "-o", str(out), env=meter_env)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == (b"", b"")
    assert out.read_bytes() == export("--format", fmt, env=meter_env).stdout


def test_db_flag_wins_over_the_mcpmeter_db_env_var(
    filled: Path, meter_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**meter_env, "MCPMETER_DB": str(tmp_path / "elsewhere.db")}
    assert ids(export("--db", str(filled), env=env)) == ["a", "b", "c", "d", "e"]


def test_an_empty_store_exports_nothing_in_jsonl_and_only_the_header_in_csv(
    db_path: Path, meter_env: dict[str, str]
) -> None:
    SQLiteStore(str(db_path)).close()
    assert export(env=meter_env).stdout == b""
    assert export("--format", "csv", env=meter_env).stdout.decode() == ",".join(COLUMNS) + "\n"


# -- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--project", "acme"], ["a", "b", "c"]),
        (["--agent", "critic"], ["b"]),
        (["--session", "s-2"], ["b"]),
        (["--tool", "fetch"], ["b"]),
        (["--status", "error"], ["c"]),
        (["--status", "tool_error"], ["e"]),
        (["--project", "acme", "--agent", "planner"], ["a", "c"]),
        (["--since", "2h"], ["d", "e"]),
        (["--since", "4h", "--until", "30m"], ["c", "d"]),
        (["--until", "12h"], ["a"]),
        (["--since", "90m", "--status", "ok"], ["d"]),
        (["--project", "nobody"], []),
    ],
)
def test_filters_select_the_rows_they_name(
    filled: Path, meter_env: dict[str, str], args: list[str], expected: list[str]
) -> None:
    assert ids(export(*args, env=meter_env)) == expected


def test_since_and_until_read_iso_times(filled: Path, meter_env: dict[str, str], now: float) -> None:
    def iso(ts: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

    assert ids(export("--since", iso(now - 6 * HOUR), "--until", iso(now - 2 * HOUR), env=meter_env)) == [
        "b",
        "c",
    ]
    # The UTC clock reading of now, read as a +02:00 time, is two hours ago.
    offset = time.strftime("%Y-%m-%dT%H:%M:%S+02:00", time.gmtime(now))
    assert ids(export("--since", offset, env=meter_env)) == ["d", "e"]
    day = time.strftime("%Y-%m-%d", time.gmtime(now + 2 * 86400))
    assert ids(export("--since", day, env=meter_env)) == []


# -- errors ----------------------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("mcpmeter: "), err
    assert "Traceback" not in err
    return err


def test_a_missing_store_is_exit_1_with_one_line_saying_no_store_at_the_path(
    tmp_path: Path, meter_env: dict[str, str]
) -> None:
    missing = tmp_path / "none" / "audit.db"
    result = export("--db", str(missing), env=meter_env)
    assert result.returncode == 1
    assert one_line_error(result).startswith(f"mcpmeter: no store at {missing}")
    assert not missing.parent.exists()


def test_the_missing_store_error_names_the_mcpmeter_db_path(db_path: Path, meter_env: dict[str, str]) -> None:
    result = export(env=meter_env)
    assert result.returncode == 1
    assert f"no store at {db_path}" in one_line_error(result)
    assert not db_path.exists()


@pytest.mark.parametrize("fmt", ["xml", "JSONL", ""])
def test_an_unknown_format_is_exit_2_with_one_line(filled: Path, meter_env: dict[str, str], fmt: str) -> None:
    result = export("--format", fmt, env=meter_env)
    assert result.returncode == 2
    assert "format" in one_line_error(result)


def test_a_time_that_cannot_be_read_is_exit_2_with_one_line(filled: Path, meter_env: dict[str, str]) -> None:
    result = export("--since", "last tuesday", env=meter_env)
    assert result.returncode == 2
    assert "last tuesday" in one_line_error(result)


def test_an_unknown_option_is_exit_2_with_one_line(filled: Path, meter_env: dict[str, str]) -> None:
    result = export("--colour", "red", env=meter_env)
    assert result.returncode == 2
    one_line_error(result)


# -- a million rows, flat memory ---------------------------------------------------------------

MILLION = 1_000_000


def million_rows(start: float) -> Iterator[Sequence[Any]]:
    for i in range(MILLION):
        ts = start + i / 1000.0
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(ts))) + f".{int(ts * 1e6) % 1_000_000:06d}Z"
        )
        yield (
            stamp,
            1.5,
            "acme",
            f"agent-{i % 7}",
            f"s-{i % 100}",
            "{}",
            "demo-server",
            "stdio",
            "stdio",
            "c2s",
            "tools/call",
            "search",
            str(i),
            f"req-{i}",
            None,
            100 + i % 50,
            200,
            "ok",
            None,
            None,
            None,
            "claude-code",
            "2.1.0",
            "1.4.2",
            "2025-06-18",
        )


#: Runs argv[1:] and prints its exit code and peak RSS (KiB). The measured process is forked
#: from this small helper, not from pytest: Linux counts the RSS a process had before exec in
#: its ru_maxrss, and pytest's own can be hundreds of MiB by now.
PEAK_RSS_HELPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
print(child.returncode, usage.ru_maxrss)
"""


def peak_rss_kib(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, int, bytes]:
    """Run ``argv``; return (exit code, peak RSS in KiB from wait4, stderr)."""
    with subprocess.Popen(
        [PYTHON, "-c", PEAK_RSS_HELPER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"{argv} ran longer than {timeout} s")
    assert proc.returncode == 0, err
    code, maxrss = (int(field) for field in out.split())
    return code, maxrss, err


def count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines


@pytest.mark.slow
def test_exporting_a_million_rows_keeps_memory_flat_and_writes_every_row(
    db_path: Path, meter_env: dict[str, str], tmp_path: Path
) -> None:
    small_db = tmp_path / "small.db"
    small = SQLiteStore(str(small_db))
    small.write_calls([record(1_700_000_000.0 + i, str(i)) for i in range(10)])
    small.close()
    SQLiteStore(str(db_path)).close()
    con = sqlite3.connect(db_path)
    try:
        with con:
            stored = [c for c in INSERT_COLUMNS if c != "args"]  # what million_rows() yields
            columns, marks = ", ".join(stored), ", ".join("?" * len(stored))
            con.executemany(f"INSERT INTO calls ({columns}) VALUES ({marks})", million_rows(1_700_000_000.0))
    finally:
        con.close()

    code, baseline_kib, err = peak_rss_kib(
        [MCPMETER, "export", "--db", str(small_db), "-o", str(tmp_path / "small.jsonl")], meter_env, 60
    )
    assert code == 0, err
    out = tmp_path / "million.jsonl"
    code, peak_kib, err = peak_rss_kib([MCPMETER, "export", "-o", str(out)], meter_env, 120)
    assert code == 0, err
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert peak_kib - baseline_kib < 40 * 1024, (
        f"peak RSS {peak_kib / 1024:.0f} MiB against {baseline_kib / 1024:.0f} MiB for 10 rows"
    )
    assert count_lines(out) == MILLION
    with out.open("rb") as f:
        first = json.loads(f.readline())
    assert list(first) == COLUMNS and first["jsonrpc_id"] == "0"
