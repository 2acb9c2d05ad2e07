"""The gate on the relay's path: before a ``tools/call`` is forwarded, may it run?

:class:`BudgetGate` reads the call from its frame (the envelope the meter reads too), runs
the loop guard, then reserves the call's price against every budget that applies (see
:mod:`mcpmeter.metering.budget` for the windows, the atomic reservation and why a call made
before the server is named is priced at the worst its tool costs). A refusal is an answer
frame the transport sends in the server's stead: a tool result with ``isError`` (or, with
``--reject-as jsonrpc-error``, a JSON-RPC error).

:class:`Budgets` is what the gates of one process share (one store connection, one pricer,
the alerter) and the audit writer's listener that keeps them current.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any

import msgspec

from mcpmeter.log import warn
from mcpmeter.metering.audit import WriterListener
from mcpmeter.metering.budget import (
    BUDGET_ERROR_CODE,
    CANONICAL_ARGUMENTS_MAX,
    STORED_REFRESH_S,
    Budget,
    Refusal,
    record_warning,
    reserve,
    settle,
    stored_budgets,
)
from mcpmeter.metering.tags import Tenant
from mcpmeter.protocol.envelope import UNSET, Buffer, Params
from mcpmeter.protocol.frame import Frame
from mcpmeter.record import CallRecord

if TYPE_CHECKING:
    from mcpmeter.store.base import Store


def read_call(frame: Frame) -> tuple[Any, str | None, msgspec.Raw] | None:
    """(id, tool name, raw arguments) of a ``tools/call`` request; None for any other frame."""
    message = frame.message  # None unless the frame is one message
    if message is None or message.method != "tools/call" or message.id in (None, UNSET):
        return None
    params = message.params
    if not isinstance(params, Params):
        return None
    return message.id, params.name if isinstance(params.name, str) else None, params.arguments


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
        book: Budgets,
        tenant: Tenant,
        *,
        inject: Callable[[bytes], None],
        budgets: Sequence[Budget] = (),
        max_repeat: int | None = None,
        reject_as: str = "tool-error",
        server_name: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        ready_timeout: float = 5.0,
    ) -> None:
        self._book = book
        self._tenant = tenant
        self._inject = inject
        self._flag_budgets = list(budgets)
        self._max_repeat = max_repeat
        self._reject_as = reject_as
        self._server_name = server_name
        self._clock = clock
        self._ready_timeout = ready_timeout
        self._stored: list[Budget] = []
        self._stored_at = -1e18
        #: Set once the store's budgets are known (the audit writer reads them at start-up).
        self._ready = threading.Event()
        self._repeats: dict[tuple[str, str], int] = {}
        #: Guards this gate's reservations (the store itself is guarded by the book's lock).
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

    def check(self, frame: Frame) -> tuple[object, bytes] | None:
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
        book = self._book
        with self._lock:
            budgets = self._flag_budgets + self._stored
            if not budgets:
                return None
            with book.lock:
                store = book.store()
                now = self._clock()
                price = book.price(store, self._server_name(), tool, now)
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
            alert = self._book.alert
            if alert is not None:
                alert(message, {"scope": budget.scope, "subject": budget.subject, "used": used})

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


class Budgets(WriterListener):
    """What the budget gates of one process share: one store connection for their
    reservations, one pricer, the webhook alerter; and, as a listener of the audit writer,
    the refresh, fallback and settling of every live gate.

    ``wrap -- CMD`` and ``wrap --url`` have one gate; ``wrap --listen`` one per session,
    made with :meth:`gate` and dropped with :meth:`forget`. Store work is serialised by
    :attr:`lock` (a check on a relay thread, another on an HTTP worker thread).
    """

    def __init__(
        self, open_store: Callable[[], Store], alert: Callable[[str, dict[str, Any]], None] | None = None
    ) -> None:
        self._open = open_store
        self._store: Store | None = None
        self._pricer: Any = None
        self._worst: WorstPrices | None = None
        self.alert = alert
        self.lock = threading.Lock()
        self.gates: set[BudgetGate] = set()

    def gate(self, tenant: Tenant, **options: Any) -> BudgetGate:
        """A new gate for ``tenant`` (options as :class:`BudgetGate` takes them), refreshed,
        failed over and settled by the writer until :meth:`forget`."""
        gate = BudgetGate(self, tenant, **options)
        self.gates.add(gate)
        return gate

    def forget(self, gate: BudgetGate) -> None:
        self.gates.discard(gate)

    def store(self) -> Store:
        """The shared connection, opened on first use; the caller holds :attr:`lock`."""
        if self._store is None:
            self._store = self._open()
        return self._store

    def price(self, store: Store, server: str | None, tool: str | None, now: float) -> float:
        """What a call is reserved at: its tool's per-call price on ``server``; before the
        server is named, the worst its tool costs anywhere (module docstring)."""
        if server is None:
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

    # -- a listener of the audit writer (on its thread) --------------------------------------

    def on_tick(self, store: Store) -> None:
        for gate in list(self.gates):
            gate.refresh(store)

    def on_unavailable(self) -> None:
        for gate in list(self.gates):
            gate.unavailable()

    def after_write(self, store: Store, records: Sequence[CallRecord]) -> None:
        for gate in list(self.gates):
            gate.settle(store, records)

    def close(self) -> None:
        # A check may still be waiting on a stuck store: the exit does not wait for it.
        if not self.lock.acquire(timeout=0.2):
            return
        try:
            if self._store is not None:
                self._store.close()
                self._store = None
        finally:
            self.lock.release()
