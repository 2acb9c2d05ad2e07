"""``mcpmeter report --html FILE``: one self-contained page that reads at a glance.

Inline CSS and inline SVG drawn here: no script, no network, nothing fetched. Three charts
(spend over time stacked by the first ``--by`` key, the top tools by cost, the latency
distribution), the headline figures and the report table.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape as _escape
from pathlib import Path
from typing import Any

from mcpmeter.analysis.join import dialect_sql, key_sql, llm_where, tool_where, where_sql
from mcpmeter.analysis.report import COLUMNS, Report, grouped
from mcpmeter.output.files import write_output
from mcpmeter.output.terminal import printable
from mcpmeter.prices import llm_cost_sql
from mcpmeter.store.base import CallFilter, Store

#: Tableau 10: distinct at a glance, readable on white.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#8cd17d",
)
OTHER_COLOR = "#bab0ac"
MAX_SERIES = 8
TOP_TOOLS = 10
#: Latency histogram bin edges, in ms (the last bin is open-ended).
LATENCY_EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)


def escape(text: str) -> str:
    """HTML-escaped text in which no URL stays a URL (``//`` is written ``&#47;&#47;``).

    The page must not reference anything outside itself, even in text: a resource URI used
    as a tool name renders the same but is not a link a viewer could follow or prefetch.
    Control characters, which HTML does not allow in text (and which would act on a terminal
    showing the file), are written as visible escapes (:func:`mcpmeter.output.terminal.printable`).
    """
    return _escape(printable(text)).replace("//", "&#47;&#47;")


def write_html(
    store: Store, keys: Sequence[str], where: CallFilter, target: Path, top: int | None = None
) -> None:
    """Render the page for ``keys`` and ``where`` and write it, UTF-8, to ``target``.

    Written by :func:`mcpmeter.output.files.write_output`: the page appears whole or not at
    all, and an existing ``target`` stays as it was when anything fails.
    """
    write_output(target, render(store, keys, where, top=top).encode("utf-8"))


# -- the data -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spend:
    """Cost per time bucket and per value of one key (tool and LLM cost together)."""

    key: str
    unit: str  # "day" or "hour"
    buckets: list[str]
    series: dict[Any, list[float]]  # key value -> cost per bucket


def spend_over_time(store: Store, key: str, where: CallFilter) -> Spend:
    """Total cost per day (per hour when the data spans two days or less) and per ``key``."""
    d = dialect_sql(store.dialect)
    t_clauses, t_params = tool_where(where)
    l_clauses, l_params = llm_where(where)
    span = store.query_one(
        "SELECT min(lo), max(hi) FROM ("
        f"SELECT min(c.ts) AS lo, max(c.ts) AS hi FROM calls c{where_sql(t_clauses)}"
        f" UNION ALL SELECT min(l.ts), max(l.ts) FROM llm_calls l{where_sql(l_clauses)}) s",
        t_params + l_params,
    )
    lo, hi = (span or (None, None))[:2]
    hourly = lo is not None and hi is not None and _days_between(lo, hi) <= 2
    width = 13 if hourly else 10
    tool_key, llm_key = key_sql(key, d)
    sql = f"""
SELECT bucket, k, sum(cost) FROM (
    SELECT substr(c.ts, 1, {width}) AS bucket, {tool_key} AS k, c.cost_usd AS cost
    FROM calls c{where_sql(t_clauses)}
    UNION ALL
    SELECT substr(l.ts, 1, {width}), {llm_key}, {llm_cost_sql("l")}
    FROM llm_calls l{where_sql(l_clauses)}
) facts GROUP BY bucket, k
"""
    cells: dict[tuple[str, Any], float] = {}
    for bucket, k, cost in store.query(sql, t_params + l_params):
        cells[(bucket, k)] = float(cost or 0)
    buckets = sorted({b for b, _ in cells})
    index = {b: i for i, b in enumerate(buckets)}
    series: dict[Any, list[float]] = {}
    for (bucket, k), cost in cells.items():
        series.setdefault(k, [0.0] * len(buckets))[index[bucket]] += cost
    return Spend(key, "hour" if hourly else "day", buckets, series)


def _days_between(lo: str, hi: str) -> float:
    from datetime import datetime

    def parse(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    return (parse(hi) - parse(lo)).total_seconds() / 86400


def top_tools(store: Store, where: CallFilter, limit: int = TOP_TOOLS) -> list[tuple[str, int, float]]:
    """``(server/tool, calls, tool cost)`` of the costliest tools (then the most called)."""
    clauses, params = tool_where(where)
    sql = f"""
SELECT c.server, c.tool, count(*) AS calls, coalesce(sum(c.cost_usd), 0) AS cost
FROM calls c{where_sql(clauses, "c.method = 'tools/call'")}
GROUP BY c.server, c.tool ORDER BY cost DESC, calls DESC LIMIT {int(limit)}
"""
    return [
        (f"{server or '?'}/{tool or '?'}", int(calls), float(cost))
        for server, tool, calls, cost in store.query(sql, params)
    ]


def latency_histogram(store: Store, where: CallFilter) -> list[tuple[str, int, int]]:
    """``(bin label, ok calls, failed calls)`` per latency bin; calls without a response are left out."""
    clauses, params = tool_where(where)
    edges = LATENCY_EDGES
    case = " ".join(f"WHEN c.latency_ms < {edge} THEN {i}" for i, edge in enumerate(edges))
    sql = f"""
SELECT CASE {case} ELSE {len(edges)} END AS bin,
       sum(CASE WHEN c.status = 'ok' THEN 1 ELSE 0 END), sum(CASE WHEN c.status = 'ok' THEN 0 ELSE 1 END)
FROM calls c{where_sql(clauses, "c.latency_ms IS NOT NULL")}
GROUP BY bin
"""
    counts = {int(b): (int(ok or 0), int(bad or 0)) for b, ok, bad in store.query(sql, params)}
    labels = [f"<{_ms(edges[0])}"]
    labels += [_span(a, b) for a, b in itertools.pairwise(edges)]
    labels.append(f"≥{_ms(edges[-1])}")
    return [(label, *counts.get(i, (0, 0))) for i, label in enumerate(labels)]


def _span(lo: float, hi: float) -> str:
    if hi < 1000:
        return f"{lo:g}–{hi:g}ms"
    if lo >= 1000:
        return f"{lo / 1000:g}–{hi / 1000:g}s"
    return f"{_ms(lo)}–{_ms(hi)}"


def _ms(value: float) -> str:
    return f"{value / 1000:g}s" if value >= 1000 else f"{value:g}ms"


# -- the page -----------------------------------------------------------------------------


def render(
    store: Store, keys: Sequence[str], where: CallFilter, *, top: int | None = None, now: float | None = None
) -> str:
    """The whole page, as text."""
    report = grouped(store, keys, where)  # the headline figures count every group
    spend = spend_over_time(store, keys[0], where)
    tools = top_tools(store, where)
    latency = latency_histogram(store, where)
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() if now is None else now))
    parts = [
        _HEAD,
        "<header><h1>mcpmeter report</h1>",
        f"<p class=scope>{escape(_scope(keys, where))} · generated {escape(generated)}</p></header>",
        _cards(report),
        '<section class=grid><div class="panel wide">',
        f"<h2>Spend over time, by {escape(spend.key)} <small>(tool + LLM cost per {spend.unit})</small></h2>",
        _spend_chart(spend),
        "</div><div class=panel><h2>Top tools by cost</h2>",
        _tools_chart(tools),
        "</div><div class=panel><h2>Latency distribution <small>(calls per bin)</small></h2>",
        _latency_chart(latency),
        "</div></section>",
        "<section class=panel><h2>Report</h2>",
        _table(report, top),
        "</section></body></html>\n",
    ]
    return "".join(parts)


_HEAD = """<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>mcpmeter report</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;
background:#f6f7f9}
h1{font-size:22px;margin:0}h2{font-size:15px;margin:0 0 8px}small{color:#777;font-weight:normal}
.scope{color:#666;margin:4px 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:16px}
.card{background:#fff;border:1px solid #e3e5e8;border-radius:8px;padding:8px 12px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px;margin-bottom:16px}
.panel{background:#fff;border:1px solid #e3e5e8;border-radius:8px;padding:14px}
.wide{grid-column:1/3}
svg{display:block;width:100%;height:auto}svg text{font:11px system-ui,sans-serif;fill:#444}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin-top:6px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:5px;border-radius:2px}
table{border-collapse:collapse;width:100%;font-size:12px}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#fafafa}td.k,th.k{text-align:left}
.note{color:#8a5a00;margin:8px 0 0}
.empty{color:#888;padding:30px;text-align:center}
</style></head><body>
"""


def _scope(keys: Sequence[str], where: CallFilter) -> str:
    parts = [f"by {', '.join(keys)}"]
    if where.since:
        parts.append(f"since {where.since}")
    if where.until:
        parts.append(f"until {where.until}")
    for name, value in (
        ("project", where.project_id),
        ("agent", where.agent_id),
        ("session", where.session_id),
        ("tool", where.tool),
        ("status", where.status),
    ):
        if value is not None:
            parts.append(f"{name} = {value}")
    return " · ".join(parts)


def _cards(report: Report) -> str:
    rows = report.rows
    total = sum(r["total_cost_usd"] for r in rows)
    llm = sum(r["llm_cost_usd"] for r in rows)
    tool = sum(r["tool_cost_usd"] for r in rows)
    calls = sum(r["calls"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    u = report.unmatched
    unmatched = (
        u.tool_calls_without_request_id + u.tool_calls_without_llm_call + u.llm_calls_without_tool_call
    )
    cards = [
        ("total cost", _usd(total)),
        ("LLM cost", _usd(llm)),
        ("tool cost", _usd(tool)),
        ("calls", f"{calls:,}"),
        ("error rate", f"{100 * errors / calls:.1f}%" if calls else "–"),
        ("LLM tokens", f"{tokens:,}"),
        ("unmatched rows", f"{unmatched:,}"),
    ]
    body = "".join(f"<div class=card><b>{escape(v)}</b><span>{escape(k)}</span></div>" for k, v in cards)
    return f"<section class=cards>{body}</section>"


def _usd(value: float) -> str:
    return f"${value:,.2f}" if abs(value) >= 1 or value == 0 else f"${value:,.4f}"


def _legend(items: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<span><i style='background:{color}'></i>{escape(name)}</span>" for name, color in items)
    return f"<div class=legend>{body}</div>"


def _spend_chart(spend: Spend) -> str:
    if not spend.buckets:
        return "<p class=empty>no calls in scope</p>"
    ranked = sorted(spend.series.items(), key=lambda item: -sum(item[1]))
    shown = ranked[:MAX_SERIES]
    rest = ranked[MAX_SERIES:]
    stacks: list[tuple[str, str, list[float]]] = [
        (_label(k), PALETTE[i % len(PALETTE)], values) for i, (k, values) in enumerate(shown)
    ]
    if rest:
        other = [sum(values[i] for _, values in rest) for i in range(len(spend.buckets))]
        stacks.append((f"{len(rest)} others", OTHER_COLOR, other))
    labels = [b[5:10] + (f" {b[11:13]}h" if spend.unit == "hour" else "") for b in spend.buckets]
    svg = _stacked_bars(labels, stacks, width=1160, height=300, money=True)
    return svg + _legend([(name, color) for name, color, _ in stacks])


def _label(value: Any) -> str:
    return "(none)" if value is None or value == "" else str(value)


def _tools_chart(tools: list[tuple[str, int, float]]) -> str:
    if not tools:
        return "<p class=empty>no tool calls in scope</p>"
    width, bar, gap, label_w = 560, 20, 8, 170
    height = len(tools) * (bar + gap) + 10
    top_cost = max(cost for _, _, cost in tools) or 1.0
    priced = any(cost for _, _, cost in tools)
    out = [f"<svg viewBox='0 0 {width} {height}' role=img aria-label='top tools by cost'>"]
    for i, (name, calls, cost) in enumerate(tools):
        y = 5 + i * (bar + gap)
        w = (width - label_w - 200) * (cost / top_cost if priced else calls / max(t[1] for t in tools))
        out.append(
            f"<text x='{label_w - 6}' y='{y + 14}' text-anchor=end>{escape(_clip(name, 26))}</text>"
            f"<rect x='{label_w}' y='{y}' width='{max(w, 1):.1f}' height='{bar}' rx=3 fill='{PALETTE[0]}'>"
            f"<title>{escape(name)}: {escape(_usd(cost))}, {calls:,} calls</title></rect>"
            f"<text x='{label_w + max(w, 1) + 6:.1f}' y='{y + 14}'>"
            f"{escape(_usd(cost))} · {calls:,} calls</text>"
        )
    out.append("</svg>")
    note = "" if priced else "<p class=note>no tool prices set: bars show calls</p>"
    return "".join(out) + note


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _latency_chart(bins: list[tuple[str, int, int]]) -> str:
    if not any(ok or bad for _, ok, bad in bins):
        return "<p class=empty>no latencies in scope</p>"
    stacks = [
        ("ok", PALETTE[4], [float(ok) for _, ok, _ in bins]),
        ("error / other", PALETTE[2], [float(bad) for _, _, bad in bins]),
    ]
    svg = _stacked_bars([label for label, _, _ in bins], stacks, width=560, height=260, money=False)
    return svg + _legend([(name, color) for name, color, _ in stacks])


def _stacked_bars(
    labels: Sequence[str],
    stacks: Sequence[tuple[str, str, Sequence[float]]],
    *,
    width: int,
    height: int,
    money: bool,
) -> str:
    """Vertical bars, one per label, each a stack of the series' values, with a y axis."""
    left, right, top, bottom = 64, 10, 10, 64
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(values[i] for _, _, values in stacks) for i in range(len(labels))]
    ymax = _nice(max(totals) if totals else 0.0)
    n = len(labels)
    slot = plot_w / max(n, 1)
    bar = max(min(slot * 0.8, 60), 1)
    out = [f"<svg viewBox='0 0 {width} {height}' role=img>"]
    for i in range(5):
        tick = ymax * i / 4
        y = top + plot_h - plot_h * i / 4
        tick_text = _usd(tick) if money else f"{tick:,.0f}"
        out.append(
            f"<line x1='{left}' x2='{width - right}' y1='{y:.1f}' y2='{y:.1f}' stroke='#e5e5e5'/>"
            f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor=end>{escape(tick_text)}</text>"
        )
    every = max(1, -(-n // 16))  # at most ~16 x labels
    tilt = max((len(label) for label in labels), default=0) * 6.5 > slot * every  # too wide: slant
    for i, label in enumerate(labels):
        x = left + slot * i + (slot - bar) / 2
        base = float(top + plot_h)
        for name, color, values in stacks:
            h = plot_h * values[i] / ymax if ymax else 0
            if h <= 0:
                continue
            base -= h
            value = _usd(values[i]) if money else f"{values[i]:,.0f}"
            out.append(
                f"<rect x='{x:.1f}' y='{base:.1f}' width='{bar:.1f}' height='{h:.1f}' fill='{color}'>"
                f"<title>{escape(label)} · {escape(name)}: {escape(value)}</title></rect>"
            )
        if i % every == 0:
            cx, cy = x + bar / 2, top + plot_h + 14
            place = f"text-anchor=end transform='rotate(-35 {cx:.1f} {cy})'" if tilt else "text-anchor=middle"
            out.append(f"<text x='{cx:.1f}' y='{cy}' {place}>{escape(label)}</text>")
    axis_y = top + plot_h
    out.append(f"<line x1='{left}' x2='{width - right}' y1='{axis_y}' y2='{axis_y}' stroke='#999'/></svg>")
    return "".join(out)


def _nice(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(step * magnitude for step in (1, 2, 2.5, 5, 10) if step * magnitude >= value * (1 - 1e-12))


def _table(report: Report, top: int | None) -> str:
    """The report's rows (with ``top``, the costliest first), then its notes."""
    columns = (*report.keys, *COLUMNS)
    shown = report.rows
    if top is not None:
        shown = sorted(shown, key=lambda r: -r["total_cost_usd"])[:top]
    head = "".join(f"<th class={'k' if c in report.keys else 'n'}>{escape(c)}</th>" for c in columns)
    rows = []
    for row in shown:
        cells = "".join(
            f"<td class={'k' if c in report.keys else 'n'}>{escape(_cell(c, row[c]))}</td>" for c in columns
        )
        rows.append(f"<tr>{cells}</tr>")
    notes = "".join(f"<p class=note>{escape(note)}</p>" for note in report.notes())
    body = "".join(rows) or f"<tr><td colspan={len(columns)} class=k>no rows</td></tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if column.endswith("_usd"):
        return f"${value:,.4f}"
    if column.endswith("_ms"):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
