"""``mcpmeter budget``: caps per project, agent or session."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Not available yet."""
