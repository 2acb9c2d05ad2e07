"""The ledger's Python API for agent runtimes: :class:`Ledger` and :func:`record`.

``from mcpmeter.ledger import Ledger, record`` (see the README). ``ledger add`` and
``ledger import`` write through the same :meth:`Ledger.write`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType

from mcpmeter.ledger.rows import (
    COLUMNS,
    LedgerRow,
    checked_row,
    count_field,
    optional_text_field,
    tags_json,
    text_field,
    time_field,
)
from mcpmeter.record import iso_utc
from mcpmeter.store import Store, open_store, resolve_db

_INSERT = (
    f"INSERT INTO llm_calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    " ON CONFLICT (source, request_id) DO NOTHING"
)


class Ledger:
    """The ledger of one store, kept open: ``with Ledger() as ledger: ledger.record(...)``.

    ``db`` is a SQLite path (default: ``MCPMETER_DB``, else the default store); or pass an
    open ``store``, which is then left open on :meth:`close`.
    """

    def __init__(self, db: str | os.PathLike[str] | None = None, *, store: Store | None = None) -> None:
        self._owned = store is None
        self.store: Store = (
            store if store is not None else open_store(resolve_db(os.fspath(db) if db else None))
        )

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the store, unless it was handed in open."""
        if self._owned:
            self.store.close()

    def record(
        self,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        agent_id: str | None = None,
        project_id: str | None = None,
        ts: float | datetime | str | None = None,
        tags: Mapping[str, str] | None = None,
        source: str = "api",
    ) -> bool:
        """Add one LLM call; False when ``(source, request_id)`` is already in the ledger.

        ``agent_id``, ``project_id`` and ``tags`` default to ``MCPMETER_AGENT_ID`` (or
        ``MCPMETER_AGENT_NAME``), ``MCPMETER_PROJECT_ID`` and ``MCPMETER_TAGS``, as for ``wrap``.
        ``ts`` (an aware datetime, ISO text, or a POSIX epoch number: seconds below 10^11,
        milliseconds from there, see :func:`~mcpmeter.ledger.rows.time_field`) defaults to
        now. Token counts are integers from 0 to :data:`~mcpmeter.ledger.rows.MAX_TOKENS`. A
        bad value raises :class:`~mcpmeter.ledger.rows.BadRow` (a ``ValueError``) naming the
        field, and nothing is written.
        """
        from mcpmeter.metering.tags import parse_tag_pairs

        env = os.environ
        if tags is None:
            tags = parse_tag_pairs(env.get("MCPMETER_TAGS", "").split(","), "MCPMETER_TAGS")
        row = checked_row(
            ts=iso_utc(time.time()) if ts is None else time_field(ts, "ts"),
            agent_id=optional_text_field(agent_id, "agent_id")
            or env.get("MCPMETER_AGENT_ID")
            or env.get("MCPMETER_AGENT_NAME")
            or None,
            project_id=optional_text_field(project_id, "project_id")
            or env.get("MCPMETER_PROJECT_ID")
            or None,
            request_id=text_field(request_id, "request_id"),
            model=text_field(model, "model"),
            prompt_tokens=count_field(prompt_tokens, "prompt_tokens"),
            completion_tokens=count_field(completion_tokens, "completion_tokens"),
            cached_tokens=count_field(cached_tokens, "cached_tokens"),
            source=text_field(source, "source"),
            tags=tags_json({str(k): str(v) for k, v in tags.items()}),
        )
        return self.write([row]) == 1

    def write(self, rows: Iterable[LedgerRow]) -> int:
        """Insert ``rows`` in one transaction; the number new to the ledger.

        Every :class:`~mcpmeter.ledger.rows.LedgerRow` was checked when it was made (a bad
        count raises :class:`~mcpmeter.ledger.rows.BadRow` there), so a batch never fails on
        one row's values.
        """
        with self.store.transaction():
            return self.store.executemany(_INSERT, [row.values() for row in rows])


def record(
    *,
    request_id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    agent_id: str | None = None,
    project_id: str | None = None,
    ts: float | datetime | str | None = None,
    tags: Mapping[str, str] | None = None,
    source: str = "api",
    db: str | os.PathLike[str] | None = None,
) -> bool:
    """Add one LLM call to the ledger at ``db`` (default ``MCPMETER_DB``); False if it was there.

    Opens and closes the store each time: keep a :class:`Ledger` open to write many rows.
    See :meth:`Ledger.record` for the fields.
    """
    with Ledger(db) as ledger:
        return ledger.record(
            request_id=request_id,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            agent_id=agent_id,
            project_id=project_id,
            ts=ts,
            tags=tags,
            source=source,
        )
