"""The tamper-evident chain, `mcpmeter verify`, and spill files loaded back exactly once."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import MCPMETER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcpmeter.chain import CHAIN_COLUMNS, GENESIS, canonical, link
from mcpmeter.integrity import verify_store
from mcpmeter.meters.audit import recover_spill, spill_path_for
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.store import SQLiteStore


def record(i: int, **fields: Any) -> CallRecord:
    values: dict[str, Any] = dict(
        ts=1_760_000_000.0 + i * 0.001,
        latency_ms=1.5 + i,
        project_id="acme",
        agent_id=f"agent-{i % 3}",
        session_id="s-1",
        tags="{}",
        server="demo-server",
        transport="stdio",
        upstream="stdio",
        direction="c2s",
        method="tools/call",
        tool="search",
        jsonrpc_id=str(i),
        request_id=f"req-{i}",
        trace_id=None,
        request_bytes=100 + i,
        response_bytes=200 + i,
        status="ok",
        error_code=None,
        error_message=None,
        cost_usd=None,
        client_name="client",
        client_version="1",
        server_version="2",
        protocol_version="2025-11-25",
    )
    values.update(fields)
    return CallRecord(**values)


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(str(db_path))
    yield s
    s.close()


def tamper(db: Path, sql: str, *params: Any) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute(sql, params)
        con.commit()
    finally:
        con.close()


def verify_cli(db: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([MCPMETER, "verify", "--db", str(db), *args], capture_output=True, timeout=60)


# -- the chain --------------------------------------------------------------------------------


def test_each_hash_covers_the_previous_hash_and_every_field_but_id_and_hash(
    store: SQLiteStore, db_path: Path
) -> None:
    store.write_calls([record(0), record(1)])
    con = sqlite3.connect(db_path)
    rows = con.execute(f"SELECT {', '.join(CHAIN_COLUMNS)}, hash FROM calls ORDER BY id").fetchall()
    con.close()
    first, second = rows
    assert first[-1] == link(GENESIS, first[:-1])
    assert second[-1] == link(first[-1], second[:-1])
    assert len({first[-1], second[-1]}) == 2 and all(len(r[-1]) == 64 for r in rows)


def test_canonical_fields_read_back_the_same_from_the_store_as_they_were_hashed() -> None:
    # A REAL column given an integer is stored as 1.0: the hash must not depend on that.
    fields = list(record(0, latency_ms=1, cost_usd=0))
    fields[0] = iso_utc(fields[0])
    as_stored = [*fields]
    as_stored[CHAIN_COLUMNS.index("latency_ms")] = 1.0
    as_stored[CHAIN_COLUMNS.index("cost_usd")] = 0.0
    assert canonical(fields) == canonical(as_stored)


def test_an_intact_log_verifies_with_exit_0_and_says_how_many_rows(store: SQLiteStore, db_path: Path) -> None:
    store.write_calls([record(i) for i in range(10)])
    store.write_calls([record(i) for i in range(10, 25)])
    result = verify_cli(db_path)
    assert result.returncode == 0
    assert result.stdout.decode() == "ok: 25 rows (ids 1..25), hash chain intact\n"


@pytest.mark.parametrize(
    ("damage", "broken_at"),
    [
        ("UPDATE calls SET latency_ms = 0.5 WHERE id = 7", 7),
        ("UPDATE calls SET agent_id = 'someone-else' WHERE id = 12", 12),
        ("UPDATE calls SET cost_usd = 0.001 WHERE id = 1", 1),
        ("DELETE FROM calls WHERE id = 9", 10),
        ("UPDATE calls SET hash = NULL WHERE id = 4", 4),
    ],
)
def test_altering_or_deleting_a_row_breaks_the_chain_at_that_row_and_verify_exits_1(
    store: SQLiteStore, db_path: Path, damage: str, broken_at: int
) -> None:
    store.write_calls([record(i) for i in range(20)])
    tamper(db_path, damage)
    result = verify_cli(db_path)
    assert result.returncode == 1
    assert result.stdout.decode().startswith(f"broken at row {broken_at} ")


def test_a_row_inserted_with_a_forged_hash_breaks_the_chain_at_the_row_after_it(
    store: SQLiteStore, db_path: Path
) -> None:
    store.write_calls([record(i) for i in range(5)])
    store.write_calls([record(i) for i in range(5, 10)])
    # Re-hash an altered row 3 correctly: the forgery shows at row 4, whose link no longer holds.
    con = sqlite3.connect(db_path)
    prev = con.execute("SELECT hash FROM calls WHERE id = 2").fetchone()[0]
    fields = list(con.execute(f"SELECT {', '.join(CHAIN_COLUMNS)} FROM calls WHERE id = 3").fetchone())
    fields[CHAIN_COLUMNS.index("status")] = "error"
    con.execute("UPDATE calls SET status = 'error', hash = ? WHERE id = 3", (link(prev, fields),))
    con.commit()
    con.close()
    result = verify_cli(db_path)
    assert result.returncode == 1
    assert result.stdout.decode().startswith("broken at row 4 ")


def test_verify_since_starts_from_the_first_row_at_that_time_and_links_it_to_the_row_before(
    store: SQLiteStore, db_path: Path
) -> None:
    store.write_calls([record(i) for i in range(30)])
    since = iso_utc(record(20).ts)
    verdict = verify_store(store, since)
    assert (verdict.rows, verdict.first_id, verdict.last_id, verdict.broken) == (10, 21, 30, None)
    tamper(db_path, "UPDATE calls SET tool = 'other' WHERE id = 3")  # before --since: not walked
    assert verify_store(store, since).broken is None
    assert verify_store(store).broken is not None


def test_verify_on_a_missing_store_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = verify_cli(tmp_path / "none.db")
    assert result.returncode == 1
    assert result.stderr.decode().count("\n") == 1 and b"no store at" in result.stderr


# -- spill files, loaded back exactly once ----------------------------------------------------


def spill(path: Path, records: list[CallRecord]) -> None:
    with path.open("ab") as out:
        for r in records:
            out.write(msgspec.json.encode(r) + b"\n")


def stored_ids(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("SELECT jsonrpc_id FROM calls ORDER BY id")]
    finally:
        con.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=5),
    crash_after_commit=st.booleans(),
)
def test_loading_spill_files_again_after_a_crash_never_duplicates_a_row(
    tmp_path_factory: pytest.TempPathFactory, batches: list[int], crash_after_commit: bool
) -> None:
    db = tmp_path_factory.mktemp("spill") / "audit.db"
    store = SQLiteStore(str(db))
    try:
        path = spill_path_for(str(db))
        assert path is not None
        n = 0
        expected: list[str] = []
        for size in batches:
            records = [record(n + i) for i in range(size)]
            n += size
            spill(path, records)
            expected += [r.jsonrpc_id for r in records]
        if crash_after_commit and path.exists():
            # The crash: rows committed, but the file still there (as if unlink never ran).
            copy = path.with_name("copy")
            shutil.copy(path, copy)
            assert recover_spill(store, path) == len(expected)
            os.rename(copy, path)
        recover_spill(store, path)
        recover_spill(store, path)
        assert stored_ids(db) == expected
        assert not path.exists()
        assert verify_store(store).broken is None
    finally:
        store.close()


def test_a_spill_file_left_half_loaded_by_a_dead_process_is_claimed_and_loaded(
    store: SQLiteStore, db_path: Path
) -> None:
    path = spill_path_for(str(db_path))
    assert path is not None
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    orphan = path.with_name(f"{path.name}.{dead_pid.pid}.loading")
    spill(orphan, [record(i) for i in range(3)])
    assert recover_spill(store, path) == 3
    assert stored_ids(db_path) == ["0", "1", "2"] and not orphan.exists()


def test_a_torn_last_spill_line_is_skipped_and_the_rest_loaded(
    store: SQLiteStore, db_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = spill_path_for(str(db_path))
    assert path is not None
    spill(path, [record(0), record(1)])
    with path.open("ab") as out:
        out.write(msgspec.json.encode(record(2))[:40])  # the writer died mid-line
    assert recover_spill(store, path) == 2
    assert "skipped 1 unreadable spill lines" in capfd.readouterr().err


def test_store_recover_loads_spilled_rows_and_says_how_many(db_path: Path) -> None:
    SQLiteStore(str(db_path)).close()
    path = spill_path_for(str(db_path))
    assert path is not None
    spill(path, [record(i) for i in range(4)])
    result = subprocess.run(
        [MCPMETER, "store", "recover", "--db", str(db_path)], capture_output=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (0, b"recovered 4 rows\n")
    assert len(stored_ids(db_path)) == 4
    again = subprocess.run(
        [MCPMETER, "store", "recover", "--db", str(db_path)], capture_output=True, timeout=60
    )
    assert (again.returncode, again.stdout) == (0, b"recovered 0 rows\n")
