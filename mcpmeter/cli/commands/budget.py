"""``mcpmeter budget``: caps per project, agent or session, shared by every wrap on the store."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from mcpmeter.cli.options import DbOption
from mcpmeter.errors import UsageError

budget_app = typer.Typer(
    help="Budgets in the store: caps per project, agent or session, for every wrap that writes to it.",
    no_args_is_help=True,
)

ProjectOption = Annotated[str | None, typer.Option("--project", help="The project the budget caps.")]
AgentOption = Annotated[str | None, typer.Option("--agent", help="The agent the budget caps.")]
SessionOption = Annotated[str | None, typer.Option("--session", help="The session the budget caps.")]


def register(app: typer.Typer) -> None:
    app.add_typer(budget_app, name="budget")


def _subject(project: str | None, agent: str | None, session: str | None) -> tuple[str, str]:
    given = [
        (scope, value)
        for scope, value in (("project", project), ("agent", agent), ("session", session))
        if value
    ]
    if len(given) != 1:
        raise UsageError("budget: give exactly one of --project, --agent or --session")
    return given[0]


@budget_app.command("set", help="Set (or replace) the budget of one project, agent or session.")
def set_budget(
    project: ProjectOption = None,
    agent: AgentOption = None,
    session: SessionOption = None,
    usd: Annotated[float | None, typer.Option("--usd", help="Dollars allowed in the window.")] = None,
    calls: Annotated[int | None, typer.Option("--calls", help="Tool calls allowed in the window.")] = None,
    window: Annotated[str, typer.Option("--window", help="day, month (UTC) or total.")] = "total",
    includes_llm: Annotated[
        bool, typer.Option("--includes-llm", help="LLM spend from the ledger counts against --usd too.")
    ] = False,
    warn_at: Annotated[float, typer.Option("--warn-at", help="Warn at this share used.")] = 0.8,
    db: DbOption = None,
) -> None:
    from mcpmeter.metering.budget_admin import set_budget as store_budget

    scope, subject = _subject(project, agent, session)
    if usd is None and calls is None:
        raise UsageError("budget set: give --usd and/or --calls")
    store_budget(db, scope, subject, window, usd, calls, includes_llm, warn_at)
    sys.stdout.write(f"budget set for {scope} {subject!r}\n")


@budget_app.command("show", help="Every budget: limit, spent, % used, and when its window resets.")
def show(
    format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    db: DbOption = None,
) -> None:
    from mcpmeter.metering.budget_admin import budget_lines

    if format not in ("table", "json"):
        raise UsageError(f"unknown format {format!r}: use table or json")
    render_budgets(budget_lines(db), format)


@budget_app.command("reset", help="Start the budget's current window over: its spend back to zero.")
def reset(
    project: ProjectOption = None,
    agent: AgentOption = None,
    session: SessionOption = None,
    delete: Annotated[bool, typer.Option("--delete", help="Also remove the budget itself.")] = False,
    db: DbOption = None,
) -> None:
    from mcpmeter.metering.budget_admin import reset_budget

    scope, subject = _subject(project, agent, session)
    reset_budget(db, scope, subject, delete=delete)
    sys.stdout.write(f"budget {'deleted' if delete else 'reset'} for {scope} {subject!r}\n")


def render_budgets(lines: list[dict[str, Any]], fmt: str) -> None:
    """``budget show``: one rich table of :func:`~mcpmeter.metering.budget_admin.budget_lines`,
    or the lines as one JSON array."""
    if fmt == "json":
        import msgspec

        sys.stdout.write(msgspec.json.encode(lines).decode() + "\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from mcpmeter.output.terminal import printable

    def cell(value: object) -> Text:  # stored names are data: never markup, never escapes
        return Text(printable(str(value)))

    table = Table(title="budgets", title_justify="left")
    for column in ("scope", "subject", "window", "limit", "spent", "used", "resets at", "set by"):
        table.add_column(column, justify="right" if column in ("limit", "spent", "used") else "left")
    for line in lines:
        limit = " + ".join(
            part
            for part in (
                f"${line['limit_usd']:.2f}" if line["limit_usd"] is not None else "",
                f"{line['limit_calls']} calls" if line["limit_calls"] is not None else "",
            )
            if part
        )
        used = line["used"]
        colour = "red" if used >= 1 else "yellow" if used >= 0.8 else "green"
        table.add_row(
            line["scope"],
            cell(line["subject"]),
            line["window"],
            limit,
            f"${line['spent_usd']:.4f} / {line['calls']} calls",
            f"[{colour}]{used:.0%}[/{colour}]",
            line["resets_at"] or "never",
            cell(line["source"]),
        )
    Console().print(table)
