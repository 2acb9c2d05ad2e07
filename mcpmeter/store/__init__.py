"""Where audit rows live: SQLite by default (one file, WAL), Postgres for fleets."""

from __future__ import annotations

import os
from pathlib import Path

from mcpmeter.errors import UsageError
from mcpmeter.store.base import CallFilter, Store
from mcpmeter.store.sqlite import SQLiteStore

__all__ = ["CallFilter", "SQLiteStore", "Store", "default_db", "is_url", "open_store", "resolve_db"]


def default_db() -> str:
    """``$XDG_DATA_HOME/mcpmeter/audit.db`` (``~/.local/share`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "mcpmeter" / "audit.db")


def resolve_db(db: str | None) -> str:
    """The store location: ``--db``, else ``MCPMETER_DB``, else the default path."""
    return db or os.environ.get("MCPMETER_DB") or default_db()


def open_store(location: str, *, create: bool = True) -> Store:
    """Open (and migrate) the store at ``location``: a SQLite path or a ``postgresql://`` URL."""
    if is_url(location):
        try:
            from mcpmeter.store.postgres import PostgresStore
        except ImportError as exc:
            raise UsageError(
                f"a postgresql:// store needs psycopg ({exc}): pip install 'mcpmeter[postgres]'"
            ) from exc
        return PostgresStore(location, create=create)
    return SQLiteStore(location, create=create)


def is_url(location: str) -> bool:
    """Whether ``location`` names a Postgres database (else it is a SQLite path)."""
    return location.startswith(("postgresql://", "postgres://"))
