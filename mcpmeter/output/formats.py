"""``--format``: one option for every read command, checked in one place.

Each command names the formats it can write (``("table", "json", "csv")`` for ``report``,
``("jsonl", "csv", "parquet", "otlp")`` for ``export``, ...) and declares its option with
:func:`format_option`; the value is checked while the command line is parsed, before any
store is opened, so an unknown format is always the same one line and exit 2:
``mcpmeter: unknown format 'xml': use one of table, json, csv``. The check is exact: formats
are lower case and ``JSONL`` is not ``jsonl``.

The writers of each format live beside this module: :mod:`mcpmeter.output.json` (through
orjson, the one JSON library of every output), :mod:`mcpmeter.output.csv` (escaped against
spreadsheet formulas) and :mod:`mcpmeter.output.table` (aligned text and rich tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer

from mcpmeter.errors import UsageError

#: The formats of a command that prints a human table, or the same rows as data.
TABLE_JSON_CSV = ("table", "json", "csv")
#: The formats of a command that prints a human table, or the same document as JSON.
TABLE_JSON = ("table", "json")


def check_format(value: str, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``; else a :class:`UsageError` naming them all."""
    if value not in choices:
        raise UsageError(f"unknown format {value!r}: use one of {', '.join(choices)}")
    return value


def describe(choices: Sequence[str]) -> str:
    """``table, json or csv``: the choices as the option's help names them."""
    if len(choices) == 1:
        return choices[0]
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


def format_option(choices: Sequence[str], help: str | None = None) -> Any:
    """The ``--format`` option of a command writing one of ``choices``, for ``Annotated``.

    ``help`` defaults to the choices (``table, json or csv.``). A value of ``None`` (an
    option without a default) is left for the command to decide.
    """
    allowed = tuple(choices)

    def checked(value: str | None) -> str | None:
        return None if value is None else check_format(value, allowed)

    return typer.Option("--format", help=help or f"{describe(allowed)}.", callback=checked)
