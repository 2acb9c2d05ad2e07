"""``mcpmeter export``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mcpmeter.commands.options import (
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


def register(app: typer.Typer) -> None:
    app.command(help="Write audit rows out as JSON lines or CSV (every column, in order), streamed.")(export)


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
