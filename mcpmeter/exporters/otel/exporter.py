"""``wrap``'s OTLP exporter: spans and the duration histogram, sent from a thread of its own.

The audit writer hands each written batch to :meth:`SpanExporter.submit`
(:class:`mcpmeter.metering.audit.BatchExporter`); a collector that is down or slow costs
spans, counted and warned about once, never a wait on the relay's path or the writer's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from mcpmeter.exporters.otel.config import OtlpConfig
from mcpmeter.exporters.otel.conventions import SpanSource
from mcpmeter.exporters.otel.histogram import DurationHistogram
from mcpmeter.exporters.otel.poster import BACKOFF_MAX_S, BACKOFF_S, ExportFailed, Poster
from mcpmeter.exporters.otel.protobuf import Encoder
from mcpmeter.log import verbose, warn, warn_once
from mcpmeter.record import CallRecord
from mcpmeter.threads import quiet_thread

#: Spans per POST (the SDK's batch span processor sends 512).
EXPORT_BATCH = 512
#: Spans waiting for the exporter's thread at most; past it, new ones are dropped.
MAX_QUEUE = 8192
#: How long a span may wait for its batch to fill.
SCHEDULE_DELAY_S = 1.0
#: At exit, how long what is still queued may take to send.
CLOSE_TIMEOUT_S = 5.0


class SpanExporter:
    """``wrap``'s exporter: a bounded queue fed by the audit writer, drained by one thread.

    :meth:`submit` (on the writer's thread) adds a batch to the histogram and queues the
    records (each carries its request's ``traceparent``), or drops what does not fit when
    :data:`MAX_QUEUE` spans already wait. The thread POSTs :data:`EXPORT_BATCH` spans at a
    time (or what waited :data:`SCHEDULE_DELAY_S`), and the histogram every
    ``metrics_interval`` and at exit. A POST that fails drops its batch and
    holds the next one back (0.5 s doubling to 30 s); the first loss is one line on stderr.
    The rows are in the store whatever happens here.
    """

    def __init__(
        self,
        config: OtlpConfig,
        *,
        max_queue: int = MAX_QUEUE,
        batch: int = EXPORT_BATCH,
        delay: float = SCHEDULE_DELAY_S,
        close_timeout: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self._config = config
        self._max_queue = max_queue
        self._batch = batch
        self._delay = delay
        self._close_timeout = close_timeout
        self._queue: deque[SpanSource] = deque()
        #: Whether spans are queued: traces are configured and the thread has not stopped.
        self._tracing = bool(config.traces_url)
        self._histogram = DurationHistogram() if config.metrics_url else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcpmeter-otlp-exporter", daemon=True)
        self._deadline: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_S
        self._count_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0

    def start(self) -> SpanExporter:
        self._thread.start()
        return self

    # -- the writer's side ---------------------------------------------------------------

    def submit(self, records: Sequence[CallRecord]) -> None:
        if self._histogram is not None:
            self._histogram.add(records)
        if not self._tracing:
            return
        queue = self._queue
        append = queue.append
        room = self._max_queue - len(queue)
        new = tuple.__new__
        lost = 0
        for record in records:
            if room > 0:
                append(new(SpanSource, (record, None, None)))
                room -= 1
            else:
                lost += 1
        if lost:
            self._drop(lost, "the exporter's queue is full")
        if len(queue) >= self._batch:
            self._wake.set()

    def close(self) -> None:
        """Send what is queued (for up to ``close_timeout`` seconds) and the histogram, then stop."""
        self._deadline = time.monotonic() + self._close_timeout
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self._close_timeout + 1.0)
        if self._queue:
            self._drop(len(self._queue), "mcpmeter was exiting")
            self._queue.clear()
        if verbose():
            warn(f"OTLP: {self.sent} spans sent, {self.dropped} dropped")

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        quiet_thread()
        encoder = Encoder(self._config.resource)
        poster = Poster(self._config.timeout, compress=self._config.gzip)
        next_metrics = time.monotonic() + self._config.metrics_interval
        try:
            while not self._stop.is_set():
                self._wake.wait(self._delay)
                self._wake.clear()
                self._send_spans(encoder, poster, final=False)
                if time.monotonic() >= next_metrics:
                    self._send_metrics(encoder, poster)
                    next_metrics = time.monotonic() + self._config.metrics_interval
            self._send_spans(encoder, poster, final=True)
            self._send_metrics(encoder, poster)
        except Exception as exc:  # never seen; the relay goes on without spans
            warn(f"OTLP export stopped: {type(exc).__name__}: {exc}")
            self._tracing = False  # the writer stops queueing spans nobody would send
        finally:
            poster.close()

    def _timeout(self) -> float | None:
        """While closing, no POST may outlive the close deadline."""
        if self._deadline is None:
            return None
        return max(0.05, min(self._config.timeout, self._deadline - time.monotonic()))

    def _expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _send_spans(self, encoder: Encoder, poster: Poster, *, final: bool) -> None:
        url = self._config.traces_url
        queue = self._queue
        if url is None:
            return
        while queue and not self._expired():
            if not final and time.monotonic() < self._retry_at:
                return  # backing off: the queue holds (up to its bound) meanwhile
            batch: list[SpanSource] = []
            popleft = queue.popleft
            try:
                while len(batch) < self._batch:
                    batch.append(popleft())
            except IndexError:
                pass
            try:
                body, count = encoder.spans(batch)
            except Exception as exc:  # a row the encoder cannot take: lose its batch, not the thread
                self._drop(len(batch), f"cannot encode spans: {exc}")
                continue
            if count == 0:
                continue
            try:
                poster.post(url, body, self._config.traces_headers, self._timeout())
            except ExportFailed as exc:
                self._failed(exc)
                self._drop(count, f"POST {url} failed: {exc}")
                if final:  # the collector is down: do not try each remaining batch
                    self._drop(len(queue), "the collector failed at exit")
                    queue.clear()
                continue
            self.sent += count
            self._backoff = BACKOFF_S
            if not final and len(queue) < self._batch:
                return

    def _send_metrics(self, encoder: Encoder, poster: Poster) -> None:
        url = self._config.metrics_url
        if url is None or self._histogram is None or self._expired():
            return
        snapshot = self._histogram.snapshot()
        if snapshot is None:
            return
        try:
            poster.post(url, encoder.histogram(snapshot), self._config.metrics_headers, self._timeout())
        except ExportFailed as exc:
            self._failed(exc)
            warn_once(
                "otlp-failed",
                f"cannot export to {url} ({exc}); the audit rows are kept",
            )

    def _failed(self, exc: ExportFailed) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _drop(self, count: int, why: str) -> None:
        if count <= 0:
            return
        with self._count_lock:
            self.dropped += count
        warn_once(
            "otlp-failed",
            f"OTLP export is dropping spans ({why}); the audit rows are kept. "
            "MCPMETER_LOG=info counts them at exit",
        )
