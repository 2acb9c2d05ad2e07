"""How tool calls meet LLM calls: the SQL both reports (and the HTML page) share.

Tool rows (``calls``, alias ``c``) and LLM rows (``llm_calls``, alias ``l``) meet on
``request_id``. Each side is filtered by its own ``ts``, ``project`` and ``agent``;
``--session``, ``--tool`` and ``--status`` keep the LLM rows that have a matching tool row
(:func:`tool_where`, :func:`llm_where`). A group key reads each side's own column where it
has one; a tool row takes ``model`` from the LLM row with its ``request_id`` (the first one,
if several sources recorded it), an LLM row takes ``session``, ``tool`` and ``server`` from
its tool rows when they all agree, else null (:func:`key_sql`). Rows with no partner on the
other side are counted in :class:`Unmatched` (partners are looked for in the whole store).

The SQL runs on SQLite (3.40) and Postgres (15); the few spellings that differ live in
:func:`dialect_sql`. LLM cost is priced at query time by :func:`mcpmeter.prices.llm_cost_sql`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mcpmeter.errors import UsageError
from mcpmeter.prices import llm_cost_sql
from mcpmeter.store.base import CallFilter, Store

IS_TOOL_CALL = "c.method = 'tools/call'"
_COST_DIGITS = 9
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


# -- group keys and filters, on each side ---------------------------------------------------


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
    """`` WHERE a AND b`` of ``clauses`` and ``more``, or nothing when there are none."""
    every = [*clauses, *more]
    return " WHERE " + " AND ".join(every) if every else ""


def clean(column: str, value: Any) -> Any:
    """A measure as the reports give it: costs and latencies rounded, counts as ints (null 0)."""
    if column.endswith("_usd"):
        return round(float(value or 0), _COST_DIGITS)
    if column.endswith("_ms"):
        return None if value is None else round(float(value), _MS_DIGITS)
    return int(value or 0)


def add_costs(*costs: float) -> float:
    """A total of costs, rounded as :func:`clean` rounds each."""
    return round(sum(costs), _COST_DIGITS)


# -- what has no partner --------------------------------------------------------------------


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


def notes(unmatched: Unmatched, unpriced: int) -> list[str]:
    """The lines that follow a report: unmatched counts, and unpriced LLM calls if any."""
    lines = [unmatched.describe()]
    if unpriced:
        lines.append(
            f"unpriced: {unpriced:,} LLM calls have no model price in force (counted as $0;"
            " see `mcpmeter prices`)"
        )
    return lines


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
    (SELECT count(*) FROM calls c{where_sql(t_clauses, "c.request_id IS NULL", IS_TOOL_CALL)}),
    {without_llm},
    (SELECT count(*) FROM llm_calls l{where_sql(l_clauses, no_tool_row)})
"""
    return sql, t_params + without_llm_params + l_params


def count_unmatched(store: Store, where: CallFilter) -> Unmatched:
    """:class:`Unmatched` for the rows of ``store`` in scope of ``where``."""
    sql, params = unmatched_sql(where)
    row = store.query_one(sql, params)
    assert row is not None
    return Unmatched(*(int(value or 0) for value in row))


def unpriced_llm_calls(store: Store, where: CallFilter) -> int:
    """LLM rows in scope without a model price in force."""
    clauses, params = llm_where(where)
    row = store.query_one(
        f"SELECT count(*) - count({llm_cost_sql('l')}) FROM llm_calls l{where_sql(clauses)}", params
    )
    return int(row[0] or 0) if row else 0
