"""Options shared by the read commands, so every command spells them the same way."""

from __future__ import annotations

from typing import Annotated

import typer

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
