"""The spill: rows the store could not take come back exactly once, and nothing else comes in.

Real stores (a SQLite file, a Postgres schema), real spill files, the real ``mcpmeter store
recover``. The exactly-once cases drive the store's own bookkeeping (``audit_writers``,
``spill_voids``) the way an audit writer does; the writer cases run a real AuditWriter
thread against a store another connection keeps locked.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MCPMETER, PYTHON, ROOT, call_record
from stores import BACKENDS, Backend, make_backend, subprocess_env

from mcpmeter.metering.audit import AuditWriter
from mcpmeter.record import CallRecord
from mcpmeter.store import Store, open_store
from mcpmeter.store.base import BatchMark
from mcpmeter.store.chain import reload_chain_key
from mcpmeter.store.spill import encode_lines, recover_spill, spill_locations, spill_path_for


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    monkeypatch.setenv("MCPMETER_SPILL_DIR", str(tmp_path / "state"))
    with make_backend(request.param, tmp_path, monkeypatch) as made:
        yield made


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    yield s
    s.close()


def records(first: int, n: int, **fields: Any) -> list[CallRecord]:
    return [call_record(jsonrpc_id=str(i), ts=1_760_000_000.0 + i, **fields) for i in range(first, first + n)]


def spill_file(backend: Backend) -> Path:
    path = spill_path_for(backend.location)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as out:
        out.write(data)


def stored_ids(backend: Backend) -> list[str]:
    return [str(r[0]) for r in backend.sql("SELECT jsonrpc_id FROM calls ORDER BY id")]


def recover_cli(backend: Backend, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(backend, tmp_path)
    env["MCPMETER_SPILL_DIR"] = str(tmp_path / "state")
    return subprocess.run(
        [MCPMETER, "store", "recover", *args], capture_output=True, text=True, timeout=60, env=env
    )


# -- exactly once -------------------------------------------------------------------------------


def test_a_spilled_write_that_had_committed_after_all_is_not_loaded_again(
    store: Store, backend: Backend
) -> None:
    # Write 1 committed, but its writer saw an error (a COMMIT whose answer was lost) and
    # spilled it; nothing was written since.
    store.write_calls(records(0, 3), BatchMark("w", 1))
    append(spill_file(backend), encode_lines("w", 1, records(0, 3)))
    assert recover_spill(store) == 0
    assert stored_ids(backend) == ["0", "1", "2"]


def test_the_next_write_records_a_spilled_write_it_finds_committed_so_it_stays_out_for_good(
    store: Store, backend: Backend
) -> None:
    store.write_calls(records(0, 2), BatchMark("w", 1))
    append(spill_file(backend), encode_lines("w", 1, records(0, 2)))
    # The writer's next write asks about write 1: committed after all.
    assert store.write_calls(records(2, 2), BatchMark("w", 2, unresolved=(1,))) == 1
    store.write_calls(records(4, 1), BatchMark("w", 3))
    assert recover_spill(store) == 0
    assert stored_ids(backend) == ["0", "1", "2", "3", "4"]


def test_a_spilled_write_that_never_committed_is_loaded_once_whatever_came_after(
    store: Store, backend: Backend
) -> None:
    append(spill_file(backend), encode_lines("w", 1, records(0, 2)))  # write 1 failed for good
    assert store.write_calls(records(2, 2), BatchMark("w", 2, unresolved=(1,))) is None
    assert recover_spill(store) == 2
    assert recover_spill(store) == 0
    assert sorted(stored_ids(backend)) == ["0", "1", "2", "3"]


def test_rows_that_never_reached_the_store_always_load(store: Store, backend: Backend) -> None:
    store.write_calls(records(0, 1), BatchMark("w", 1))
    append(spill_file(backend), encode_lines("w", None, records(1, 2)))
    assert recover_spill(store) == 2


#: A writer process: one write, then (once the test holds the store's lock) five rows that the
#: writer gives up on after 0.5 s; it lives on until the test has released the lock.
IN_FLIGHT_SCRIPT = """
import sys
from mcpmeter.metering.audit import AuditWriter
from mcpmeter.store.spill import spill_locations
from mcpmeter.record import CallRecord
from mcpmeter.store import open_store

location = sys.argv[1]

def row(i):
    return CallRecord(1_760_000_000.0 + i, 1.0, "p", "a", "s", "{}", "srv", "stdio", "stdio", "c2s",
                      "tools/call", "t", str(i), None, None, 10, 20, "ok", None, None, None, None, None,
                      None, None)

def writer():
    return AuditWriter(lambda: open_store(location), spill_paths=spill_locations(location)).start()

first = writer()
first.put(row(0))
first.close()
print("written", flush=True)
sys.stdin.readline()  # the test holds the lock now
stuck = writer()
for i in range(1, 6):
    stuck.put(row(i))
stuck.close(0.5)
print("spilled", stuck.spilled, flush=True)
sys.stdin.readline()  # the lock is gone: the abandoned write may commit after all
print("joined", stuck.join(10), flush=True)
"""


def test_a_write_still_in_flight_when_the_writer_gives_up_is_stored_exactly_once(
    backend: Backend, tmp_path: Path
) -> None:
    backend.open().close()
    env = subprocess_env(backend, tmp_path)
    env["MCPMETER_SPILL_DIR"] = str(tmp_path / "state")
    proc = subprocess.Popen(
        [PYTHON, "-c", IN_FLIGHT_SCRIPT, backend.location],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "written\n"
        with backend.write_lock_held():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "spilled 5\n"
        proc.stdin.write("released\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "joined True\n"
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # Whether the abandoned write committed (SQLite: its busy wait went on) or was cancelled
    # (Postgres), once the spill is loaded every row is there once.
    assert recover_cli(backend, tmp_path).returncode == 0
    assert recover_cli(backend, tmp_path).stdout == "recovered 0 rows\n"
    assert sorted(stored_ids(backend), key=int) == [str(i) for i in range(6)]


def test_a_writer_that_spilled_nothing_leaves_no_bookkeeping_behind(backend: Backend) -> None:
    writer = AuditWriter(lambda: open_store(backend.location), spill_paths=spill_locations(backend.location))
    writer.start()
    for record in records(0, 10):
        writer.put(record)
    writer.close()
    assert (writer.written, writer.spilled) == (10, 0)
    assert backend.sql("SELECT count(*) FROM audit_writers") == [(0,)]


# -- bad lines ------------------------------------------------------------------------------------


POISON = {
    "a wrong type": call_record(jsonrpc_id="x1", request_bytes="many"),
    "a huge integer": call_record(jsonrpc_id="x2", request_bytes=10**30),
    "a bad ts": call_record(jsonrpc_id="x3", ts=1e20),
    "an object where text belongs": call_record(jsonrpc_id="x4", project_id={"a": 1}),
    "a NUL character": call_record(jsonrpc_id="x5", tool="a\x00b"),
}


def test_poison_spill_lines_are_moved_aside_one_line_each_and_the_rest_loads(
    backend: Backend, tmp_path: Path
) -> None:
    backend.open().close()
    path = spill_file(backend)
    append(path, encode_lines("w", None, records(0, 2)))
    for record in POISON.values():
        append(path, encode_lines("w", None, [record]))  # type: ignore[list-item]
    append(path, encode_lines("w", None, records(2, 1)))
    result = recover_cli(backend, tmp_path)
    assert (result.returncode, result.stdout) == (0, "recovered 3 rows\n"), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(POISON)
    for number, line in enumerate(lines, start=3):
        assert line.startswith("mcpmeter: ") and f" line {number}: " in line and ".rejected" in line
    rejected = path.with_name(path.name + ".rejected")
    assert len(rejected.read_bytes().splitlines()) == len(POISON)
    assert stored_ids(backend) == ["0", "1", "2"]
    again = recover_cli(backend, tmp_path)  # nothing left to trip on
    assert (again.returncode, again.stdout, again.stderr) == (0, "recovered 0 rows\n", "")


def test_an_edited_spill_line_and_a_forged_one_are_rejected_and_never_loaded(
    backend: Backend, tmp_path: Path
) -> None:
    backend.open().close()
    path = spill_file(backend)
    edited = encode_lines("w", None, records(0, 1)).replace(b'"ok"', b'"error"')
    forged_unsigned = (
        b'[1760000000.0,1.0,"acme","x","s","{}","srv","stdio","stdio","c2s","tools/call","t","99",'
        b'null,null,1,1,"ok",null,null,null,null,null,null,null]\n'
    )
    append(path, edited + encode_lines("w", None, records(1, 1)) + forged_unsigned)
    result = recover_cli(backend, tmp_path)
    assert result.stdout == "recovered 1 rows\n"
    assert "line 1: integrity check failed" in result.stderr
    assert "line 3: no integrity check" in result.stderr
    assert stored_ids(backend) == ["1"]
    # Someone looked: the unsigned line may come in; the altered one never does.
    accepted = recover_cli(backend, tmp_path, "--accept-unsigned")
    assert accepted.stdout == "recovered 1 rows\n", accepted.stderr
    assert stored_ids(backend) == ["1", "99"]


def test_with_a_chain_key_lines_carry_an_hmac_and_unkeyed_or_foreign_key_lines_are_rejected(
    store: Store, backend: Backend, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    path = spill_file(backend)
    append(path, encode_lines("w", None, records(0, 1)))  # written before the key was set
    monkeypatch.setenv("MCPMETER_CHAIN_KEY", "k1")
    reload_chain_key()
    keyed = encode_lines("w", None, records(1, 1))
    assert keyed.startswith(b'{"h":"hmac-sha256:')
    append(path, keyed)
    monkeypatch.setenv("MCPMETER_CHAIN_KEY", "k2")  # a line made with another key
    reload_chain_key()
    append(path, encode_lines("w", None, records(2, 1)))
    monkeypatch.setenv("MCPMETER_CHAIN_KEY", "k1")
    reload_chain_key()
    assert recover_spill(store) == 1
    err = capfd.readouterr().err
    assert "line 1: unkeyed check while a chain key is configured" in err
    assert "line 3: integrity check failed" in err
    assert stored_ids(backend) == ["1"]


# -- where rows go when the first location is full or read-only -----------------------------------


def test_rows_go_to_the_fallback_location_when_the_spill_beside_the_store_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MCPMETER_SPILL_DIR", str(tmp_path / "state"))
    db = tmp_path / "db-dir-is-a-file" / "audit.db"
    db.parent.write_text("a file where the store's directory should be")
    writer = AuditWriter(lambda: open_store(str(db)), spill_paths=spill_locations(str(db))).start()
    for record in records(0, 4):
        writer.put(record)
    writer.close()
    assert writer.spilled == 4 and writer.lost == 0
    fallback = spill_locations(str(db))[1]
    assert fallback.parent == tmp_path / "state" and fallback.exists()
    assert f"spilling audit rows to {fallback} instead" in capfd.readouterr().err
    # The store's place is fixed: recovery finds the rows in the fallback location.
    db.parent.unlink()
    store = open_store(str(db))
    try:
        assert recover_spill(store) == 4
    finally:
        store.close()
    assert not fallback.exists()


def test_rows_wait_in_memory_while_nothing_can_be_written_and_reach_the_store_when_it_comes_back(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where directories should be")
    db = blocker / "audit.db"
    attempts: list[int] = []
    second_failed = threading.Event()

    def open_it() -> Store:
        attempts.append(1)
        try:
            return open_store(str(db))
        finally:
            if len(attempts) == 2:
                second_failed.set()  # the first write's attempt: it failed

    never = tmp_path / "never"  # no spill location can ever be made under a file
    never.write_text("")
    spills = [never / "audit.db.spill.jsonl", never / "state" / "audit.spill.jsonl"]
    writer = AuditWriter(open_it, spill_paths=spills, interval=0.01).start()
    for record in records(0, 3):
        writer.put(record)
    assert second_failed.wait(10)  # the first write found neither store nor spill location
    blocker.unlink()  # the store can be created now
    writer.put(records(3, 1)[0])
    writer.close()
    # Held in memory (nothing spilled, nothing lost), then written once the store could be.
    assert (writer.written, writer.spilled, writer.lost) == (4, 0, 0)
    store = open_store(str(db))
    try:
        ids = [str(row[0]) for row in store.query("SELECT jsonrpc_id FROM calls")]
    finally:
        store.close()
    assert sorted(ids, key=int) == ["0", "1", "2", "3"]


def test_the_store_file_and_its_directory_are_created_private(tmp_path: Path) -> None:
    db = tmp_path / "new" / "audit.db"
    open_store(str(db)).close()
    assert os.stat(db).st_mode & 0o777 == 0o600
    assert os.stat(db.parent).st_mode & 0o777 == 0o700
