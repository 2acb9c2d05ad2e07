"""The command line of ``mcpmeter wrap``.

``wrap`` is parsed with :mod:`argparse`, not typer, for two reasons: its argv is special
(options up to the first non-option word, then the server command with *its* options,
with or without ``--``), and it must start fast, since a client waits for the server's
first answer. This module imports nothing heavy until the options are known.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from mcpmeter.errors import UsageError

DESCRIPTION = (
    "Run a stdio MCP server and relay its JSON-RPC frames unchanged, recording one audit row "
    "per request. The -- may be left out when CMD does not start with -."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"wrap: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mcpmeter wrap",
        usage="mcpmeter wrap [OPTIONS] -- CMD [ARGS...]",
        description=DESCRIPTION,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--db", help="the store: a SQLite path (default $XDG_DATA_HOME/mcpmeter/audit.db); env MCPMETER_DB")
    add("--project", help="project, customer or tenant; env MCPMETER_PROJECT_ID")
    add("--agent", help="agent name; env MCPMETER_AGENT_ID (or MCPMETER_AGENT_NAME)")
    add("--session", help="session id (default: a new UUID per process); env MCPMETER_SESSION_ID")
    add(
        "--tag",
        action="append",
        default=[],
        metavar="K=V",
        help="a free dimension (repeatable); env MCPMETER_TAGS=k=v,k2=v2",
    )
    add(
        "--kill-after",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="grace between a forwarded SIGTERM/SIGINT and SIGKILL (default 5)",
    )
    add(
        "--record-args",
        action="store_true",
        help="also store a redacted copy of tool arguments (secrets masked; off by default)",
    )
    add("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]", help="the server command")
    return parser


def main(args: list[str]) -> int:
    """Parse ``args`` (what follows ``wrap``), run the relay, return the exit code."""
    options = build_parser().parse_args(args)
    cmd: list[str] = list(options.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("wrap needs a server command: mcpmeter wrap [OPTIONS] -- CMD [ARGS...]")
    if options.kill_after < 0:
        raise UsageError("wrap: --kill-after must be zero or more seconds")

    from mcpmeter.tags import resolve_tenant
    from mcpmeter.wrap import WrapOptions, run_wrap

    tenant = resolve_tenant(
        project=options.project, agent=options.agent, session=options.session, tags=options.tag
    )
    return run_wrap(
        WrapOptions(
            argv=cmd,
            tenant=tenant,
            db=options.db,
            kill_after=options.kill_after,
            record_args=options.record_args,
        )
    )
