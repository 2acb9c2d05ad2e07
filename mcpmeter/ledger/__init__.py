"""The LLM ledger (``llm_calls``): one row per LLM call, joined to tool calls on ``request_id``.

Ways in: :func:`record` (and :class:`Ledger`) for agent runtimes, ``mcpmeter ledger add``,
and :func:`import_file` for files: the ledger's own columns as JSON lines or CSV, LiteLLM
spend logs, OpenAI-style and Anthropic-style responses. Rows are unique on
``(source, request_id)``: writing or importing the same call again adds nothing.

Imports stream: records are read one at a time and written in batches of :data:`BATCH`
rows, one transaction each, so memory stays flat however big the file and concurrent
``wrap`` writers wait for one batch at most.

Field mapping per format (``--agent``/``--project``/``--source`` replace what the file says):

``jsonl``, ``csv``
    The ledger's columns: ``ts, agent_id, project_id, request_id, model, prompt_tokens,
    completion_tokens, cached_tokens, source, tags`` (``ts``, ``request_id``, ``model`` and
    the two token counts required; ``tags`` a JSON object; ``source`` defaults to the format).
``litellm`` (a spend-log export: the ``SpendLogs`` table or ``/spend/logs``, one object a line or CSV)
    ``request_id``; ``model`` (else ``model_group``; a ``provider/`` prefix equal to
    ``custom_llm_provider`` is dropped); ``prompt_tokens``, ``completion_tokens``; ``ts`` from
    ``startTime``; ``cached_tokens`` from ``metadata.usage_object`` (``prompt_tokens_details.cached_tokens``
    or ``cache_read_input_tokens``) when present, else 0. ``agent_id``: the first of a tag
    ``agent:NAME`` (or ``agent=NAME``) in ``request_tags``, ``agent_id`` in ``metadata`` (or its
    ``spend_logs_metadata``, ``requester_metadata``), ``metadata.user_api_key_alias`` (the
    virtual key's alias). ``project_id``: the first of a tag ``project:NAME``, ``project_id`` in
    ``metadata`` (same places), ``end_user`` (LiteLLM's customer), ``metadata.user_api_key_team_alias``,
    ``team_id``. ``tags``: each request tag ``k:v`` or ``k=v`` as ``{k: v}``, a bare tag ``t`` as
    ``{t: "true"}``.
``openai`` (Chat Completions or Responses objects)
    ``id``; ``model``; ``ts`` from ``created`` (or ``created_at``); ``usage.prompt_tokens``,
    ``usage.completion_tokens``, ``usage.prompt_tokens_details.cached_tokens`` (Responses:
    ``input_tokens``, ``output_tokens``, ``input_tokens_details.cached_tokens``).
``anthropic`` (Messages objects)
    ``id``; ``model``; ``prompt_tokens = input_tokens + cache_creation_input_tokens +
    cache_read_input_tokens``; ``cached_tokens = cache_read_input_tokens``;
    ``completion_tokens = output_tokens``. A message has no time: ``ts`` comes from a ``ts``
    (or ``created_at``, ``timestamp``) member when the line has one, else the import's time.

For ``openai`` and ``anthropic`` lines, top-level ``agent_id``/``project_id`` members (or the
same keys in ``metadata``) are read when present. The default ``source`` of a provider
format is the format's name: request ids from one provider are unique, so overlapping or
renamed exports of the same calls import once.

Every token count (each field a format reads, and the prompt an Anthropic message adds up) is
an integer from 0 to :data:`MAX_TOKENS` (10^12), so that sums over the store stay far inside
64-bit integers; ``cached_tokens`` is at most ``prompt_tokens``. Times are ISO-8601 text,
taken as written, or POSIX epoch numbers: seconds below 10^11, milliseconds from there; from
1970 to the end of year 9999 UTC. A record that breaks a rule is a bad row: skipped and
counted (or, with ``--strict``, the end of the import).

Every format is UTF-8 text (a leading BOM is dropped). A line that is not ends the import,
whatever the format, with one line naming the file, the line and the first bad byte: a
Latin-1 file would otherwise be half read as U+FFFD and half skipped. The rows before it
stay imported, as with ``--strict`` (importing the fixed file adds them no second time).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from types import TracebackType
from typing import IO, Any

import orjson

from mcpmeter.errors import MeterError, UsageError
from mcpmeter.record import iso_utc
from mcpmeter.store import Store, open_store, resolve_db
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
FORMATS = ("auto", "jsonl", "csv", "litellm", "openai", "anthropic")
#: Rows per insert transaction during an import.
BATCH = 1000
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

_INSERT = (
    f"INSERT INTO llm_calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    " ON CONFLICT (source, request_id) DO NOTHING"
)


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
            _bounded(getattr(self, field), getattr(self, field), field)
        if self.cached_tokens > self.prompt_tokens:
            raise BadRow("cached_tokens", _more_cached(self.cached_tokens, self.prompt_tokens))

    def values(self) -> tuple[Any, ...]:
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


# -- field parsing -----------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any, field: str) -> str:
    if _missing(value):
        raise BadRow(field, "missing")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRow(field, f"expected text, got {_show(value)}")
    return str(value).strip()


def _opt_text(value: Any, field: str) -> str | None:
    return None if _missing(value) else _text(value, field)


def _bounded(number: Any, value: Any, field: str) -> int:
    """``number`` when it is an integer from 0 to :data:`MAX_TOKENS` (``value`` as given)."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise BadRow(field, f"expected a non-negative integer, got {_show(value)}")
    if number > MAX_TOKENS:
        raise BadRow(field, f"expected at most {MAX_TOKENS:,} tokens for one call, got {_show(value)}")
    return number


def _more_cached(cached: int, prompt: int) -> str:
    return f"{cached} cached tokens is more than the {prompt} prompt tokens"


def _count(value: Any, field: str, *, required: bool = True) -> int:
    """A token count: an integer from 0 to :data:`MAX_TOKENS` (CSV text and integral floats accepted)."""
    if _missing(value):
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
    return _bounded(number, value, field)


def _ts(value: Any, field: str) -> str:
    """A time, from 1970 to the end of year 9999 UTC, as the store's ISO text.

    ISO-8601 text (no zone means UTC) is taken as written, to the microsecond. A number, or
    text that is one (a CSV cell), is a POSIX epoch: seconds below :data:`MILLISECONDS_FROM`
    (1e11, up to 5138-11-16), milliseconds from there (1973-03-03 on, up to
    253402300799999, the last millisecond of 9999). Larger numbers (microseconds,
    nanoseconds) are refused, never guessed at.
    """
    if _missing(value):
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
    raise BadRow(field, f"expected an ISO-8601 time or POSIX seconds, got {_show(value)}")


def _iso_in_range(moment: datetime, field: str, value: Any) -> str:
    try:
        if moment >= _EPOCH:
            return iso_exact(moment)
    except OverflowError:  # past 9999 once in UTC
        pass
    raise BadRow(field, f"expected a time from {_RANGE}, got {_show(value)}")


def _epoch(number: int | float, field: str, value: Any) -> str:
    """POSIX seconds, or milliseconds from :data:`MILLISECONDS_FROM` on, as ISO text.

    Integers convert exactly; a float to the nearest microsecond it can tell apart.
    """
    if not math.isfinite(number) or number < 0:
        raise BadRow(field, f"expected an ISO-8601 time or POSIX seconds, got {_show(value)}")
    per_unit = 1_000 if number >= MILLISECONDS_FROM else 1_000_000
    whole = int(number)
    micros = whole * per_unit + round((number - whole) * per_unit)
    if micros > _LAST_MICROSECOND:
        raise BadRow(
            field,
            f"expected POSIX seconds (below 10^11) or milliseconds (up to {_LAST_MICROSECOND // 1000},"
            f" the end of year 9999), got {_show(value)}",
        )
    return iso_exact(_EPOCH + timedelta(microseconds=micros))


def _tags(value: Any, field: str) -> str:
    """A JSON object of text values (a dict, or its JSON text in a CSV cell)."""
    if _missing(value):
        return "{}"
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise BadRow(field, f"expected a JSON object, got {_show(value)}") from None
    if not isinstance(value, dict):
        raise BadRow(field, f"expected a JSON object, got {_show(value)}")
    return _tags_json(
        {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in value.items()}
    )


def _tags_json(tags: Mapping[str, str]) -> str:
    return orjson.dumps(dict(sorted(tags.items()))).decode()


def _object(value: Any, field: str) -> dict[str, Any]:
    """A JSON object member, or the JSON text of one (CSV exports); {} when absent."""
    if _missing(value):
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise BadRow(field, f"expected a JSON object, got {_show(value)}") from None
    if not isinstance(value, dict):
        raise BadRow(field, f"expected a JSON object, got {_show(value)}")
    return value


def _member(record: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``record[key]`` when it is an object, else {}."""
    value = record.get(key)
    return value if isinstance(value, Mapping) else {}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(record: Mapping[str, Any], path: str) -> Any:
    """``record["a"]["b"]`` for ``"a.b"``; None where a step is missing or not an object."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _row(
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
    _bounded(prompt_tokens, prompt_tokens, prompt_field)
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


# -- formats -----------------------------------------------------------------------------------

#: Maps one record (a dict) to a row: ``(record, default_source, now) -> LedgerRow``.
Mapper = Callable[[Mapping[str, Any], str, float], LedgerRow]


def _from_ledger(rec: Mapping[str, Any], source: str, now: float) -> LedgerRow:
    return _row(
        ts=_ts(rec.get("ts"), "ts"),
        agent_id=_opt_text(rec.get("agent_id"), "agent_id"),
        project_id=_opt_text(rec.get("project_id"), "project_id"),
        request_id=_text(rec.get("request_id"), "request_id"),
        model=_text(rec.get("model"), "model"),
        prompt_tokens=_count(rec.get("prompt_tokens"), "prompt_tokens"),
        completion_tokens=_count(rec.get("completion_tokens"), "completion_tokens"),
        cached_tokens=_count(rec.get("cached_tokens"), "cached_tokens", required=False),
        source=_opt_text(rec.get("source"), "source") or source,
        tags=_tags(rec.get("tags"), "tags"),
    )


def _litellm_tags(value: Any) -> dict[str, str]:
    if _missing(value):
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            value = [t for t in value.split(",") if t.strip()]
    if not isinstance(value, list):
        raise BadRow("request_tags", f"expected a list of tags, got {_show(value)}")
    tags: dict[str, str] = {}
    for tag in value:
        text = str(tag).strip()
        key, sep, val = text.partition(":") if ":" in text else text.partition("=")
        if sep and key.strip():
            tags[key.strip()] = val.strip()
        elif text:
            tags[text] = "true"
    return tags


def _first_text(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _from_litellm(rec: Mapping[str, Any], source: str, now: float) -> LedgerRow:
    metadata = _object(rec.get("metadata"), "metadata")
    spend_meta = _member(metadata, "spend_logs_metadata")
    asked_meta = _member(metadata, "requester_metadata")
    tags = _litellm_tags(rec.get("request_tags"))
    model = _opt_text(rec.get("model"), "model") or _text(rec.get("model_group"), "model")
    provider = _opt_text(rec.get("custom_llm_provider"), "custom_llm_provider")
    if provider and model.startswith(provider + "/"):
        model = model[len(provider) + 1 :]
    usage = _member(metadata, "usage_object")
    cached = _get(usage, "prompt_tokens_details.cached_tokens")
    if _missing(cached):
        cached = usage.get("cache_read_input_tokens")
    return _row(
        ts=_ts(rec.get("startTime"), "startTime"),
        agent_id=_first_text(
            tags.get("agent"),
            metadata.get("agent_id"),
            spend_meta.get("agent_id"),
            asked_meta.get("agent_id"),
            metadata.get("user_api_key_alias"),
        ),
        project_id=_first_text(
            tags.get("project"),
            metadata.get("project_id"),
            spend_meta.get("project_id"),
            asked_meta.get("project_id"),
            rec.get("end_user"),
            metadata.get("user_api_key_team_alias"),
            rec.get("team_id"),
        ),
        request_id=_text(rec.get("request_id"), "request_id"),
        model=model,
        prompt_tokens=_count(rec.get("prompt_tokens"), "prompt_tokens"),
        completion_tokens=_count(rec.get("completion_tokens"), "completion_tokens"),
        cached_tokens=_count(cached, "metadata.usage_object cached tokens", required=False),
        source=source,
        tags=_tags_json(tags),
        cached_field="metadata.usage_object cached tokens",
    )


def _tenant(rec: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``agent_id`` and ``project_id`` a logger put beside a provider's response, if any."""
    return (
        _first_text(rec.get("agent_id"), _get(rec, "metadata.agent_id")),
        _first_text(rec.get("project_id"), _get(rec, "metadata.project_id")),
    )


def _from_openai(rec: Mapping[str, Any], source: str, now: float) -> LedgerRow:
    usage = rec.get("usage")
    if not isinstance(usage, dict):
        raise BadRow("usage", "missing" if usage is None else f"expected an object, got {_show(usage)}")
    if "prompt_tokens" in usage or "input_tokens" not in usage:  # Chat Completions
        prompt = _count(usage.get("prompt_tokens"), "usage.prompt_tokens")
        completion = _count(usage.get("completion_tokens"), "usage.completion_tokens")
        cached_field = "usage.prompt_tokens_details.cached_tokens"
    else:  # Responses
        prompt = _count(usage.get("input_tokens"), "usage.input_tokens")
        completion = _count(usage.get("output_tokens"), "usage.output_tokens")
        cached_field = "usage.input_tokens_details.cached_tokens"
    created = rec.get("created") if not _missing(rec.get("created")) else rec.get("created_at")
    agent_id, project_id = _tenant(rec)
    return _row(
        ts=_ts(created, "created"),
        agent_id=agent_id,
        project_id=project_id,
        request_id=_text(rec.get("id"), "id"),
        model=_text(rec.get("model"), "model"),
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=_count(_get(rec, cached_field), cached_field, required=False),
        source=source,
        tags="{}",
        cached_field=cached_field,
    )


def _from_anthropic(rec: Mapping[str, Any], source: str, now: float) -> LedgerRow:
    usage = rec.get("usage")
    if not isinstance(usage, dict):
        raise BadRow("usage", "missing" if usage is None else f"expected an object, got {_show(usage)}")
    read = _count(usage.get("cache_read_input_tokens"), "usage.cache_read_input_tokens", required=False)
    written = _count(
        usage.get("cache_creation_input_tokens"), "usage.cache_creation_input_tokens", required=False
    )
    when_field = next((k for k in ("ts", "created_at", "timestamp") if not _missing(rec.get(k))), None)
    agent_id, project_id = _tenant(rec)
    return _row(
        ts=_ts(rec[when_field], when_field) if when_field else iso_utc(now),
        agent_id=agent_id,
        project_id=project_id,
        request_id=_text(rec.get("id"), "id"),
        model=_text(rec.get("model"), "model"),
        prompt_tokens=_count(usage.get("input_tokens"), "usage.input_tokens") + written + read,
        completion_tokens=_count(usage.get("output_tokens"), "usage.output_tokens"),
        cached_tokens=read,
        source=source,
        tags="{}",
        prompt_field="usage.input_tokens + cache_creation_input_tokens + cache_read_input_tokens",
    )


MAPPERS: dict[str, Mapper] = {
    "jsonl": _from_ledger,
    "csv": _from_ledger,
    "litellm": _from_litellm,
    "openai": _from_openai,
    "anthropic": _from_anthropic,
}


def detect_format(record: Mapping[str, Any], container: str) -> str | None:
    """The format of a file whose first record is ``record`` (``container``: json or csv)."""
    if "startTime" in record or "request_tags" in record or "model_group" in record:
        return "litellm"
    usage = record.get("usage")
    if isinstance(usage, dict):
        if (
            record.get("object") in ("chat.completion", "text_completion", "response")
            or "prompt_tokens" in usage
        ):
            return "openai"
        if "input_tokens" in usage:
            return "anthropic"
    if "request_id" in record and "prompt_tokens" in record:
        return "jsonl" if container == "json" else "csv"
    return None


# -- reading files -----------------------------------------------------------------------------

Record = tuple[int, Mapping[str, Any] | BadRow]


class NotUtf8(Exception):
    """Line ``line`` of an import is not UTF-8: its first bad byte is ``byte``, at ``column`` (1-based)."""

    def __init__(self, line: int, column: int, byte: int) -> None:
        super().__init__(f"line {line} is not UTF-8")
        self.line, self.column, self.byte = line, column, byte


def _utf8_lines(lines: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """``lines`` as they are, raising :class:`NotUtf8` at the first that is not UTF-8."""
    for number, raw in lines:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotUtf8(number, exc.start + 1, raw[exc.start]) from None
        yield number, raw


def _records(lines: Iterator[tuple[int, bytes]], name: str) -> tuple[str, Iterator[Record]]:
    """The container (``json``, ``csv`` or ``empty``) and its records, with line numbers."""
    for number, raw in lines:
        if raw.strip():
            first = (number, raw.removeprefix(b"\xef\xbb\xbf"))
            break
    else:
        return "empty", iter(())
    lead = first[1].lstrip()[:1]
    if lead == b"[":
        raise UsageError(
            f"{name} is one JSON array: give one object a line (e.g. jq -c '.[]' FILE > FILE.jsonl)"
        )
    rest = chain([first], lines)
    if lead == b"{":
        return "json", _json_records(rest)
    return "csv", _csv_records(rest)


def _json_records(lines: Iterable[tuple[int, bytes]]) -> Iterator[Record]:
    loads = orjson.loads
    for number, raw in lines:
        if not raw.strip():
            continue
        try:
            value = loads(raw)
        except orjson.JSONDecodeError as exc:
            yield number, BadRow(None, f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        if isinstance(value, dict):
            yield number, value
        else:
            yield number, BadRow(None, f"expected a JSON object, got {type(value).__name__}")


def _csv_records(lines: Iterator[tuple[int, bytes]]) -> Iterator[Record]:
    last = [0]

    def text() -> Iterator[str]:
        for number, raw in lines:
            last[0] = number
            yield raw.decode("utf-8")  # checked by _utf8_lines

    reader = csv.reader(text())
    header = [name.strip() for name in next(reader, [])]
    end = last[0]
    for row in reader:
        start, end = end + 1, last[0]
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield start, BadRow(None, f"expected {len(header)} columns as in the header, got {len(row)}")
            continue
        yield start, dict(zip(header, row, strict=True))


# -- writing -----------------------------------------------------------------------------------


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


@dataclass(slots=True)
class ImportResult:
    """What an import did: rows new to the ledger, rows it had already, rows skipped."""

    file: str
    format: str
    source: str | None
    imported: int = 0
    already: int = 0
    skipped: int = 0
    first_error: BadRow | None = None

    def summary(self) -> str:
        text = f"imported {self.imported}, skipped {self.skipped}"
        if self.first_error is not None:
            text += f" (first: {self.first_error})"
        if self.already:
            text += f"; {self.already} already in the ledger"
        return text


class Ledger:
    """The ledger of one store, kept open: ``with Ledger() as ledger: ledger.record(...)``.

    ``db`` is a SQLite path (default: ``MCPMETER_DB``, else the default store); or pass an
    open ``store``, which is then left open on :meth:`close`.
    """

    def __init__(self, db: str | os.PathLike[str] | None = None, *, store: Store | None = None) -> None:
        self._owned = store is None
        self.store: Store = (
            store if store is not None else open_store(resolve_db(os.fspath(db) if db else None))
        )

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.store.close()

    def record(
        self,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        agent_id: str | None = None,
        project_id: str | None = None,
        ts: float | datetime | str | None = None,
        tags: Mapping[str, str] | None = None,
        source: str = "api",
    ) -> bool:
        """Add one LLM call; False when ``(source, request_id)`` is already in the ledger.

        ``agent_id``, ``project_id`` and ``tags`` default to ``MCPMETER_AGENT_ID`` (or
        ``MCPMETER_AGENT_NAME``), ``MCPMETER_PROJECT_ID`` and ``MCPMETER_TAGS``, as for ``wrap``.
        ``ts`` (an aware datetime, ISO text, or a POSIX epoch number: seconds below 10^11,
        milliseconds from there, see :func:`_ts`) defaults to now. Token counts are integers
        from 0 to :data:`MAX_TOKENS`. A bad value raises :class:`BadRow` (a ``ValueError``)
        naming the field, and nothing is written.
        """
        from mcpmeter.metering.tags import parse_tag_pairs

        env = os.environ
        if tags is None:
            tags = parse_tag_pairs(env.get("MCPMETER_TAGS", "").split(","), "MCPMETER_TAGS")
        row = _row(
            ts=iso_utc(time.time()) if ts is None else _ts(ts, "ts"),
            agent_id=_opt_text(agent_id, "agent_id")
            or env.get("MCPMETER_AGENT_ID")
            or env.get("MCPMETER_AGENT_NAME")
            or None,
            project_id=_opt_text(project_id, "project_id") or env.get("MCPMETER_PROJECT_ID") or None,
            request_id=_text(request_id, "request_id"),
            model=_text(model, "model"),
            prompt_tokens=_count(prompt_tokens, "prompt_tokens"),
            completion_tokens=_count(completion_tokens, "completion_tokens"),
            cached_tokens=_count(cached_tokens, "cached_tokens"),
            source=_text(source, "source"),
            tags=_tags_json({str(k): str(v) for k, v in tags.items()}),
        )
        return self.write([row]) == 1

    def write(self, rows: Iterable[LedgerRow]) -> int:
        """Insert ``rows`` in one transaction; the number new to the ledger.

        Every :class:`LedgerRow` was checked when it was made (a bad count raises
        :class:`BadRow` there), so a batch never fails on one row's values.
        """
        with self.store.transaction():
            return self.store.executemany(_INSERT, [row.values() for row in rows])


def record(
    *,
    request_id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    agent_id: str | None = None,
    project_id: str | None = None,
    ts: float | datetime | str | None = None,
    tags: Mapping[str, str] | None = None,
    source: str = "api",
    db: str | os.PathLike[str] | None = None,
) -> bool:
    """Add one LLM call to the ledger at ``db`` (default ``MCPMETER_DB``); False if it was there.

    Opens and closes the store each time: keep a :class:`Ledger` open to write many rows.
    See :meth:`Ledger.record` for the fields.
    """
    with Ledger(db) as ledger:
        return ledger.record(
            request_id=request_id,
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            agent_id=agent_id,
            project_id=project_id,
            ts=ts,
            tags=tags,
            source=source,
        )


def import_file(
    store: Store,
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    strict: bool = False,
    source: str | None = None,
    agent_id: str | None = None,
    project_id: str | None = None,
    batch: int = BATCH,
    now: float | None = None,
) -> ImportResult:
    """Import the LLM calls in ``path`` (``-`` for stdin) into ``store``, streamed.

    ``format`` ``auto`` decides from the file's first record. ``source``, ``agent_id`` and
    ``project_id``, when given, replace what every row says. A bad record is skipped and
    counted (the first one is kept in the result), or with ``strict`` raised as
    :class:`BadRow` once the rows before it are written.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    name = "<stdin>" if os.fspath(path) == "-" else os.fspath(path)
    now = time.time() if now is None else now
    stream: IO[bytes]
    if name == "<stdin>":
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(path, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        return _import(store, stream, name, format, strict, source, agent_id, project_id, max(1, batch), now)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _import(
    store: Store,
    stream: IO[bytes],
    name: str,
    format: str,
    strict: bool,
    source: str | None,
    agent_id: str | None,
    project_id: str | None,
    batch_size: int,
    now: float,
) -> ImportResult:
    result = ImportResult(name, format, source)
    ledger = Ledger(store=store)
    batch: list[LedgerRow] = []

    def flush() -> None:
        if batch:
            added = ledger.write(batch)
            result.imported += added
            result.already += len(batch) - added
            batch.clear()

    try:
        container, records = _records(_utf8_lines(enumerate(stream, 1)), name)
        mapper: Mapper | None = None
        for line, record in records:
            if mapper is None and not isinstance(record, BadRow):
                if format == "auto":
                    detected = detect_format(record, container)
                    if detected is None:
                        raise UsageError(
                            f"{name}:{line}: cannot tell the format from the first record:"
                            f" use --format {'|'.join(FORMATS[1:])}"
                        )
                    result.format = detected
                mapper = MAPPERS[result.format]
            try:
                if isinstance(record, BadRow):
                    raise record
                assert mapper is not None
                row = mapper(record, source or result.format, now)
            except BadRow as exc:
                error = exc.at(name, line)
                if strict:
                    flush()
                    raise BadRow(
                        error.field,
                        f"{error.problem} (--strict: stopped here;"
                        f" {_rows(result.imported)} imported before it)",
                        name,
                        line,
                    ) from None
                result.skipped += 1
                if result.first_error is None:
                    result.first_error = error
                continue
            if source is not None or agent_id is not None or project_id is not None:
                row = LedgerRow(
                    row.ts,
                    agent_id if agent_id is not None else row.agent_id,
                    project_id if project_id is not None else row.project_id,
                    row.request_id,
                    row.model,
                    row.prompt_tokens,
                    row.completion_tokens,
                    row.cached_tokens,
                    source if source is not None else row.source,
                    row.tags,
                )
            batch.append(row)
            if len(batch) >= batch_size:
                flush()
    except NotUtf8 as exc:
        flush()
        raise MeterError(
            f"{name}:{exc.line}: not UTF-8 (byte 0x{exc.byte:02x} at column {exc.column}): convert the file"
            f" to UTF-8 (e.g. iconv -f latin1 -t utf-8); {_rows(result.imported)} imported before it"
        ) from None
    flush()
    return result
