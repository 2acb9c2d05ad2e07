"""Options shared by the read commands, so every command spells them the same way.

Values are checked while the command line is parsed, before a store is opened: an unknown
``--status`` (here) or ``--format`` (:func:`mcpmeter.output.formats.format_option`) is one
line on stderr and exit 2, the same in every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from mcpmeter.store.base import CallFilter

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


def _known_status(value: str | None) -> str | None:
    """``--status`` names one of :data:`mcpmeter.record.STATUSES` (a typo would match nothing)."""
    from mcpmeter.errors import UsageError
    from mcpmeter.record import STATUSES

    if value is not None and value not in STATUSES:
        raise UsageError(f"unknown status {value!r}: use one of {', '.join(STATUSES)}")
    return value


StatusFilter = Annotated[
    str | None,
    typer.Option(
        "--status",
        help="Only this status: ok, error, tool_error, rejected, cancelled, no_response.",
        callback=_known_status,
    ),
]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="From this time: ISO date/time or a span (10m, 1h, 7d).")
]
UntilOption = Annotated[
    str | None, typer.Option("--until", help="Before this time: ISO date/time or a span.")
]


def call_filter(
    since: str | None,
    until: str | None,
    project: str | None,
    agent: str | None,
    session: str | None,
    tool: str | None,
    status: str | None,
) -> CallFilter:
    """The rows the filter options select (``--since`` and ``--until`` read as times)."""
    from mcpmeter.store.base import CallFilter
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
