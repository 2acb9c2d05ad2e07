"""Tool prices: USD per call (and per KB of response), dated, and the pricer of audit rows.

A price row applies from its ``effective_from`` until the next row of the same pattern. Tool
cost is stamped on each audit row when it is written (:class:`ToolPricer`, in the audit
writer's thread).

Tool patterns are ``SERVER/TOOL-GLOB`` matched, case-sensitively and fnmatch-style, against
the one string ``server/tool`` (``*`` also matches ``/``). When several patterns match, the
most specific wins: a pattern without wildcards first, then the one with more literal
characters in its tool part (after the first ``/``), then more in its server part, then the
pattern text in alphabetical order. So for ``github/web_search``, ``github/web_search`` beats
``*/web_search``, which beats ``github/*``, which beats ``*/*``. Among the matching patterns,
only those with a price in force at the row's time (``effective_from <= ts``, the latest
such row) compete.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mcpmeter.errors import UsageError
from mcpmeter.prices.models import check_usd
from mcpmeter.record import CallRecord, iso_utc
from mcpmeter.store.base import Store

#: How often (seconds) the writer's pricer re-reads ``tool_prices``.
REFRESH_S = 5.0

_WILDCARDS = re.compile(r"\[[^\]]*\]|[*?]")
_UPSERT_TOOL = (
    "INSERT INTO tool_prices (pattern, effective_from, per_call, per_kb, source) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (pattern, effective_from) DO UPDATE SET per_call = excluded.per_call,"
    " per_kb = excluded.per_kb, source = excluded.source"
)


@dataclass(frozen=True, slots=True)
class ToolPrice:
    """USD per call (plus per KiB of response) of tools matching ``pattern`` from ``effective_from`` on."""

    pattern: str
    effective_from: str
    per_call: float
    per_kb: float = 0.0
    source: str = "manual"

    def as_json(self) -> dict[str, Any]:
        """The price as a price file's ``tools`` entry gives it."""
        return {
            "pattern": self.pattern,
            "from": self.effective_from,
            "per_call": self.per_call,
            "per_kb": self.per_kb,
            "source": self.source,
        }


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is a ``SERVER/TOOL-GLOB``; a :class:`UsageError` otherwise."""
    server, slash, tool = pattern.partition("/")
    if not slash or not server or not tool:
        raise UsageError(
            f"tool price pattern {pattern!r} is not SERVER/TOOL-GLOB"
            " (e.g. github/*, */web_search, github/create_issue)"
        )
    return pattern


def set_tool_price(
    store: Store,
    pattern: str,
    per_call: float,
    per_kb: float = 0.0,
    effective_from: str | None = None,
    source: str = "manual",
) -> ToolPrice:
    """Add (or replace, at the same ``effective_from``) a tool price. Default: in force from now."""
    check_pattern(pattern)
    check_usd(per_call, "--per-call")
    check_usd(per_kb, "--per-kb")
    price = ToolPrice(pattern, effective_from or iso_utc(time.time()), per_call, per_kb, source)
    with store.transaction():
        write_tool_prices(store, [price])
    return price


def write_tool_prices(store: Store, prices: Iterable[ToolPrice]) -> int:
    """Upsert ``prices``, in the caller's transaction."""
    return store.executemany(
        _UPSERT_TOOL, [(p.pattern, p.effective_from, p.per_call, p.per_kb, p.source) for p in prices]
    )


def tool_prices(store: Store) -> list[ToolPrice]:
    """Every tool price row, by pattern then date."""
    rows = store.query(
        "SELECT pattern, effective_from, per_call, per_kb, source FROM tool_prices"
        " ORDER BY pattern, effective_from"
    )
    return [ToolPrice(*row) for row in rows]


# -- tool prices on audit rows -----------------------------------------------------------------


def _literal_chars(glob: str) -> int:
    return len(_WILDCARDS.sub("", glob))


def specificity(pattern: str) -> tuple[bool, int, int, str]:
    """Sort key of a pattern, most specific first (see the module's docstring)."""
    server, _, tool = pattern.partition("/")
    return (_WILDCARDS.search(pattern) is not None, -_literal_chars(tool), -_literal_chars(server), pattern)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class _Pattern:
    """One pattern's price timeline: ``times[i]`` (POSIX) starts ``prices[i]`` (per call, per KiB)."""

    pattern: str
    match: Any  # a compiled regex's fullmatch
    times: tuple[float, ...]
    prices: tuple[tuple[float, float], ...]

    def at(self, ts: float) -> tuple[float, float] | None:
        index = bisect_right(self.times, ts) - 1
        return self.prices[index] if index >= 0 else None


_COST = CallRecord._fields.index("cost_usd")
_new_record = tuple.__new__  # CallRecord._replace, without its keyword machinery


def tool_pricer(store: Store) -> ToolPricer:
    """The writer's pricer for ``store``: fills ``cost_usd`` of ``tools/call`` rows."""
    return ToolPricer(store)


class ToolPricer:
    """Prices ``tools/call`` records with the tool price in force at their time.

    ``cost_usd = per_call + per_kb * response_bytes / 1024``; None when no pattern has a
    price in force. Rows already priced and ``rejected`` rows (never forwarded) are left as
    they are. Tool prices are read once, then again at most every ``refresh_s`` seconds;
    the patterns matching each (server, tool) are cached, so a row costs a dict lookup and
    a bisect.
    """

    def __init__(self, store: Store, *, refresh_s: float = REFRESH_S) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._loaded_at = -math.inf
        self._rows: list[tuple[Any, ...]] | None = None
        self._patterns: list[_Pattern] = []
        self._matches: dict[tuple[str | None, str | None], tuple[_Pattern, ...]] = {}

    def __call__(self, records: Sequence[CallRecord]) -> Sequence[CallRecord]:
        now = time.monotonic()
        if now - self._loaded_at >= self._refresh_s:
            self._refresh(now)
        if not self._patterns:
            return records
        priced: list[CallRecord] | None = None
        for index, record in enumerate(records):
            if record.method != "tools/call" or record.cost_usd is not None or record.status == "rejected":
                continue
            cost = self.cost(record.server, record.tool, record.ts, record.response_bytes)
            if cost is None:
                continue
            if priced is None:
                priced = list(records)
            priced[index] = _new_record(CallRecord, (*record[:_COST], cost, *record[_COST + 1 :]))
        return records if priced is None else priced

    def cost(
        self, server: str | None, tool: str | None, ts: float, response_bytes: int | None
    ) -> float | None:
        """The price of one call of ``server``/``tool`` at ``ts`` (POSIX seconds), or None."""
        matches = self._matches.get((server, tool))
        if matches is None:
            matches = self._match(server, tool)
        for pattern in matches:
            price = pattern.at(ts)
            if price is not None:
                per_call, per_kb = price
                return per_call + per_kb * (response_bytes or 0) / 1024 if per_kb else per_call
        return None

    def _match(self, server: str | None, tool: str | None) -> tuple[_Pattern, ...]:
        name = f"{server or ''}/{tool or ''}"
        matches = tuple(p for p in self._patterns if p.match(name))
        self._matches[server, tool] = matches
        return matches

    def _refresh(self, now: float) -> None:
        try:
            rows = list(
                self._store.query(
                    "SELECT pattern, effective_from, per_call, per_kb FROM tool_prices"
                    " ORDER BY pattern, effective_from"
                )
            )
        except Exception:
            if self._rows is None:
                raise
            rows = self._rows  # keep pricing with what was read last; try again later
        self._loaded_at = now
        if rows == self._rows:
            return
        self._rows = rows
        timelines: dict[str, list[tuple[float, float, float]]] = {}
        for pattern, effective_from, per_call, per_kb in rows:
            timelines.setdefault(pattern, []).append((_epoch(effective_from), per_call, per_kb or 0.0))
        self._patterns = [
            _Pattern(
                pattern,
                re.compile(fnmatch.translate(pattern)).fullmatch,
                tuple(t for t, _, _ in timeline),
                tuple((c, k) for _, c, k in timeline),
            )
            for pattern, timeline in sorted(timelines.items(), key=lambda item: specificity(item[0]))
        ]
        self._matches.clear()
