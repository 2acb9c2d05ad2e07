"""``mcpmeter report``: usage and cost, grouped; ``report invocations``: per request_id."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
)
from mcpmeter.errors import UsageError

if TYPE_CHECKING:
    from mcpmeter.store import CallFilter, Store

FormatOption = Annotated[str, typer.Option("--format", help="table, json or csv.")]
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
    from mcpmeter.output.files import atomic_output, guard_output, writing_stdout
    from mcpmeter.store import open_store, resolve_db

    keys = reports.parse_by(by)
    _check_format(format, reports.FORMATS)
    where = _filter(since, until, project, agent, session, tool, status)
    location = resolve_db(db)
    if html is not None:
        guard_output(html, location, option="--html")  # before the store is opened
    store = open_store(location, create=False)
    try:
        _with_bundled_prices(store)
        if html is not None:
            from mcpmeter.analysis.html import write_html

            with atomic_output(html) as page:
                write_html(store, keys, where, page, top=top)
            sys.stderr.write(f"mcpmeter: wrote {html}\n")
            return
        result = reports.grouped(store, keys, where, top)
    finally:
        store.close()
    out = sys.stdout
    with writing_stdout():
        if format == "json":
            reports.write_json(result.rows, out)
        elif format == "csv":
            reports.write_csv((*keys, *reports.COLUMNS), result.rows, out)
        else:
            reports.write_table((*keys, *reports.COLUMNS), result.rows, out, notes=result.notes())
    if format != "table":  # stdout stays machine-readable; the counts still reach the reader
        for note in result.notes():
            sys.stderr.write(f"mcpmeter: {note}\n")


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
    from mcpmeter.analysis import report as reports
    from mcpmeter.output.files import writing_stdout
    from mcpmeter.store import open_store, resolve_db

    _check_format(format, reports.FORMATS)
    where = _filter(since, until, project, agent, session, tool, status)
    out = sys.stdout
    columns = reports.INVOCATION_COLUMNS
    store = open_store(resolve_db(db), create=False)
    try:
        _with_bundled_prices(store)
        unmatched = reports.count_unmatched(store, where)
        unpriced = reports.unpriced_llm_calls(store, where)
        notes = reports.notes(unmatched, unpriced)
        rows = reports.iter_invocations(store, where, top)  # streamed for json and csv
        with writing_stdout():
            if format == "json":
                reports.write_invocations_json(rows, unmatched, unpriced, out)
            elif format == "csv":
                reports.write_csv(columns, rows, out)
            else:
                reports.write_table(columns, list(rows), out, notes=notes)
        if format == "csv":
            for note in notes:
                sys.stderr.write(f"mcpmeter: {note}\n")
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


def _check_format(format: str, formats: tuple[str, ...]) -> None:
    if format not in formats:
        raise UsageError(f"unknown format {format!r}: use one of {', '.join(formats)}")


def _filter(
    since: str | None,
    until: str | None,
    project: str | None,
    agent: str | None,
    session: str | None,
    tool: str | None,
    status: str | None,
) -> CallFilter:
    from mcpmeter.store import CallFilter
    from mcpmeter.timeparse import parse_when

    return CallFilter(
        since=parse_when(since) if since else None,
        until=parse_when(until) if until else None,
        project_id=project,
        agent_id=agent,
        session_id=session,
        tool=tool,
        status=status,
    )
