"""The README documents every command and every option users can type."""

from __future__ import annotations

import re

import pytest
import typer
from conftest import ROOT

from mcpmeter.cli.app import app
from mcpmeter.cli.wrap import build_parser
from mcpmeter.record import COLUMNS, STATUSES

README = (ROOT / "README.md").read_text()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_section_in_the_readme(name: str) -> None:
    assert re.search(rf"^### `mcpmeter {name}\b", README, re.MULTILINE), f"README lacks a section for {name}"


WRAP_OPTIONS = [("wrap", opt) for action in build_parser()._actions for opt in action.option_strings]
TYPER_OPTIONS = [
    (name, opt)
    for name, command in sorted(COMMANDS.items())
    for param in command.params
    for opt in param.opts
    if opt.startswith("--")
]


@pytest.mark.parametrize(
    ("command", "option"),
    [(c, o) for c, o in WRAP_OPTIONS + TYPER_OPTIONS if o.startswith("--") and o != "--help"],
)
def test_every_option_is_mentioned_in_the_readme(command: str, option: str) -> None:
    mentioned = re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", README)
    assert mentioned, f"README does not mention {command} {option}"


def test_the_changelog_has_an_unreleased_section() -> None:
    assert "## Unreleased" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("column", COLUMNS)
def test_every_audit_column_is_in_the_readme_table(column: str) -> None:
    assert re.search(rf"^\| [^|]*`{column}`", README.split("## The audit row", 1)[1], re.MULTILINE), column


@pytest.mark.parametrize("status", STATUSES)
def test_every_status_is_documented_in_the_readme_table(status: str) -> None:
    rows = [
        line for line in README.split("## The audit row", 1)[1].splitlines() if line.startswith("| `status`")
    ]
    assert rows and f"`{status}`" in rows[0], status
