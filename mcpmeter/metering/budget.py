"""Budgets that hold: hard caps per project, agent or session, shared through the store.

A budget caps dollars (``limit_usd``) and/or calls (``limit_calls``) for one subject (a
project, an agent or a session) over a window (``day`` and ``month`` in UTC, or ``total``).
Budgets come from ``wrap`` flags (this process only) and from the store (``mcpmeter budget
set``: every ``wrap`` on the store). Their spend lives in the store, in ``budget_spend``,
one row per subject, period and window start, so every proxy on the store shares it.

Before a ``tools/call`` is forwarded, :class:`BudgetGate` reserves its price in one write
transaction (SQLite ``BEGIN IMMEDIATE``; a row lock on Postgres): it reads the window's
spend, refuses when the call would take it past a limit, else adds the price and one call.
Reservations are atomic, so concurrent proxies never exceed a call budget, and exceed a
dollar budget only by what per-KB prices add once responses are settled (at most one
call's price). The audit writer settles each reserved call with its final ``cost_usd``.

A refused call is answered by the proxy itself and recorded ``rejected``; the server never
sees it. At ``warn_at`` (80% by default) one warning per budget and window goes to stderr,
to ``budget_events`` (``tail`` shows it) and optionally to a webhook.

The loop guard (``--max-repeat N``) refuses the N+1th identical call (same tool, same
arguments) in a session, with the same rejection shape.

A call is reserved at the price of its tool on its server. Until the server has named
itself (the ``initialize`` answer, or a 2026-07-28 result's ``_meta``), patterns such as
``acme-server/*`` cannot be matched, so a call made before then (a client that pipelines
its first calls behind ``initialize``) is reserved at the highest per-call price of every
pattern whose tool part matches its tool, whatever the server; once the row is written,
``settle`` gives back what the real price did not use. Such calls are never held: holding
them on stdio would stop every frame behind them until the server answers (or forever, for
a server that never names itself), and pricing high never lets a call through free.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from mcpmeter.metering.tags import Tenant
from mcpmeter.record import iso_utc

if TYPE_CHECKING:
    from mcpmeter.store.base import Store

SCOPES = ("project", "agent", "session")
PERIODS = ("day", "month", "total")
REJECT_AS = ("tool-error", "jsonrpc-error")
#: The JSON-RPC error code of a refusal with ``--reject-as jsonrpc-error``: outside the
#: ranges JSON-RPC (-32768..-32000) and MCP reserve.
BUDGET_ERROR_CODE = -31402
STORED_REFRESH_S = 5.0
#: The largest call limit a store holds (SQLite INTEGER and Postgres BIGINT are 64-bit).
MAX_CALLS = 2**63 - 1
#: Arguments up to this size are compared by the loop guard as JSON values (key order and
#: spacing aside); larger ones by their bytes, so it never builds a big call's arguments.
CANONICAL_ARGUMENTS_MAX = 1 << 16


class Budget(NamedTuple):
    scope: str
    subject: str
    period: str = "total"
    limit_usd: float | None = None
    limit_calls: int | None = None
    includes_llm: bool = False
    warn_at: float = 0.8

    @property
    def label(self) -> str:
        return f"{self.scope} {self.subject!r}"


class Refusal(NamedTuple):
    """Why a call is refused, for the answer the agent reads and for the row."""

    reason: str
    data: dict[str, Any]


# -- windows ----------------------------------------------------------------------------------


def usd_problem(value: object, what: str) -> str | None:
    """What is wrong with ``value`` as a dollar limit (None: nothing). NaN, infinities and
    negative amounts are refused: NaN would be stored as NULL, a budget without a limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{what} must be a number of dollars, got {value!r}"
    if not math.isfinite(value) or value < 0:
        return f"{what} must be a finite number of dollars, zero or more, got {value}"
    return None


def count_problem(value: object, what: str) -> str | None:
    """What is wrong with ``value`` as a call limit (None: nothing): a whole number from 0
    to :data:`MAX_CALLS`, the most a store's integer column holds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{what} must be a whole number of calls, got {value!r}"
    if not 0 <= value <= MAX_CALLS:
        return f"{what} must be a whole number from 0 to {MAX_CALLS}, got {value}"
    return None


def window(period: str, now: float) -> tuple[str, str | None]:
    """(start, resets_at) of the ``period`` window containing ``now``, ISO-8601 UTC."""
    if period == "total":
        return "total", None
    t = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return iso_utc(start), iso_utc(start + 86400)
    if period == "month":
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return iso_utc(start), iso_utc(calendar.timegm((year, month, 1, 0, 0, 0)))
    raise ValueError(f"unknown budget window {period!r}")


def subject_of(scope: str, tenant: Tenant) -> str | None:
    return {"project": tenant.project_id, "agent": tenant.agent_id, "session": tenant.session_id}[scope]


# -- the store side ---------------------------------------------------------------------------


def stored_budgets(store: Store, tenant: Tenant) -> list[Budget]:
    """The budgets set in the store that apply to ``tenant``."""
    out = []
    for scope in SCOPES:
        subject = subject_of(scope, tenant)
        if subject is None:
            continue
        for row in store.query(
            "SELECT scope, subject, period, limit_usd, limit_calls, includes_llm, warn_at"
            " FROM budgets WHERE scope = ? AND subject = ?",
            (scope, subject),
        ):
            out.append(Budget(row[0], row[1], row[2], row[3], row[4], bool(row[5]), float(row[6])))
    return out


def llm_spend(store: Store, budget: Budget, start: str) -> float:
    """LLM cost from the ledger for the budget's subject since ``start`` (sessions: none)."""
    if budget.scope == "session":
        return 0.0
    from mcpmeter.prices import llm_cost_sql

    column = "project_id" if budget.scope == "project" else "agent_id"
    since = "" if start == "total" else " AND l.ts >= ?"
    params: tuple[Any, ...] = (budget.subject,) if start == "total" else (budget.subject, start)
    row = store.query_one(
        f"SELECT COALESCE(SUM({llm_cost_sql('l')}), 0) FROM llm_calls l WHERE l.{column} = ?{since}", params
    )
    return float(row[0]) if row else 0.0


def reserve(
    store: Store, budgets: Sequence[Budget], price: float, now: float
) -> tuple[Refusal | None, list[tuple[Budget, str, float, int]]]:
    """Reserve one call of ``price`` on every budget, atomically; or refuse it.

    Returns the refusal (None when reserved) and, for warnings, each budget's window start,
    spend and calls after the reservation.
    """
    after: list[tuple[Budget, str, float, int]] = []
    with store.transaction():
        spends: list[tuple[Budget, str, str | None, float, int]] = []
        for budget in budgets:
            start, resets = window(budget.period, now)
            row = store.query_one(
                "SELECT spent_usd, calls FROM budget_spend"
                " WHERE scope = ? AND subject = ? AND period = ? AND period_start = ?",
                (budget.scope, budget.subject, budget.period, start),
            )
            spent, calls = (float(row[0]), int(row[1])) if row else (0.0, 0)
            if budget.includes_llm and budget.limit_usd is not None:
                spent += llm_spend(store, budget, start)
            refusal = _refuse(budget, spent, calls, price, resets)
            if refusal is not None:
                return refusal, []
            spends.append((budget, start, resets, spent, calls))
        for budget, start, _resets, spent, calls in spends:
            store.execute(
                "INSERT INTO budget_spend (scope, subject, period, period_start, spent_usd, calls,"
                " limit_usd, limit_calls) VALUES (?, ?, ?, ?, ?, 1, ?, ?)"
                " ON CONFLICT (scope, subject, period, period_start) DO UPDATE SET"
                " spent_usd = budget_spend.spent_usd + excluded.spent_usd,"
                " calls = budget_spend.calls + 1,"
                " limit_usd = excluded.limit_usd, limit_calls = excluded.limit_calls",
                (
                    budget.scope,
                    budget.subject,
                    budget.period,
                    start,
                    price,
                    budget.limit_usd,
                    budget.limit_calls,
                ),
            )
            after.append((budget, start, spent + price, calls + 1))
    return None, after


def _refuse(budget: Budget, spent: float, calls: int, price: float, resets: str | None) -> Refusal | None:
    over_calls = budget.limit_calls is not None and calls + 1 > budget.limit_calls
    over_usd = budget.limit_usd is not None and (
        spent >= budget.limit_usd or spent + price > budget.limit_usd
    )
    if not (over_calls or over_usd):
        return None
    if over_calls:
        what = f"{calls} of {budget.limit_calls} calls"
    else:
        what = f"${spent:.4f} of ${budget.limit_usd:.4f}"
    when = f"resets at {resets}" if resets else "does not reset"
    reason = (
        f"Budget exhausted: {budget.label} has used {what} ({budget.period} budget; {when}). "
        "This tool call was not run. Stop, or continue without this tool."
    )
    data = {
        "scope": budget.scope,
        "subject": budget.subject,
        "window": budget.period,
        "limit_usd": budget.limit_usd,
        "limit_calls": budget.limit_calls,
        "spent_usd": round(spent, 10),
        "calls": calls,
        "price_usd": price,
        "resets_at": resets,
    }
    return Refusal(reason, data)


def settle(store: Store, deltas: Sequence[tuple[Budget, str, float]]) -> None:
    """Adjust reserved spend by what per-KB prices added once responses were known."""
    if not deltas:
        return
    with store.transaction():
        for budget, start, delta in deltas:
            store.execute(
                "UPDATE budget_spend SET spent_usd = spent_usd + ?"
                " WHERE scope = ? AND subject = ? AND period = ? AND period_start = ?",
                (delta, budget.scope, budget.subject, budget.period, start),
            )


def record_warning(store: Store, budget: Budget, start: str, spent: float, calls: int, message: str) -> bool:
    """Store a ``warning`` event unless this budget already warned in this window."""
    with store.transaction():
        seen = store.query_one(
            "SELECT 1 FROM budget_events WHERE scope = ? AND subject = ? AND period = ?"
            " AND period_start = ? AND kind = 'warning'",
            (budget.scope, budget.subject, budget.period, start),
        )
        if seen:
            return False
        store.execute(
            "INSERT INTO budget_events (ts, scope, subject, period, period_start, kind, spent_usd, calls,"
            " limit_usd, limit_calls, message) VALUES (?, ?, ?, ?, ?, 'warning', ?, ?, ?, ?, ?)",
            (
                iso_utc(time.time()),
                budget.scope,
                budget.subject,
                budget.period,
                start,
                spent,
                calls,
                budget.limit_usd,
                budget.limit_calls,
                message,
            ),
        )
        return True
