"""The tamper-evident chain, `mcpmeter verify`, and spill files loaded back exactly once.

Each test of a store runs on SQLite and on Postgres (see ``tests/stores.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import MCPMETER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stores import BACKENDS, Backend, make_backend, subprocess_env

from mcpmeter.chain import CHAIN_COLUMNS, GENESIS, canonical, link
from mcpmeter.integrity import verify_store
from mcpmeter.meters.audit import recover_spill, spill_path_for
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.store import Store


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


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    with make_backend(request.param, tmp_path, monkeypatch) as made:
        yield made


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    yield s
    s.close()


def verify_cli(location: str | Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([MCPMETER, "verify", "--db", str(location), *args], capture_output=True, timeout=60)


# -- the chain --------------------------------------------------------------------------------


def test_each_hash_covers_the_previous_hash_and_every_field_but_id_and_hash(
    store: Store, backend: Backend
) -> None:
    store.write_calls([record(0), record(1)])
    rows = backend.sql(f"SELECT {', '.join(CHAIN_COLUMNS)}, hash FROM calls ORDER BY id")
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


def test_an_intact_log_verifies_with_exit_0_and_says_how_many_rows(store: Store, backend: Backend) -> None:
    store.write_calls([record(i) for i in range(10)])
    store.write_calls([record(i) for i in range(10, 25)])
    result = verify_cli(backend.location)
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
    store: Store, backend: Backend, damage: str, broken_at: int
) -> None:
    store.write_calls([record(i) for i in range(20)])
    backend.sql(damage)
    result = verify_cli(backend.location)
    assert result.returncode == 1
    assert result.stdout.decode().startswith(f"broken at row {broken_at} ")


def test_a_row_inserted_with_a_forged_hash_breaks_the_chain_at_the_row_after_it(
    store: Store, backend: Backend
) -> None:
    store.write_calls([record(i) for i in range(5)])
    store.write_calls([record(i) for i in range(5, 10)])
    # Re-hash an altered row 3 correctly: the forgery shows at row 4, whose link no longer holds.
    [(prev,)] = backend.sql("SELECT hash FROM calls WHERE id = 2")
    [fields] = backend.sql(f"SELECT {', '.join(CHAIN_COLUMNS)} FROM calls WHERE id = 3")
    forged = list(fields)
    forged[CHAIN_COLUMNS.index("status")] = "error"
    backend.sql("UPDATE calls SET status = 'error', hash = ? WHERE id = 3", link(prev, forged))
    result = verify_cli(backend.location)
    assert result.returncode == 1
    assert result.stdout.decode().startswith("broken at row 4 ")


def test_verify_since_starts_from_the_first_row_at_that_time_and_links_it_to_the_row_before(
    store: Store, backend: Backend
) -> None:
    store.write_calls([record(i) for i in range(30)])
    since = iso_utc(record(20).ts)
    verdict = verify_store(store, since)
    assert (verdict.rows, verdict.first_id, verdict.last_id, verdict.broken) == (10, 21, 30, None)
    backend.sql("UPDATE calls SET tool = 'other' WHERE id = 3")  # before --since: not walked
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


def stored_ids(backend: Backend) -> list[str]:
    return [r[0] for r in backend.sql("SELECT jsonrpc_id FROM calls ORDER BY id")]


def spill_file(backend: Backend) -> Path:
    """Where a writer of ``backend`` spills (the directory made, as a writer would)."""
    path = spill_path_for(backend.location)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=5),
    crash_after_commit=st.booleans(),
)
def test_loading_spill_files_again_after_a_crash_never_duplicates_a_row(
    store: Store, backend: Backend, batches: list[int], crash_after_commit: bool
) -> None:
    # One store for every example: each starts from empty tables.
    backend.sql("DELETE FROM calls")
    backend.sql("DELETE FROM spill_loads")
    path = spill_file(backend)
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
    assert stored_ids(backend) == expected
    assert not path.exists()
    assert verify_store(store).broken is None


def test_a_spill_file_left_half_loaded_by_a_dead_process_is_claimed_and_loaded(
    store: Store, backend: Backend
) -> None:
    path = spill_file(backend)
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    orphan = path.with_name(f"{path.name}.{dead_pid.pid}.loading")
    spill(orphan, [record(i) for i in range(3)])
    assert recover_spill(store, path) == 3
    assert stored_ids(backend) == ["0", "1", "2"] and not orphan.exists()


def test_a_torn_last_spill_line_is_skipped_and_the_rest_loaded(
    store: Store, backend: Backend, capfd: pytest.CaptureFixture[str]
) -> None:
    path = spill_file(backend)
    spill(path, [record(0), record(1)])
    with path.open("ab") as out:
        out.write(msgspec.json.encode(record(2))[:40])  # the writer died mid-line
    assert recover_spill(store, path) == 2
    assert "skipped 1 unreadable spill lines" in capfd.readouterr().err


def test_store_recover_loads_spilled_rows_and_says_how_many(backend: Backend, tmp_path: Path) -> None:
    backend.open().close()
    path = spill_file(backend)
    spill(path, [record(i) for i in range(4)])
    env = subprocess_env(backend, tmp_path)
    result = subprocess.run([MCPMETER, "store", "recover"], capture_output=True, timeout=60, env=env)
    assert (result.returncode, result.stdout) == (0, b"recovered 4 rows\n")
    assert len(stored_ids(backend)) == 4
    again = subprocess.run([MCPMETER, "store", "recover"], capture_output=True, timeout=60, env=env)
    assert (again.returncode, again.stdout) == (0, b"recovered 0 rows\n")
