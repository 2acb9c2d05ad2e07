"""``mcpmeter report``: usage and cost, grouped; ``report invocations``: per request_id.

The queries are :mod:`mcpmeter.analysis` (:mod:`~mcpmeter.analysis.report`,
:mod:`~mcpmeter.analysis.invocations`); how their rows are shown lives here, written through
the output layer (:mod:`mcpmeter.output`): ``--format table`` aligned columns, a total line
and the notes (unmatched and unpriced counts); ``json`` and ``csv`` the exact values, the
notes then on stderr so that stdout stays machine-readable.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from mcpmeter.cli.options import (
    AgentFilter,
    DbOption,
    ProjectFilter,
    SessionFilter,
    SinceOption,
    StatusFilter,
    ToolFilter,
    UntilOption,
    call_filter,
)
from mcpmeter.output.formats import TABLE_JSON_CSV, format_option

if TYPE_CHECKING:
    from mcpmeter.analysis.join import Unmatched
    from mcpmeter.store import Store

FormatOption = Annotated[str, format_option(TABLE_JSON_CSV)]
TopOption = Annotated[
    int | None,
    typer.Option("--top", min=1, help="Only the N costliest rows (by total cost), costliest first."),
]


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="report",
        help="Usage and cost, grouped: tool calls joined to LLM calls on request_id.",
        invoke_without_command=True,
        no_args_is_help=False,
        add_completion=False,
        rich_markup_mode=None,
    )
    group.callback(invoke_without_command=True)(report)
    group.command(
        "invocations",
        help="One row per request_id: its LLM calls, its tool calls and the all-in cost.",
    )(invocations)
    app.add_typer(group)


def report(
    ctx: typer.Context,
    db: DbOption = None,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="Group by a comma list of project, agent, session, tool, server, model, day, tag:NAME.",
        ),
    ] = "agent",
    since: SinceOption = None,
    until: UntilOption = None,
    project: ProjectFilter = None,
    agent: AgentFilter = None,
    session: SessionFilter = None,
    tool: ToolFilter = None,
    status: StatusFilter = None,
    format: FormatOption = "table",
    top: TopOption = None,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Write a self-contained HTML page (charts and the table) to FILE."),
    ] = None,
) -> None:
    """Usage and cost per group: calls, errors, latency, bytes, tool and LLM cost, total."""
    if ctx.invoked_subcommand is not None:
        return
    from mcpmeter.analysis import report as reports
    from mcpmeter.output.files import guard_output, writing_stdout
    from mcpmeter.store import open_store, resolve_db

    keys = reports.parse_by(by)
    where = call_filter(since, until, project, agent, session, tool, status)
    location = resolve_db(db)
    if html is not None:
        guard_output(html, location, option="--html")  # before the store is opened
    store = open_store(location, create=False)
    try:
        _with_bundled_prices(store)
        if html is not None:
            from mcpmeter.analysis.html import write_html

            write_html(store, keys, where, html, top=top)
            sys.stderr.write(f"mcpmeter: wrote {html}\n")
            return
        result = reports.grouped(store, keys, where, top)
    finally:
        store.close()
    with writing_stdout():
        write_rows(format, (*keys, *reports.COLUMNS), result.rows, sys.stdout, notes=result.notes())
    if format != "table":  # stdout stays machine-readable; the counts still reach the reader
        _notes_to_stderr(result.notes())


def invocations(
    db: DbOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    project: ProjectFilter = None,
    agent: AgentFilter = None,
    session: SessionFilter = None,
    tool: ToolFilter = None,
    status: StatusFilter = None,
    format: FormatOption = "table",
    top: TopOption = None,
) -> None:
    from mcpmeter.analysis.invocations import INVOCATION_COLUMNS, iter_invocations
    from mcpmeter.analysis.join import count_unmatched, notes, unpriced_llm_calls
    from mcpmeter.output.files import writing_stdout
    from mcpmeter.store import open_store, resolve_db

    where = call_filter(since, until, project, agent, session, tool, status)
    out = sys.stdout
    store = open_store(resolve_db(db), create=False)
    try:
        _with_bundled_prices(store)
        unmatched = count_unmatched(store, where)
        unpriced = unpriced_llm_calls(store, where)
        lines = notes(unmatched, unpriced)
        rows = iter_invocations(store, where, top)  # streamed for json and csv
        with writing_stdout():
            if format == "json":  # the counts are members of the document
                _write_invocations_json(rows, unmatched, unpriced, out)
            else:
                write_rows(format, INVOCATION_COLUMNS, rows, out, notes=lines)
        if format == "csv":
            _notes_to_stderr(lines)
    finally:
        store.close()


def _with_bundled_prices(store: Store) -> None:
    """Load the bundled model prices on the store's first use for cost (as ledger and prices do)."""
    from mcpmeter.log import warn
    from mcpmeter.prices import ensure_bundled

    try:
        ensure_bundled(store)
    except Exception as exc:  # a read-only store still reports, with the prices it has
        warn(f"cannot load the bundled model prices ({exc}); LLM calls without a price count as $0")


# -- how a report is shown ----------------------------------------------------------------


def write_rows(
    format: str,
    columns: Sequence[str],
    rows: Iterable[dict[str, Any]],
    out: IO[str],
    *,
    notes: Sequence[str] = (),
) -> None:
    """``rows`` (their ``columns``) in ``format``: a JSON array of objects, CSV (streamed),
    or the table, its total line and then ``notes``."""
    from mcpmeter.output.csv import write_csv
    from mcpmeter.output.json import write_json
    from mcpmeter.output.table import write_table

    if format == "json":
        write_json(list(rows), out)
    elif format == "csv":
        write_csv(columns, ([row[c] for c in columns] for row in rows), out.write)
    else:
        shown = list(rows)
        write_table(
            out,
            columns,
            [[_cell(c, row[c]) for c in columns] for row in shown],
            numeric=[c in _summable() or c.endswith("_ms") for c in columns],
            total=_total(columns, shown),
            notes=notes,
        )


def _write_invocations_json(
    rows: Iterable[dict[str, Any]], unmatched: Unmatched, unpriced: int, out: IO[str]
) -> None:
    """``{"invocations": [...], "unmatched": {...}, "llm_calls_without_price": N}``, streamed:
    one invocation a line, so memory stays flat however many there are."""
    from mcpmeter.output.json import write_json_stream

    after = {"unmatched": unmatched.as_dict(), "llm_calls_without_price": int(unpriced)}
    write_json_stream(out, "invocations", rows, after)


def _notes_to_stderr(notes: Sequence[str]) -> None:
    for note in notes:
        sys.stderr.write(f"mcpmeter: {note}\n")


@functools.cache
def _summable() -> frozenset[str]:
    """Columns that add up in a total line (percentiles, keys and text do not)."""
    from mcpmeter.analysis.report import COLUMNS

    return frozenset({c for c in COLUMNS if not c.endswith("_ms")} | {"llm_calls", "tool_calls", "errors"})


def _total(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    """The total line: ``total`` under the first column, the sum under each summable one."""
    summable = _summable()
    sums = ["" for _ in columns]
    sums[0] = "total"
    for i, column in enumerate(columns):
        if i and column in summable:
            sums[i] = _cell(column, sum(row[column] or 0 for row in rows))
    return sums


def _cell(column: str, value: Any) -> str:
    """A value as the table shows it: ``-`` for none, dollars to 4 places, ms to 1."""
    if value is None:
        return "-"
    if column.endswith("_usd"):
        return f"${value:,.4f}"
    if column.endswith("_ms"):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):  # tool names: one quoted when it holds the separator
        from mcpmeter.output.json import json_text

        return ", ".join(json_text(v) if "," in v else v for v in value) or "-"
    return str(value)
