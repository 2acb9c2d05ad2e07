"""The store side of ``mcpmeter budget set/show/reset``: a budget stored, its spend reset, the lines
``budget show`` renders (:mod:`mcpmeter.cli.commands.budget` draws them)."""

from __future__ import annotations

import time
from typing import Any

from mcpmeter.errors import UsageError
from mcpmeter.metering.budget import PERIODS, SCOPES, Budget, count_problem, llm_spend, usd_problem, window
from mcpmeter.record import iso_utc
from mcpmeter.store import open_store, resolve_db


def set_budget(
    db: str | None,
    scope: str,
    subject: str,
    period: str,
    usd: float | None,
    calls: int | None,
    includes_llm: bool,
    warn_at: float,
) -> None:
    """Store (or replace) the budget of one subject; a :class:`UsageError` for a limit the
    store could not hold or enforce (NaN, an infinity, a negative or out-of-range number)."""
    if scope not in SCOPES:
        raise UsageError(f"budget: the scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if period not in PERIODS:
        raise UsageError(f"budget: --window must be one of {', '.join(PERIODS)}")
    problem = usd_problem(usd, "--usd") or count_problem(calls, "--calls")
    if problem is not None:
        raise UsageError(f"budget: {problem}")
    if usd is None and calls is None:
        raise UsageError("budget set: give --usd and/or --calls")
    if isinstance(warn_at, bool) or not isinstance(warn_at, int | float) or not 0 < warn_at <= 1:
        raise UsageError("budget: --warn-at is a fraction between 0 and 1")
    store = open_store(resolve_db(db))
    try:
        with store.transaction():
            store.execute("DELETE FROM budgets WHERE scope = ? AND subject = ?", (scope, subject))
            store.execute(
                "INSERT INTO budgets (scope, subject, period, limit_usd, limit_calls, includes_llm, warn_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (scope, subject, period, usd, calls, int(includes_llm), warn_at, iso_utc(time.time())),
            )
    finally:
        store.close()


def reset_budget(db: str | None, scope: str, subject: str, *, delete: bool) -> None:
    """Start the current window of one subject's budget over (its spend and warnings gone);
    with ``delete``, remove the budget too."""
    store = open_store(resolve_db(db), create=False)
    try:
        with store.transaction():
            store.execute("DELETE FROM budget_spend WHERE scope = ? AND subject = ?", (scope, subject))
            store.execute(
                "DELETE FROM budget_events WHERE scope = ? AND subject = ? AND kind = 'warning'",
                (scope, subject),
            )
            if delete:
                store.execute("DELETE FROM budgets WHERE scope = ? AND subject = ?", (scope, subject))
    finally:
        store.close()


def budget_lines(db: str | None, now: float | None = None) -> list[dict[str, Any]]:
    """One line per budget: the stored ones, and those only flags set (seen in the spend)."""
    now = time.time() if now is None else now
    store = open_store(resolve_db(db), create=False)
    try:
        lines = []
        stored = {
            (row[0], row[1]): Budget(row[0], row[1], row[2], row[3], row[4], bool(row[5]), float(row[6]))
            for row in store.query(
                "SELECT scope, subject, period, limit_usd, limit_calls, includes_llm, warn_at FROM budgets"
            )
        }
        from_flags = {
            (row[0], row[1]): Budget(row[0], row[1], row[2], row[3], row[4])
            for row in store.query(
                "SELECT scope, subject, period, limit_usd, limit_calls FROM budget_spend"
                " ORDER BY period_start"
            )
            if (row[0], row[1]) not in stored
        }
        for (scope, subject), budget in sorted({**from_flags, **stored}.items()):
            start, resets = window(budget.period, now)
            row = store.query_one(
                "SELECT spent_usd, calls FROM budget_spend"
                " WHERE scope = ? AND subject = ? AND period = ? AND period_start = ?",
                (scope, subject, budget.period, start),
            )
            spent, calls = (float(row[0]), int(row[1])) if row else (0.0, 0)
            if budget.includes_llm:
                spent += llm_spend(store, budget, start)
            used = max(
                spent / budget.limit_usd if budget.limit_usd else 0.0,
                calls / budget.limit_calls if budget.limit_calls else 0.0,
            )
            lines.append(
                {
                    "scope": scope,
                    "subject": subject,
                    "window": budget.period,
                    "limit_usd": budget.limit_usd,
                    "limit_calls": budget.limit_calls,
                    "spent_usd": round(spent, 10),
                    "calls": calls,
                    "used": round(used, 4),
                    "resets_at": resets,
                    "source": "store" if (scope, subject) in stored else "flags",
                }
            )
        return lines
    finally:
        store.close()
