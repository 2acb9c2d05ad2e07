"""``mcpmeter export``: audit rows out to a file, stdout or an OTLP collector."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpmeter.cli.options import (
    AgentFilter,
    DbOption,
    ProjectFilter,
    SessionFilter,
    SinceOption,
    StatusFilter,
    ToolFilter,
    UntilOption,
    call_filter,
)
from mcpmeter.errors import UsageError
from mcpmeter.output.formats import format_option

if TYPE_CHECKING:
    from mcpmeter.exporters.otel import OtlpConfig

#: What ``--format`` accepts: jsonl and csv (:mod:`mcpmeter.exporters.text`), parquet
#: (:mod:`mcpmeter.exporters.parquet`), otlp (:func:`mcpmeter.exporters.otel.replay`).
EXPORT_FORMATS = ("jsonl", "csv", "parquet", "otlp")


def register(app: typer.Typer) -> None:
    app.command(
        help="Write audit rows out as JSON lines, CSV or Parquet (every column, in order), streamed; "
        "or replay them to an OTLP collector as spans (--format otlp)."
    )(export)


def export(
    db: DbOption = None,
    format: Annotated[
        str,
        format_option(
            EXPORT_FORMATS, help="jsonl, csv, parquet (needs -o FILE) or otlp (needs an endpoint)."
        ),
    ] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to FILE instead of stdout.")
    ] = None,
    since: SinceOption = None,
    until: UntilOption = None,
    project: ProjectFilter = None,
    agent: AgentFilter = None,
    session: SessionFilter = None,
    tool: ToolFilter = None,
    status: StatusFilter = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            metavar="URL",
            help="With --format otlp: the collector's OTLP/HTTP base URL. Env: OTEL_EXPORTER_OTLP_ENDPOINT.",
        ),
    ] = None,
) -> None:
    from mcpmeter.exporters.text import write_csv, write_jsonl
    from mcpmeter.output.files import atomic_output, guard_output, writing_stdout
    from mcpmeter.store import open_store, resolve_db

    if format == "parquet" and output is None:
        raise UsageError("--format parquet needs -o FILE")
    if endpoint is not None and format != "otlp":
        raise UsageError("--endpoint goes with --format otlp")
    otlp = _otlp_config(endpoint) if format == "otlp" else None
    where = call_filter(since, until, project, agent, session, tool, status)
    location = resolve_db(db)
    if output is not None:
        guard_output(output, location)  # before the store is opened: -o must never overwrite it
    store = open_store(location, create=False)
    rows: Iterator[tuple[Any, ...]] = iter(())
    try:
        rows = store.iter_calls(where)
        if otlp is not None:
            _replay(rows, otlp)
            return
        if format == "parquet" and output is not None:
            from mcpmeter.exporters.parquet import write_parquet

            with atomic_output(output) as out:
                write_parquet(rows, out)
            return
        write = write_jsonl if format == "jsonl" else write_csv
        if output is None:
            with writing_stdout():
                write(rows, sys.stdout.buffer)
        else:
            with atomic_output(output) as out:
                write(rows, out)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:  # a write that failed midway left the cursor open: close it first
            close()
        store.close()


def _otlp_config(endpoint: str | None) -> OtlpConfig:
    import os

    from mcpmeter.exporters.otel import config_from

    config = config_from(endpoint, os.environ, source="--endpoint")
    if config is None:
        raise UsageError(
            "--format otlp needs --endpoint URL (or OTEL_EXPORTER_OTLP_ENDPOINT / "
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"
        )
    return config


def _replay(rows: Iterable[tuple[Any, ...]], config: OtlpConfig) -> None:
    from mcpmeter.exporters.otel import replay

    result = replay(rows, config)
    parts = []
    if config.traces_url is not None:
        parts.append(f"{result.spans} spans to {config.traces_url}")
    if config.metrics_url is not None:
        parts.append(f"{result.series} histogram series to {config.metrics_url}")
    sys.stderr.write(f"sent {' and '.join(parts)}\n")
