"""``mcpmeter report``: usage and cost, grouped, tool calls joined to LLM calls on ``request_id``.

How the two sides meet, and the SQL both engines share, is :mod:`mcpmeter.analysis.join`.
Every row counts in exactly one group: nothing is dropped, and rows with no partner on the
other side are counted in :class:`~mcpmeter.analysis.join.Unmatched`. One statement
aggregates each side (on two connections, in parallel); the groups of the two results are
merged here by key. LLM cost is priced at query time by :func:`mcpmeter.prices.llm_cost_sql`;
tool cost is each audit row's ``cost_usd``.

Percentiles are nearest-rank: the p-th percentile of n latencies is the value at rank
``ceil(p * n / 100)`` in ascending order; rows without a latency (no response) are left out.
They are exact, found in two passes so that no sort ever holds every row with its latency:
pass 1 (the one sort, shared with every other measure) aggregates per group and per
monotone latency bucket; running sums over those few rows say which bucket holds each
wanted rank and at which rank inside it; pass 2 ranks, with ``ROW_NUMBER()``, only the
rows of those buckets.

How a report is shown (table, JSON, CSV) is the command's part:
:mod:`mcpmeter.cli.commands.report`; the HTML page is :mod:`mcpmeter.analysis.html`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from mcpmeter.analysis.join import (
    Unmatched,
    add_costs,
    clean,
    count_unmatched,
    dialect_sql,
    key_sql,
    llm_where,
    notes,
    tool_where,
    where_sql,
)
from mcpmeter.errors import UsageError
from mcpmeter.prices import llm_cost_sql
from mcpmeter.store.base import CallFilter, Store

#: What ``--by`` accepts, besides ``tag:NAME``.
GROUP_KEYS = ("project", "agent", "session", "tool", "server", "model", "day")
#: The measures of a grouped report, in the order DESIGN.md gives them.
COLUMNS = (
    "calls",
    "errors",
    "rejected",
    "p50_ms",
    "p95_ms",
    "request_bytes",
    "response_bytes",
    "tool_cost_usd",
    "prompt_tokens",
    "completion_tokens",
    "llm_cost_usd",
    "total_cost_usd",
)
PERCENTILES = (50, 95)


# -- what the user asks for ---------------------------------------------------------------


def parse_by(text: str) -> tuple[str, ...]:
    """``"agent,tag:team"`` -> ``("agent", "tag:team")``, checked."""
    keys = tuple(part.strip() for part in text.split(",") if part.strip())
    if not keys:
        raise UsageError(f"--by needs at least one of {', '.join(GROUP_KEYS)}, tag:NAME")
    for key in keys:
        if key.startswith("tag:"):
            name = key[4:]
            if not name or any(ch in name for ch in "\"\\'"):
                raise UsageError(f"--by {key}: a tag name must be non-empty, without quotes or backslashes")
        elif key not in GROUP_KEYS:
            raise UsageError(f"--by: unknown key {key!r}: use {', '.join(GROUP_KEYS)} or tag:NAME")
    if len(set(keys)) != len(keys):
        raise UsageError(f"--by names a key twice: {text}")
    return keys


# -- the grouped report -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """A grouped report: ``rows`` hold the group keys, then :data:`COLUMNS`."""

    keys: tuple[str, ...]
    rows: list[dict[str, Any]]
    unmatched: Unmatched
    llm_calls_without_price: int

    def notes(self) -> list[str]:
        """What the reader must know besides the rows: the unmatched and unpriced counts."""
        return notes(self.unmatched, self.llm_calls_without_price)


def _bucket_sql(latency: str) -> str:
    """A monotone bucket of a latency in ms: 90 to 100 buckets a decade, in plain arithmetic.

    Only used to find which rows hold a percentile's rank; any non-decreasing function would
    do (Postgres rounds where SQLite truncates: both are).
    """
    x = latency
    return (
        f"(CASE WHEN {x} < 1 THEN CAST({x} * 100 AS INTEGER)"
        f" WHEN {x} < 10 THEN 100 + CAST({x} * 10 AS INTEGER)"
        f" WHEN {x} < 100 THEN 200 + CAST({x} AS INTEGER)"
        f" WHEN {x} < 1000 THEN 300 + CAST({x} / 10 AS INTEGER)"
        f" WHEN {x} < 10000 THEN 400 + CAST({x} / 100 AS INTEGER)"
        f" ELSE 500 + CAST({x} / 1000 AS INTEGER) END)"
    )


def tool_side_sql(keys: Sequence[str], where: CallFilter, dialect: str) -> tuple[str, list[Any]]:
    """Tool rows per group: the keys, then calls, errors, rejected, p50, p95, request and
    response bytes and tool cost."""
    d = dialect_sql(dialect)
    ks = [f"k{i}" for i in range(len(keys))]
    k_list = ", ".join(ks)
    t_keys = ", ".join(f"t.{k}" for k in ks)
    selects = ", ".join(f"{key_sql(key, d)[0]} AS {k}" for key, k in zip(keys, ks, strict=True))
    clauses, params = tool_where(where)
    same_keys = " AND ".join(f"x.{k} {d.same} t.{k}" for k in ks)
    pcts = " UNION ALL ".join(f"SELECT {p} AS pct" for p in PERCENTILES)
    rank = "(p.pct * cm.n + 99) / 100"  # ceil(pct * n / 100) in integers: the nearest rank
    pct_columns = ", ".join(f"max(CASE WHEN pct = {p} THEN lat END) AS p{p}" for p in PERCENTILES)
    sql = f"""
WITH base AS NOT MATERIALIZED (
    SELECT {selects}, c.status AS status, c.latency_ms AS lat, {_bucket_sql("c.latency_ms")} AS b,
           c.request_bytes AS qb, c.response_bytes AS rb, c.cost_usd AS cost
    FROM calls c{where_sql(clauses)}
),
-- pass 1: every measure per group and latency bucket (one sort of the rows in scope)
hist AS MATERIALIZED (
    SELECT {k_list}, b, count(*) AS calls, count(lat) AS nl,
           sum(CASE WHEN status IN ('error', 'tool_error') THEN 1 ELSE 0 END) AS errors,
           sum(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END) AS rejected,
           sum(qb) AS qb, sum(rb) AS rb, sum(cost) AS cost
    FROM base GROUP BY {k_list}, b
),
-- which bucket holds each percentile's rank, and the rank within that bucket
cum AS (
    SELECT {k_list}, b, nl,
           CAST(sum(nl) OVER (PARTITION BY {k_list} ORDER BY b ROWS UNBOUNDED PRECEDING) AS BIGINT) AS upto,
           CAST(sum(nl) OVER (PARTITION BY {k_list}) AS BIGINT) AS n
    FROM hist WHERE nl > 0
),
targets AS MATERIALIZED (
    SELECT {", ".join(f"cm.{k}" for k in ks)}, cm.b, p.pct, {rank} - (cm.upto - cm.nl) AS off
    FROM cum cm CROSS JOIN ({pcts}) p
    WHERE cm.upto - cm.nl < {rank} AND cm.upto >= {rank}
),
-- pass 2: rank only the rows of those buckets
cand AS MATERIALIZED (
    SELECT {k_list}, b, lat FROM base WHERE b IN (SELECT b FROM targets)
),
picks AS (
    SELECT {t_keys}, t.pct, t.off, x.lat,
           row_number() OVER (PARTITION BY {t_keys}, t.pct ORDER BY x.lat) AS rn
    FROM cand x JOIN targets t ON x.b = t.b AND {same_keys}
),
pcts AS (
    SELECT {k_list}, {pct_columns} FROM picks WHERE rn = off GROUP BY {k_list}
),
groups AS (
    SELECT {k_list}, sum(calls) AS calls, sum(errors) AS errors, sum(rejected) AS rejected,
           sum(qb) AS qb, sum(rb) AS rb, sum(cost) AS cost
    FROM hist GROUP BY {k_list}
)
SELECT {", ".join(f"g.{k}" for k in ks)}, g.calls, g.errors, g.rejected,
       {", ".join(f"q.p{p}" for p in PERCENTILES)}, g.qb, g.rb, g.cost
FROM groups g LEFT JOIN pcts q ON {" AND ".join(f"q.{k} {d.same} g.{k}" for k in ks)}
"""
    return sql, params


def llm_side_sql(keys: Sequence[str], where: CallFilter, dialect: str) -> tuple[str, list[Any]]:
    """LLM rows per group: the keys, then prompt and completion tokens, LLM cost, and the
    number of rows without a model price in force."""
    d = dialect_sql(dialect)
    ks = [f"k{i}" for i in range(len(keys))]
    k_list = ", ".join(ks)
    selects = ", ".join(f"{key_sql(key, d)[1]} AS {k}" for key, k in zip(keys, ks, strict=True))
    clauses, params = llm_where(where)
    sql = f"""
SELECT {k_list}, sum(pt), sum(ct), sum(cost), count(*) - count(cost)
FROM (
    SELECT {selects}, l.prompt_tokens AS pt, l.completion_tokens AS ct, {llm_cost_sql("l")} AS cost
    FROM llm_calls l{where_sql(clauses)}
) priced
GROUP BY {k_list}
"""
    return sql, params


_T = TypeVar("_T")


def _beside(store: Store, work: Callable[[Store], _T]) -> Future[_T]:
    """Run ``work`` on a second connection to ``store``, in a thread, while the caller queries.

    The two sides of a report read different tables; on two cores this hides the smaller.
    """
    from mcpmeter.store import open_store

    def run() -> _T:
        other = open_store(store.location, create=False)
        try:
            return work(other)
        finally:
            other.close()

    if store.location in ("", ":memory:"):
        done: Future[_T] = Future()
        done.set_result(work(store))
        return done
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcpmeter-report")
    try:
        return pool.submit(run)
    finally:
        pool.shutdown(wait=False)


def grouped(store: Store, keys: Sequence[str], where: CallFilter, top: int | None = None) -> Report:
    """The grouped report: one row per distinct combination of ``keys`` on either side.

    Rows are in key order (nulls first), or with ``top`` the ``top`` costliest, costliest first.
    """
    keys = tuple(keys)
    tool_sql, tool_params = tool_side_sql(keys, where, store.dialect)
    llm_sql, llm_params = llm_side_sql(keys, where, store.dialect)

    def llm_side(other: Store) -> tuple[list[tuple[Any, ...]], Unmatched]:
        return list(other.query(llm_sql, llm_params)), count_unmatched(other, where)

    pending = _beside(store, llm_side)
    tool_rows = list(store.query(tool_sql, tool_params))
    llm_rows, unmatched = pending.result()

    n = len(keys)
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}

    def group(key: tuple[Any, ...]) -> dict[str, Any]:
        row = merged.get(key)
        if row is None:
            row = merged[key] = {**dict(zip(keys, key, strict=True)), **_EMPTY}
        return row

    for raw in tool_rows:
        row = group(tuple(raw[:n]))
        calls, errors, rejected, p50, p95, qb, rb, cost = raw[n:]
        row.update(calls=calls, errors=errors, rejected=rejected, p50_ms=p50, p95_ms=p95)
        row.update(request_bytes=qb, response_bytes=rb, tool_cost_usd=cost)
    unpriced = 0
    for raw in llm_rows:
        row = group(tuple(raw[:n]))
        pt, ct, cost, missing = raw[n:]
        row.update(prompt_tokens=pt, completion_tokens=ct, llm_cost_usd=cost)
        unpriced += int(missing or 0)
    rows = []
    for row in merged.values():
        for column in COLUMNS:
            row[column] = clean(column, row[column])
        row["total_cost_usd"] = add_costs(row["tool_cost_usd"], row["llm_cost_usd"])
        rows.append(row)
    rows.sort(key=lambda r: tuple(_order(r[k]) for k in keys))
    if top is not None:
        rows.sort(key=lambda r: -r["total_cost_usd"])
        rows = rows[:top]
    return Report(keys, rows, unmatched, unpriced)


_EMPTY: dict[str, Any] = dict.fromkeys(COLUMNS)


def _order(value: Any) -> tuple[Any, ...]:
    """Sort key: nulls first, then numbers, then text."""
    if value is None:
        return (0,)
    if isinstance(value, int | float):
        return (1, value, "")
    return (2, 0, str(value))
