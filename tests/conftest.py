"""Shared fixtures: real processes, real files. Nothing of mcpmeter's own is mocked."""

from __future__ import annotations

import contextlib
import inspect
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from mcpmeter.record import CallRecord

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SERVERS = Path(__file__).resolve().parent / "servers"
PYTHON = sys.executable
#: The console script installed in the virtual environment the tests run from.
MCPMETER = str(Path(sys.executable).with_name("mcpmeter"))
#: How long :func:`eventually` waits unless told, and how often it looks.
EVENTUALLY_S = 30.0
POLL_S = 0.01

T = TypeVar("T")


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


# -- bounded waits for what nothing announces (a row committed, a process gone, a screen drawn) --


def _not_within(what: str, within: float, last_seen: Callable[[], object] | None) -> AssertionError:
    message = f"not within {within} s: {what}"
    if last_seen is not None:
        message += f"; last seen:\n{last_seen()}"
    return AssertionError(message)


def eventually(
    condition: Callable[[], T],
    what: str,
    within: float = EVENTUALLY_S,
    *,
    poll: float = POLL_S,
    last_seen: Callable[[], object] | None = None,
) -> T:
    """Poll ``condition()`` until it returns something true, and return that; fail after
    ``within`` seconds saying ``what`` was awaited (and ``last_seen()``, if given).

    For what no pipe, event or lock reports; the sleep is the poll period, never a
    synchronisation. In async tests use :func:`eventually_async`, which lets the loop run.
    """
    deadline = time.monotonic() + within
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise _not_within(what, within, last_seen)
        time.sleep(poll)
    return value


async def eventually_async(
    condition: Callable[[], T] | Callable[[], Awaitable[T]],
    what: str,
    within: float = EVENTUALLY_S,
    *,
    poll: float = POLL_S,
    last_seen: Callable[[], object] | None = None,
) -> T:
    """:func:`eventually` for async tests: the event loop runs between polls, ``condition``
    may be a coroutine function, and a condition that hangs is cut off at the deadline too."""
    with anyio.move_on_after(within):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            await anyio.sleep(poll)
    raise _not_within(what, within, last_seen)
