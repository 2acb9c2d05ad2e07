"""The private Postgres server tests use to make the database go away or hang (tests/pgserver.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgserver import PrivatePostgres, StopMode

pytest_plugins = ["pgserver"]


class Background:
    """``fn`` running in a thread of its own; its result or exception, once it has finished."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc

    def finished_within(self, seconds: float) -> bool:
        self._thread.join(timeout=seconds)
        return not self._thread.is_alive()


def select_one(url: str, connect_timeout: int = 2) -> Any:
    with psycopg.connect(url, connect_timeout=connect_timeout) as con:
        row = con.execute("SELECT 1").fetchone()
        return row[0] if row else None


def postgres_processes_using(datadir: Path) -> list[int]:
    """Live processes whose command line names ``datadir`` (the postmaster's does: ``-D datadir``)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if str(datadir).encode() in cmdline:
            found.append(int(entry.name))
    return found


def state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, T, Z, …), or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    return state(pid) not in (None, "Z", "X")


def test_accepts_connections(private_postgres: PrivatePostgres) -> None:
    assert private_postgres.url == f"postgresql://postgres@127.0.0.1:{private_postgres.port}/postgres"
    assert select_one(private_postgres.url) == 1
    with psycopg.connect(private_postgres.url) as con:
        row = con.execute("SHOW data_directory").fetchone()
    assert row is not None and Path(row[0]) == private_postgres.datadir


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stop_then_start_keeps_the_data(private_postgres: PrivatePostgres, mode: StopMode) -> None:
    url = private_postgres.url
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("CREATE TABLE kept (n int)")
        con.execute("INSERT INTO kept VALUES (41), (42)")

    private_postgres.stop(mode)
    assert not private_postgres.running
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    assert time.monotonic() - began < 2.5, "a stopped server should refuse at once, not time out"

    private_postgres.start()
    assert private_postgres.url == url, "start() after stop() reuses the port"
    with psycopg.connect(url) as con:
        assert con.execute("SELECT n FROM kept ORDER BY n").fetchall() == [(41,), (42,)]


def test_stopping_a_stopped_server_does_nothing(private_postgres: PrivatePostgres) -> None:
    private_postgres.stop()
    private_postgres.stop("immediate")
    with pytest.raises(ValueError):
        private_postgres.stop("smart")  # type: ignore[arg-type]


def test_pause_hangs_queries_and_connections_until_resume(private_postgres: PrivatePostgres) -> None:
    url = private_postgres.url
    con = psycopg.connect(url, connect_timeout=2, autocommit=True)
    try:
        assert con.execute("SELECT 1").fetchone() == (1,)
        private_postgres.pause()
        try:
            assert private_postgres.is_paused
            # (A child that exited since, e.g. an autovacuum worker, stays a zombie: its parent is stopped.)
            postmaster, *children = private_postgres.pids()
            states = {pid: state(pid) for pid in children}
            assert state(postmaster) == "T" and set(states.values()) <= {"T", "Z", None}, states

            query = Background(lambda: con.execute("SELECT 2").fetchone())
            connect = Background(lambda: select_one(url, connect_timeout=10))
            assert not query.finished_within(1.0), "a query on a paused server must hang"
            assert not connect.finished_within(0.0), "connecting to a paused server must hang"
        finally:
            private_postgres.resume()
        assert query.finished_within(10.0), "the query finishes once the server resumes"
        assert query.error is None and query.result == (2,)
        assert connect.finished_within(10.0), "the connection completes once the server resumes"
        assert connect.error is None and connect.result == 1
    finally:
        con.close()


def test_connect_timeout_expires_while_paused(private_postgres: PrivatePostgres) -> None:
    with private_postgres.paused():
        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            psycopg.connect(private_postgres.url, connect_timeout=2)
        assert time.monotonic() - began < 10.0
    assert not private_postgres.is_paused
    assert select_one(private_postgres.url) == 1


def test_nothing_is_left_after_the_context_exits() -> None:
    with PrivatePostgres() as pg:
        datadir, base = pg.datadir, pg.base
        assert base is not None and datadir.is_dir()
        with psycopg.connect(pg.url) as con:
            con.execute("SELECT 1")
            pids = pg.pids()
        assert len(pids) > 1, "the postmaster and its children"
        assert postgres_processes_using(datadir) == [pids[0]]
    assert not [pid for pid in pids if alive(pid)]
    assert postgres_processes_using(datadir) == []
    assert not base.exists()


def test_exiting_while_paused_still_cleans_up() -> None:
    with PrivatePostgres() as pg:
        con = psycopg.connect(pg.url, connect_timeout=2)
        pg.pause()
        stuck = Background(lambda: con.execute("SELECT 1"))
        assert not stuck.finished_within(0.2)
        pids, datadir, base = pg.pids(), pg.datadir, pg.base
    assert stuck.finished_within(10.0), "the client sees its server go away"
    assert isinstance(stuck.error, psycopg.OperationalError) or stuck.result is not None
    con.close()
    assert not [pid for pid in pids if alive(pid)]
    assert postgres_processes_using(datadir) == []
    assert base is not None and not base.exists()


def test_two_servers_side_by_side() -> None:
    with PrivatePostgres() as one, PrivatePostgres() as two:
        assert one.port != two.port
        one.pause()
        assert select_one(two.url) == 1, "pausing one server leaves the other alone"
        one.resume()
        assert select_one(one.url) == 1
