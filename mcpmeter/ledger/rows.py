"""One ledger row (:class:`LedgerRow`) and the rules every value of it keeps, whatever it came from.

The Python API, ``ledger add`` and every import format check their values here, so a value
is refused in the same words wherever it comes from: a refused value is a :class:`BadRow`
naming the field (and, in an import, the file and line).

Every token count is an integer from 0 to :data:`MAX_TOKENS` (10^12), so that sums over the
store stay far inside 64-bit integers; ``cached_tokens`` is at most ``prompt_tokens``. Times
are ISO-8601 text, taken as written, or POSIX epoch numbers: seconds below 10^11,
milliseconds from there; from 1970 to the end of year 9999 UTC.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson

from mcpmeter.errors import MeterError
from mcpmeter.timeparse import iso_exact

#: The ledger's columns, in the order JSON lines and CSV files give them.
COLUMNS: tuple[str, ...] = (
    "ts",
    "agent_id",
    "project_id",
    "request_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "source",
    "tags",
)
#: The most tokens one row may count in any token column (and in the prompt an Anthropic
#: message adds up). The store keeps 64-bit integers and ``report`` sums them: SQLite's
#: ``sum()`` fails ("integer overflow") past 2**63 - 1, about 9.2 * 10**18. The largest context
#: windows hold about 10**7 tokens, so 10**12 is five orders of magnitude above any real call
#: (room for a day's usage imported as one row), and still takes some 9.2 million rows, all at
#: the bound, before any sum (or ``prompt_tokens + completion_tokens``) nears 2**63.
MAX_TOKENS = 10**12
#: An epoch number at or above this is milliseconds, below it seconds: 10**11 seconds is
#: 5138-11-16, 10**11 milliseconds 1973-03-03, so each reading covers every real call time.
MILLISECONDS_FROM = 10**11
#: The last instant a row may carry, in microseconds since the epoch: 9999-12-31T23:59:59.999999Z
#: (the store's text has four-digit years). The first is the epoch itself.
_LAST_MICROSECOND = 253_402_300_799_999_999
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RANGE = "1970-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"


class BadRow(MeterError, ValueError):
    """A record the ledger cannot take: ``str()`` names the file, line and field."""

    def __init__(self, field: str | None, problem: str, file: str | None = None, line: int | None = None):
        self.field = field
        self.problem = problem
        self.file = file
        self.line = line
        super().__init__(self._message())

    def _message(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"{self.field}: {self.problem}" if self.field else self.problem
        return f"{where} {what}" if where and self.field else f"{where}: {what}" if where else what

    def at(self, file: str, line: int) -> BadRow:
        """The same problem, placed in ``file`` at ``line``."""
        return BadRow(self.field, self.problem, file, line)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One row of ``llm_calls`` (``ts`` in the store's ISO-8601 UTC form, ``tags`` JSON text)."""

    ts: str
    agent_id: str | None
    project_id: str | None
    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    source: str = "manual"
    tags: str = "{}"

    def __post_init__(self) -> None:
        """A row is writable or not made: counts within :data:`MAX_TOKENS`, cached within prompt."""
        for field in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            bounded(getattr(self, field), getattr(self, field), field)
        if self.cached_tokens > self.prompt_tokens:
            raise BadRow("cached_tokens", _more_cached(self.cached_tokens, self.prompt_tokens))

    def values(self) -> tuple[Any, ...]:
        """The row's values in :data:`COLUMNS` order, for an ``INSERT``."""
        return (
            self.ts,
            self.agent_id,
            self.project_id,
            self.request_id,
            self.model,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.source,
            self.tags,
        )


def checked_row(
    *,
    ts: str,
    agent_id: str | None,
    project_id: str | None,
    request_id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    source: str,
    tags: str,
    cached_field: str = "cached_tokens",
    prompt_field: str = "prompt_tokens",
) -> LedgerRow:
    """The row of these values, its prompt and cached counts checked under the names its
    source gives them (``cached_field``, ``prompt_field``: an import names the file's field,
    not the ledger's column)."""
    bounded(prompt_tokens, prompt_tokens, prompt_field)
    if cached_tokens > prompt_tokens:
        raise BadRow(cached_field, _more_cached(cached_tokens, prompt_tokens))
    return LedgerRow(
        ts,
        agent_id,
        project_id,
        request_id,
        model,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        source,
        tags,
    )


# -- one value each ----------------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """True for an absent member (None, or ``msgspec.UNSET`` where presence matters) or blank text."""
    return value is None or value is msgspec.UNSET or (isinstance(value, str) and not value.strip())


def text_field(value: Any, field: str) -> str:
    """Required text (an integer is taken as its digits), stripped."""
    if is_missing(value):
        raise BadRow(field, "missing")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRow(field, f"expected text, got {shown(value)}")
    return str(value).strip()


def optional_text_field(value: Any, field: str) -> str | None:
    """Text as :func:`text_field`, or None when missing."""
    return None if is_missing(value) else text_field(value, field)


def bounded(number: Any, value: Any, field: str) -> int:
    """``number`` when it is an integer from 0 to :data:`MAX_TOKENS` (``value`` as given)."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise BadRow(field, f"expected a non-negative integer, got {shown(value)}")
    if number > MAX_TOKENS:
        raise BadRow(field, f"expected at most {MAX_TOKENS:,} tokens for one call, got {shown(value)}")
    return number


def _more_cached(cached: int, prompt: int) -> str:
    return f"{cached} cached tokens is more than the {prompt} prompt tokens"


def count_field(value: Any, field: str, *, required: bool = True) -> int:
    """A token count: an integer from 0 to :data:`MAX_TOKENS` (CSV text and integral floats accepted)."""
    if is_missing(value):
        if required:
            raise BadRow(field, "missing")
        return 0
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            number = None
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    return bounded(number, value, field)


def time_field(value: Any, field: str) -> str:
    """A time, from 1970 to the end of year 9999 UTC, as the store's ISO text.

    ISO-8601 text (no zone means UTC) is taken as written, to the microsecond. A number, or
    text that is one (a CSV cell), is a POSIX epoch: seconds below :data:`MILLISECONDS_FROM`
    (1e11, up to 5138-11-16), milliseconds from there (1973-03-03 on, up to
    253402300799999, the last millisecond of 9999). Larger numbers (microseconds,
    nanoseconds) are refused, never guessed at.
    """
    if is_missing(value):
        raise BadRow(field, "missing")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise BadRow(field, "a datetime needs a time zone")
        return _iso_in_range(value, field, value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _epoch(value, field, value)
    if isinstance(value, str):
        text = value.strip()
        number: int | float | None = None
        try:
            number = int(text)
        except ValueError:
            with contextlib.suppress(ValueError):
                number = float(text)
        if number is not None:
            return _epoch(number, field, value)
        try:
            moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
        except ValueError:
            pass
        else:
            return _iso_in_range(moment if moment.tzinfo else moment.replace(tzinfo=UTC), field, value)
    raise BadRow(field, f"expected an ISO-8601 time or POSIX seconds, got {shown(value)}")


def _iso_in_range(moment: datetime, field: str, value: Any) -> str:
    try:
        if moment >= _EPOCH:
            return iso_exact(moment)
    except OverflowError:  # past 9999 once in UTC
        pass
    raise BadRow(field, f"expected a time from {_RANGE}, got {shown(value)}")


def _epoch(number: int | float, field: str, value: Any) -> str:
    """POSIX seconds, or milliseconds from :data:`MILLISECONDS_FROM` on, as ISO text.

    Integers convert exactly; a float to the nearest microsecond it can tell apart.
    """
    if not math.isfinite(number) or number < 0:
        raise BadRow(field, f"expected an ISO-8601 time or POSIX seconds, got {shown(value)}")
    per_unit = 1_000 if number >= MILLISECONDS_FROM else 1_000_000
    whole = int(number)
    micros = whole * per_unit + round((number - whole) * per_unit)
    if micros > _LAST_MICROSECOND:
        raise BadRow(
            field,
            f"expected POSIX seconds (below 10^11) or milliseconds (up to {_LAST_MICROSECOND // 1000},"
            f" the end of year 9999), got {shown(value)}",
        )
    return iso_exact(_EPOCH + timedelta(microseconds=micros))


def tags_field(value: Any, field: str) -> str:
    """A JSON object of text values (a dict, or its JSON text in a CSV cell), as the row's JSON text."""
    if is_missing(value):
        return "{}"
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise BadRow(field, f"expected a JSON object, got {shown(value)}") from None
    if not isinstance(value, dict):
        raise BadRow(field, f"expected a JSON object, got {shown(value)}")
    return tags_json(
        {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in value.items()}
    )


def tags_json(tags: Mapping[str, str]) -> str:
    """The row's ``tags`` text: a JSON object, keys sorted."""
    return orjson.dumps(dict(sorted(tags.items()))).decode()


def object_field(value: Any, field: str) -> dict[str, Any]:
    """A JSON object member, or the JSON text of one (CSV exports); {} when absent."""
    if is_missing(value):
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise BadRow(field, f"expected a JSON object, got {shown(value)}") from None
    if not isinstance(value, dict):
        raise BadRow(field, f"expected a JSON object, got {shown(value)}")
    return value


def shown(value: Any) -> str:
    """``value`` as an error message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
