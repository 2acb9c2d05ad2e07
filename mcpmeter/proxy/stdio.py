"""``mcpmeter wrap -- CMD``: run a stdio server behind the metering relay.

The server is spawned first (before any thread exists, since ``fork`` and threads do not
mix), then the audit writer and the two pumps start. The main thread waits for the server
to exit, handling signals meanwhile: SIGINT/SIGTERM/SIGHUP go to the server's process group
and SIGKILL follows after ``kill_after`` seconds if it is still running. Our stdin closing
closes the server's stdin; the client closing our stdout does too. Once the server has
exited and its stdout is drained, what it left in its group is stopped, every row is
written (or, when the store does not take them within a second, or a signal comes
meanwhile, spilled), and mcpmeter exits with the server's code. Our signal handlers stay
in place to the end (see :mod:`mcpmeter.proxy.shutdown`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from mcpmeter.errors import MeterError
from mcpmeter.log import verbose, warn
from mcpmeter.metering.audit import AuditWriter, Pricer, spill_locations
from mcpmeter.metering.budget import Budget, BudgetGate
from mcpmeter.metering.calls import C2S, S2C, CallMeter
from mcpmeter.metering.tags import Tenant
from mcpmeter.proxy.process import ServerProcess, exit_status
from mcpmeter.proxy.relay import ClientWriter, FdEndpoint, Gate, Pump, Tap
from mcpmeter.proxy.shutdown import Signals
from mcpmeter.threads import QuietTimer

if TYPE_CHECKING:
    from mcpmeter.exporters.otel import OtlpConfig
    from mcpmeter.metering.alerts import WebhookAlerter
    from mcpmeter.store.base import Store

#: How long a webhook still queued at exit may take to send (none after a signal).
ALERT_CLOSE_S = 1.0
#: After the server exits, how long its stdout may stay open without a byte moving (a
#: grandchild holding it, or a client that stopped reading) before the relay gives up.
DRAIN_IDLE_S = 2.0
#: After the server exits, how long our stdin may stay quiet before the relay stops reading it
#: (a client that still holds it open while its server is gone).
STDIN_IDLE_S = 0.1
#: How long a thread may hold the GIL while another waits (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.0002


class WrapOptions(NamedTuple):
    argv: list[str]
    tenant: Tenant
    db: str | None = None
    kill_after: float = 5.0
    record_args: bool = False
    #: Budgets from the flags (``--budget``, ``--max-calls``); stored ones are read too.
    budgets: tuple[Budget, ...] = ()
    max_repeat: int | None = None
    reject_as: str = "tool-error"
    alert_webhook: str | None = None


def run_wrap(options: WrapOptions) -> int:
    """Relay until the server exits; write every row; return the exit code for mcpmeter."""
    server = ServerProcess(options.argv)
    try:
        server.start()
    except FileNotFoundError:
        raise MeterError(f"command not found: {options.argv[0]}", exit_code=127) from None
    except PermissionError:
        raise MeterError(f"permission denied: {options.argv[0]}", exit_code=126) from None
    except OSError as exc:
        raise MeterError(f"cannot start {options.argv[0]}: {exc.strerror or exc}", exit_code=126) from None

    # Ours from now to the exit: the default action would drop the rows not yet written.
    signals = Signals().install()
    # The relay's threads must not wait long for the GIL while the writer holds it.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Our stdout: the server's frames, and between them any answer the proxy gives itself.
    client_out = ClientWriter(FdEndpoint(1))
    meter: CallMeter | None = None
    gate, alerter = budget_gate(
        options, client_out.inject, lambda: meter.peers.server_name if meter is not None else None
    )
    writer = start_audit_writer(
        options.db, on_tick=gate.refresh, on_unavailable=gate.unavailable, after_write=gate.settle
    )
    meter = CallMeter(
        options.tenant,
        writer.put,
        transport="stdio",
        upstream="stdio",
        default_server=os.path.basename(options.argv[0]),
        record_args=options.record_args,
    )
    try:
        return _relay(server, meter, options.kill_after, gate, client_out, signals)
    finally:
        finish(meter, writer, gate, alerter, signals)


def finish(
    meter: CallMeter, writer: AuditWriter, gate: BudgetGate, alerter: WebhookAlerter | None, signals: Signals
) -> None:
    """The end of a relay: pending calls become rows, every row is written or spilled within
    :data:`~mcpmeter.proxy.shutdown.EXIT_FLUSH_S` (at once on a signal during it), gate and alerter
    stop; with ``MCPMETER_LOG=info``, a one-line summary on stderr."""
    signals.while_flushing(writer)
    with meter.lock:  # stdin may still be open: its pump could be metering
        meter.close()
    writer.close(signals.flush_timeout())
    signals.done()
    gate.close()
    if alerter is not None:
        alerter.close(timeout=0 if signals.received else ALERT_CLOSE_S)
    if verbose():
        s = meter.stats
        warn(
            f"{s.frames} frames ({s.requests} requests, {s.responses} responses, "
            f"{s.notifications} notifications, {s.not_json} not JSON, {s.not_jsonrpc} not JSON-RPC, "
            f"{s.unmatched_responses} unmatched); {writer.written} rows written, "
            f"{writer.spilled} spilled, {writer.recovered} recovered, {writer.lost} lost"
        )


#: Where spans and the duration histogram go (``--otlp-endpoint`` or the ``OTEL_EXPORTER_OTLP_*``
#: env vars): set by :func:`export_to_otlp` before the relay starts; every audit writer of
#: the process (one per ``wrap``, whatever the transport) then feeds an OTLP exporter.
_otlp: OtlpConfig | None = None


def export_to_otlp(config: OtlpConfig | None) -> None:
    global _otlp
    _otlp = config


def start_audit_writer(db: str | None, **hooks: Any) -> AuditWriter:
    """The audit writer for the store ``db`` names (or the default), started.

    ``hooks`` are the AuditWriter's ``on_tick``/``on_unavailable``/``after_write``.
    """
    location = resolve_db(db)
    exporter = None
    if _otlp is not None:
        from mcpmeter.exporters.otel import SpanExporter

        exporter = SpanExporter(_otlp).start()
    return AuditWriter(
        _store_opener(location),
        spill_paths=spill_locations(location),
        pricer=_tool_pricer,
        exporter=exporter,
        **hooks,
    ).start()


class GateOptions(Protocol):
    """The budget settings ``wrap`` and ``wrap --url`` share."""

    @property
    def db(self) -> str | None: ...
    @property
    def tenant(self) -> Tenant: ...
    @property
    def budgets(self) -> tuple[Budget, ...]: ...
    @property
    def max_repeat(self) -> int | None: ...
    @property
    def reject_as(self) -> str: ...
    @property
    def alert_webhook(self) -> str | None: ...


def budget_gate(
    options: GateOptions, inject: Callable[[bytes], None], server_name: Callable[[], str | None]
) -> tuple[BudgetGate, WebhookAlerter | None]:
    """The budget gate (flag budgets, stored ones, the loop guard) and its webhook alerter."""
    alerter = _alerter(options.alert_webhook)
    gate = BudgetGate(
        _store_opener(resolve_db(options.db)),
        options.tenant,
        inject=inject,
        budgets=options.budgets,
        max_repeat=options.max_repeat,
        reject_as=options.reject_as,
        server_name=server_name,
        alert=alerter,
    )
    return gate, alerter


def _alerter(url: str | None) -> WebhookAlerter | None:
    if url is None:
        return None
    from mcpmeter.metering.alerts import WebhookAlerter

    return WebhookAlerter(url)


def resolve_db(db: str | None) -> str:
    """The store location (see :func:`mcpmeter.store.resolve_db`), without importing the store."""
    if db or os.environ.get("MCPMETER_DB"):
        return db or os.environ["MCPMETER_DB"]
    from mcpmeter.store import default_db

    return default_db()


def _store_opener(location: str) -> Callable[[], Store]:
    """Opens the store in the writer's thread: SQLite is imported there, off the start-up path."""

    def open_it() -> Store:
        from mcpmeter.store import open_store

        return open_store(location)

    return open_it


def _tool_pricer(store: Store) -> Pricer:
    from mcpmeter.prices import tool_pricer

    return tool_pricer(store)


def _relay(
    server: ServerProcess,
    meter: CallMeter,
    kill_after: float,
    gate: Gate,
    client_out: ClientWriter,
    signals: Signals,
) -> int:
    assert server.stdin is not None and server.stdout is not None
    lock = meter.lock
    c2s = Pump("c2s", FdEndpoint(0), server.stdin, Tap(C2S, meter), lock, on_eof=server.close_stdin)
    c2s.gate = gate
    # The client stopped reading our stdout: the session is over, tell the server so.
    s2c = Pump("s2c", server.stdout, client_out, Tap(S2C, meter), lock, on_sink_lost=server.close_stdin)
    kill_timer: threading.Timer | None = None

    def forward(sig: int) -> None:
        nonlocal kill_timer
        server.signal(sig)
        if kill_timer is None:
            kill_timer = QuietTimer(kill_after, server.signal, (signal.SIGKILL,))
            kill_timer.daemon = True
            kill_timer.start()

    signals.while_relaying(forward)
    try:
        c2s.start()
        s2c.start()
        returncode = server.wait()
        _drain(s2c)
        # What the client had already sent (a pipelined backlog behind its EOF) is read and
        # metered before the meter closes: each of those requests gets its row.
        _drain(c2s, idle=STDIN_IDLE_S)
        client_out.flush()
        server.reap_group(kill_after)
        return exit_status(returncode)
    finally:
        signals.while_relaying(None)
        if kill_timer is not None:
            kill_timer.cancel()
        server.close()


def _drain(pump: Pump, idle: float = DRAIN_IDLE_S) -> None:
    """Wait for the pump's source to reach EOF, as long as bytes keep moving."""
    last = -1
    while not pump.done.wait(idle):
        if pump.bytes == last:
            return  # nothing moved for DRAIN_IDLE_S: a grandchild holds the pipe open
        last = pump.bytes
