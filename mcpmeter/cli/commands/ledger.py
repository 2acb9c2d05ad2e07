"""``mcpmeter ledger``: the LLM side of the join."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mcpmeter.cli.options import DbOption

#: The ``ledger add`` flag of each ledger field, to name it in an error.
_FLAGS = {
    "request_id": "--request-id",
    "model": "--model",
    "prompt_tokens": "--prompt-tokens",
    "completion_tokens": "--completion-tokens",
    "cached_tokens": "--cached-tokens",
    "agent_id": "--agent",
    "project_id": "--project",
    "ts": "--ts",
    "source": "--source",
}


def register(app: typer.Typer) -> None:
    ledger = typer.Typer(
        name="ledger",
        help="The LLM side of the join: one row per LLM call, keyed by request_id.",
        no_args_is_help=True,
    )
    ledger.command("add", help="Add one LLM call to the ledger (idempotent on source + request id).")(add)
    ledger.command(
        "import",
        help="Import LLM calls from a file: ledger JSON lines or CSV, LiteLLM spend logs, "
        "OpenAI or Anthropic responses (one JSON object a line). Idempotent, streamed.",
    )(import_)
    app.add_typer(ledger)


def add(
    request_id: Annotated[
        str, typer.Option("--request-id", help="The LLM call's id: the join key stamped on tool calls.")
    ],
    model: Annotated[str, typer.Option("--model", help="The model, as the provider names it.")],
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", min=0, help="The whole prompt, cached part included.")
    ],
    completion_tokens: Annotated[int, typer.Option("--completion-tokens", min=0, help="Output tokens.")],
    cached_tokens: Annotated[
        int, typer.Option("--cached-tokens", min=0, help="The part of the prompt read from the cache.")
    ] = 0,
    agent: Annotated[str | None, typer.Option("--agent", help="Agent name. Env: MCPMETER_AGENT_ID.")] = None,
    project: Annotated[
        str | None, typer.Option("--project", help="Project or customer. Env: MCPMETER_PROJECT_ID.")
    ] = None,
    ts: Annotated[
        str | None,
        typer.Option(
            "--ts",
            help="When the call was made: ISO time (1970 to 9999, UTC if no zone) or a span back"
            " (default now).",
        ),
    ] = None,
    source: Annotated[
        str, typer.Option("--source", help="Where the row comes from; unique with the request id.")
    ] = "manual",
    db: DbOption = None,
) -> None:
    from mcpmeter.errors import UsageError
    from mcpmeter.ledger import BadRow, Ledger
    from mcpmeter.timeparse import parse_when

    when = parse_when(ts) if ts else None
    with Ledger(db) as ledger:
        try:
            added = ledger.record(
                request_id=request_id,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached_tokens,
                agent_id=agent,
                project_id=project,
                ts=when,
                source=source,
            )
        except BadRow as exc:  # a value the ledger refuses (a count past MAX_TOKENS, ...): exit 2
            flag = _FLAGS.get(exc.field or "", exc.field or "")
            raise UsageError(f"{flag}: {exc.problem}" if flag else exc.problem) from None
    from mcpmeter.output.terminal import printable

    call = printable(f"{request_id} ({source})")
    if added:
        sys.stderr.write(f"added {call}\n")
    else:
        sys.stderr.write(f"{call} is already in the ledger: nothing added\n")


def import_(
    file: Annotated[str, typer.Argument(metavar="FILE", help="The file to import, or - for stdin.")],
    format: Annotated[
        str, typer.Option("--format", help="auto, jsonl, csv, litellm, openai or anthropic.")
    ] = "auto",
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first bad row (exit 1) instead of skipping it.")
    ] = False,
    source: Annotated[
        str | None,
        typer.Option("--source", help="The source of every row (default: the format's name)."),
    ] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="The agent of every row.")] = None,
    project: Annotated[str | None, typer.Option("--project", help="The project of every row.")] = None,
    db: DbOption = None,
) -> None:
    from mcpmeter.errors import UsageError
    from mcpmeter.ledger import FORMATS, import_file
    from mcpmeter.prices import ensure_bundled
    from mcpmeter.store import open_store, resolve_db

    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    store = open_store(resolve_db(db))
    try:
        ensure_bundled(store)
        result = import_file(
            store, file, format=format, strict=strict, source=source, agent_id=agent, project_id=project
        )
    finally:
        store.close()
    sys.stderr.write(result.summary() + "\n")
