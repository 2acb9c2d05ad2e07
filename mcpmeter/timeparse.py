"""``--since``/``--until`` values: an ISO date or time, or a span back from now.

Spans: ``90s``, ``10m``, ``1h``, ``7d``, ``2w``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from mcpmeter.errors import UsageError
from mcpmeter.record import iso_utc

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(value: str, *, now: float | None = None) -> str:
    """The instant ``value`` names, as the store's ISO-8601 UTC text."""
    now = time.time() if now is None else now
    span = _SPAN.match(value)
    if span:
        return iso_utc(now - float(span.group(1)) * _UNIT_S[span.group(2)])
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"cannot read time {value!r}: use an ISO date/time (2026-11-01, 2026-11-01T09:30Z) "
            "or a span like 10m, 1h, 7d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return iso_utc(moment.timestamp())
