"""The tamper-evident chain, `mcpmeter verify`, and spill files loaded back exactly once.

Each test of a store runs on SQLite and on Postgres (see ``tests/stores.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MCPMETER
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stores import BACKENDS, Backend, make_backend, subprocess_env

from mcpmeter.errors import UsageError
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.store import Store
from mcpmeter.store.chain import (
    CHAIN_COLUMNS,
    GENESIS,
    KEY_ENV,
    KEY_FILE_ENV,
    canonical,
    chain,
    chain_key,
    link,
    reload_chain_key,
)
from mcpmeter.store.integrity import Gaps, check_store, verify_store
from mcpmeter.store.spill import encode_lines, recover_spill, spill_path_for


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
            out.write(encode_lines("test-writer", None, [r]))


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
        assert recover_spill(store) == len(expected)
        os.rename(copy, path)
    recover_spill(store)
    recover_spill(store)
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
    assert recover_spill(store) == 3
    assert stored_ids(backend) == ["0", "1", "2"] and not orphan.exists()


def test_a_torn_last_spill_line_is_skipped_and_the_rest_loaded(
    store: Store, backend: Backend, capfd: pytest.CaptureFixture[str]
) -> None:
    path = spill_file(backend)
    spill(path, [record(0), record(1)])
    with path.open("ab") as out:
        out.write(encode_lines("test-writer", None, [record(2)])[:40])  # the writer died mid-line
    assert recover_spill(store) == 2
    assert "skipped 1 unreadable spill line (a torn last line)" in capfd.readouterr().err


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


# -- what the plain chain cannot see: truncation, recomputed hashes, gaps -------------------------
#
# The key reaches the writer in-process through the environment and ``reload_chain_key``
# (which re-reads it), and the ``mcpmeter verify`` subprocess through its environment.

KEY = "correct horse battery staple"
HASHED = ", ".join(CHAIN_COLUMNS)


class WritersKey:
    """The chain key of this process's writers (the environment, read again on each change)."""

    def __init__(self, env: pytest.MonkeyPatch) -> None:
        self.env = env  # undone when the test ends, before the key is read again

    def set(self, key: str | None) -> None:
        if key is None:
            self.env.delenv(KEY_ENV, raising=False)
        else:
            self.env.setenv(KEY_ENV, key)
        reload_chain_key()


@pytest.fixture(autouse=True)
def writers_key() -> Iterator[WritersKey]:
    """No chain key unless a test sets one (whatever the shell running the tests has)."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv(KEY_ENV, raising=False)
        env.delenv(KEY_FILE_ENV, raising=False)
        reload_chain_key()
        yield WritersKey(env)
    with contextlib.suppress(UsageError):
        reload_chain_key()


def test_the_chain_key_is_read_once_per_process_and_again_by_reload_chain_key(
    writers_key: WritersKey, tmp_path: Path
) -> None:
    writers_key.set(KEY)
    writers_key.env.setenv(KEY_ENV, "changed")
    assert chain_key() == KEY.encode()
    assert reload_chain_key() == b"changed"
    key_file = tmp_path / "chain.key"
    key_file.write_text("from a file\n")
    key_file.chmod(0o640)
    writers_key.env.delenv(KEY_ENV)
    writers_key.env.setenv(KEY_FILE_ENV, str(key_file))
    with pytest.raises(UsageError, match=r"is open to group or others \(mode 640\): chmod 600 it$"):
        reload_chain_key()
    fields = list(record(0))
    with pytest.raises(UsageError):  # a writer refuses to write rather than fall back to plain hashes
        link(GENESIS, fields)
    key_file.chmod(0o600)
    assert reload_chain_key() == b"from a file"
    assert (
        link(GENESIS, fields) == link(GENESIS, fields, key=b"from a file") != link(GENESIS, fields, key=None)
    )


def verify_run(
    location: str | Path, *args: str, key: str | None = None, key_file: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``mcpmeter verify`` with the chain key (or key file) given in its environment, or none."""
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, KEY_FILE_ENV)}
    if key is not None:
        env[KEY_ENV] = key
    if key_file is not None:
        env[KEY_FILE_ENV] = str(key_file)
    return subprocess.run(
        [MCPMETER, "verify", "--db", str(location), *args], capture_output=True, timeout=60, env=env
    )


def head_of(result: subprocess.CompletedProcess[bytes]) -> str:
    """The checkpoint a successful verify printed (``head ID HASH``), as ``--head`` takes it."""
    [line] = [line for line in result.stderr.decode().splitlines() if line.startswith("head ")]
    _, row_id, digest = line.split(" ")
    return f"{row_id}:{digest}"


def rechain(backend: Backend, after: int = 0, key: bytes | None = None) -> None:
    """What someone who can write the store does to hide an edit: recompute every hash after
    row ``after`` with :mod:`mcpmeter.store.chain` (without the key, unless given one)."""
    rows = backend.sql(f"SELECT id, {HASHED}, hash FROM calls ORDER BY id")
    previous = GENESIS
    for row in rows:
        if row[0] <= after:
            previous = row[-1]
    rewritten = [row for row in rows if row[0] > after]
    for row, digest in zip(rewritten, chain(previous, [r[1:-1] for r in rewritten], key=key), strict=True):
        backend.sql("UPDATE calls SET hash = ? WHERE id = ?", digest, row[0])


def test_verify_prints_the_head_and_verify_head_with_it_passes(store: Store, backend: Backend) -> None:
    store.write_calls([record(i) for i in range(20)])
    result = verify_run(backend.location)
    [(last_id, last_hash)] = backend.sql("SELECT id, hash FROM calls ORDER BY id DESC LIMIT 1")
    assert result.returncode == 0
    assert result.stderr.decode() == f"head {last_id} {last_hash}\n"
    store.write_calls([record(i) for i in range(20, 25)])  # the log grew since the checkpoint
    again = verify_run(backend.location, "--head", head_of(result))
    assert (again.returncode, again.stdout.decode()) == (0, "ok: 25 rows (ids 1..25), hash chain intact\n")


def test_deleting_the_last_rows_fails_verify_head_with_a_checkpoint_kept_from_before(
    store: Store, backend: Backend
) -> None:
    store.write_calls([record(i) for i in range(20)])
    checkpoint = head_of(verify_run(backend.location))
    backend.sql("DELETE FROM calls WHERE id > 15")
    result = verify_run(backend.location, "--head", checkpoint)
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "broken: the checkpoint's row 20 is gone: the log ends at row 15 (truncated)"
    plain = verify_run(backend.location)
    if backend.kind == "sqlite":  # the AUTOINCREMENT counter remembers ids 16..20 were drawn
        assert plain.returncode == 1
        assert plain.stdout.decode().startswith("broken: ids missing: 16..20 (1 gap, 5 ids): ")
    else:  # the chain is intact and a Postgres sequence proves nothing: only the checkpoint knows
        assert (plain.returncode, plain.stdout.decode()) == (
            0,
            "ok: 15 rows (ids 1..15), hash chain intact\n",
        )


def test_a_checkpoint_catches_an_edit_hidden_by_recomputing_the_plain_chain(
    store: Store, backend: Backend
) -> None:
    store.write_calls([record(i) for i in range(20)])
    checkpoint = head_of(verify_run(backend.location))
    backend.sql("UPDATE calls SET cost_usd = 0 WHERE id = 7")
    rechain(backend)
    assert verify_run(backend.location).returncode == 0  # the plain chain is bent
    result = verify_run(backend.location, "--head", checkpoint)
    assert result.returncode == 1
    assert result.stdout.decode().startswith("broken: the checkpoint's row 20 has hash ")


def test_a_malformed_head_is_one_line_and_exit_2(store: Store, backend: Backend) -> None:
    store.write_calls([record(0)])
    result = verify_run(backend.location, "--head", "twenty")
    assert result.returncode == 2
    assert (
        result.stderr.decode()
        == "mcpmeter: --head takes ID:HASH (verify prints them as 'head ID HASH'), not 'twenty'\n"
    )


def test_a_keyed_log_verifies_with_the_key(store: Store, backend: Backend, writers_key: WritersKey) -> None:
    writers_key.set(KEY)
    store.write_calls([record(i) for i in range(10)])
    store.write_calls([record(i) for i in range(10, 25)])
    hashes = [h for (h,) in backend.sql("SELECT hash FROM calls ORDER BY id")]
    assert all(h.startswith("hmac-sha256:") and len(h) == len("hmac-sha256:") + 64 for h in hashes)
    expected = (
        "ok: 25 rows (ids 1..25), hash chain intact, every row keyed (HMAC-SHA256, checked with the key)\n"
    )
    for args in ((), ("--require-key",)):
        result = verify_run(backend.location, *args, key=KEY)
        assert (result.returncode, result.stdout.decode()) == (0, expected)
    assert verify_store(store).broken is None
    wrong = verify_run(backend.location, key="another key")
    assert wrong.returncode == 1
    assert wrong.stdout.decode().startswith("broken at row 1 ")


def test_a_key_file_verifies_like_the_key_and_one_open_to_others_is_refused_in_one_line(
    store: Store, backend: Backend, writers_key: WritersKey, tmp_path: Path
) -> None:
    writers_key.set(KEY)
    store.write_calls([record(i) for i in range(5)])
    key_file = tmp_path / "chain.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    assert verify_run(backend.location, "--require-key", key_file=key_file).returncode == 0
    key_file.chmod(0o644)
    result = verify_run(backend.location, key_file=key_file)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode() == (
        f"mcpmeter: the chain key file {key_file} (MCPMETER_CHAIN_KEY_FILE) is open to group or others"
        " (mode 644): chmod 600 it\n"
    )


def test_recomputing_the_chain_after_an_edit_passes_the_plain_verify_but_fails_with_the_key_configured(
    store: Store, backend: Backend, writers_key: WritersKey
) -> None:
    writers_key.set(KEY)
    store.write_calls([record(i) for i in range(20)])
    backend.sql("UPDATE calls SET agent_id = 'someone-else' WHERE id = 7")
    rechain(backend)  # every row rewritten with a plain hash, as mcpmeter.store.chain computes it
    plain = verify_run(backend.location)
    assert (plain.returncode, plain.stdout.decode()) == (0, "ok: 20 rows (ids 1..20), hash chain intact\n")
    keyed = verify_run(backend.location, key=KEY)
    assert keyed.returncode == 1
    assert keyed.stdout.decode().startswith(
        "broken at row 20 (20 rows checked): a key is configured but no row is keyed"
    )
    rechain(backend, key=b"a guessed key")  # keyed hashes, but not with the key
    guessed = verify_run(backend.location, key=KEY)
    assert guessed.returncode == 1 and guessed.stdout.decode().startswith("broken at row 1 ")


def test_a_log_keyed_part_way_verifies_and_says_which_rows_predate_the_key(
    store: Store, backend: Backend, writers_key: WritersKey
) -> None:
    store.write_calls([record(i) for i in range(10)])
    writers_key.set(KEY)
    store.write_calls([record(i) for i in range(10, 25)])
    result = verify_run(backend.location, key=KEY)
    assert (result.returncode, result.stdout.decode()) == (
        0,
        "ok: 25 rows (ids 1..25), hash chain intact; ids 11..25 keyed (HMAC-SHA256, checked with the key),"
        " the 10 rows before them written before keying started (SHA-256 only)\n",
    )
    strict = verify_run(backend.location, "--require-key", key=KEY)
    assert strict.returncode == 1
    assert strict.stdout.decode().startswith("broken at row 1 (1 rows checked): the row is not keyed")


def test_a_keyed_log_without_the_key_reports_the_rows_it_could_not_check(
    store: Store, backend: Backend, writers_key: WritersKey
) -> None:
    store.write_calls([record(i) for i in range(10)])
    writers_key.set(KEY)
    store.write_calls([record(i) for i in range(10, 25)])
    writers_key.set(None)
    result = verify_run(backend.location)
    assert (result.returncode, result.stdout.decode()) == (
        0,
        "ok: 25 rows (ids 1..25): 15 keyed rows (ids 11..25) not checked, no key (set MCPMETER_CHAIN_KEY"
        " or MCPMETER_CHAIN_KEY_FILE); the 10 rows before them are intact\n",
    )
    verdict = verify_store(store)
    assert (verdict.rows, verdict.keyed, verdict.unchecked, verdict.broken) == (25, 15, 15, None)
    # What can be checked without the key still is: the plain rows before the keyed ones.
    backend.sql("UPDATE calls SET tool = 'other' WHERE id = 4")
    broken = verify_run(backend.location)
    assert broken.returncode == 1 and broken.stdout.decode().startswith("broken at row 4 ")
    required = verify_run(backend.location, "--require-key")
    assert required.returncode == 2
    assert b"--require-key needs the chain key" in required.stderr


def test_a_downgrade_to_plain_hashes_after_keyed_rows_fails_with_or_without_the_key(
    store: Store, backend: Backend, writers_key: WritersKey
) -> None:
    writers_key.set(KEY)
    store.write_calls([record(i) for i in range(20)])
    backend.sql("UPDATE calls SET status = 'error' WHERE id = 15")
    rechain(backend, after=10)  # rows 11.. rewritten by someone without the key
    for key in (KEY, None):
        result = verify_run(backend.location, key=key)
        assert result.returncode == 1
        assert result.stdout.decode().startswith(
            "broken at row 11 (11 rows checked): a plain (unkeyed) hash after a keyed row: a downgrade"
        )


def test_a_writer_without_the_key_appending_to_a_keyed_log_breaks_it_at_its_first_row(
    store: Store, backend: Backend, writers_key: WritersKey
) -> None:
    writers_key.set(KEY)
    store.write_calls([record(i) for i in range(5)])
    writers_key.set(None)
    store.write_calls([record(i) for i in range(5, 8)])
    result = verify_run(backend.location, key=KEY)
    assert result.returncode == 1
    assert result.stdout.decode().startswith("broken at row 6 ")


def test_id_gaps_fail_verify_on_sqlite_and_are_a_warning_on_postgres(store: Store, backend: Backend) -> None:
    store.write_calls([record(i) for i in range(20)])
    backend.sql("DELETE FROM calls WHERE id > 15")
    store.write_calls([record(i) for i in range(20, 25)])  # ids 21..25, chained onto row 15
    result = verify_run(backend.location)
    gap = "ids missing: 16..20 (1 gap, 5 ids)"
    if backend.kind == "sqlite":  # SQLite never skips an id: rows were deleted
        assert result.returncode == 1
        assert (
            result.stdout.decode()
            == f"broken: {gap}: SQLite never skips or reuses an id, so these rows were deleted\n"
        )
    else:  # a rolled-back batch leaves such a gap on Postgres
        assert (result.returncode, result.stdout.decode()) == (
            0,
            "ok: 20 rows (ids 1..25), hash chain intact\n",
        )
        assert result.stderr.decode().startswith(f"mcpmeter: {gap}: on Postgres a rolled-back write leaves")


def test_id_gaps_are_reported_as_ranges_and_capped(store: Store, backend: Backend) -> None:
    store.write_calls([record(i) for i in range(60)])
    deleted = [3, 4, 5, *range(12, 50, 2)]
    backend.sql(f"DELETE FROM calls WHERE id IN ({', '.join(map(str, deleted))})")
    rechain(backend)  # the chain hides the deletions: the ids do not
    check = check_store(store)
    assert check.verdict.broken is None
    assert check.gaps.total == 20 and check.gaps.ids == 22
    assert check.gaps.describe() == (
        "ids missing: 3..5, 12, 14, 16, 18, 20, 22, 24, 26, 28, ... (the first 10 of 20 gaps, 22 ids)"
    )
    assert check.failed == (backend.kind == "sqlite")
    result = verify_run(backend.location)
    shown = result.stdout if backend.kind == "sqlite" else result.stderr
    assert check.gaps.describe().encode() in shown
    assert result.returncode == (1 if backend.kind == "sqlite" else 0)


def test_a_row_deleted_from_the_middle_breaks_the_chain_and_shows_as_a_gap(
    store: Store, backend: Backend
) -> None:
    store.write_calls([record(i) for i in range(20)])
    backend.sql("DELETE FROM calls WHERE id = 9")
    check = check_store(store)
    assert check.verdict.broken is not None and check.verdict.broken.id == 10
    assert check.gaps == Gaps(((9, 9),), 1, 1)
