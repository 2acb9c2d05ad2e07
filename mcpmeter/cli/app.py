"""The command line: one thin function per command; the work lives in the modules.

Modules are imported inside the commands so ``wrap`` starts fast and pays only for what
it uses.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mcpmeter",
    help="A metering proxy for MCP servers: who called which tool, how long, how many bytes, at what cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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
    """Parsed by :mod:`mcpmeter.cli.wrap` (``mcpmeter.__main__`` goes there directly)."""
    from mcpmeter.cli.wrap import main

    raise typer.Exit(main(list(ctx.args)))


def _register_commands() -> None:
    """Each command group lives in its own module under :mod:`mcpmeter.cli.commands`."""
    from mcpmeter.cli.commands import COMMAND_MODULES

    for module in COMMAND_MODULES:
        module.register(app)


_register_commands()
