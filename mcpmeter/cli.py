"""The command line: one thin function per command; the work lives in the modules.

Modules are imported inside the commands so ``wrap`` starts fast and pays only for what
it uses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mcpmeter.errors import UsageError

app = typer.Typer(
    name="mcpmeter",
    help="A metering proxy for MCP servers: who called which tool, how long, how many bytes, at what cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="The store: a SQLite path (default $XDG_DATA_HOME/mcpmeter/audit.db). Env: MCPMETER_DB."
    ),
]
ProjectFilter = Annotated[str | None, typer.Option("--project", help="Only this project.")]
AgentFilter = Annotated[str | None, typer.Option("--agent", help="Only this agent.")]
SessionFilter = Annotated[str | None, typer.Option("--session", help="Only this session.")]
ToolFilter = Annotated[
    str | None, typer.Option("--tool", help="Only this tool (or prompt name, resource URI).")
]
StatusFilter = Annotated[
    str | None,
    typer.Option(
        "--status", help="Only this status: ok, error, tool_error, rejected, cancelled, no_response."
    ),
]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="From this time: ISO date/time or a span (10m, 1h, 7d).")
]
UntilOption = Annotated[
    str | None, typer.Option("--until", help="Before this time: ISO date/time or a span.")
]


@app.command(
    context_settings={
        "allow_interspersed_args": False,
        "ignore_unknown_options": True,
        "allow_extra_args": True,
    },
    add_help_option=False,
    help="Run a stdio MCP server behind the metering relay: mcpmeter wrap [OPTIONS] -- CMD [ARGS...]",
)
def wrap(ctx: typer.Context) -> None:
    """Parsed by :mod:`mcpmeter.wrap_cli` (``mcpmeter.__main__`` goes there directly)."""
    from mcpmeter.wrap_cli import main

    raise typer.Exit(main(list(ctx.args)))


@app.command(help="Write audit rows out as JSON lines or CSV (every column, in order), streamed.")
def export(
    db: DbOption = None,
    format: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to FILE instead of stdout.")
    ] = None,
    since: SinceOption = None,
    until: UntilOption = None,
    project: ProjectFilter = None,
    agent: AgentFilter = None,
    session: SessionFilter = None,
    tool: ToolFilter = None,
    status: StatusFilter = None,
) -> None:
    from mcpmeter.export import FORMATS, write_csv, write_jsonl
    from mcpmeter.store import CallFilter, open_store, resolve_db
    from mcpmeter.timeparse import parse_when

    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    where = CallFilter(
        since=parse_when(since) if since else None,
        until=parse_when(until) if until else None,
        project_id=project,
        agent_id=agent,
        session_id=session,
        tool=tool,
        status=status,
    )
    store = open_store(resolve_db(db), create=False)
    try:
        rows = store.iter_calls(where)
        write = write_jsonl if format == "jsonl" else write_csv
        if output is None:
            write(rows, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            with output.open("wb") as out:
                write(rows, out)
    finally:
        store.close()
