"""``mcpmeter prices``: dated model and tool prices."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from mcpmeter.cli.options import DbOption

if TYPE_CHECKING:
    from mcpmeter.prices import ModelPrice, ToolPrice

FromOption = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="In force from this date/time (ISO, or a span back like 7d); default now. "
        "Earlier rows keep the price in force before it.",
    ),
]


def register(app: typer.Typer) -> None:
    prices = typer.Typer(
        name="prices",
        help="Model prices (USD per million tokens) and tool prices (USD per call, per KB), dated.",
        no_args_is_help=True,
    )
    set_ = typer.Typer(name="set", help="Add a dated model or tool price.", no_args_is_help=True)
    set_.command("model", help="A model's price per million input, output and cached tokens.")(set_model)
    set_.command("tool", help="A price per call (and per KB of response) of the tools a glob matches.")(
        set_tool
    )
    prices.add_typer(set_)
    prices.command("show", help="Every price row: the bundled defaults and yours, with their dates.")(show)
    prices.command(
        "import", help="Load model and tool prices from a JSON or CSV file, or the bundled defaults."
    )(import_)
    app.add_typer(prices)


def set_model(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The model, as the ledger names it.")],
    input: Annotated[float, typer.Option("--input", min=0, help="USD per million prompt tokens.")],
    output: Annotated[float, typer.Option("--output", min=0, help="USD per million completion tokens.")],
    cached: Annotated[
        float | None,
        typer.Option(
            "--cached", min=0, help="USD per million cached prompt tokens (default: the input price)."
        ),
    ] = None,
    effective_from: FromOption = None,
    db: DbOption = None,
) -> None:
    from mcpmeter.output.terminal import printable
    from mcpmeter.prices import ensure_bundled, set_model_price
    from mcpmeter.store import open_store, resolve_db
    from mcpmeter.timeparse import parse_when

    when = parse_when(effective_from) if effective_from else None
    store = open_store(resolve_db(db))
    try:
        ensure_bundled(store)
        price = set_model_price(store, model, input, output, cached, when)
    finally:
        store.close()
    sys.stderr.write(f"{printable(price.model)}: {_usd(price.input)} in, {_usd(price.output)} out per MTok")
    sys.stderr.write(f" from {price.effective_from}\n")


def set_tool(
    pattern: Annotated[
        str, typer.Argument(metavar="SERVER/TOOL-GLOB", help="e.g. 'github/*', '*/web_search'.")
    ],
    per_call: Annotated[float, typer.Option("--per-call", min=0, help="USD per call.")],
    per_kb: Annotated[float, typer.Option("--per-kb", min=0, help="USD per KB (1024 bytes) of reply.")] = 0.0,
    effective_from: FromOption = None,
    db: DbOption = None,
) -> None:
    from mcpmeter.output.terminal import printable
    from mcpmeter.prices import set_tool_price
    from mcpmeter.store import open_store, resolve_db
    from mcpmeter.timeparse import parse_when

    when = parse_when(effective_from) if effective_from else None
    store = open_store(resolve_db(db))
    try:
        price = set_tool_price(store, pattern, per_call, per_kb, when)
    finally:
        store.close()
    sys.stderr.write(f"{printable(price.pattern)}: {_usd(price.per_call)} a call")
    if price.per_kb:
        sys.stderr.write(f" + {_usd(price.per_kb)} per KB")
    sys.stderr.write(f" from {price.effective_from}\n")


def show(
    format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    db: DbOption = None,
) -> None:
    from mcpmeter.errors import UsageError
    from mcpmeter.output.files import writing_stdout
    from mcpmeter.prices import current_prices

    if format not in ("table", "json"):
        raise UsageError(f"unknown format {format!r}: use table or json")
    with writing_stdout():
        models, tools = current_prices(db)
        render_prices(models, tools, format, sys.stdout)


def import_(
    file: Annotated[
        Path | None, typer.Argument(metavar="[FILE]", help="A JSON or CSV price file.", show_default=False)
    ] = None,
    bundled: Annotated[
        bool, typer.Option("--bundled", help="Load the bundled default model prices (after an upgrade).")
    ] = False,
    db: DbOption = None,
) -> None:
    from mcpmeter.errors import UsageError
    from mcpmeter.prices import bundled_as_of, import_prices, load_bundled, read_price_file
    from mcpmeter.store import open_store, resolve_db

    if (file is None) == (not bundled):
        raise UsageError("prices import: give a FILE or --bundled (not both)")
    table = read_price_file(file) if file is not None else None
    store = open_store(resolve_db(db))
    try:
        if table is None:
            count = load_bundled(store)
            sys.stderr.write(f"loaded {count} bundled model prices (list prices of {bundled_as_of()})\n")
        else:
            models, tools = import_prices(store, table)
            sys.stderr.write(f"imported {models} model prices and {tools} tool prices from {file}\n")
    finally:
        store.close()


def _usd(value: float) -> str:
    return f"${value:g}"


def render_prices(models: list[ModelPrice], tools: list[ToolPrice], format: str, out: IO[str]) -> None:
    """``prices show``: two rich tables, or one JSON object in the import file's shape."""
    if format == "json":
        import json

        doc = {"models": [p.as_json() for p in models], "tools": [p.as_json() for p in tools]}
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from mcpmeter.output.terminal import printable
    from mcpmeter.prices import specificity

    def text(value: str) -> Text:  # a name from the store: no markup, control characters escaped
        return Text(printable(value))

    console = Console(file=out, width=max(100, Console(file=out).width))
    table = Table(title="Model prices (USD per million tokens)", title_justify="left")
    for name in ("model", "from", "input", "output", "cached", "source"):
        table.add_column(name, justify="right" if name in ("input", "output", "cached") else "left")
    for m in models:
        cached = "" if m.cached is None else f"{m.cached:g}"
        table.add_row(
            text(m.model), _day(m.effective_from), f"{m.input:g}", f"{m.output:g}", cached, text(m.source)
        )
    console.print(table)
    table = Table(title="Tool prices (USD)", title_justify="left")
    for name in ("pattern", "from", "per call", "per KB", "source"):
        table.add_column(name, justify="right" if name.startswith("per") else "left")
    for t in sorted(tools, key=lambda t: (specificity(t.pattern), t.effective_from)):
        table.add_row(
            text(t.pattern), _day(t.effective_from), f"{t.per_call:g}", f"{t.per_kb:g}", text(t.source)
        )
    if not tools:
        table.caption = "none set: mcpmeter prices set tool 'SERVER/TOOL-GLOB' --per-call USD"
    console.print(table)


def _day(iso: str) -> str:
    """``2026-11-01T00:00:00.000000Z`` -> ``2026-11-01``; other times to the second."""
    return iso[:10] if iso[10:] == "T00:00:00.000000Z" else iso[:19].replace("T", " ")
