"""``mcpmeter prices``: dated model and tool prices."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mcpmeter.cli.options import DbOption

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
    from mcpmeter.prices import render_prices

    if format not in ("table", "json"):
        raise UsageError(f"unknown format {format!r}: use table or json")
    with writing_stdout():
        render_prices(db, format, sys.stdout)


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
