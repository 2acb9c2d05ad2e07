"""``mcpmeter verify`` and ``mcpmeter store``: the audit log's integrity."""

from __future__ import annotations

import sys

import typer

from mcpmeter.commands.options import DbOption, SinceOption

store_app = typer.Typer(help="Maintain the store: load spilled rows back.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command(help="Check the audit log's hash chain; report the first row that breaks it (exit 1).")(
        verify
    )
    app.add_typer(store_app, name="store")


def verify(db: DbOption = None, since: SinceOption = None) -> None:
    from mcpmeter.integrity import verify_store
    from mcpmeter.store import open_store, resolve_db
    from mcpmeter.timeparse import parse_when

    store = open_store(resolve_db(db), create=False)
    try:
        verdict = verify_store(store, parse_when(since) if since else None)
    finally:
        store.close()
    if verdict.broken is not None:
        sys.stdout.write(
            f"broken at row {verdict.broken.id} ({verdict.rows} rows checked): {verdict.broken.reason}\n"
        )
        raise typer.Exit(1)
    span = f" (ids {verdict.first_id}..{verdict.last_id})" if verdict.rows else ""
    sys.stdout.write(f"ok: {verdict.rows} rows{span}, hash chain intact\n")


@store_app.command(help="Load rows spilled beside the store back into it (idempotent).")
def recover(db: DbOption = None) -> None:
    from mcpmeter.meters.audit import recover_spill, spill_path_for
    from mcpmeter.store import open_store, resolve_db

    location = resolve_db(db)
    spill = spill_path_for(location)
    store = open_store(location)
    try:
        added = recover_spill(store, spill) if spill is not None else 0
    finally:
        store.close()
    sys.stdout.write(f"recovered {added} rows\n")
