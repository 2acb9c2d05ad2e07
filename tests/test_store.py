"""The SQLite store and the audit writer: schema, round trips, many writers, and the spill file."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MCPMETER, PYTHON, ROOT, read_rows

from mcpmeter.errors import StoreError
from mcpmeter.meters.audit import AuditWriter, spill_path_for
from mcpmeter.record import CallRecord
from mcpmeter.store import CallFilter, SQLiteStore, open_store
from mcpmeter.store.migrations import MIGRATIONS

#: The columns of an exported row, in the order DESIGN.md gives them.
COLUMNS = (
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
)
ISO_UTC_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def record(**fields: Any) -> CallRecord:
    """A settled tools/call; ``fields`` override any column."""
    values: dict[str, Any] = {
        "ts": 1_700_000_000.123456,
        "latency_ms": 12.5,
        "project_id": "acme",
        "agent_id": "planner",
        "session_id": "s-1",
        "tags": '{"team":"growth"}',
        "server": "demo-server",
        "transport": "stdio",
        "upstream": "stdio",
        "direction": "c2s",
        "method": "tools/call",
        "tool": "search",
        "jsonrpc_id": "1",
        "request_id": "chatcmpl-1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "request_bytes": 120,
        "response_bytes": 480,
        "status": "ok",
        "error_code": None,
        "error_message": None,
        "cost_usd": None,
        "client_name": "claude-code",
        "client_version": "2.1.0",
        "server_version": "1.4.2",
        "protocol_version": "2025-06-18",
    }
    values.update(fields)
    return CallRecord(**values)


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(db_path))
    yield s
    s.close()


def sqlite_master(db: Path, kind: str) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = ?", (kind,))}
    finally:
        con.close()


# -- schema -------------------------------------------------------------------------------------


def test_a_new_store_records_every_migration_by_name_in_schema_version(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    con = sqlite3.connect(db_path)
    try:
        applied = con.execute(
            "SELECT version, name, applied_at FROM schema_version ORDER BY version"
        ).fetchall()
    finally:
        con.close()
    assert [(v, n) for v, n, _ in applied] == [(m.version, m.name) for m in MIGRATIONS]
    assert all(ISO_UTC_MICROS.match(at) for _, _, at in applied)


def test_the_calls_table_has_the_documented_columns_in_order_then_the_redacted_args(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    con = sqlite3.connect(db_path)
    try:
        columns = [row[1] for row in con.execute("PRAGMA table_info(calls)")]
    finally:
        con.close()
    assert tuple(columns) == (*COLUMNS, "args")


def test_the_store_is_in_wal_mode(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_the_calls_table_is_indexed_for_time_tenant_and_join_queries(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    assert {"calls_ts", "calls_project_agent_ts", "calls_request_id"} <= sqlite_master(db_path, "index")


def test_queries_by_time_by_project_and_agent_and_by_request_id_use_an_index(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    con = sqlite3.connect(db_path)
    try:
        for query, index in (
            ("SELECT id FROM calls WHERE ts >= '2026-01-01'", "calls_ts"),
            (
                "SELECT id FROM calls WHERE project_id = 'p' AND agent_id = 'a' AND ts >= '2026'",
                "calls_project_agent_ts",
            ),
            ("SELECT id FROM calls WHERE request_id = 'r'", "calls_request_id"),
        ):
            plan = " ".join(str(row[-1]) for row in con.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert index in plan, (query, plan)
    finally:
        con.close()


def test_opening_a_store_again_applies_no_migration_twice_and_keeps_its_rows(db_path: Path) -> None:
    first = SQLiteStore(str(db_path))
    first.write_calls([record()])
    before = first.schema_versions()
    first.close()
    con = sqlite3.connect(db_path)
    applied_at = con.execute("SELECT applied_at FROM schema_version").fetchall()
    con.close()

    again = SQLiteStore(str(db_path))
    try:
        assert again.schema_versions() == before == [(m.version, m.name) for m in MIGRATIONS]
        assert again.count_calls() == 1
    finally:
        again.close()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("SELECT applied_at FROM schema_version").fetchall() == applied_at
    finally:
        con.close()


def test_opening_a_missing_store_without_create_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "audit.db"
    with pytest.raises(StoreError, match=r"^no store at ") as caught:
        SQLiteStore(str(missing), create=False)
    assert "\n" not in str(caught.value)
    assert not missing.parent.exists()


def test_a_postgres_url_is_a_clear_usage_error_in_this_version() -> None:
    with pytest.raises(Exception, match="Postgres") as caught:
        open_store("postgresql://localhost/mcpmeter")
    assert "\n" not in str(caught.value)


# -- rows in, rows out --------------------------------------------------------------------------


def test_rows_come_back_in_order_with_every_column_and_ts_as_iso_utc_with_microseconds(
    store: SQLiteStore,
) -> None:
    records = [
        record(),
        record(
            ts=1_700_000_001.5,
            latency_ms=None,
            project_id=None,
            tool=None,
            method="ping",
            request_id=None,
            trace_id=None,
            response_bytes=None,
            status="no_response",
        ),
        record(ts=1_700_000_002.0, status="error", error_code=-32602, error_message="Unknown tool: é"),
    ]
    store.write_calls(records)
    rows = list(store.iter_calls(CallFilter()))
    assert [len(row) for row in rows] == [len(COLUMNS)] * 3
    assert [row[0] for row in rows] == [1, 2, 3]
    assert [row[1] for row in rows] == [
        "2023-11-14T22:13:20.123456Z",
        "2023-11-14T22:13:21.500000Z",
        "2023-11-14T22:13:22.000000Z",
    ]
    for row, rec in zip(rows, records, strict=True):
        assert row[2:-1] == tuple(rec)[1:-1]  # every exported column but id and hash (not args)


def test_a_timestamp_a_hair_below_a_second_rounds_up_into_the_next_second(store: SQLiteStore) -> None:
    store.write_calls([record(ts=1_700_000_000.9999996), record(ts=0.0)])
    assert [row[1] for row in store.iter_calls(CallFilter())] == [
        "2023-11-14T22:13:21.000000Z",
        "1970-01-01T00:00:00.000000Z",
    ]


def test_writing_no_records_is_a_no_op(store: SQLiteStore) -> None:
    store.write_calls([])
    assert store.count_calls() == 0


def test_iter_calls_streams_in_batches_without_skipping_or_repeating(store: SQLiteStore) -> None:
    store.write_calls([record(jsonrpc_id=str(i)) for i in range(2_345)])
    assert [row[13] for row in store.iter_calls(CallFilter(), batch=100)] == [str(i) for i in range(2_345)]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (CallFilter(), ["a", "b", "c", "d", "e"]),
        (CallFilter(project_id="acme"), ["a", "b", "c"]),
        (CallFilter(agent_id="planner"), ["a", "c", "e"]),
        (CallFilter(session_id="s-2"), ["b", "d"]),
        (CallFilter(tool="fetch"), ["b", "e"]),
        (CallFilter(status="error"), ["c"]),
        (CallFilter(since="2023-11-14T22:13:22.000000Z"), ["c", "d", "e"]),  # inclusive
        (CallFilter(until="2023-11-14T22:13:22.000000Z"), ["a", "b"]),  # exclusive
        (
            CallFilter(since="2023-11-14T22:13:21.000000Z", until="2023-11-14T22:13:23.500000Z"),
            ["b", "c", "d"],
        ),
        (CallFilter(project_id="acme", agent_id="planner", status="ok"), ["a"]),
        (CallFilter(after_id=3), ["d", "e"]),
        (CallFilter(project_id="nobody"), []),
    ],
)
def test_call_filters_select_the_rows_they_name(
    store: SQLiteStore, where: CallFilter, expected: list[str]
) -> None:
    store.write_calls(
        [
            record(
                ts=1_700_000_000.0, jsonrpc_id="a", project_id="acme", agent_id="planner", session_id="s-1"
            ),
            record(
                ts=1_700_000_001.0,
                jsonrpc_id="b",
                project_id="acme",
                agent_id="critic",
                tool="fetch",
                session_id="s-2",
            ),
            record(ts=1_700_000_002.0, jsonrpc_id="c", project_id="acme", agent_id="planner", status="error"),
            record(
                ts=1_700_000_003.0, jsonrpc_id="d", project_id="globex", agent_id="critic", session_id="s-2"
            ),
            record(ts=1_700_000_004.0, jsonrpc_id="e", project_id="globex", agent_id="planner", tool="fetch"),
        ]
    )
    assert [row[13] for row in store.iter_calls(where)] == expected
    assert store.count_calls(where) == len(expected)


# -- many writers -------------------------------------------------------------------------------

WRITER_SCRIPT = """
import sys
from mcpmeter.meters.audit import AuditWriter, spill_path_for
from mcpmeter.record import CallRecord
from mcpmeter.store import open_store

db, worker, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdin.readline()  # every writer starts at once: the test says go
writer = AuditWriter(lambda: open_store(db), spill_path=spill_path_for(db), max_batch=7).start()
for i in range(n):
    writer.put(CallRecord(
        1_700_000_000.0 + i, 1.0, "p", "a", "worker-" + worker, "{}", "srv", "stdio", "stdio", "c2s",
        "tools/call", "t", str(i), None, None, 10, 20, "ok", None, None, None, None, None, None, None,
    ))
writer.close()
print(writer.written, writer.spilled, writer.recovered)
"""


def test_twenty_processes_writing_one_store_at_once_lose_no_row(db_path: Path) -> None:
    workers, rows_each = 20, 150
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", WRITER_SCRIPT, str(db_path), str(w), str(rows_each)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for w in range(workers)
    ]
    results: list[tuple[int, bytes, bytes]] = []
    try:
        assert all(p.stdin is not None for p in procs)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=120)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()

    assert [(code, out.split(), err) for code, out, err in results] == [
        (0, [str(rows_each).encode(), b"0", b"0"], b"")
    ] * workers
    rows = read_rows(db_path)
    assert len(rows) == workers * rows_each
    per_worker: dict[object, set[object]] = {}
    for row in rows:
        per_worker.setdefault(row["session_id"], set()).add(row["jsonrpc_id"])
    assert per_worker == {f"worker-{w}": {str(i) for i in range(rows_each)} for w in range(workers)}
    verified = subprocess.run([MCPMETER, "verify", "--db", str(db_path)], capture_output=True, timeout=60)
    assert verified.returncode == 0, verified.stdout  # twenty writers, one intact chain
    spill = spill_path_for(str(db_path))
    assert spill is not None and not spill.exists()
    again = SQLiteStore(str(db_path))
    try:
        assert again.schema_versions() == [(m.version, m.name) for m in MIGRATIONS]
    finally:
        again.close()


#: A tiny raw stdio server: answers every request with an empty result.
RAW_SERVER = """
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if "id" in message and "method" in message:
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {}}) + "\\n")
        sys.stdout.flush()
"""


def test_twenty_wrap_processes_relaying_at_once_into_one_store_record_every_call(
    db_path: Path, meter_env: dict[str, str]
) -> None:
    workers, calls_each = 20, 40
    requests = b"".join(
        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"t%d"}}\n' % (i, i)
        for i in range(calls_each)
    )
    procs = []
    for w in range(workers):
        # Each wrap's whole input, EOF included, is waiting in its pipe before it starts.
        read_fd, write_fd = os.pipe()
        os.write(write_fd, requests)
        os.close(write_fd)
        procs.append(
            subprocess.Popen(
                [MCPMETER, "wrap", "--session", f"wrap-{w}", "--", PYTHON, "-c", RAW_SERVER],
                stdin=read_fd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=meter_env,
            )
        )
        os.close(read_fd)
    results: list[tuple[int, int, bytes]] = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            results.append((p.returncode, len(out.splitlines()), err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert results == [(0, calls_each, b"")] * workers
    rows = read_rows(db_path)
    assert len(rows) == workers * calls_each
    assert {row["status"] for row in rows} == {"ok"}
    per_session: dict[object, list[object]] = {}
    for row in rows:
        per_session.setdefault(row["session_id"], []).append(row["tool"])
    assert {k: sorted(v, key=str) for k, v in per_session.items()} == {
        f"wrap-{w}": sorted((f"t{i}" for i in range(calls_each)), key=str) for w in range(workers)
    }


# -- the spill file -----------------------------------------------------------------------------


def writer_for(location: str, **kwargs: Any) -> AuditWriter:
    return AuditWriter(lambda: open_store(location), spill_path=spill_path_for(location), **kwargs)


def test_the_spill_file_sits_beside_a_sqlite_store_and_there_is_none_for_a_url() -> None:
    assert spill_path_for("/var/lib/mcpmeter/audit.db") == Path("/var/lib/mcpmeter/audit.db.spill.jsonl")
    assert spill_path_for("postgresql://db.internal/mcpmeter") is None


def test_rows_a_store_cannot_take_go_to_the_spill_file_and_the_next_writer_loads_them_back(
    db_path: Path,
) -> None:
    # A directory where the database file should be: SQLite cannot open it, whoever we are
    # (root ignores file modes, so chmod would not do).
    db_path.mkdir()
    spill = spill_path_for(str(db_path))
    assert spill is not None
    lost = [
        record(jsonrpc_id=str(i), ts=1_700_000_000.25 + i, error_message="ü" if i else None) for i in range(5)
    ]

    broken = writer_for(str(db_path)).start()
    for rec in lost:
        broken.put(rec)
    broken.close()
    assert (broken.written, broken.spilled) == (0, 5)
    assert len(spill.read_bytes().splitlines()) == 5

    db_path.rmdir()
    later = record(jsonrpc_id="later", ts=1_700_000_100.0)
    healed = writer_for(str(db_path)).start()
    healed.put(later)
    healed.close()
    assert (healed.written, healed.recovered, healed.spilled) == (1, 5, 0)
    assert not spill.exists()
    assert [p.name for p in db_path.parent.iterdir() if "spill" in p.name] == []

    store = SQLiteStore(str(db_path))
    try:
        rows = list(store.iter_calls(CallFilter()))
    finally:
        store.close()
    assert [row[13] for row in rows] == ["0", "1", "2", "3", "4", "later"]  # spilled rows first
    for row, rec in zip(rows, [*lost, later], strict=True):
        assert row[2:-1] == tuple(rec)[1:-1]  # every exported column but id and hash (not args)


def test_rows_written_while_another_process_holds_the_store_locked_are_spilled_not_lost(
    db_path: Path,
) -> None:
    SQLiteStore(str(db_path)).close()
    spill = spill_path_for(str(db_path))
    assert spill is not None
    lock = sqlite3.connect(db_path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # holds the write lock until ROLLBACK
        busy = AuditWriter(
            lambda: SQLiteStore(str(db_path), busy_timeout=0.05), spill_path=spill, interval=0.01
        ).start()
        for i in range(3):
            busy.put(record(jsonrpc_id=str(i)))
        busy.close()
        assert (busy.written, busy.spilled) == (0, 3)
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    healed = writer_for(str(db_path)).start()
    healed.close()
    assert healed.recovered == 3
    assert [row["jsonrpc_id"] for row in read_rows(db_path)] == ["0", "1", "2"]
    assert not spill.exists()


def test_with_neither_store_nor_spill_file_writable_the_writer_warns_and_does_not_raise(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # A path under a regular file: neither the store nor the spill beside it can be created.
    (tmp_path / "file").write_text("not a directory")
    location = str(tmp_path / "file" / "audit.db")
    writer = writer_for(location).start()
    writer.put(record())
    writer.close()
    assert (writer.written, writer.spilled) == (0, 0)
    err = capfd.readouterr().err
    assert "lost 1 audit rows" in err
    assert all(line.startswith("mcpmeter: ") for line in err.splitlines())
