"""The command line of ``mcpmeter wrap``.

``wrap`` is parsed with :mod:`argparse`, not typer, for two reasons: its argv is special
(options up to the first non-option word, then the server command with *its* options,
with or without ``--``), and it must start fast, since a client waits for the server's
first answer. This module imports nothing heavy until the options are known.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, NoReturn

from mcpmeter.errors import UsageError

if TYPE_CHECKING:
    from mcpmeter.exporters.otel import OtlpConfig
    from mcpmeter.metering.budget import Budget
    from mcpmeter.metering.tags import Tenant
    from mcpmeter.proxy.listen.limits import ListenLimits
    from mcpmeter.proxy.runtime import Runtime

DESCRIPTION = (
    "Run a stdio MCP server and relay its JSON-RPC frames unchanged, recording one audit row "
    "per request. The -- may be left out when CMD does not start with -. With --url the "
    "server is remote (streamable HTTP or HTTP+SSE); with --listen clients reach it over HTTP."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"wrap: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mcpmeter wrap",
        usage=(
            "mcpmeter wrap [OPTIONS] -- CMD [ARGS...]\n"
            "       mcpmeter wrap [OPTIONS] --url URL\n"
            "       mcpmeter wrap [OPTIONS] --listen HOST:PORT (-- CMD [ARGS...] | --url URL)"
        ),
        description=DESCRIPTION,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--db", help="the store: a SQLite path (default $XDG_DATA_HOME/mcpmeter/audit.db); env MCPMETER_DB")
    add("--project", help="project, customer or tenant; env MCPMETER_PROJECT_ID")
    add("--agent", help="agent name; env MCPMETER_AGENT_ID (or MCPMETER_AGENT_NAME)")
    add("--session", help="session id (default: a new UUID per process); env MCPMETER_SESSION_ID")
    add(
        "--tag",
        action="append",
        default=[],
        metavar="K=V",
        help="a free dimension (repeatable); env MCPMETER_TAGS=k=v,k2=v2",
    )
    add(
        "--kill-after",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="grace between a forwarded SIGTERM/SIGINT and SIGKILL (default 5)",
    )
    add(
        "--record-args",
        action="store_true",
        help="also store a redacted copy of tool arguments (secrets masked; off by default)",
    )
    add(
        "--otlp-endpoint",
        metavar="URL",
        help="also send a span per request and the mcp.client.operation.duration histogram to this "
        "OTLP/HTTP collector (e.g. http://localhost:4318); env OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    _add_budget_options(parser)
    add("--url", help="a remote MCP server (streamable HTTP or HTTP+SSE) instead of CMD")
    add(
        "--transport",
        choices=("auto", "streamable-http", "sse"),
        default="auto",
        help="how to reach --url: auto (default: streamable HTTP, HTTP+SSE on a 4xx), streamable-http, sse",
    )
    add(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an HTTP header for --url (repeatable); ${VAR} is replaced by the env var VAR",
    )
    add(
        "--listen",
        metavar="HOST:PORT",
        help="serve clients over HTTP: streamable HTTP at /mcp, HTTP+SSE at /sse (host default 127.0.0.1)",
    )
    add(
        "--shared-server",
        action="store_true",
        help="with --listen -- CMD: one server process for every session (ids rewritten), not one each",
    )
    add(
        "--trust-tag-headers",
        action="store_true",
        help="with --listen: X-MCPMeter-Project/-Agent/-Session request headers override the tags",
    )
    add(
        "--auth-token",
        metavar="TOKEN",
        help="with --listen: require Authorization: Bearer TOKEN (needed off loopback); "
        "env MCPMETER_AUTH_TOKEN",
    )
    add(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="with --listen: a browser Origin to accept besides localhost (repeatable)",
    )
    add(
        "--batch-timeout",
        type=float,
        metavar="SECONDS",
        help="with --listen: how long a batch's requests wait for the server before mcpmeter "
        "answers them with an error (default 60)",
    )
    _add_listen_limits(parser)
    add("cmd", nargs=argparse.REMAINDER, metavar="CMD [ARGS...]", help="the server command")
    return parser


#: The ``--listen`` limit flags: (flag, ListenLimits field, type, metavar, help). Defaults
#: are ListenLimits's own; the flags default to None so that giving one without --listen is
#: refused.
_LIMIT_FLAGS: tuple[tuple[str, str, type, str, str], ...] = (
    (
        "--max-connections",
        "max_connections",
        int,
        "N",
        "open connections (default 4096, fewer if the open-file limit has no room); one more gets 503",
    ),
    ("--max-sessions", "max_sessions", int, "N", "live sessions (default 1000); one more gets 503"),
    (
        "--max-servers",
        "max_servers",
        int,
        "N",
        "server processes when each session has its own (default 100); one more session gets 503",
    ),
    (
        "--session-rate",
        "session_rate",
        float,
        "PER_SECOND",
        "new sessions per second per client address (default 10; 0: no limit); past it 429",
    ),
    (
        "--session-burst",
        "session_burst",
        int,
        "N",
        "new sessions one client address may open at once before --session-rate applies (default 100)",
    ),
    (
        "--max-body",
        "max_body",
        str,
        "SIZE",
        "bytes of one request body, e.g. 64MiB (default 256MiB); past it 413",
    ),
    (
        "--header-timeout",
        "header_timeout",
        float,
        "SECONDS",
        "a request head not complete in this long is closed (default 10)",
    ),
    (
        "--idle-timeout",
        "idle_timeout",
        float,
        "SECONDS",
        "a connection on which mcpmeter waits for the client and no byte moves for this long "
        "is closed (default 60)",
    ),
    (
        "--evict-idle",
        "evict_idle",
        float,
        "SECONDS",
        "at --max-sessions or --max-servers, close the least recently used session idle this "
        "long to make room (default 60; 0: never)",
    ),
)


def _add_listen_limits(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--listen limits (each client, and all of them)")
    for flag, _, kind, metavar, text in _LIMIT_FLAGS:
        group.add_argument(flag, type=kind, metavar=metavar, help=text)


def _listen_limits(options: argparse.Namespace) -> ListenLimits:
    """The limits given, checked, over the defaults of ListenLimits."""
    from mcpmeter.proxy.listen.limits import ListenLimits, parse_size

    given: dict[str, float | int] = {}
    for flag, field, _, _, _ in _LIMIT_FLAGS:
        value = getattr(options, field)
        if value is None:
            continue
        if field == "max_body":
            value = parse_size(value)
        positive = field not in ("session_rate", "evict_idle")
        if not (value > 0 if positive else value >= 0) or value == float("inf"):
            more = "a positive number" if positive else "zero or more"
            raise UsageError(f"wrap: {flag} must be {more}")
        given[field] = value
    return ListenLimits(**given)  # type: ignore[arg-type]


def _add_budget_options(parser: argparse.ArgumentParser) -> None:
    budgets = parser.add_argument_group("budgets (see also: mcpmeter budget set)")
    add = budgets.add_argument
    add("--budget", type=float, metavar="USD", help="refuse tool calls once this many dollars are spent")
    add(
        "--budget-scope",
        choices=("project", "agent", "session"),
        default="session",
        help="whose spend --budget/--max-calls cap (default session)",
    )
    add(
        "--budget-window",
        choices=("day", "month", "total"),
        default="total",
        help="the window the cap applies to, in UTC (default total)",
    )
    add("--max-calls", type=int, metavar="N", help="refuse tool calls after N in the window")
    add(
        "--budget-includes-llm",
        action="store_true",
        help="LLM spend from the ledger (same scope and window) counts against --budget too",
    )
    add(
        "--warn-at", type=float, default=0.8, metavar="FRACTION", help="warn at this share used (default 0.8)"
    )
    add(
        "--alert-webhook", metavar="URL", help="POST budget warnings here (JSON with a Slack-compatible text)"
    )
    add(
        "--reject-as",
        choices=("tool-error", "jsonrpc-error"),
        default="tool-error",
        help="answer a refused call with an isError result (default) or a JSON-RPC error -31402",
    )
    add("--max-repeat", type=int, metavar="N", help="refuse the N+1th identical tools/call of a session")


def _budgets(options: argparse.Namespace, tenant: Tenant) -> tuple[Budget, ...]:
    from mcpmeter.metering.budget import Budget, subject_of

    if options.budget is None and options.max_calls is None:
        return ()
    subject = subject_of(options.budget_scope, tenant)
    if subject is None:
        flag = "--project" if options.budget_scope == "project" else "--agent"
        raise UsageError(f"wrap: --budget-scope {options.budget_scope} needs {flag} (or its env var)")
    return (
        Budget(
            options.budget_scope,
            subject,
            options.budget_window,
            options.budget,
            options.max_calls,
            options.budget_includes_llm,
            options.warn_at,
        ),
    )


def _check_budget_options(options: argparse.Namespace) -> None:
    from mcpmeter.metering.budget import count_problem, usd_problem

    problem = (
        usd_problem(options.budget, "--budget")
        or count_problem(options.max_calls, "--max-calls")
        or count_problem(options.max_repeat, "--max-repeat")
    )
    if problem is not None:
        raise UsageError(f"wrap: {problem}")
    if not 0 < options.warn_at <= 1:
        raise UsageError("wrap: --warn-at is a fraction between 0 and 1")


def main(args: list[str]) -> int:
    """Parse ``args`` (what follows ``wrap``), run the relay, return the exit code."""
    options = build_parser().parse_args(args)
    from mcpmeter.proxy.fdlimit import raise_fd_limit

    raise_fd_limit()  # connections, pipes and store files: the usual 1,024 is soon reached
    cmd: list[str] = list(options.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    _check(options, cmd)
    _check_budget_options(options)
    otlp = _otlp_config(options.otlp_endpoint)

    from mcpmeter.metering.tags import resolve_tenant

    tenant = resolve_tenant(
        project=options.project, agent=options.agent, session=options.session, tags=options.tag
    )
    # The composition root: what every mode shares, built once (no thread starts yet).
    from mcpmeter.proxy.runtime import GateSettings, Runtime

    runtime = Runtime(
        options.db, otlp=otlp, alert_webhook=options.alert_webhook, record_args=options.record_args
    )
    if options.listen is not None:
        return _listen(options, cmd, tenant, runtime)
    gates = GateSettings(_budgets(options, tenant), options.max_repeat, options.reject_as)
    if options.url is not None:
        from mcpmeter.proxy.http_upstream import parse_headers
        from mcpmeter.proxy.url import UrlOptions, run_url

        headers = parse_headers(options.header)
        return run_url(UrlOptions(options.url, tenant, options.transport, headers, gates), runtime)

    from mcpmeter.proxy.stdio import WrapOptions, run_wrap

    return run_wrap(WrapOptions(cmd, tenant, options.kill_after, gates), runtime)


_OTLP_ENDPOINT_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


def _otlp_config(endpoint: str | None) -> OtlpConfig | None:
    """Where to export spans and metrics, when the flag or the standard env vars ask for it.

    Without either, nothing of it is imported. A bad URL in the flag is a usage error; in the
    env vars (perhaps meant for another program) it is one warning, and no export.
    """
    import os

    if endpoint is None and not any(os.environ.get(name) for name in _OTLP_ENDPOINT_VARS):
        return None
    from mcpmeter.exporters.otel import config_from

    try:
        config = config_from(endpoint, os.environ, source="wrap: --otlp-endpoint")
    except UsageError as exc:
        if endpoint is not None:
            raise
        from mcpmeter.log import warn

        warn(f"{exc}; not exporting to OTLP")
        return None
    return config


def _check(options: argparse.Namespace, cmd: list[str]) -> None:
    if not 0 <= options.kill_after < float("inf"):  # NaN fails the comparison too
        raise UsageError("wrap: --kill-after must be zero or more seconds")
    if options.url is not None and cmd:
        raise UsageError("wrap: give either --url or a server command, not both")
    if options.url is not None and not options.url.lower().startswith(("http://", "https://")):
        raise UsageError(f"wrap: --url must be an http:// or https:// URL, got {options.url!r}")
    if not cmd and options.url is None:
        raise UsageError(
            "wrap needs a server command: mcpmeter wrap [OPTIONS] -- CMD [ARGS...] (or --url URL)"
        )
    if options.url is None and (options.header or options.transport != "auto"):
        raise UsageError("wrap: --header and --transport go with --url")
    if options.listen is None:
        listen_only = {
            "--shared-server": options.shared_server,
            "--trust-tag-headers": options.trust_tag_headers,
            "--auth-token": options.auth_token is not None,
            "--allow-origin": bool(options.allow_origin),
            "--batch-timeout": options.batch_timeout is not None,
            **{flag: getattr(options, field) is not None for flag, field, _, _, _ in _LIMIT_FLAGS},
        }
        given = [name for name, value in listen_only.items() if value]
        if given:
            raise UsageError(f"wrap: {given[0]} goes with --listen")
    if options.shared_server and options.url is not None:
        raise UsageError("wrap: --shared-server goes with a server command, not --url")
    if options.batch_timeout is not None and not 0 < options.batch_timeout < float("inf"):
        raise UsageError("wrap: --batch-timeout must be a positive number of seconds")


def _listen(options: argparse.Namespace, cmd: list[str], tenant: Tenant, runtime: Runtime) -> int:
    import os

    from mcpmeter.proxy.http_upstream import parse_headers
    from mcpmeter.proxy.listen.options import BATCH_TIMEOUT_S, ListenOptions, parse_listen
    from mcpmeter.proxy.listen.serve import run_listen

    host, port = parse_listen(options.listen)
    return run_listen(
        ListenOptions(
            host=host,
            port=port,
            tenant=tenant,
            fixed_session=bool(options.session or os.environ.get("MCPMETER_SESSION_ID")),
            argv=cmd or None,
            url=options.url,
            transport=options.transport,
            headers=parse_headers(options.header),
            shared_server=options.shared_server,
            trust_tag_headers=options.trust_tag_headers,
            auth_token=options.auth_token or os.environ.get("MCPMETER_AUTH_TOKEN") or None,
            allow_origins=tuple(options.allow_origin),
            kill_after=options.kill_after,
            budgets_for=lambda session_tenant: _budgets(options, session_tenant),
            max_repeat=options.max_repeat,
            reject_as=options.reject_as,
            batch_timeout=options.batch_timeout or BATCH_TIMEOUT_S,
            limits=_listen_limits(options),
        ),
        runtime,
    )
