"""``export --format otlp``: stored rows, streamed, sent as spans and one cumulative histogram.

A replayed span's ids are derived from its row, so replaying the same rows twice sends the
same span ids. A POST that fails is retried with backoff; a refusal stops the replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from mcpmeter.errors import MeterError
from mcpmeter.exporters.otel.config import OtlpConfig
from mcpmeter.exporters.otel.conventions import SpanSource
from mcpmeter.exporters.otel.histogram import DurationHistogram
from mcpmeter.exporters.otel.poster import BACKOFF_S, ExportFailed, Poster
from mcpmeter.exporters.otel.protobuf import Encoder
from mcpmeter.record import CallRecord

#: Spans per POST.
REPLAY_BATCH = 1000
#: Tries of one POST before the replay gives up.
REPLAY_ATTEMPTS = 4


def record_of_row(row: Sequence[Any]) -> CallRecord:
    """A stored row (``record.COLUMNS`` order) as the record it was written from."""
    ts = datetime.fromisoformat(row[1]).timestamp()
    return CallRecord(ts, *row[2:26])


def replay_source(row: Sequence[Any]) -> SpanSource:
    """The span of a stored row: ids derived from the row, so a second replay sends the same."""
    import hashlib

    record = record_of_row(row)
    seed = row[26] or f"{row[0]}|{row[1]}|{record.session_id}|{record.direction}|{record.jsonrpc_id}"
    digest = hashlib.blake2b(str(seed).encode(), digest_size=24).digest()
    trace_id = None if record.trace_id is not None else digest[8:24]
    return SpanSource(record, digest[:8], trace_id)


class ReplayResult:
    """What a replay sent: spans, and histogram series."""

    def __init__(self) -> None:
        self.spans = 0
        self.series = 0


def replay(rows: Iterable[Sequence[Any]], config: OtlpConfig) -> ReplayResult:
    """Send stored rows as spans (batches of 1,000) and their histogram (one cumulative point per series).

    A request that fails is retried (4 attempts, backing off from 0.5 s) unless the collector
    refused it for good (a 4xx); then the replay stops with a :class:`MeterError` saying how
    many spans were sent.
    """
    encoder = Encoder(config.resource)
    poster = Poster(config.timeout, compress=config.gzip)
    result = ReplayResult()
    histogram: DurationHistogram | None = None
    traces_url, metrics_url = config.traces_url, config.metrics_url
    try:
        batch: list[SpanSource] = []
        for row in rows:
            source = replay_source(row)
            if metrics_url is not None:
                if histogram is None:
                    histogram = DurationHistogram(start=source.record.ts)
                histogram.add((source.record,))
            if traces_url is not None:
                batch.append(source)
                if len(batch) >= REPLAY_BATCH:
                    result.spans += _replay_spans(poster, encoder, traces_url, config, batch, result.spans)
                    batch = []
        if batch and traces_url is not None:
            result.spans += _replay_spans(poster, encoder, traces_url, config, batch, result.spans)
        snapshot = histogram.snapshot(now_ns=histogram.last_ns) if histogram is not None else None
        if snapshot is not None and metrics_url is not None:
            body = encoder.histogram(snapshot)
            _retrying(
                lambda: poster.post(metrics_url, body, config.metrics_headers), metrics_url, result.spans
            )
            result.series = len(snapshot.series)
    finally:
        poster.close()
    return result


def _replay_spans(
    poster: Poster, encoder: Encoder, url: str, config: OtlpConfig, batch: list[SpanSource], sent: int
) -> int:
    body, count = encoder.spans(batch)
    _retrying(lambda: poster.post(url, body, config.traces_headers), url, sent)
    return count


def _retrying(send: Callable[[], None], url: str, sent: int) -> None:
    delay = BACKOFF_S
    for attempt in range(REPLAY_ATTEMPTS):
        try:
            send()
            return
        except ExportFailed as exc:
            if not exc.retryable or attempt == REPLAY_ATTEMPTS - 1:
                raise MeterError(f"cannot export to {url}: {exc} ({sent} spans sent before)") from None
        time.sleep(delay)
        delay *= 2
