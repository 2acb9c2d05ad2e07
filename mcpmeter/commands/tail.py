"""``mcpmeter tail``: the live view."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Not available yet."""
