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
import fnmatch
import hashlib
import math
import re
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from mcpmeter.log import warn
from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.envelope import UNSET, Buffer, Params, read_envelope
from mcpmeter.record import CallRecord, iso_utc

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


# -- the gate on the relay's path -------------------------------------------------------------


_NULL = msgspec.Raw(b"null")


class _Call(msgspec.Struct):
    name: Any = None
    #: The arguments' bytes, a view of the frame: never decoded here (a 200 MB argument
    #: stays the frame's 200 MB); only the loop guard reads them, and small ones only.
    arguments: msgspec.Raw = _NULL


class _Request(msgspec.Struct):
    """The part of a request the gate reads: the envelope, not the arguments."""

    id: Any = None
    method: Any = None
    params: _Call | list[Any] | str | int | float | bool | None = None


_decode_request = msgspec.json.Decoder(_Request).decode


def read_call(frame: Buffer) -> tuple[Any, str | None, Buffer | msgspec.Raw] | None:
    """(id, tool name, raw arguments) of a ``tools/call`` request; None for any other frame."""
    try:
        request = _decode_request(frame)
    except (msgspec.DecodeError, UnicodeDecodeError):  # ValidationError is a DecodeError
        return None
    except RecursionError:  # nested too deeply for msgspec (in its arguments, say)
        return _read_deep_call(frame)
    params = request.params
    if request.method != "tools/call" or request.id is None or not isinstance(params, _Call):
        return None
    return request.id, params.name if isinstance(params.name, str) else None, params.arguments


def _read_deep_call(frame: Buffer) -> tuple[Any, str | None, Buffer] | None:
    try:
        message, span = read_envelope(frame)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    params = message.params
    if message.method != "tools/call" or message.id in (None, UNSET) or not isinstance(params, Params):
        return None
    arguments = memoryview(frame)[span[0] : span[1]] if span is not None else b"null"
    return message.id, params.name if isinstance(params.name, str) else None, arguments


def arguments_digest(arguments: Buffer | msgspec.Raw) -> str:
    """What the loop guard compares: the arguments as a JSON value when small, else their bytes."""
    if len(arguments) <= CANONICAL_ARGUMENTS_MAX:
        try:
            value = msgspec.json.decode(arguments)
            return hashlib.sha256(msgspec.json.encode(value, order="sorted")).hexdigest()
        except (msgspec.DecodeError, RecursionError):
            pass
    return hashlib.sha256(arguments).hexdigest()


class WorstPrices:
    """The highest per-call price in force for a tool under any server.

    Prices a call made before the server is named: every pattern whose tool part (after
    the first ``/``) matches the tool counts, whatever its server part says. Prices are
    read from the store at most every :data:`STORED_REFRESH_S` seconds.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._loaded_at = -math.inf
        #: (tool glob's fullmatch, effective_from times, per-call prices) per pattern.
        self._patterns: list[tuple[Callable[[str], object], list[float], list[float]]] = []
        self._by_tool: dict[str, list[int]] = {}

    def cost(self, tool: str | None, now: float) -> float | None:
        """The price, or None when no matching pattern has one in force at ``now``."""
        if time.monotonic() - self._loaded_at >= STORED_REFRESH_S:
            self._load()
        name = tool or ""
        matching = self._by_tool.get(name)
        if matching is None:
            matching = [i for i, (match, _, _) in enumerate(self._patterns) if match(name)]
            self._by_tool[name] = matching
        worst: float | None = None
        for i in matching:
            _, times, prices = self._patterns[i]
            at = bisect_right(times, now) - 1
            if at >= 0 and (worst is None or prices[at] > worst):
                worst = prices[at]
        return worst

    def _load(self) -> None:
        from mcpmeter.prices import tool_prices

        timelines: dict[str, tuple[list[float], list[float]]] = {}
        for price in tool_prices(self._store):  # by pattern, then date
            times, prices = timelines.setdefault(price.pattern, ([], []))
            times.append(datetime.fromisoformat(price.effective_from.replace("Z", "+00:00")).timestamp())
            prices.append(price.per_call)
        self._patterns = [
            (re.compile(fnmatch.translate(pattern.partition("/")[2])).fullmatch, times, prices)
            for pattern, (times, prices) in timelines.items()
        ]
        self._by_tool.clear()
        self._loaded_at = time.monotonic()


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
        self._worst: WorstPrices | None = None
        self._lock = threading.Lock()
        #: jsonrpc id -> (budget windows reserved, price reserved) of each call reserved
        #: with it, oldest first (an id may be in flight twice): settled by the writer.
        self._reserved: dict[str, deque[tuple[list[tuple[Budget, str]], float]]] = {}
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

    def check(self, frame: Buffer) -> tuple[object, bytes] | None:
        """(id, answer) to refuse ``frame`` with, or None to forward it."""
        call = read_call(frame)
        if call is None:
            return None
        rpc_id, tool, arguments = call
        if not self._ready.is_set():
            self._ready.wait(self._ready_timeout)
        refusal = self._loop_guard(tool, arguments)
        if refusal is None:
            refusal = self._reserve(str(rpc_id), tool)
        if refusal is None:
            return None
        self.rejected += 1
        return rpc_id, self._answer(rpc_id, refusal)

    def answer(self, frame: bytes) -> None:
        self._inject(frame)

    def _loop_guard(self, tool: str | None, arguments: Buffer | msgspec.Raw) -> Refusal | None:
        if self._max_repeat is None:
            return None
        key = (tool or "", arguments_digest(arguments))
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
                reserved = ([(b, start) for b, start, _s, _c in after], price)
                queue = self._reserved.get(rpc_id)
                if queue is None:
                    self._reserved[rpc_id] = deque((reserved,))
                else:
                    queue.append(reserved)
                for budget, start, spent, calls in after:
                    self._maybe_warn(store, budget, start, spent, calls)
            return refusal

    def _connect(self) -> Store:
        if self._store is None:
            self._store = self._open()
        return self._store

    def _price(self, store: Store, tool: str | None, now: float) -> float:
        server = self._server_name()
        if server is None:  # not named yet: the worst its tool costs anywhere (module docstring)
            if self._worst is None:
                self._worst = WorstPrices(store)
            worst = self._worst.cost(tool, now)
            return worst if worst is not None else 0.0
        if self._pricer is None:
            from mcpmeter.prices import ToolPricer

            self._pricer = ToolPricer(store)
            self._pricer([])  # load the prices
        cost = self._pricer.cost(server, tool, now, 0)
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
                if record.status == "rejected":  # refused: it reserved nothing
                    continue
                queue = self._reserved.get(record.jsonrpc_id)
                if not queue:
                    continue
                windows, price = queue.popleft()  # rows of one id come in the order it was sent
                if not queue:
                    del self._reserved[record.jsonrpc_id]
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
