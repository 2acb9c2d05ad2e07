"""``mcpmeter verify`` and ``mcpmeter store``: the audit log's integrity."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from mcpmeter.cli.options import DbOption, SinceOption

if TYPE_CHECKING:
    from mcpmeter.store.chain import Verdict
    from mcpmeter.store.integrity import Check

store_app = typer.Typer(help="Maintain the store: load spilled rows back.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command(
        help="Check the audit log's hash chain and its ids; report the first row that breaks it (exit 1)."
    )(verify)
    app.add_typer(store_app, name="store")


HeadOption = Annotated[
    str | None,
    typer.Option(
        "--head",
        metavar="ID:HASH",
        help="A checkpoint kept elsewhere (an earlier run's 'head ID HASH' line): fail unless row ID "
        "is still there with hash HASH, so rows deleted from the end are caught.",
    ),
]
RequireKeyOption = Annotated[
    bool,
    typer.Option(
        "--require-key",
        help="Fail on any row not keyed (HMAC); needs MCPMETER_CHAIN_KEY or MCPMETER_CHAIN_KEY_FILE.",
    ),
]


def verify(
    db: DbOption = None,
    since: SinceOption = None,
    head: HeadOption = None,
    require_key: RequireKeyOption = False,
) -> None:
    from mcpmeter.log import warn
    from mcpmeter.output.files import writing_stdout
    from mcpmeter.output.terminal import printable
    from mcpmeter.store import open_store, resolve_db
    from mcpmeter.store.integrity import Head, check_store
    from mcpmeter.timeparse import parse_when

    checkpoint = Head.parse(head) if head is not None else None
    store = open_store(resolve_db(db), create=False)
    try:
        check = check_store(
            store, parse_when(since) if since else None, require_key=require_key, head=checkpoint
        )
    finally:
        store.close()
    verdict = check.verdict
    if check.failed:  # the lines quote stored hashes: whatever a tamperer wrote, escaped for the terminal
        with writing_stdout():
            sys.stdout.write("".join(f"{printable(line)}\n" for line in _failures(check)))
        raise typer.Exit(1)
    if check.gaps.total:
        warn(
            f"{check.gaps.describe()}: on Postgres a rolled-back write leaves such a gap, so it is "
            "not a failure (a --head checkpoint catches rows deleted from the end)"
        )
    with writing_stdout():
        sys.stdout.write(_summary(verdict) + "\n")
    if verdict.last_id is not None and verdict.head is not None:
        # stderr: stdout keeps its one line (`ok: ...`) that scripts match
        sys.stderr.write(f"head {verdict.last_id} {printable(verdict.head)}\n")


def _failures(check: Check) -> list[str]:
    verdict = check.verdict
    lines = []
    if verdict.broken is not None:
        lines.append(
            f"broken at row {verdict.broken.id} ({verdict.rows} rows checked): {verdict.broken.reason}"
        )
    if check.head_problem is not None:
        lines.append(f"broken: {check.head_problem}")
    if check.gaps_fail and check.gaps.total:
        lines.append(
            f"broken: {check.gaps.describe()}: SQLite never skips or reuses an id, so these rows were deleted"
        )
    return lines


def _summary(verdict: Verdict) -> str:
    """The ``ok: ...`` line: what was checked, and how."""
    span = f" (ids {verdict.first_id}..{verdict.last_id})" if verdict.rows else ""
    line = f"ok: {verdict.rows} rows{span}"
    keyed = f"ids {verdict.first_keyed_id}..{verdict.last_id}"
    plain = verdict.rows - verdict.keyed
    if verdict.unchecked:
        before = f"; the {plain} rows before them are intact" if plain else ""
        return (
            f"{line}: {verdict.unchecked} keyed rows ({keyed}) not checked, no key "
            f"(set MCPMETER_CHAIN_KEY or MCPMETER_CHAIN_KEY_FILE){before}"
        )
    line += ", hash chain intact"
    if not verdict.keyed:
        return line
    if not plain:
        return f"{line}, every row keyed (HMAC-SHA256, checked with the key)"
    return (
        f"{line}; {keyed} keyed (HMAC-SHA256, checked with the key), the {plain} rows before them "
        "written before keying started (SHA-256 only)"
    )


@store_app.command(
    help="Load rows spilled while the store could not take them back into it (exactly once); "
    "lines that fail their integrity check are moved to a .rejected file and named on stderr."
)
def recover(
    db: DbOption = None,
    accept_unsigned: Annotated[
        bool,
        typer.Option(
            "--accept-unsigned",
            help="Also load spill lines without an integrity check (written by an older mcpmeter, "
            "or rejected for that reason): only once you have looked at them.",
        ),
    ] = False,
) -> None:
    from mcpmeter.output.files import writing_stdout
    from mcpmeter.store import open_store, resolve_db
    from mcpmeter.store.spill import recover_spill

    store = open_store(resolve_db(db))
    try:
        added = recover_spill(store, accept_unsigned=accept_unsigned)
    finally:
        store.close()
    with writing_stdout():
        sys.stdout.write(f"recovered {added} rows\n")
