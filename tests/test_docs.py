"""The README documents every command and every option users can type, and pyproject.toml
declares every package mcpmeter imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from conftest import ROOT

from mcpmeter.cli.app import app
from mcpmeter.cli.wrap import build_parser
from mcpmeter.record import COLUMNS, STATUSES

README = (ROOT / "README.md").read_text()
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
PACKAGE = ROOT / "mcpmeter"


# -- commands and their options -------------------------------------------------------------------


def leaf_commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Every command a user can run, as ``("budget set", command)``; a group that runs on its
    own (``report``) counts as one too, with its own options. (Typer's commands are click's,
    from the copy of click typer carries: they are told apart by their ``commands``.)"""
    subcommands: dict[str, Any] | None = getattr(group, "commands", None)
    if path and (subcommands is None or group.invoke_without_command):
        yield " ".join(path), group
    for name, command in sorted((subcommands or {}).items()):
        yield from leaf_commands(command, (*path, name))


def long_options(command: Any) -> list[str]:
    return [
        opt
        for param in command.params
        for opt in (*param.opts, *param.secondary_opts)
        if opt.startswith("--") and opt != "--help"
    ]


RUNNABLE = dict(leaf_commands(typer.main.get_command(app)))
WRAP_OPTIONS = [
    opt for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--")
]
OPTIONS = [("wrap", opt) for opt in WRAP_OPTIONS if opt != "--help"] + [
    (name, opt) for name, command in RUNNABLE.items() if name != "wrap" for opt in long_options(command)
]


def section(name: str) -> str:
    """The README section of command ``name``: from the most specific ``### `mcpmeter ...```
    heading that names it (``store recover``; ``budget`` for ``budget set``) to the next
    ``###`` or ``##`` heading; its ``####`` subsections are part of it."""
    words = name.split()
    for n in range(len(words), 0, -1):
        heading = re.search(rf"^### `mcpmeter {re.escape(' '.join(words[:n]))}\b.*$", README, re.MULTILINE)
        if heading:
            end = re.search(r"^##(#)? ", README[heading.end() :], re.MULTILINE)
            return README[heading.start() : heading.end() + (end.start() if end else len(README))]
    raise AssertionError(f"README lacks a section for {name}")


def mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_section_in_the_readme(name: str) -> None:
    assert re.search(rf"^### `mcpmeter {name}\b", README, re.MULTILINE), f"README lacks a section for {name}"


def test_the_walk_reaches_every_subcommand() -> None:
    assert {"budget set", "budget show", "budget reset", "ledger add", "ledger import"} <= set(RUNNABLE)
    assert {"prices set model", "prices set tool", "prices show", "prices import"} <= set(RUNNABLE)
    assert {"report", "report invocations", "store recover", "export", "tail", "verify"} <= set(RUNNABLE)
    assert {"--budget", "--listen", "--url", "--otlp-endpoint"} <= set(WRAP_OPTIONS)


@pytest.mark.parametrize("name", sorted(n for n in RUNNABLE if " " in n))
def test_every_subcommand_is_shown_in_its_commands_section(name: str) -> None:
    assert f"mcpmeter {name}" in section(name), f"the README section of {name} does not show it"


@pytest.mark.parametrize(("command", "option"), OPTIONS)
def test_every_option_is_mentioned_in_its_commands_section(command: str, option: str) -> None:
    assert mentions(section(command), option), f"the README section of {command} does not mention {option}"


# -- the audit row --------------------------------------------------------------------------------


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


# -- declared dependencies ------------------------------------------------------------------------


def module_name(path: object) -> str:
    relative = str(path).removeprefix(str(ROOT) + "/").removesuffix(".py").removesuffix("/__init__")
    return relative.replace("/", ".")


def imports(tree: ast.AST) -> Iterator[tuple[str, bool]]:
    """``(module, optional)`` for each import in ``tree``: optional when it sits in a ``try``
    that handles its ``ImportError`` (the code then says which extra to install)."""

    def visit(node: ast.AST, optional: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.Import):
            yield from ((alias.name, optional) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, optional
            yield from ((f"{node.module}.{alias.name}", optional) for alias in node.names)
        elif isinstance(node, ast.Try) and any(
            "ImportError" in ast.unparse(h.type) for h in node.handlers if h.type is not None
        ):
            for statement in node.body:
                yield from visit(statement, True)
            for part in (*node.handlers, *node.orelse, *node.finalbody):
                yield from visit(part, optional)
        else:
            for child in ast.iter_child_nodes(node):
                yield from visit(child, optional)

    yield from visit(tree, False)


def third_party_imports() -> dict[str, bool]:
    """Each third-party top-level module mcpmeter imports, and whether it is optional: every
    import of it handles its absence, or sits in a mcpmeter module whose every import does
    (the Postgres store, imported only where a missing psycopg becomes an error message)."""
    uses: dict[str, list[tuple[str, bool]]] = {}  # imported module -> (importer, optional)
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for name, optional in imports(ast.parse(path.read_text(), str(path))):
            uses.setdefault(name if name.startswith("mcpmeter.") else name.split(".")[0], []).append(
                (importer, optional)
            )
    optional_modules: set[str] = set()
    while True:
        more = {
            name
            for name, by in uses.items()
            if name.startswith("mcpmeter.") and all(o or importer in optional_modules for importer, o in by)
        }
        if more <= optional_modules:
            break
        optional_modules |= more
    return {
        top: all(optional or importer in optional_modules for importer, optional in by)
        for top, by in uses.items()
        if top != "mcpmeter"
        and not top.startswith("mcpmeter.")
        and top not in sys.stdlib_module_names
        and top != "__future__"
    }


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group()) for req in requirements}  # type: ignore[union-attr]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEPENDENCIES = requirement_names(PROJECT["dependencies"])
EXTRAS = requirement_names(
    [req for extra, reqs in PROJECT["optional-dependencies"].items() if extra != "dev" for req in reqs]
)
THIRD_PARTY = third_party_imports()


def test_the_import_walk_sees_the_packages_mcpmeter_is_built_on() -> None:
    assert {"typer", "rich", "orjson", "msgspec", "uvicorn", "h11", "anyio", "httpx"} <= set(THIRD_PARTY)
    assert {top for top, optional in THIRD_PARTY.items() if optional} == {"psycopg", "pyarrow"}


@pytest.mark.parametrize("top", sorted(THIRD_PARTY))
def test_every_imported_package_is_declared_in_pyproject(top: str) -> None:
    distributions = importlib.metadata.packages_distributions().get(top)
    assert distributions, f"{top} is imported by mcpmeter but no installed distribution provides it"
    optional = THIRD_PARTY[top]
    declared = DEPENDENCIES | EXTRAS if optional else DEPENDENCIES
    assert {normalized(d) for d in distributions} & declared, (
        f"mcpmeter imports {top} ({', '.join(distributions)}) but pyproject.toml does not declare it"
        + (" in its dependencies or a non-dev extra" if optional else " in its dependencies")
    )
