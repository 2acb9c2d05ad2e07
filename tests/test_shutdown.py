"""No row lost at the end: the MCP client's shutdown sequence, signals at every phase of the
exit, and a store that is locked, full, read-only or gone.

MCP clients stop a stdio server by closing its stdin, then SIGTERM a second or two later,
then SIGKILL. Every test here drives a real ``mcpmeter wrap`` subprocess that way (or with
the official SDK client, which does exactly that) and then checks the promise: every
request has exactly one row once the spill is loaded back (``store recover``), and
mcpmeter exits with the status the contract gives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import psycopg
import pytest
from conftest import MCPMETER, PYTHON, SERVERS, eventually, read_rows, store_locked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client, StdioServerParameters, types
from pgserver import PrivatePostgres

from mcpmeter.store import open_store

pytest_plugins = ["pgserver"]

#: The bound DESIGN.md promises: gone within 2 s of stdin EOF, even with the store stuck.
EXIT_BOUND_S = 2.0

AGENT = types.Implementation(name="shutdown-test", version="1")

#: A raw server that answers every request at once and ends 128+N on SIGINT as on SIGTERM.
SERVER = """
import json, os, signal, sys
signal.signal(signal.SIGINT, lambda *_: os._exit(130))
for line in sys.stdin:
    message = json.loads(line)
    if "id" in message and "method" in message:
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": {}}) + "\\n")
        sys.stdout.flush()
"""


def requests(n: int) -> bytes:
    return b"".join(
        b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"t%d"}}\n' % (i, i % 7)
        for i in range(n)
    )


class Shutdown:
    """One ``wrap`` run ended as a client ends it; what it saw and how long the exit took."""

    def __init__(self, returncode: int, exit_s: float, answers: int, stderr: str) -> None:
        self.returncode = returncode
        self.exit_s = exit_s
        self.answers = answers
        self.stderr = stderr


def shut_down_like_a_client(
    env: dict[str, str],
    data: bytes,
    *,
    sig: int | None = signal.SIGTERM,
    after: float = 1.0,
    kill_after: float = 5.0,
) -> Shutdown:
    """Write ``data``, close stdin and read the first answer (mcpmeter is up); send ``sig``
    ``after`` seconds later if still running, then SIGKILL ``kill_after`` seconds after that.
    ``exit_s`` runs from the stdin EOF."""
    proc = subprocess.Popen(
        [MCPMETER, "wrap", "--", PYTHON, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    err: list[bytes] = []
    err_reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    err_reader.start()
    eof_at: list[float] = []

    def send() -> None:  # a thread: the answers must be read while the requests go in
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()
        eof_at.append(time.monotonic())

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    out: list[bytes] = [proc.stdout.readline()]
    readers = [
        err_reader,
        threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
    ]
    readers[1].start()
    sender.join(60)
    eof = eof_at[0]
    try:
        if sig is not None:
            try:
                proc.wait(after)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        exit_s = time.monotonic() - eof
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for reader in readers:
        reader.join(10)
    proc.stdout.close()
    proc.stderr.close()
    answers = b"".join(out).count(b"\n")
    return Shutdown(proc.returncode, exit_s, answers, b"".join(err).decode(errors="replace"))


def recover(env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run([MCPMETER, "store", "recover"], capture_output=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result


def ids_after_recovery(env: dict[str, str], db: Path) -> list[str]:
    """The tools/call ids of every row, once the spill files are loaded back."""
    recover(env)
    return sorted((str(row["jsonrpc_id"]) for row in read_rows(db) if row["method"] == "tools/call"), key=int)


def every(n: int) -> list[str]:
    return [str(i) for i in range(n)]


# -- the client's shutdown sequence ----------------------------------------------------------------


def test_a_client_shutdown_while_another_process_locks_the_store_exits_in_time_and_loses_no_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    with store_locked(db_path):
        run = shut_down_like_a_client(meter_env, requests(2), sig=signal.SIGTERM, after=1.0)
    assert run.answers == 2
    assert run.returncode == 0  # the server's own code: it had exited at EOF
    assert run.exit_s < EXIT_BOUND_S, run.stderr
    assert "spilled" in run.stderr
    assert ids_after_recovery(meter_env, db_path) == every(2)
    again = recover(meter_env)
    assert again.stdout == b"recovered 0 rows\n"  # exactly once


def test_eof_alone_with_the_store_locked_exits_within_the_bound_and_spills_every_row(
    meter_env: dict[str, str], db_path: Path
) -> None:
    with store_locked(db_path):
        run = shut_down_like_a_client(meter_env, requests(50), sig=None, kill_after=20)
    assert (run.returncode, run.answers) == (0, 50)
    assert run.exit_s < EXIT_BOUND_S, run.stderr
    assert ids_after_recovery(meter_env, db_path) == every(50)


@pytest.mark.anyio
async def test_the_sdk_clients_own_shutdown_with_the_store_locked_keeps_every_row(
    meter_env: dict[str, str], db_path: Path, tmp_path: Path
) -> None:
    counts = tmp_path / "counts"
    params = StdioServerParameters(
        command=MCPMETER,
        args=["wrap", "--", PYTHON, str(SERVERS / "counting_server.py"), str(counts)],
        env=meter_env,
    )
    with store_locked(db_path):
        with anyio.fail_after(60):
            async with Client(params, client_info=AGENT) as client:
                result = await client.call_tool("lookup", {"query": "q"})
                assert not result.is_error
                started = time.monotonic()
            # The client closed stdin and waited for the exit (SIGTERM after 2 s, then SIGKILL).
            exited = time.monotonic() - started
    assert exited < EXIT_BOUND_S
    recover(meter_env)
    rows = read_rows(db_path)
    assert [row["status"] for row in rows if row["method"] == "tools/call"] == ["ok"]
    assert counts.read_text() == "q\n"
    # The discovery or handshake request and the call, each once.
    requests_seen = [(row["method"], row["jsonrpc_id"]) for row in rows]
    assert len(requests_seen) >= 2 and len(set(requests_seen)) == len(requests_seen)


def test_sigterm_20_ms_after_eof_with_20000_pipelined_calls_leaves_one_row_per_request(
    meter_env: dict[str, str], db_path: Path
) -> None:
    n = 20_000
    run = shut_down_like_a_client(meter_env, requests(n), sig=signal.SIGTERM, after=0.02, kill_after=20)
    # The server may have been stopped by the forwarded SIGTERM (143) or exited at EOF (0).
    assert run.returncode in (0, 128 + signal.SIGTERM), run.stderr
    assert ids_after_recovery(meter_env, db_path) == every(n)
    answered = [row for row in read_rows(db_path) if row["status"] == "ok"]
    assert len(answered) >= run.answers


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_writer_waits_on_a_locked_store_spills_at_once_and_exits_with_the_servers_code(
    meter_env: dict[str, str], db_path: Path, sig: int
) -> None:
    with store_locked(db_path):
        run = shut_down_like_a_client(meter_env, requests(30), sig=sig, after=0.6)
    assert run.returncode == 0  # the server had exited: its code, not the signal's
    # The signal cut the flush short: it did not wait out its second (which began after
    # mcpmeter had started and relayed, so would end past 1.3 s).
    assert run.exit_s < 0.6 + 0.5, run.stderr
    assert ids_after_recovery(meter_env, db_path) == every(30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_the_server_still_runs_is_forwarded_and_every_row_written(
    meter_env: dict[str, str], db_path: Path, sig: int
) -> None:
    proc = subprocess.Popen(
        [MCPMETER, "wrap", "--", PYTHON, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=meter_env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(requests(3))
    proc.stdin.flush()
    for _ in range(3):
        assert proc.stdout.readline()
    proc.send_signal(sig)  # stdin still open: the relay phase
    proc.wait(30)  # with stdin still open (an EOF now would race the forwarded signal)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert ids_after_recovery(meter_env, db_path) == every(3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(min_value=1, max_value=3000),
    after=st.floats(min_value=0.0, max_value=1.3),
    sig=st.sampled_from([signal.SIGTERM, signal.SIGINT]),
    stuck=st.booleans(),
)
def test_a_signal_at_any_moment_of_the_exit_loses_no_row_and_duplicates_none(
    tmp_path: Path, n: int, after: float, sig: int, stuck: bool
) -> None:
    db = tmp_path / f"kill-{time.monotonic_ns()}.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(db)
    if stuck:
        with store_locked(db):
            run = shut_down_like_a_client(env, requests(n), sig=sig, after=after, kill_after=20)
    else:
        run = shut_down_like_a_client(env, requests(n), sig=sig, after=after, kill_after=20)
    assert run.returncode in (0, 128 + sig), run.stderr
    assert run.exit_s < after + EXIT_BOUND_S
    assert ids_after_recovery(env, db) == every(n)


# -- a store on a full or read-only filesystem --------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (the tests run as root: CI does)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, timeout=30)


def test_a_full_disk_spills_to_the_fallback_location_says_where_and_loses_nothing(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "small", "2m") as small:
        db = small / "audit.db"
        env = {**meter_env, "MCPMETER_DB": str(db), "MCPMETER_SPILL_DIR": str(tmp_path / "state")}
        n = 12_000
        run = shut_down_like_a_client(env, requests(n), sig=None, kill_after=60)
        assert (run.returncode, run.answers) == (0, n), run.stderr
        assert f"spilling audit rows to {tmp_path / 'state'}" in run.stderr
        assert "lost" not in run.stderr
        remount(small, "size=64m")  # room again: the spill loads back
        assert ids_after_recovery(env, db) == every(n)


def test_a_read_only_store_spills_to_the_fallback_location_and_loads_back_once_writable(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "ro", "16m") as ro:
        db = ro / "audit.db"
        open_store(str(db)).close()
        remount(ro, "ro")
        env = {**meter_env, "MCPMETER_DB": str(db), "MCPMETER_SPILL_DIR": str(tmp_path / "state")}
        run = shut_down_like_a_client(env, requests(40), sig=None, kill_after=60)
        assert (run.returncode, run.answers) == (0, 40), run.stderr
        assert list((tmp_path / "state").glob("audit.db-*.spill.jsonl"))
        remount(ro, "rw")
        assert ids_after_recovery(env, db) == every(40)


# -- Postgres going away or hanging mid-session --------------------------------------------------


def count_rows(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as con:
        row = con.execute("SELECT count(*) FROM calls").fetchone()
        return int(row[0]) if row else 0


def wait_for_rows(url: str, n: int) -> None:
    """Until the writer has committed ``n`` rows (bounded)."""
    eventually(lambda: count_rows(url) >= n, f"{n} rows committed", 30, poll=0.05)


class Session:
    """``mcpmeter wrap`` driven one request at a time, like an agent's session."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [MCPMETER, "wrap", "--", PYTHON, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.sent = 0

    def call(self, n: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        for _ in range(n):
            self.proc.stdin.write(requests(self.sent + 1).splitlines(keepends=True)[-1])
            self.proc.stdin.flush()
            assert self.proc.stdout.readline()  # answered: the relay never waits on the store
            self.sent += 1

    def shut_down(self) -> tuple[int, float]:
        """Close stdin, SIGTERM a second later if still running; (status, seconds from EOF)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        eof = time.monotonic()
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            exit_s = time.monotonic() - eof
            for stream in (self.proc.stdout, self.proc.stderr):
                assert stream is not None
                stream.read()
                stream.close()
        return self.proc.returncode, exit_s


def pg_env(meter_env: dict[str, str], pg: PrivatePostgres, tmp_path: Path) -> dict[str, str]:
    return {**meter_env, "MCPMETER_DB": pg.url, "XDG_DATA_HOME": str(tmp_path / "xdg")}


def pg_ids_after_recovery(env: dict[str, str], url: str) -> list[str]:
    recover(env)
    with psycopg.connect(url, connect_timeout=5) as con:
        rows = con.execute("SELECT jsonrpc_id FROM calls WHERE method = 'tools/call'").fetchall()
    return sorted((str(r[0]) for r in rows), key=int)


def test_postgres_going_away_mid_session_loses_no_row_and_the_exit_stays_in_bound(
    meter_env: dict[str, str], tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    env = pg_env(meter_env, private_postgres, tmp_path)
    session = Session(env)
    session.call(5)
    wait_for_rows(private_postgres.url, 5)
    private_postgres.stop("immediate")
    session.call(5)
    status, exit_s = session.shut_down()
    assert status == 0
    assert exit_s < EXIT_BOUND_S
    private_postgres.start()
    assert pg_ids_after_recovery(env, private_postgres.url) == every(10)
    assert recover(env).stdout == b"recovered 0 rows\n"


def test_postgres_hanging_mid_session_loses_no_row_duplicates_none_and_the_exit_stays_in_bound(
    meter_env: dict[str, str], tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    env = pg_env(meter_env, private_postgres, tmp_path)
    session = Session(env)
    session.call(5)
    wait_for_rows(private_postgres.url, 5)
    with private_postgres.paused():
        session.call(5)
        status, exit_s = session.shut_down()
    assert status == 0
    assert exit_s < EXIT_BOUND_S
    # Whether the write that hung committed once the database woke up or not, every row once.
    assert pg_ids_after_recovery(env, private_postgres.url) == every(10)
