"""``mcp.client.operation.duration``: the latencies of the rows, as a cumulative histogram.

The audit writer adds each batch (:meth:`DurationHistogram.add`, on its thread); the
exporter's thread takes a :meth:`~DurationHistogram.snapshot` to send. ``export --format
otlp`` builds one over the stored rows and sends it once.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from mcpmeter.exporters.otel.conventions import DURATION_BOUNDS, common_attributes, nanos
from mcpmeter.record import CallRecord

#: Attribute sets the histogram keeps; further ones go to one overflow series.
MAX_SERIES = 2000


class Series:
    """One attribute set's count, sum, min, max and bucket counts."""

    __slots__ = ("attributes", "buckets", "count", "high", "low", "total")

    def __init__(self, attributes: tuple[tuple[str, Any], ...]) -> None:
        self.attributes = attributes
        self.count = 0
        self.total = 0.0
        self.low = float("inf")
        self.high = float("-inf")
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)

    def copy(self) -> Series:
        twin = Series(self.attributes)
        twin.count, twin.total, twin.low, twin.high = self.count, self.total, self.low, self.high
        twin.buckets = list(self.buckets)
        return twin


class HistogramSnapshot(NamedTuple):
    """Every series of a histogram at ``time_ns``, cumulative since ``start_ns``."""

    start_ns: int
    time_ns: int
    series: list[tuple[tuple[tuple[str, Any], ...], Series]]


class DurationHistogram:
    """``mcp.client.operation.duration``, cumulative since ``start``, one series per attribute set.

    Rows without a latency (no response came) are not durations and are left out. Past
    :data:`MAX_SERIES` attribute sets, rows go to one series marked ``otel.metric.overflow``.
    """

    _OVERFLOW: tuple[tuple[str, Any], ...] = (("otel.metric.overflow", True),)

    def __init__(self, start: float | None = None) -> None:
        #: Keyed by the record fields the attributes come from (cheaper than the attributes).
        self._series: dict[tuple[Any, ...], Series] = {}
        self._lock = threading.Lock()
        self.start_ns = nanos(start if start is not None else time.time())
        self.last_ns = self.start_ns

    def add(self, records: Iterable[CallRecord]) -> None:
        with self._lock:
            series_of = self._series
            last = self.last_ns
            for record in records:
                latency = record.latency_ms
                if latency is None:
                    continue
                seconds = latency / 1000.0
                key: tuple[Any, ...] = (
                    record.method,
                    record.tool,
                    record.status,
                    record.error_code,
                    record.protocol_version,
                    record.direction,
                    record.transport,
                    record.upstream,
                    record.project_id,
                    record.agent_id,
                    record.server,
                )
                series = series_of.get(key)
                if series is None:
                    attributes = tuple(common_attributes(record))
                    if len(series_of) >= MAX_SERIES:
                        key = attributes = self._OVERFLOW
                        series = series_of.get(key)
                    if series is None:
                        series = series_of[key] = Series(attributes)
                series.count += 1
                series.total += seconds
                if seconds < series.low:
                    series.low = seconds
                if seconds > series.high:
                    series.high = seconds
                series.buckets[bisect.bisect_left(DURATION_BOUNDS, seconds)] += 1
                end = nanos(record.ts) + round(latency * 1000) * 1000
                if end > last:
                    last = end
            self.last_ns = last

    def __len__(self) -> int:
        return len(self._series)

    def snapshot(self, now_ns: int | None = None) -> HistogramSnapshot | None:
        """A copy of every series, stamped ``now_ns`` (default: now); None while empty."""
        with self._lock:
            if not self._series:
                return None
            copied = [(s.attributes, s.copy()) for s in self._series.values()]
        return HistogramSnapshot(self.start_ns, now_ns if now_ns is not None else time.time_ns(), copied)
