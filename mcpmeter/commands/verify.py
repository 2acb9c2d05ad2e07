"""``mcpmeter verify`` and ``mcpmeter store``: the audit log's integrity."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Not available yet."""
