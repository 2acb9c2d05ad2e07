"""``mcpmeter report``: usage and cost, grouped, tool calls joined to LLM calls on ``request_id``.

Computed in SQL that both SQLite (3.40) and Postgres (15) run; the few spellings that differ
live in :func:`dialect_sql`. LLM cost is priced at query time by
:func:`mcpmeter.prices.llm_cost_sql`; tool cost is each audit row's ``cost_usd``.

How the two sides meet in a group. Tool rows (``calls``) group by their own columns; LLM rows
(``llm_calls``) by their own ``project``, ``agent``, ``model``, ``day`` and tags. A tool row
takes ``model`` from the LLM row with its ``request_id`` (the first one, if several sources
recorded it); an LLM row takes ``session``, ``tool`` and ``server`` from its tool rows when
they all agree, else null. Each side is filtered by its own ``ts``, ``project`` and ``agent``;
``--session``, ``--tool`` and ``--status`` keep the LLM rows that have a matching tool row.
Every row counts in exactly one group: nothing is dropped, and rows with no partner on the
other side are counted in :class:`Unmatched` (partners are looked for in the whole store).
One statement aggregates each side (on two connections, in parallel); the groups of the two
results are merged here by key.

Percentiles are nearest-rank: the p-th percentile of n latencies is the value at rank
``ceil(p * n / 100)`` in ascending order; rows without a latency (no response) are left out.
They are exact, found in two passes so that no sort ever holds every row with its latency:
pass 1 (the one sort, shared with every other measure) aggregates per group and per
monotone latency bucket; running sums over those few rows say which bucket holds each
wanted rank and at which rank inside it; pass 2 ranks, with ``ROW_NUMBER()``, only the
rows of those buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import orjson

from mcpmeter.errors import UsageError
from mcpmeter.output.terminal import printable
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
#: The columns of ``report invocations``: one row per request_id.
INVOCATION_COLUMNS = (
    "request_id",
    "ts",
    "project",
    "agent",
    "model",
    "llm_calls",
    "prompt_tokens",
    "completion_tokens",
    "llm_cost_usd",
    "tool_calls",
    "errors",
    "tools",
    "tool_cost_usd",
    "total_cost_usd",
)
FORMATS = ("table", "json", "csv")
PERCENTILES = (50, 95)
_COST_DIGITS = 9
_IS_TOOL_CALL = "c.method = 'tools/call'"
_MS_DIGITS = 3


# -- the SQL that differs between engines --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dialect:
    """The few SQL spellings that differ between SQLite and Postgres."""

    tag: Callable[[str, str], str]
    """``tag(column, name)``: the text value of key ``name`` in the JSON object ``column``."""
    same: str
    """Null-safe equality operator: ``a <same> b`` is true when both are null."""
    distinct_list: Callable[[str], str]
    """``distinct_list(expr)``: the distinct non-null values of ``expr`` in a group, as the text
    of a JSON array (a separator could occur in the values themselves: tool names may hold
    commas)."""


def dialect_sql(dialect: str) -> Dialect:
    """The spellings for ``store.dialect``."""
    if dialect == "sqlite":
        return Dialect(
            tag=lambda column, name: f"json_extract({column}, {_literal(f'$.{_quoted(name)}')})",
            same="IS",
            distinct_list=lambda expr: f"json_group_array(DISTINCT {expr}) FILTER (WHERE {expr} IS NOT NULL)",
        )
    if dialect in ("postgres", "postgresql"):
        return Dialect(
            tag=lambda column, name: f"(CAST({column} AS jsonb) ->> {_literal(name)})",
            same="IS NOT DISTINCT FROM",
            distinct_list=lambda expr: (
                f"CAST(json_agg(DISTINCT {expr}) FILTER (WHERE {expr} IS NOT NULL) AS text)"
            ),
        )
    raise UsageError(f"report does not support the {dialect!r} store")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quoted(name: str) -> str:
    return '"' + name + '"'


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


def key_sql(key: str, d: Dialect) -> tuple[str, str]:
    """The SQL of group key ``key`` over a tool row ``c`` and over an LLM row ``l``."""
    if key.startswith("tag:"):
        return d.tag("c.tags", key[4:]), d.tag("l.tags", key[4:])
    if key == "project":
        return "c.project_id", "l.project_id"
    if key == "agent":
        return "c.agent_id", "l.agent_id"
    if key == "day":
        return "substr(c.ts, 1, 10)", "substr(l.ts, 1, 10)"
    if key == "model":
        return (
            "(SELECT m.model FROM llm_calls m WHERE m.request_id = c.request_id ORDER BY m.id LIMIT 1)",
            "l.model",
        )
    column = {"session": "session_id", "tool": "tool", "server": "server"}[key]
    # An LLM row takes the value its tool rows agree on (null when they differ or are none).
    return (
        f"c.{column}",
        f"(SELECT CASE WHEN min(t.{column}) = max(t.{column}) THEN min(t.{column}) END"
        f" FROM calls t WHERE t.request_id = l.request_id)",
    )


def tool_where(where: CallFilter) -> tuple[list[str], list[Any]]:
    """Tool rows (alias ``c``) by every filter of ``where``."""
    return where.clauses("c.")


def llm_where(where: CallFilter) -> tuple[list[str], list[Any]]:
    """LLM rows by their own time, project and agent; by session, tool, status through a tool row."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, op, value in (
        ("ts", ">=", where.since),
        ("ts", "<", where.until),
        ("project_id", "=", where.project_id),
        ("agent_id", "=", where.agent_id),
    ):
        if value is not None:
            clauses.append(f"l.{column} {op} ?")
            params.append(value)
    via_tool = [
        (column, value)
        for column, value in (
            ("session_id", where.session_id),
            ("tool", where.tool),
            ("status", where.status),
        )
        if value is not None
    ]
    if via_tool:
        clauses.append(
            "EXISTS (SELECT 1 FROM calls t WHERE t.request_id = l.request_id"
            + "".join(f" AND t.{column} = ?" for column, _ in via_tool)
            + ")"
        )
        params.extend(value for _, value in via_tool)
    return clauses, params


def where_sql(clauses: Sequence[str], *more: str) -> str:
    every = [*clauses, *more]
    return " WHERE " + " AND ".join(every) if every else ""


# -- the grouped report -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unmatched:
    """Rows with no partner on the other side of the join (partners looked for store-wide)."""

    tool_calls_without_request_id: int = 0
    """``tools/call`` rows in scope that carry no request_id."""
    tool_calls_without_llm_call: int = 0
    """Rows in scope whose request_id has no LLM row."""
    llm_calls_without_tool_call: int = 0
    """LLM rows in scope whose request_id has no tool row."""

    def as_dict(self) -> dict[str, int]:
        return {
            "tool_calls_without_request_id": self.tool_calls_without_request_id,
            "tool_calls_without_llm_call": self.tool_calls_without_llm_call,
            "llm_calls_without_tool_call": self.llm_calls_without_tool_call,
        }

    def describe(self) -> str:
        return (
            f"unmatched: {self.tool_calls_without_request_id:,} tool calls without a request_id,"
            f" {self.tool_calls_without_llm_call:,} rows with a request_id not in the ledger,"
            f" {self.llm_calls_without_tool_call:,} LLM calls without a tool call"
        )


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


def notes(unmatched: Unmatched, unpriced: int) -> list[str]:
    """The lines that follow a report: unmatched counts, and unpriced LLM calls if any."""
    lines = [unmatched.describe()]
    if unpriced:
        lines.append(
            f"unpriced: {unpriced:,} LLM calls have no model price in force (counted as $0;"
            " see `mcpmeter prices`)"
        )
    return lines


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


def unmatched_sql(where: CallFilter) -> tuple[str, list[Any]]:
    """The three counts of :class:`Unmatched` for the rows in scope.

    Over the whole audit log, rows without a partner are counted as "rows with a request_id
    less those with a partner": ``IN (SELECT ...)`` walks the ledger's request_id index once
    instead of probing it for every row. With a filter, the filter's index drives and each
    row in scope probes the other side's request_id index.
    """
    t_clauses, t_params = tool_where(where)
    l_clauses, l_params = llm_where(where)
    no_ledger_row = "NOT EXISTS (SELECT 1 FROM llm_calls m WHERE m.request_id = c.request_id)"
    no_tool_row = "NOT EXISTS (SELECT 1 FROM calls t WHERE t.request_id = l.request_id)"
    if t_clauses:
        without_llm = (
            f"(SELECT count(*) FROM calls c{where_sql(t_clauses, 'c.request_id IS NOT NULL', no_ledger_row)})"
        )
        without_llm_params = t_params
    else:
        without_llm = (
            "(SELECT count(*) FROM calls c WHERE c.request_id IS NOT NULL)"
            " - (SELECT count(*) FROM calls c WHERE c.request_id IN (SELECT m.request_id FROM llm_calls m))"
        )
        without_llm_params = []
    sql = f"""
SELECT
    (SELECT count(*) FROM calls c{where_sql(t_clauses, "c.request_id IS NULL", _IS_TOOL_CALL)}),
    {without_llm},
    (SELECT count(*) FROM llm_calls l{where_sql(l_clauses, no_tool_row)})
"""
    return sql, t_params + without_llm_params + l_params


def count_unmatched(store: Store, where: CallFilter) -> Unmatched:
    sql, params = unmatched_sql(where)
    row = store.query_one(sql, params)
    assert row is not None
    return Unmatched(*(int(value or 0) for value in row))


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
            row[column] = _clean(column, row[column])
        row["total_cost_usd"] = round(row["tool_cost_usd"] + row["llm_cost_usd"], _COST_DIGITS)
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


def _clean(column: str, value: Any) -> Any:
    if column.endswith("_usd"):
        return round(float(value or 0), _COST_DIGITS)
    if column.endswith("_ms"):
        return None if value is None else round(float(value), _MS_DIGITS)
    return int(value or 0)


# -- per invocation (request_id) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invocations:
    """``report invocations``: one row per request_id, both sides summed."""

    rows: list[dict[str, Any]]
    unmatched: Unmatched
    llm_calls_without_price: int

    def notes(self) -> list[str]:
        return notes(self.unmatched, self.llm_calls_without_price)


def invocations_sql(where: CallFilter, dialect: str, top: int | None = None) -> tuple[str, list[Any]]:
    """Per request_id in scope: its LLM rows and its tool rows, each summed, and the all-in total."""
    d = dialect_sql(dialect)
    t_clauses, t_params = tool_where(where)
    l_clauses, l_params = llm_where(where)
    order = f"total_cost_usd DESC, request_id LIMIT {int(top)}" if top is not None else "ts, request_id"
    sql = f"""
WITH tool AS (
    SELECT c.request_id AS rid, min(c.ts) AS ts, min(c.project_id) AS project, min(c.agent_id) AS agent,
           count(*) AS tool_calls,
           sum(CASE WHEN c.status IN ('error', 'tool_error') THEN 1 ELSE 0 END) AS errors,
           {d.distinct_list("c.tool")} AS tools, sum(c.cost_usd) AS tool_cost
    FROM calls c{where_sql(t_clauses, "c.request_id IS NOT NULL")}
    GROUP BY c.request_id
),
llm AS (
    SELECT rid, min(ts) AS ts, min(project) AS project, min(agent) AS agent, min(model) AS model,
           count(*) AS llm_calls, sum(pt) AS pt, sum(ct) AS ct, sum(cost) AS cost
    FROM (
        SELECT l.request_id AS rid, l.ts AS ts, l.project_id AS project, l.agent_id AS agent,
               l.model AS model, l.prompt_tokens AS pt, l.completion_tokens AS ct,
               {llm_cost_sql("l")} AS cost
        FROM llm_calls l{where_sql(l_clauses)}
    ) priced GROUP BY rid
),
facts AS (
    SELECT rid, ts, NULL AS l_project, NULL AS l_agent, project AS t_project, agent AS t_agent,
           NULL AS model, 0 AS llm_calls, 0 AS pt, 0 AS ct, NULL AS llm_cost,
           tool_calls, errors, tools, tool_cost
    FROM tool
    UNION ALL
    SELECT rid, ts, project, agent, NULL, NULL, model, llm_calls, pt, ct, cost, 0, 0, NULL, NULL
    FROM llm
)
SELECT rid AS request_id, min(ts) AS ts,
       coalesce(max(l_project), max(t_project)) AS project,
       coalesce(max(l_agent), max(t_agent)) AS agent,
       max(model) AS model, sum(llm_calls) AS llm_calls, sum(pt) AS prompt_tokens,
       sum(ct) AS completion_tokens, coalesce(sum(llm_cost), 0) AS llm_cost_usd,
       sum(tool_calls) AS tool_calls, sum(errors) AS errors, max(tools) AS tools,
       coalesce(sum(tool_cost), 0) AS tool_cost_usd,
       coalesce(sum(llm_cost), 0) + coalesce(sum(tool_cost), 0) AS total_cost_usd
FROM facts GROUP BY rid ORDER BY {order}
"""
    return sql, t_params + l_params


def iter_invocations(store: Store, where: CallFilter, top: int | None = None) -> Iterator[dict[str, Any]]:
    """The rows of ``report invocations``, streamed (:data:`INVOCATION_COLUMNS`)."""
    sql, params = invocations_sql(where, store.dialect, top)
    text_columns = ("request_id", "ts", "project", "agent", "model", "tools")
    for raw in store.query(sql, params):
        row: dict[str, Any] = {}
        for column, value in zip(INVOCATION_COLUMNS, raw, strict=True):
            row[column] = value if column in text_columns else _clean(column, value)
        row["tools"] = sorted(set(orjson.loads(row["tools"]))) if row["tools"] else []
        yield row


def invocations(store: Store, where: CallFilter, top: int | None = None) -> Invocations:
    """``report invocations`` in memory (the command streams :func:`iter_invocations`)."""
    unmatched, unpriced = count_unmatched(store, where), unpriced_llm_calls(store, where)
    return Invocations(list(iter_invocations(store, where, top)), unmatched, unpriced)


def unpriced_llm_calls(store: Store, where: CallFilter) -> int:
    """LLM rows in scope without a model price in force."""
    clauses, params = llm_where(where)
    row = store.query_one(
        f"SELECT count(*) - count({llm_cost_sql('l')}) FROM llm_calls l{where_sql(clauses)}", params
    )
    return int(row[0] or 0) if row else 0


# -- output -------------------------------------------------------------------------------


def write_json(rows: list[dict[str, Any]], out: IO[str]) -> None:
    """A JSON array of objects, one per row."""
    out.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    out.write("\n")


def write_invocations_json(
    rows: Iterable[dict[str, Any]], unmatched: Unmatched, unpriced: int, out: IO[str]
) -> None:
    """``{"invocations": [...], "unmatched": {...}, "llm_calls_without_price": N}``, streamed:
    one invocation a line, so memory stays flat however many there are."""
    out.write('{\n  "invocations": [')
    separator = "\n    "
    for row in rows:
        out.write(separator + orjson.dumps(row).decode())
        separator = ",\n    "
    out.write('\n  ],\n  "unmatched": ' + orjson.dumps(unmatched.as_dict()).decode())
    out.write(f',\n  "llm_calls_without_price": {int(unpriced)}\n}}\n')


def write_csv(columns: Sequence[str], rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    """A header row, then one line per row; nulls are empty cells, a list (``tools``) the text
    of a JSON array. Text is escaped against spreadsheet formulas
    (:class:`~mcpmeter.exporters.text.CsvWriter`)."""
    from mcpmeter.exporters.text import CsvWriter

    writer = CsvWriter(out.write)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(_csv_value(row[c]) for c in columns)


def _csv_value(value: Any) -> Any:
    return orjson.dumps(value).decode() if isinstance(value, list) else value


def write_table(
    columns: Sequence[str],
    rows: list[dict[str, Any]],
    out: IO[str],
    *,
    total: bool = True,
    notes: Sequence[str] = (),
) -> None:
    """Aligned columns, a total line (sums; percentiles do not add up), then ``notes``.

    Values are shown with their control characters escaped (:func:`mcpmeter.output.terminal.printable`).
    """
    cells = [[_cell(c, row[c]) for c in columns] for row in rows]
    if total and rows:
        sums = ["" for _ in columns]
        sums[0] = "total"
        for i, column in enumerate(columns):
            if i and column in _SUMMABLE:
                sums[i] = _cell(column, sum(row[column] or 0 for row in rows))
        cells.append(sums)
    header = [printable(c) for c in columns]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(header)]
    numeric = [c in _SUMMABLE or c.endswith("_ms") for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if is_num else v.ljust(w) for v, w, is_num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out.write(line(header) + "\n")
    for i, values in enumerate(cells):
        if total and rows and i == len(cells) - 1:
            out.write(line(["-" * w for w in widths]) + "\n")
        out.write(line(values) + "\n")
    if not rows:
        out.write("(no rows)\n")
    for note in notes:
        out.write(note + "\n")


#: Columns that add up in a total line (percentiles, keys and text do not).
_SUMMABLE = frozenset({c for c in COLUMNS if not c.endswith("_ms")} | {"llm_calls", "tool_calls", "errors"})


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column.endswith("_usd"):
        return f"${value:,.4f}"
    if column.endswith("_ms"):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):  # tool names: one quoted when it holds the separator
        return printable(", ".join(orjson.dumps(v).decode() if "," in v else v for v in value) or "-")
    return printable(str(value))
