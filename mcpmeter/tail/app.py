"""``mcpmeter tail``: follow the audit log as proxies write it.

The :class:`Poller` reads new rows by id (``WHERE id > ? AND id <= ? ... LIMIT``) on one
read connection, each query its own short read transaction: under WAL, readers never block
the writers. Two front ends consume it:

- :func:`stream_json` (``--json``, ``--format json``): one JSON object per row on stdout,
  flushed per line (:func:`mcpmeter.output.json.write_json_lines`);
- :func:`run_screen`: the full-screen view. The main thread polls the store into a
  :class:`~mcpmeter.tail.model.TailState`; ``rich.live.Live`` redraws from it on its own
  refresh thread; a :class:`~mcpmeter.output.terminal.KeyReader` thread handles ``q``, ``p``, ``g``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import IO, Any

from mcpmeter.output.json import write_json_lines
from mcpmeter.record import COLUMNS
from mcpmeter.store.base import CallFilter, Store
from mcpmeter.tail.model import BudgetStatus, TailState

BATCH = 1000
"""Rows a poll reads at most; a poll that fills it is followed at once by the next."""

BUDGET_POLL_S = 2.0
"""How often the view re-reads budgets."""

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM calls"


class Poller:
    """Reads the rows of ``calls`` matching ``where`` that it has not read yet, in id order.

    Each :meth:`poll` first reads ``max(id)`` (free on the primary key), then at most
    ``batch`` matching rows up to it; when fewer come back, everything up to that id has been
    seen, so a selective filter never rescans rows that did not match. SQLite assigns ids in
    commit order (one writer at a time), so reading by id misses nothing.
    """

    def __init__(
        self, store: Store, where: CallFilter, *, after_id: int = 0, until_id: int | None = None
    ) -> None:
        self.store = store
        self.where = replace(where, after_id=None)
        self.last_id = after_id
        self.until_id = until_id
        self.batch = BATCH

    @classmethod
    def starting(cls, store: Store, where: CallFilter, *, new_only: bool, follow: bool) -> Poller:
        """A poller positioned where ``tail`` starts: at the first row at or after
        ``where.since``, else at the end (``new_only``) or the beginning. Without ``follow``
        it stops at the last row present now."""
        if new_only and where.since is None:
            after = _max_id(store)
        elif where.since is not None:
            first = store.query_one("SELECT min(id) FROM calls WHERE ts >= ?", (where.since,))
            after = (int(first[0]) - 1) if first and first[0] is not None else _max_id(store)
        else:
            after = 0
        return cls(store, where, after_id=after, until_id=None if follow else _max_id(store))

    @property
    def done(self) -> bool:
        """True once a bounded poller has read up to its last row."""
        return self.until_id is not None and self.last_id >= self.until_id

    def poll(self) -> tuple[list[tuple[Any, ...]], bool]:
        """New matching rows, and whether more are waiting (call again at once)."""
        high = self.until_id if self.until_id is not None else _max_id(self.store)
        if high <= self.last_id:
            return [], False
        clause, params = replace(self.where, after_id=self.last_id).where()
        rows = list(
            self.store.query(
                f"{_SELECT}{clause} AND id <= ? ORDER BY id LIMIT {int(self.batch)}", [*params, high]
            )
        )
        if len(rows) >= self.batch:
            self.last_id = int(rows[-1][0])
            return rows, True
        self.last_id = high
        return rows, False


def _max_id(store: Store) -> int:
    row = store.query_one("SELECT max(id) FROM calls")
    return int(row[0]) if row and row[0] is not None else 0


# -- --json, --format json ---------------------------------------------------------------------


def stream_json(poller: Poller, out: IO[bytes], *, follow: bool, interval: float) -> int:
    """Write each row as one JSON object (every column, in order) on its own line.

    Following, each line is flushed as it is written and the store is polled every
    ``interval`` seconds until interrupted. A closed pipe (``| head``) ends it quietly.
    """
    try:
        while True:
            rows, more = poller.poll()
            write_json_lines(COLUMNS, rows, out, flush=follow)
            if more:
                continue
            if not follow or poller.done:
                break
            time.sleep(interval)
        out.flush()
    except BrokenPipeError:
        _silence_stdout()
    return 0


def _silence_stdout() -> None:
    """The reader went away: point stdout at /dev/null so the exit flush cannot complain."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# -- budgets -----------------------------------------------------------------------------------

BUDGETS_SQL = (
    "SELECT scope, subject, period, spent, limit_value, unit FROM budget_status WHERE limit_value IS NOT NULL"
)
"""What the panel reads once budgets exist: one row per budget (scope, subject, period,
spent, limit_value, unit ``usd``/``calls``; ``period`` is day, month or total). The budget
work owns ``budget_status`` (a view or a table); until it exists the panel says "no budgets"."""


def table_exists(store: Store, name: str) -> bool:
    if store.dialect == "sqlite":
        sql = "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?"
    else:
        sql = "SELECT 1 FROM information_schema.tables WHERE table_name = ?"
    return store.query_one(sql, (name,)) is not None


def read_budgets(store: Store) -> tuple[list[BudgetStatus] | None, str | None]:
    """The budgets to show (None when the store has none yet) and a note if they cannot be read."""
    if not table_exists(store, "budget_status"):
        return None, None
    try:
        rows = list(store.query(BUDGETS_SQL))
    except Exception as exc:  # a schema this version does not know: say so, keep tailing
        return None, f"cannot read budgets: {exc}"
    return [
        BudgetStatus(str(scope), str(subject), str(period), float(spent or 0), float(limit), str(unit))
        for scope, subject, period, spent, limit, unit in rows
    ], None


# -- the full-screen view ------------------------------------------------------------------------


def describe_filters(where: CallFilter) -> str:
    """``project=acme agent=bot``: the filters the view was started with."""
    parts = [
        f"{name}={value}"
        for name, value in (
            ("project", where.project_id),
            ("agent", where.agent_id),
            ("session", where.session_id),
            ("tool", where.tool),
            ("status", where.status),
        )
        if value is not None
    ]
    return " ".join(parts)


def drain(poller: Poller, state: TailState, *, max_batches: int = 20) -> None:
    """Read what is waiting into ``state`` (a bounded number of batches per call)."""
    for _ in range(max_batches):
        rows, more = poller.poll()
        if rows:
            state.add_rows(rows, time.time())
        if not more:
            return


def run_screen(
    poller: Poller,
    state: TailState,
    *,
    location: str,
    filters: str,
    follow: bool,
    interval: float,
) -> int:
    """The full-screen view until ``q`` (0), Ctrl-C (130) or SIGTERM/SIGHUP (128 + N).

    Without ``follow``, draws one frame of what is there now (not full-screen) and returns.
    """
    from rich.console import Console
    from rich.live import Live

    from mcpmeter.output.terminal import KeyReader, Terminated, signals_raise
    from mcpmeter.tail.view import TailView

    console = Console()

    def frame(keys: bool = True) -> TailView:
        return TailView(state.snapshot(time.time()), location=location, filters=filters, keys=keys)

    def refresh_budgets() -> None:
        budgets, note = read_budgets(poller.store)
        state.set_budgets(budgets, note)

    if not follow:
        while not poller.done:
            drain(poller, state)
        refresh_budgets()
        console.print(frame(keys=False), height=max(12, console.height - 1))
        return 0

    stop = threading.Event()
    live = Live(
        console=console,
        screen=True,
        auto_refresh=True,
        refresh_per_second=4,
        redirect_stdout=False,
        redirect_stderr=False,
        get_renderable=frame,
    )

    def on_key(key: str) -> None:
        if key in ("q", "Q"):
            stop.set()
            return
        if key in ("p", "P"):
            state.toggle_pause(time.time())
        elif key in ("g", "G"):
            state.cycle_grouping()
        else:
            return
        if live.is_started:
            live.refresh()

    try:
        with signals_raise(signal.SIGTERM, signal.SIGHUP), KeyReader(on_key), live:
            next_budgets = 0.0
            while not stop.is_set():
                if not state.paused:
                    drain(poller, state)
                if time.monotonic() >= next_budgets:
                    refresh_budgets()
                    next_budgets = time.monotonic() + BUDGET_POLL_S
                stop.wait(interval)
    except Terminated as exc:
        return exc.exit_code
    return 0
