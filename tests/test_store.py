"""The stores and the audit writer: schema, round trips, many writers, and the spill file.

Every test of store behaviour runs on SQLite and on Postgres (the ``backend`` fixture; see
``tests/stores.py``); a few check what only one engine has.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MCPMETER, PYTHON, ROOT, call_record, eventually
from stores import BACKENDS, Backend, make_backend, require_postgres, subprocess_env

from mcpmeter.errors import StoreError
from mcpmeter.metering.audit import AuditWriter, spill_path_for
from mcpmeter.record import STORED_FIELDS, CallRecord
from mcpmeter.store import CallFilter, SQLiteStore, Store, open_store
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
    defaults = {
        "ts": 1_700_000_000.123456,
        "request_id": "chatcmpl-1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    return call_record(**{**defaults, **fields})


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    with make_backend(request.param, tmp_path, monkeypatch) as made:
        yield made


@pytest.fixture
def pg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """A Postgres store only: for what only a store behind a server can do."""
    with make_backend("postgres", tmp_path, monkeypatch) as made:
        yield made


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    yield s
    s.close()


def count(store: Store, where: CallFilter | None = None) -> int:
    clause, params = (where or CallFilter()).where()
    row = store.query_one(f"SELECT count(*) FROM calls{clause}", params)
    assert row is not None
    return int(row[0])


# -- schema -------------------------------------------------------------------------------------


def test_a_new_store_records_every_migration_by_name_in_schema_version(backend: Backend) -> None:
    backend.open().close()
    applied = backend.sql("SELECT version, name, applied_at FROM schema_version ORDER BY version")
    assert [(v, n) for v, n, _ in applied] == [(m.version, m.name) for m in MIGRATIONS]
    assert all(ISO_UTC_MICROS.match(at) for _, _, at in applied)


def test_every_migration_has_sql_for_both_engines_and_both_record_the_same_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert all(m.sqlite and m.postgres for m in MIGRATIONS)
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len({m.name for m in MIGRATIONS}) == len(MIGRATIONS)
    recorded = []
    for kind in BACKENDS:
        with make_backend(kind, tmp_path / kind, monkeypatch) as made:
            store = made.open()
            try:
                recorded.append(store.schema_versions())
            finally:
                store.close()
            assert set(made.tables()) >= {"calls", "llm_calls", "model_prices", "tool_prices", "spill_loads"}
    assert recorded[0] == recorded[1] == [(m.version, m.name) for m in MIGRATIONS]


def test_the_calls_table_has_the_documented_columns_in_order_then_the_redacted_args(
    backend: Backend,
) -> None:
    backend.open().close()
    assert tuple(backend.columns("calls")) == (*COLUMNS, "args")


def test_a_sqlite_store_is_in_wal_mode(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_the_calls_table_is_indexed_for_time_tenant_and_join_queries(backend: Backend) -> None:
    backend.open().close()
    indexes = backend.indexes()
    assert {"calls_ts", "calls_project_agent_ts", "calls_request_id"} <= set(indexes)
    assert "WHERE request_id IS NOT NULL" in indexes["calls_request_id"].replace("(", "").replace(")", "")


def test_queries_by_time_by_project_and_agent_and_by_request_id_use_an_index(backend: Backend) -> None:
    backend.open().close()
    for query, index in (
        ("SELECT id FROM calls WHERE ts >= '2026-01-01'", "calls_ts"),
        (
            "SELECT id FROM calls WHERE project_id = 'p' AND agent_id = 'a' AND ts >= '2026'",
            "calls_project_agent_ts",
        ),
        ("SELECT id FROM calls WHERE request_id = 'r'", "calls_request_id"),
    ):
        plan = backend.plan(query)
        assert index in plan, (query, plan)


def test_opening_a_store_again_applies_no_migration_twice_and_keeps_its_rows(backend: Backend) -> None:
    first = backend.open()
    first.write_calls([record()])
    before = first.schema_versions()
    first.close()
    applied_at = backend.sql("SELECT applied_at FROM schema_version ORDER BY version")

    again = backend.open()
    try:
        assert again.schema_versions() == before == [(m.version, m.name) for m in MIGRATIONS]
        assert count(again) == 1
    finally:
        again.close()
    assert backend.sql("SELECT applied_at FROM schema_version ORDER BY version") == applied_at


def test_opening_a_missing_store_without_create_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "audit.db"
    with pytest.raises(StoreError, match=r"^no store at ") as caught:
        SQLiteStore(str(missing), create=False)
    assert "\n" not in str(caught.value)
    assert not missing.parent.exists()


def test_a_postgres_url_opens_the_postgres_store(backend: Backend) -> None:
    store = backend.open()
    try:
        assert store.dialect == backend.kind
        assert type(store).__name__ == {"sqlite": "SQLiteStore", "postgres": "PostgresStore"}[backend.kind]
    finally:
        store.close()


def test_a_postgres_server_that_does_not_answer_is_one_clear_line_naming_the_store() -> None:
    require_postgres()  # psycopg is there; nothing listens on port 1
    with pytest.raises(
        StoreError, match=r"^cannot connect to store postgresql://u:\*\*\*@127\.0\.0\.1:1/x: "
    ) as caught:
        open_store("postgresql://u:secret@127.0.0.1:1/x")
    assert "\n" not in str(caught.value) and "secret" not in str(caught.value)


def test_a_postgres_url_without_psycopg_installed_says_which_extra_to_install(tmp_path: Path) -> None:
    # The missing package is faked at its boundary: the import of psycopg fails.
    script = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from mcpmeter.__main__ import main\n"
        "sys.exit(main(['export', '--db', 'postgresql://127.0.0.1/x']))\n"
    )
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1
    assert "pip install 'mcpmeter[postgres]'" in result.stderr.decode()
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = %s AND c = %s"),
        ("SELECT '?', 'it''s ?' WHERE x = ?", "SELECT '?', 'it''s ?' WHERE x = %s"),
        ('SELECT "odd?name" FROM t -- why?\nWHERE x = ?', 'SELECT "odd?name" FROM t -- why?\nWHERE x = %s'),
        (
            "SELECT '5%' /* 100%? */ WHERE a LIKE ? || '%'",
            "SELECT '5%%' /* 100%%? */ WHERE a LIKE %s || '%%'",
        ),
        ("SELECT 10 % 3", "SELECT 10 %% 3"),
    ],
)
def test_question_mark_placeholders_become_psycopg_ones_outside_quotes_only(sql: str, expected: str) -> None:
    pytest.importorskip("psycopg")
    from mcpmeter.store.postgres import translate

    assert translate(sql) == expected


def test_literal_question_marks_and_percent_signs_reach_the_engine_unchanged(store: Store) -> None:
    row = store.query_one("SELECT '?', '5%', ? || '%?', 7 % ?", ("a?", 4))
    assert row == ("?", "5%", "a?%?", 3)


def test_sums_and_averages_read_back_as_numbers_the_same_on_both_engines(store: Store) -> None:
    store.write_calls([record(request_bytes=3, latency_ms=1.0), record(request_bytes=4, latency_ms=2.0)])
    row = store.query_one("SELECT sum(request_bytes), avg(request_bytes), sum(latency_ms) FROM calls")
    assert row == (7, 3.5, 3.0)
    assert [type(v) for v in row] == [int, float, float]


# -- rows in, rows out --------------------------------------------------------------------------


def test_rows_come_back_in_order_with_every_column_and_ts_as_iso_utc_with_microseconds(
    store: Store,
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
        assert row[2:-1] == tuple(rec)[1 : STORED_FIELDS - 1]  # every exported column but id, hash (not args)


def test_a_timestamp_a_hair_below_a_second_rounds_up_into_the_next_second(store: Store) -> None:
    store.write_calls([record(ts=1_700_000_000.9999996), record(ts=0.0)])
    assert [row[1] for row in store.iter_calls(CallFilter())] == [
        "2023-11-14T22:13:21.000000Z",
        "1970-01-01T00:00:00.000000Z",
    ]


def test_writing_no_records_is_a_no_op(store: Store) -> None:
    store.write_calls([])
    assert count(store) == 0


def test_iter_calls_streams_in_batches_without_skipping_or_repeating(store: Store) -> None:
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
def test_call_filters_select_the_rows_they_name(store: Store, where: CallFilter, expected: list[str]) -> None:
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
    assert count(store, where) == len(expected)


# -- many writers -------------------------------------------------------------------------------

WRITER_SCRIPT = """
import sys
from mcpmeter.metering.audit import AuditWriter, spill_path_for
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


def test_twenty_processes_opening_and_writing_one_new_store_at_once_lose_no_row(
    backend: Backend, tmp_path: Path
) -> None:
    # The store does not exist yet: the twenty also race to create it (apply the migrations).
    workers, rows_each = 20, 150
    env = subprocess_env(backend, tmp_path)
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", WRITER_SCRIPT, backend.location, str(w), str(rows_each)],
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
    rows = backend.rows()
    assert len(rows) == workers * rows_each
    per_worker: dict[object, set[object]] = {}
    for row in rows:
        per_worker.setdefault(row["session_id"], set()).add(row["jsonrpc_id"])
    assert per_worker == {f"worker-{w}": {str(i) for i in range(rows_each)} for w in range(workers)}
    verified = subprocess.run(
        [MCPMETER, "verify", "--db", backend.location], capture_output=True, timeout=60, env=env
    )
    assert verified.returncode == 0, verified.stdout  # twenty writers, one intact chain
    spill = spill_path_for(backend.location)
    assert spill is not None and not spill.exists()
    again = backend.open()
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


def test_many_wrap_processes_relaying_at_once_into_one_store_record_every_call_in_one_chain(
    backend: Backend, tmp_path: Path
) -> None:
    # Twenty on SQLite; ten on Postgres (one database shared by a fleet's proxies).
    workers, calls_each = {"sqlite": 20, "postgres": 10}[backend.kind], 40
    meter_env = subprocess_env(backend, tmp_path)
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
    rows = backend.rows()
    assert len(rows) == workers * calls_each
    assert {row["status"] for row in rows} == {"ok"}
    per_session: dict[object, list[object]] = {}
    for row in rows:
        per_session.setdefault(row["session_id"], []).append(row["tool"])
    assert {k: sorted(v, key=str) for k, v in per_session.items()} == {
        f"wrap-{w}": sorted((f"t{i}" for i in range(calls_each)), key=str) for w in range(workers)
    }
    verified = subprocess.run([MCPMETER, "verify"], capture_output=True, timeout=60, env=meter_env)
    expected = f"ok: {workers * calls_each} rows (ids {rows[0]['id']}..{rows[-1]['id']}), hash chain intact\n"
    assert (verified.returncode, verified.stdout.decode()) == (0, expected)


# -- the spill file -----------------------------------------------------------------------------


def writer_for(location: str, **kwargs: Any) -> AuditWriter:
    return AuditWriter(lambda: open_store(location), spill_path=spill_path_for(location), **kwargs)


def test_the_spill_file_sits_beside_a_sqlite_store_and_under_the_data_home_for_a_postgres_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert spill_path_for("/var/lib/mcpmeter/audit.db") == Path("/var/lib/mcpmeter/audit.db.spill.jsonl")
    home = tmp_path / "mcpmeter"
    assert spill_path_for("postgresql://db.internal/mcpmeter") == home / "spill-db.internal-mcpmeter.jsonl"
    assert spill_path_for("postgresql://me:pw@db.internal:6432/audit?sslmode=require") == (
        home / "spill-db.internal-6432-audit.jsonl"
    )
    assert spill_path_for("postgres://10.0.0.5/audit?options=-csearch_path%3Dmeter") == (
        home / "spill-10.0.0.5-audit-meter.jsonl"
    )


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
        assert row[2:-1] == tuple(rec)[1 : STORED_FIELDS - 1]  # every exported column but id, hash (not args)


def test_rows_written_while_another_process_holds_the_store_locked_are_spilled_not_lost(
    backend: Backend,
) -> None:
    backend.open().close()
    spill = spill_path_for(backend.location)
    assert spill is not None

    def impatient() -> Store:
        if backend.kind == "sqlite":
            return SQLiteStore(backend.location, busy_timeout=0.05)
        from mcpmeter.store.postgres import PostgresStore

        return PostgresStore(backend.location, lock_timeout=0.05)

    with backend.write_lock_held():
        busy = AuditWriter(impatient, spill_path=spill, interval=0.01).start()
        for i in range(3):
            busy.put(record(jsonrpc_id=str(i)))
        busy.close()
        assert (busy.written, busy.spilled) == (0, 3)

    healed = writer_for(backend.location).start()
    healed.close()
    assert healed.recovered == 3
    assert [row["jsonrpc_id"] for row in backend.rows()] == ["0", "1", "2"]
    assert not spill.exists()


def test_a_postgres_server_that_drops_the_writer_gets_its_rows_later_and_the_chain_holds(
    pg: Backend, tmp_path: Path
) -> None:
    spill = spill_path_for(pg.location)
    assert spill is not None and spill.is_relative_to(tmp_path)
    writer = writer_for(pg.location, interval=0.01).start()
    try:
        for i in range(5):
            writer.put(record(jsonrpc_id=f"before-{i}"))
        eventually(lambda: writer.written == 5, "the first rows written")

        assert pg.end_connections() == 1  # the server ends the writer's connection
        for i in range(5):
            writer.put(record(jsonrpc_id=f"during-{i}"))
        eventually(lambda: writer.spilled > 0, "rows spilled once the connection is gone")

        for i in range(5):
            writer.put(record(jsonrpc_id=f"after-{i}"))
        eventually(lambda: writer.written + writer.recovered == 15, "reconnected, spill loaded back")
    finally:
        writer.close()
    assert writer.recovered == writer.spilled > 0
    assert not spill.exists()
    ids = [row["jsonrpc_id"] for row in pg.rows()]
    assert sorted(ids) == sorted(f"{when}-{i}" for when in ("before", "during", "after") for i in range(5))
    assert ids[:5] == [f"before-{i}" for i in range(5)]
    verified = subprocess.run([MCPMETER, "verify", "--db", pg.location], capture_output=True, timeout=60)
    assert verified.returncode == 0
    assert re.fullmatch(r"ok: 15 rows \(ids 1\.\.\d+\), hash chain intact\n", verified.stdout.decode())


def test_a_postgres_store_reconnects_on_the_next_call_after_its_connection_is_ended(
    pg: Backend,
) -> None:
    store = pg.open()
    try:
        store.write_calls([record(jsonrpc_id="1")])
        assert pg.end_connections() == 1
        with pytest.raises(StoreError, match=r"^cannot write to store postgresql://") as caught:
            store.write_calls([record(jsonrpc_id="lost")])
        assert "\n" not in str(caught.value)
        store.write_calls([record(jsonrpc_id="2")])  # a new connection
        assert [row[13] for row in store.iter_calls(CallFilter())] == ["1", "2"]
    finally:
        store.close()


def test_while_postgres_refuses_it_the_store_fails_fast_until_its_back_off_ends(pg: Backend) -> None:
    with pg.own_role() as location:
        store = open_store(location)
        try:
            store.write_calls([record(jsonrpc_id="1")])
            pg.sql(f"ALTER ROLE {pg.schema} NOLOGIN")  # the server refuses it from now on
            assert pg.end_connections() == 1
            with pytest.raises(StoreError, match=r"^cannot write to store"):
                store.write_calls([record(jsonrpc_id="lost")])  # the connection was lost
            with pytest.raises(StoreError, match=r"^cannot connect to store"):
                store.write_calls([record(jsonrpc_id="lost")])  # one attempt to reconnect
            with pytest.raises(StoreError, match=r"is unreachable; next attempt in 0\.\d s$"):
                store.write_calls([record(jsonrpc_id="lost")])  # then none until the back-off ends
        finally:
            store.close()
        assert [row["jsonrpc_id"] for row in pg.rows()] == ["1"]


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
