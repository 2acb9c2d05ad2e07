"""``mcpmeter tail``: the live view."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mcpmeter.cli.options import (
    AgentFilter,
    DbOption,
    ProjectFilter,
    SessionFilter,
    StatusFilter,
    ToolFilter,
)
from mcpmeter.errors import UsageError
from mcpmeter.output.formats import format_option

MIN_INTERVAL_S = 0.05
#: What ``--format`` accepts: the live view (the default), or a JSON object per row (``--json``).
TAIL_FORMATS = ("view", "json")


def register(app: typer.Typer) -> None:
    app.command(
        help="Follow calls as they are recorded: a live full-screen view (q quits, p pauses, "
        "g cycles the grouping), or --json (--format json) for one JSON object per row."
    )(tail)


def tail(
    db: DbOption = None,
    project: ProjectFilter = None,
    agent: AgentFilter = None,
    session: SessionFilter = None,
    tool: ToolFilter = None,
    status: StatusFilter = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Start at this time: ISO date/time or a span (10m, 1h). Default: the view starts "
            "with the last minute, --json with new rows, --no-follow with every row.",
        ),
    ] = None,
    by: Annotated[
        str, typer.Option("--by", help="Group the summary by tool, agent, project or server (g cycles).")
    ] = "tool",
    json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per row on stdout (every column), flushed per line."),
    ] = False,
    format: Annotated[
        str | None,
        format_option(TAIL_FORMATS, help="view (the live view, default) or json (as --json)."),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow/--no-follow", help="Keep reading new rows (default), or show what matches and exit."
        ),
    ] = True,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between polls of the store.", metavar="S")
    ] = 0.25,
) -> None:
    import time

    from mcpmeter.store import CallFilter, open_store, resolve_db
    from mcpmeter.tail.model import GROUPINGS, WINDOW_S
    from mcpmeter.timeparse import parse_when

    if json and format == "view":
        raise UsageError("tail: --json and --format view ask for different outputs; give one")
    json = json or format == "json"
    if not json and not sys.stdout.isatty():
        raise UsageError("tail: stdout is not a terminal; use --json for a stream of rows")
    if by not in GROUPINGS:
        raise UsageError(f"unknown grouping {by!r}: use one of {', '.join(GROUPINGS)}")
    if interval < MIN_INTERVAL_S:
        raise UsageError(f"--interval must be at least {MIN_INTERVAL_S} seconds")
    start = parse_when(since) if since else None
    if start is None and not json and follow:
        start = parse_when(f"{WINDOW_S}s", now=time.time())  # what the view's rates need
    where = CallFilter(
        since=start, project_id=project, agent_id=agent, session_id=session, tool=tool, status=status
    )
    location = resolve_db(db)
    store = open_store(location, create=False)
    try:
        from mcpmeter.output.files import writing_stdout
        from mcpmeter.tail.app import Poller, describe_filters, run_screen, stream_json

        poller = Poller.starting(store, where, new_only=follow, follow=follow)
        with writing_stdout():
            if json:
                code = stream_json(poller, sys.stdout.buffer, follow=follow, interval=interval)
            else:
                from mcpmeter.tail.model import TailState

                code = run_screen(
                    poller,
                    TailState(group_by=by),
                    location=location,
                    filters=describe_filters(where),
                    follow=follow,
                    interval=interval,
                )
    finally:
        store.close()
    if code:
        raise typer.Exit(code)
