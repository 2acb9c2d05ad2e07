"""Shared fixtures: real processes, real files. Nothing of mcpmeter's own is mocked."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SERVERS = Path(__file__).resolve().parent / "servers"
PYTHON = sys.executable
#: The console script installed in the virtual environment the tests run from.
MCPMETER = str(Path(sys.executable).with_name("mcpmeter"))


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


def read_rows(db: Path) -> list[dict[str, object]]:
    """Every row of `calls`, in id order, as dicts."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM calls ORDER BY id")]
    finally:
        con.close()
