"""``mcpmeter report invocations``: one row per request_id, both sides of the join summed.

An invocation is one LLM decision: its LLM calls (``llm_calls``) and the tool calls
(``calls``) that carry its ``request_id``, each side filtered as
:mod:`mcpmeter.analysis.join` says, and the all-in cost. Rows are streamed from one
statement (:func:`iter_invocations`), so a command can write them as they come.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from mcpmeter.analysis.join import (
    Unmatched,
    clean,
    count_unmatched,
    dialect_sql,
    llm_where,
    notes,
    tool_where,
    unpriced_llm_calls,
    where_sql,
)
from mcpmeter.prices import llm_cost_sql
from mcpmeter.store.base import CallFilter, Store

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
            row[column] = value if column in text_columns else clean(column, value)
        row["tools"] = sorted(set(orjson.loads(row["tools"]))) if row["tools"] else []
        yield row


def invocations(store: Store, where: CallFilter, top: int | None = None) -> Invocations:
    """``report invocations`` in memory (the command streams :func:`iter_invocations`)."""
    unmatched, unpriced = count_unmatched(store, where), unpriced_llm_calls(store, where)
    return Invocations(list(iter_invocations(store, where, top)), unmatched, unpriced)
