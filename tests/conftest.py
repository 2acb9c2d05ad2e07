"""Shared fixtures: real processes, real files. Nothing of mcpmeter's own is mocked."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpmeter.record import CallRecord

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SERVERS = Path(__file__).resolve().parent / "servers"
PYTHON = sys.executable
#: The console script installed in the virtual environment the tests run from.
MCPMETER = str(Path(sys.executable).with_name("mcpmeter"))


@pytest.fixture(autouse=True)
def no_chain_key() -> Iterator[None]:
    """No chain key unless a test sets one, and none left behind in this process's cache."""
    from mcpmeter.errors import MeterError
    from mcpmeter.store.chain import reload_chain_key

    with pytest.MonkeyPatch.context() as env:
        env.delenv("MCPMETER_CHAIN_KEY", raising=False)
        env.delenv("MCPMETER_CHAIN_KEY_FILE", raising=False)
        reload_chain_key()
        yield
    with contextlib.suppress(MeterError):  # the environment is as it was: forget a test's key
        reload_chain_key()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A SQLite store path that does not exist yet."""
    return tmp_path / "audit.db"


@pytest.fixture
def meter_env(db_path: Path) -> Iterator[dict[str, str]]:
    """An environment for `mcpmeter wrap` subprocesses: the test's store, no inherited tags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPMETER_")}
    env["MCPMETER_DB"] = str(db_path)
    yield env


def call_record(**fields: Any) -> CallRecord:
    """A settled tools/call as the meter would hand it to the writer; ``fields`` override."""
    values: dict[str, Any] = {
        "ts": 1_700_000_000.0,
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
        "request_id": None,
        "trace_id": None,
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


def read_rows(db: Path) -> list[dict[str, object]]:
    """Every row of `calls`, in id order, as dicts."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM calls ORDER BY id")]
    finally:
        con.close()


@contextlib.contextmanager
def store_locked(db: Path) -> Iterator[None]:
    """Another process's exclusive lock on a SQLite store (created and migrated first): the
    store stuck, as when a long transaction or a backup holds it."""
    from mcpmeter.store import open_store

    open_store(str(db)).close()
    holder = sqlite3.connect(db, isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()
