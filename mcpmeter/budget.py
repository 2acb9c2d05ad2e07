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
"""

from __future__ import annotations

import calendar
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from mcpmeter.log import warn
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.tags import Tenant

if TYPE_CHECKING:
    from mcpmeter.store.base import Store

SCOPES = ("project", "agent", "session")
PERIODS = ("day", "month", "total")
REJECT_AS = ("tool-error", "jsonrpc-error")
#: The JSON-RPC error code of a refusal with ``--reject-as jsonrpc-error``: outside the
#: ranges JSON-RPC (-32768..-32000) and MCP reserve.
BUDGET_ERROR_CODE = -31402
STORED_REFRESH_S = 5.0


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


# -- the gate on the relay's path -------------------------------------------------------------


class _Call(msgspec.Struct):
    name: Any = None
    arguments: Any = None


class _Request(msgspec.Struct):
    id: Any = None
    method: Any = None
    params: _Call | list[Any] | str | int | float | bool | None = None


_decode_request = msgspec.json.Decoder(_Request).decode


class BudgetGate:
    """Decides, before a ``tools/call`` is forwarded, whether it may run.

    ``check`` runs on the client->server pump, frame by frame; only ``tools/call`` requests
    cost anything (one parse, then a store transaction when a budget applies). ``settle``
    runs in the audit writer's thread with the written records.
    """

    def __init__(
        self,
        store_opener: Callable[[], Store],
        tenant: Tenant,
        *,
        inject: Callable[[bytes], None],
        budgets: Sequence[Budget] = (),
        max_repeat: int | None = None,
        reject_as: str = "tool-error",
        server_name: Callable[[], str | None] = lambda: None,
        alert: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        ready_timeout: float = 5.0,
    ) -> None:
        self._open = store_opener
        self._store: Store | None = None
        self._tenant = tenant
        self._inject = inject
        self._flag_budgets = list(budgets)
        self._max_repeat = max_repeat
        self._reject_as = reject_as
        self._server_name = server_name
        self._alert = alert
        self._clock = clock
        self._ready_timeout = ready_timeout
        self._stored: list[Budget] = []
        self._stored_at = -1e18
        #: Set once the store's budgets are known (the audit writer reads them at start-up).
        self._ready = threading.Event()
        self._repeats: dict[tuple[str, str], int] = {}
        self._pricer: Any = None
        self._lock = threading.Lock()
        #: jsonrpc id -> (budget windows reserved, price reserved): settled by the writer.
        self._reserved: dict[str, tuple[list[tuple[Budget, str]], float]] = {}
        #: Until the stored budgets are known, every tools/call is checked.
        self.active = True
        self.rejected = 0

    # -- in the audit writer's thread: which stored budgets apply -------------------------

    def refresh(self, store: Store) -> None:
        """Read the store's budgets for this tenant (at most every few seconds)."""
        now = time.monotonic()
        if now - self._stored_at < STORED_REFRESH_S:
            return
        self._stored_at = now
        try:
            stored = stored_budgets(store, self._tenant)
        except Exception as exc:
            warn(f"cannot read budgets from the store ({exc}); flag budgets still apply")
            stored = []
        self._stored = stored
        self.active = bool(self._flag_budgets or stored or self._max_repeat is not None)
        self._ready.set()

    def unavailable(self) -> None:
        """The store cannot be opened: enforce what the flags say, and stop waiting."""
        self.active = bool(self._flag_budgets or self._max_repeat is not None)
        self._ready.set()

    # -- on the relay's path --------------------------------------------------------------

    def check(self, frame: bytes) -> tuple[object, bytes] | None:
        """(id, answer) to refuse ``frame`` with, or None to forward it."""
        try:
            request = _decode_request(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            return None
        if request.method != "tools/call" or request.id is None or not isinstance(request.params, _Call):
            return None
        if not self._ready.is_set():
            self._ready.wait(self._ready_timeout)
        tool = request.params.name if isinstance(request.params.name, str) else None
        refusal = self._loop_guard(tool, request.params.arguments)
        if refusal is None:
            refusal = self._reserve(str(request.id), tool)
        if refusal is None:
            return None
        self.rejected += 1
        return request.id, self._answer(request.id, refusal)

    def answer(self, frame: bytes) -> None:
        self._inject(frame)

    def _loop_guard(self, tool: str | None, arguments: Any) -> Refusal | None:
        if self._max_repeat is None:
            return None
        digest = hashlib.sha256(msgspec.json.encode(arguments, order="sorted")).hexdigest()
        key = (tool or "", digest)
        count = self._repeats.get(key, 0) + 1
        self._repeats[key] = count
        if count <= self._max_repeat:
            return None
        reason = (
            f"Loop guard: this exact call ({tool} with the same arguments) was already made "
            f"{self._max_repeat} times in this session. It was not run again: try something different."
        )
        return Refusal(reason, {"scope": "session", "subject": self._tenant.session_id, "repeats": count - 1})

    def _reserve(self, rpc_id: str, tool: str | None) -> Refusal | None:
        with self._lock:
            budgets = self._flag_budgets + self._stored
            if not budgets:
                return None
            store = self._connect()
            now = self._clock()
            price = self._price(store, tool, now)
            refusal, after = reserve(store, budgets, price, now)
            if refusal is None:
                self._reserved[rpc_id] = ([(b, start) for b, start, _s, _c in after], price)
                for budget, start, spent, calls in after:
                    self._maybe_warn(store, budget, start, spent, calls)
            return refusal

    def _connect(self) -> Store:
        if self._store is None:
            self._store = self._open()
        return self._store

    def _price(self, store: Store, tool: str | None, now: float) -> float:
        if self._pricer is None:
            from mcpmeter.prices import ToolPricer

            self._pricer = ToolPricer(store)
            self._pricer([])  # load the prices
        cost = self._pricer.cost(self._server_name(), tool, now, 0)
        return float(cost) if cost is not None else 0.0

    def _maybe_warn(self, store: Store, budget: Budget, start: str, spent: float, calls: int) -> None:
        used = max(
            spent / budget.limit_usd if budget.limit_usd else 0.0,
            calls / budget.limit_calls if budget.limit_calls else 0.0,
        )
        if used < budget.warn_at:
            return
        message = (
            f"budget warning: {budget.label} has used {used:.0%} of its {budget.period} budget"
            + (f" (${spent:.4f} of ${budget.limit_usd:.4f})" if budget.limit_usd else "")
            + (f" ({calls} of {budget.limit_calls} calls)" if budget.limit_calls else "")
        )
        if record_warning(store, budget, start, spent, calls, message):
            warn(message)
            if self._alert is not None:
                self._alert(message, {"scope": budget.scope, "subject": budget.subject, "used": used})

    def _answer(self, rpc_id: Any, refusal: Refusal) -> bytes:
        raw_id = msgspec.json.encode(rpc_id)
        if self._reject_as == "jsonrpc-error":
            error = {"code": BUDGET_ERROR_CODE, "message": refusal.reason, "data": refusal.data}
            return b'{"jsonrpc":"2.0","id":' + raw_id + b',"error":' + msgspec.json.encode(error) + b"}"
        result = {"content": [{"type": "text", "text": refusal.reason}], "isError": True}
        return b'{"jsonrpc":"2.0","id":' + raw_id + b',"result":' + msgspec.json.encode(result) + b"}"

    # -- in the audit writer's thread -----------------------------------------------------

    def settle(self, store: Store, records: Sequence[CallRecord]) -> None:
        """Adjust each reserved call's spend to its final cost (per-KB prices)."""
        if not self._reserved:  # nothing reserved (no budget applies): nothing to settle
            return
        deltas: list[tuple[Budget, str, float]] = []
        with self._lock:
            for record in records:
                if record.method != "tools/call" or record.session_id != self._tenant.session_id:
                    continue
                reserved = self._reserved.pop(record.jsonrpc_id, None)
                if reserved is None or record.status == "rejected":
                    continue
                windows, price = reserved
                delta = (record.cost_usd or 0.0) - price
                if abs(delta) > 1e-12:
                    deltas.extend((budget, start, delta) for budget, start in windows)
        settle(store, deltas)

    def close(self) -> None:
        # A check may still be waiting on a stuck store: the exit does not wait for it.
        if not self._lock.acquire(timeout=0.2):
            return
        try:
            if self._store is not None:
                self._store.close()
                self._store = None
        finally:
            self._lock.release()
