"""``mcpmeter ledger``: the LLM side of the join."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Not available yet."""
