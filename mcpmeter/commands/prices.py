"""``mcpmeter prices``: dated model and tool prices."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Not available yet."""
