"""``--since``/``--until`` values: an ISO date or time, or a span back from now.

Spans: ``90s``, ``10m``, ``1h``, ``7d``, ``2w``. ISO times are formatted from their fields, never
through a float: a float of POSIX seconds keeps only about 30 microseconds near year 9999, and
``time.strftime`` writes years before 1000 with fewer than four digits.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from mcpmeter.errors import UsageError
from mcpmeter.record import iso_utc

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def iso_exact(moment: datetime) -> str:
    """``moment`` (aware) as the store's ISO-8601 UTC text, to the microsecond it carries.

    The shape of :func:`mcpmeter.record.iso_utc` (``2026-11-22T17:23:38.123456Z``, four-digit
    year), so text order stays time order. Raises ``OverflowError`` when the instant in UTC
    falls outside years 1..9999 (``9999-12-31T23:00-05:00``).
    """
    m = moment.astimezone(UTC)
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f".{m.microsecond:06d}Z"
    )


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
    try:
        return iso_exact(moment)
    except OverflowError:
        raise UsageError(f"cannot read time {value!r}: it is outside years 1 to 9999 in UTC") from None
