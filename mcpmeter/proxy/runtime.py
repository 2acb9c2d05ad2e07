"""The composition root of ``wrap``: what every mode builds once per process.

``mcpmeter wrap`` runs in one of three modes (a stdio server, ``--url``, ``--listen``);
each needs the same parts, built here once and handed to its runner explicitly:

* the **store opener** (the store is opened in the threads that use it, and imported only
  there, off the start-up path);
* the **audit writer**, the one writer of the store, with its tool pricer and its
  listeners: the budgets (refreshed, failed over and settled after each batch) and, when
  OTLP is configured, the span exporter;
* the **budgets** every gate of the process shares (one store connection, one pricer, the
  webhook alerter): ``gate()`` makes one per client connection;
* the **meters**, one per client connection, feeding the writer's queue.

Nothing here starts a thread until :meth:`Runtime.start` (a stdio server must be spawned
before any thread exists: ``fork`` and threads do not mix). :meth:`Runtime.finish` is the
bounded end every mode shares: pending calls become rows, every row is written or spilled
within the flush deadline of :mod:`mcpmeter.proxy.shutdown`, the listeners close.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from mcpmeter.log import verbose, warn
from mcpmeter.metering.audit import AuditWriter, Exporting, Pricer, WriterListener, spill_locations
from mcpmeter.metering.calls import CallMeter
from mcpmeter.metering.gate import BudgetGate, Budgets
from mcpmeter.metering.tags import Tenant

if TYPE_CHECKING:
    from mcpmeter.exporters.otel import OtlpConfig, SpanExporter
    from mcpmeter.metering.alerts import WebhookAlerter
    from mcpmeter.metering.budget import Budget
    from mcpmeter.proxy.shutdown import Signals
    from mcpmeter.record import CallRecord
    from mcpmeter.store.base import Store

#: How long a webhook still queued at exit may take to send (none after a signal).
ALERT_CLOSE_S = 1.0
#: How long a thread may hold the GIL while another waits (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.0002


class GateSettings(NamedTuple):
    """The budget flags of ``wrap`` (stored budgets are read from the store as well)."""

    #: Budgets from ``--budget`` / ``--max-calls`` (for ``--listen``, see ``budgets_for``).
    budgets: tuple[Budget, ...] = ()
    max_repeat: int | None = None
    reject_as: str = "tool-error"


class Runtime:
    """The parts of one ``wrap`` process (module docstring); ``start`` them, then relay."""

    def __init__(
        self,
        db: str | None = None,
        *,
        otlp: OtlpConfig | None = None,
        alert_webhook: str | None = None,
        record_args: bool = False,
    ) -> None:
        self.location = resolve_db(db)
        self.open_store = store_opener(self.location)
        self.record_args = record_args
        self._alert_webhook = alert_webhook
        self.alerter: WebhookAlerter | None = None
        self.budgets = Budgets(self.open_store)
        listeners: list[WriterListener] = [self.budgets]
        self._exporter: SpanExporter | None = None
        if otlp is not None:
            from mcpmeter.exporters.otel import SpanExporter

            self._exporter = SpanExporter(otlp)  # its thread starts with start()
            listeners.append(Exporting(self._exporter))
        self.writer = AuditWriter(
            self.open_store,
            spill_paths=spill_locations(self.location),
            pricer=_tool_pricer,
            listeners=listeners,
        )

    def start(self) -> Runtime:
        """Start the threads: the alerter's, the exporter's, the writer's."""
        # The relay's threads must not wait long for the GIL while the writer holds it.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if self._alert_webhook is not None:
            from mcpmeter.metering.alerts import WebhookAlerter

            self.alerter = self.budgets.alert = WebhookAlerter(self._alert_webhook)
        if self._exporter is not None:
            self._exporter.start()
        self.writer.start()
        return self

    def meter(
        self,
        tenant: Tenant,
        *,
        transport: str,
        upstream: str,
        default_server: str | None,
        sink: Callable[[CallRecord], None] | None = None,
    ) -> CallMeter:
        """A meter for one client connection; its rows go to the writer (or ``sink``)."""
        return CallMeter(
            tenant,
            self.writer.put if sink is None else sink,
            transport=transport,
            upstream=upstream,
            default_server=default_server,
            record_args=self.record_args,
        )

    def gate(
        self,
        tenant: Tenant,
        settings: GateSettings,
        *,
        server_name: Callable[[], str | None],
        inject: Callable[[bytes], None] = lambda frame: None,
    ) -> BudgetGate:
        """A budget gate for one client connection (drop it with ``budgets.forget``).

        ``inject`` sends a refusal between the server's frames (stdio); the HTTP transports
        answer refusals themselves and leave it unset.
        """
        return self.budgets.gate(
            tenant,
            inject=inject,
            budgets=settings.budgets,
            max_repeat=settings.max_repeat,
            reject_as=settings.reject_as,
            server_name=server_name,
        )

    def finish(
        self, signals: Signals, meters: Iterable[CallMeter] = (), *, hurried: bool | None = None
    ) -> None:
        """The end of a relay: pending calls become rows, every row is written or spilled
        within :data:`~mcpmeter.proxy.shutdown.EXIT_FLUSH_S` (at once on a signal during
        it), the listeners and the alerter stop; with ``MCPMETER_LOG=info``, a summary.

        ``hurried``: whether queued webhooks are dropped rather than sent (by default, when
        a signal came; ``--listen``, which a signal stops, says when a second one came)."""
        meters = list(meters)
        writer = self.writer
        signals.while_flushing(writer)
        for meter in meters:
            with meter.lock:  # stdin may still be open: its pump could be metering
                meter.close()
        writer.close(signals.flush_timeout())
        signals.done()
        if hurried is None:
            hurried = bool(signals.received)
        if self.alerter is not None:
            self.alerter.close(timeout=0 if hurried else ALERT_CLOSE_S)
        if verbose():
            if not meters:
                warn(f"{writer.written} rows written, {writer.spilled} spilled")
            for meter in meters:
                s = meter.stats
                warn(
                    f"{s.frames} frames ({s.requests} requests, {s.responses} responses, "
                    f"{s.notifications} notifications, {s.not_json} not JSON, "
                    f"{s.not_jsonrpc} not JSON-RPC, {s.unmatched_responses} unmatched); "
                    f"{writer.written} rows written, {writer.spilled} spilled, "
                    f"{writer.recovered} recovered, {writer.lost} lost"
                )


def resolve_db(db: str | None) -> str:
    """The store location (see :func:`mcpmeter.store.resolve_db`), without importing the store."""
    if db or os.environ.get("MCPMETER_DB"):
        return db or os.environ["MCPMETER_DB"]
    from mcpmeter.store import default_db

    return default_db()


def store_opener(location: str) -> Callable[[], Store]:
    """Opens the store in the caller's thread: SQLite is imported there, off the start-up path."""

    def open_it() -> Store:
        from mcpmeter.store import open_store

        return open_store(location)

    return open_it


def _tool_pricer(store: Store) -> Pricer:
    from mcpmeter.prices import tool_pricer

    return tool_pricer(store)
