"""What ``mcpmeter tail`` knows: recent calls, totals and per-group stats over the last minute.

No I/O here: the poller feeds rows in (:meth:`TailState.add_rows`), the keys flip flags,
and the view renders a :class:`Snapshot` taken under the state's lock. Every method that
depends on the time takes ``now`` (POSIX seconds), so tests pass a fixed one.
"""

from __future__ import annotations

import calendar
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mcpmeter.record import COLUMNS

#: What ``--by`` and the ``g`` key choose between, in cycling order.
GROUPINGS: tuple[str, ...] = ("tool", "agent", "project", "server")

#: Statuses counted as errors (``rejected`` is counted on its own).
ERROR_STATUSES = frozenset({"error", "tool_error", "no_response"})

WINDOW_S = 60
"""The summary's window: calls/s, errors, percentiles, bytes and cost over the last minute."""

LATENCY_SAMPLE = 2000
"""Latencies kept per group for p50/p95: the latest ones, within the window."""

RECENT_ROWS = 500
"""Calls kept for the scrolling list (the screen shows as many as fit)."""

_COL = {name: i for i, name in enumerate(COLUMNS)}


@dataclass(frozen=True, slots=True)
class Call:
    """The part of an audit row the view shows."""

    id: int
    ts: float
    ts_text: str
    project: str | None
    agent: str | None
    session: str | None
    server: str | None
    tool: str  # the tool (prompt, resource) name, else the method
    is_tool: bool
    status: str
    latency_ms: float | None
    bytes: int
    cost_usd: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Call:
        """From a row of ``calls`` with every column of ``record.COLUMNS``, in order."""
        tool = row[_COL["tool"]]
        ts_text = str(row[_COL["ts"]])
        return cls(
            id=int(row[_COL["id"]]),
            ts=parse_ts(ts_text),
            ts_text=ts_text,
            project=row[_COL["project_id"]],
            agent=row[_COL["agent_id"]],
            session=row[_COL["session_id"]],
            server=row[_COL["server"]],
            tool=tool if tool is not None else str(row[_COL["method"]]),
            is_tool=tool is not None,
            status=str(row[_COL["status"]]),
            latency_ms=row[_COL["latency_ms"]],
            bytes=int(row[_COL["request_bytes"]] or 0) + int(row[_COL["response_bytes"]] or 0),
            cost_usd=row[_COL["cost_usd"]],
        )

    def key(self, grouping: str) -> str:
        """This call's group under ``grouping`` (one of :data:`GROUPINGS`); ``-`` when unset."""
        value = {"tool": self.tool, "agent": self.agent, "project": self.project, "server": self.server}[
            grouping
        ]
        return value or "-"


_second_cache: dict[str, float] = {}


def parse_ts(text: str) -> float:
    """The store's ``2026-11-22T17:23:38.123456Z`` as POSIX seconds (the second part is cached)."""
    prefix = text[:19]
    base = _second_cache.get(prefix)
    if base is None:
        try:
            base = float(calendar.timegm(time.strptime(prefix, "%Y-%m-%dT%H:%M:%S")))
        except ValueError:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        if len(_second_cache) > 4096:
            _second_cache.clear()
        _second_cache[prefix] = base
    fraction = text[19:].rstrip("Zz")
    return base + (float(fraction) if fraction.startswith(".") and len(fraction) > 1 else 0.0)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (``q`` in 0..1); None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Window:
    """Calls, errors, bytes and cost per second over the last :data:`WINDOW_S` seconds,
    plus the latest latencies: constant memory whatever the rate."""

    __slots__ = ("_buckets", "_latencies")

    def __init__(self) -> None:
        self._buckets: dict[int, list[float]] = {}  # second -> [calls, errors, bytes, cost]
        self._latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_SAMPLE)

    def add(self, call: Call) -> None:
        bucket = self._buckets.get(int(call.ts))
        if bucket is None:
            bucket = self._buckets[int(call.ts)] = [0, 0, 0, 0.0]
        bucket[0] += 1
        bucket[1] += call.status in ERROR_STATUSES
        bucket[2] += call.bytes
        bucket[3] += call.cost_usd or 0.0
        if call.latency_ms is not None:
            self._latencies.append((call.ts, call.latency_ms))

    def prune(self, now: float) -> bool:
        """Forget seconds before the window; False when nothing is left."""
        oldest = _window_start(now)
        for second in [s for s in self._buckets if s < oldest]:
            del self._buckets[second]
        return bool(self._buckets)

    def empty(self, now: float) -> bool:
        oldest = _window_start(now)
        return not any(s >= oldest for s in self._buckets)

    def stats(self, key: str, now: float) -> GroupStats:
        oldest = _window_start(now)
        calls = errors = size = 0
        cost = 0.0
        for second, (n, e, b, c) in self._buckets.items():
            if second >= oldest:
                calls += int(n)
                errors += int(e)
                size += int(b)
                cost += c
        latencies = sorted(ms for ts, ms in self._latencies if ts >= oldest)
        return GroupStats(
            key=key,
            calls=calls,
            per_second=calls / WINDOW_S,
            errors=errors,
            p50_ms=percentile(latencies, 0.50),
            p95_ms=percentile(latencies, 0.95),
            bytes=size,
            cost_usd=cost,
        )


def _window_start(now: float) -> int:
    return int(now) - WINDOW_S + 1


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One line of the summary: a group over the last minute."""

    key: str
    calls: int
    per_second: float
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    bytes: int
    cost_usd: float


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One budget as the panel shows it: how much of its limit is spent."""

    scope: str  # project, agent or session
    subject: str
    window: str  # day, month or total
    spent: float
    limit: float
    unit: str  # "usd" or "calls"

    @property
    def used(self) -> float:
        """Spent over limit (1.0 is at the limit); infinite for a zero limit with spending."""
        if self.limit > 0:
            return self.spent / self.limit
        return math.inf if self.spent > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one frame shows, copied out of the state so rendering needs no lock."""

    now: float
    paused: bool
    group_by: str
    rows: int
    errors: int
    rejected: int
    cost_usd: float
    per_second: float
    first_ts: str | None
    recent: tuple[Call, ...]
    groups: tuple[GroupStats, ...]
    budgets: tuple[BudgetStatus, ...] | None  # None: the store has no budgets yet
    budget_note: str | None


class TailState:
    """The live view's model. Thread-safe: the poller, the key reader and the refresh thread
    share one instance."""

    def __init__(self, *, group_by: str = "tool", keep: int = RECENT_ROWS) -> None:
        if group_by not in GROUPINGS:
            raise ValueError(f"unknown grouping {group_by!r}")
        self._lock = threading.Lock()
        self._recent: deque[Call] = deque(maxlen=keep)
        self._total = Window()
        self._groups: dict[str, dict[str, Window]] = {g: {} for g in GROUPINGS}
        self.group_by = group_by
        self.paused_at: float | None = None
        self.rows = 0
        self.errors = 0
        self.rejected = 0
        self.cost_usd = 0.0
        self.first_ts: str | None = None
        self.last_id: int | None = None
        self._budgets: tuple[BudgetStatus, ...] | None = None
        self._budget_note: str | None = None

    # -- fed by the poller -------------------------------------------------------------------

    def add_rows(self, rows: Iterable[Sequence[Any]], now: float) -> int:
        """Add rows of ``calls`` (every column, id order); returns how many."""
        calls = [Call.from_row(row) for row in rows]
        oldest = _window_start(now)
        with self._lock:
            for call in calls:
                self._recent.append(call)
                self.rows += 1
                self.errors += call.status in ERROR_STATUSES
                self.rejected += call.status == "rejected"
                self.cost_usd += call.cost_usd or 0.0
                if self.first_ts is None:
                    self.first_ts = call.ts_text
                self.last_id = call.id
                if call.ts < oldest:
                    continue  # in the list and the totals, too old for the window
                self._total.add(call)
                for grouping, groups in self._groups.items():
                    key = call.key(grouping)
                    window = groups.get(key)
                    if window is None:
                        window = groups[key] = Window()
                    window.add(call)
            self._prune(now)
        return len(calls)

    def set_budgets(self, budgets: Sequence[BudgetStatus] | None, note: str | None = None) -> None:
        """The budgets to show (None: the store has none yet) and a line about them, if any."""
        with self._lock:
            self._budgets = None if budgets is None else tuple(budgets)
            self._budget_note = note

    # -- keys --------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def toggle_pause(self, now: float) -> bool:
        """Freeze the view at ``now`` (the poller stops reading), or resume; True if now paused."""
        with self._lock:
            self.paused_at = None if self.paused_at is not None else now
            return self.paused_at is not None

    def cycle_grouping(self) -> str:
        """Group the summary by the next of :data:`GROUPINGS`; returns it."""
        with self._lock:
            self.group_by = GROUPINGS[(GROUPINGS.index(self.group_by) + 1) % len(GROUPINGS)]
            return self.group_by

    # -- read by the view --------------------------------------------------------------------

    def snapshot(self, now: float) -> Snapshot:
        """One frame's worth of state at ``now`` (or at the moment it was paused)."""
        with self._lock:
            if self.paused_at is not None:
                now = self.paused_at
            else:
                self._prune(now)
            groups = sorted(
                (w.stats(key, now) for key, w in self._groups[self.group_by].items() if not w.empty(now)),
                key=lambda g: (-g.calls, -g.errors, g.key),
            )
            return Snapshot(
                now=now,
                paused=self.paused_at is not None,
                group_by=self.group_by,
                rows=self.rows,
                errors=self.errors,
                rejected=self.rejected,
                cost_usd=self.cost_usd,
                per_second=self._total.stats("", now).per_second,
                first_ts=self.first_ts,
                recent=tuple(self._recent),
                groups=tuple(groups),
                budgets=self._budgets,
                budget_note=self._budget_note,
            )

    def _prune(self, now: float) -> None:
        self._total.prune(now)
        for groups in self._groups.values():
            for key in [key for key, window in groups.items() if not window.prune(now)]:
                del groups[key]
