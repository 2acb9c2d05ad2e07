"""The import formats: each a msgspec struct of the members it reads, and the row it makes.

A record of a file (one JSON object, or one CSV row keyed by its header) is converted to its
format's struct, then :meth:`FormatRecord.row` checks each member by the rules of
:mod:`mcpmeter.ledger.rows`. The struct's members are typed :data:`Json` (the value as the
file gave it) on purpose: a value of the wrong type is then a bad row named in the ledger's
words, never a decoder's error. Members whose presence (not only value) decides something
default to ``msgspec.UNSET``.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
import orjson

from mcpmeter.ledger.rows import (
    BadRow,
    LedgerRow,
    checked_row,
    count_field,
    is_missing,
    object_field,
    optional_text_field,
    shown,
    tags_field,
    tags_json,
    text_field,
    time_field,
)
from mcpmeter.record import iso_utc

FORMATS = ("auto", "jsonl", "csv", "litellm", "openai", "anthropic")

#: A member as the file gave it: a JSON value, or a CSV cell's text. Checked by the row rules,
#: not by the decoder (see the module's docstring).
Json = Any

_Part = TypeVar("_Part", bound=msgspec.Struct)


class FormatRecord(msgspec.Struct, frozen=True):
    """One record of an import file, read as its format reads it."""

    def row(self, source: str, now: float) -> LedgerRow:
        """The record's ledger row; ``source`` when the record names none, ``now`` (POSIX
        seconds) when a format's record has no time. A member that breaks a rule raises
        :class:`BadRow`, the members checked in the order the format lists them."""
        raise NotImplementedError


def _part(value: Json, kind: type[_Part]) -> _Part:
    """A nested object read as ``kind``; ``kind``'s defaults when ``value`` is not an object."""
    return msgspec.convert(value, kind) if isinstance(value, dict) else kind()


def _usage(value: Json, kind: type[_Part]) -> _Part:
    """A provider's required ``usage`` object, read as ``kind``."""
    if not isinstance(value, dict):
        raise BadRow("usage", "missing" if value is None else f"expected an object, got {shown(value)}")
    return msgspec.convert(value, kind)


def _dig(value: Json, key: str) -> Json:
    """``value[key]`` when ``value`` is an object; None otherwise."""
    return value.get(key) if isinstance(value, Mapping) else None


def _first_text(*values: Json) -> str | None:
    for value in values:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


# -- the ledger's own columns ------------------------------------------------------------------


class LedgerRecord(FormatRecord, frozen=True):
    """``jsonl`` and ``csv``: a row in the ledger's own columns."""

    ts: Json = None
    agent_id: Json = None
    project_id: Json = None
    request_id: Json = None
    model: Json = None
    prompt_tokens: Json = None
    completion_tokens: Json = None
    cached_tokens: Json = None
    source: Json = None
    tags: Json = None

    def row(self, source: str, now: float) -> LedgerRow:
        return checked_row(
            ts=time_field(self.ts, "ts"),
            agent_id=optional_text_field(self.agent_id, "agent_id"),
            project_id=optional_text_field(self.project_id, "project_id"),
            request_id=text_field(self.request_id, "request_id"),
            model=text_field(self.model, "model"),
            prompt_tokens=count_field(self.prompt_tokens, "prompt_tokens"),
            completion_tokens=count_field(self.completion_tokens, "completion_tokens"),
            cached_tokens=count_field(self.cached_tokens, "cached_tokens", required=False),
            source=optional_text_field(self.source, "source") or source,
            tags=tags_field(self.tags, "tags"),
        )


# -- LiteLLM spend logs ------------------------------------------------------------------------


class LiteLLMTenant(msgspec.Struct, frozen=True):
    """``metadata.spend_logs_metadata`` or ``metadata.requester_metadata``: ids a caller attached."""

    agent_id: Json = None
    project_id: Json = None


class LiteLLMUsage(msgspec.Struct, frozen=True):
    """``metadata.usage_object``: the provider's usage as LiteLLM kept it (for cached tokens)."""

    prompt_tokens_details: Json = None
    cache_read_input_tokens: Json = None


class LiteLLMMetadata(msgspec.Struct, frozen=True):
    """A spend log's ``metadata`` (an object, or its JSON text in a CSV export)."""

    agent_id: Json = None
    project_id: Json = None
    spend_logs_metadata: Json = None
    requester_metadata: Json = None
    usage_object: Json = None
    user_api_key_alias: Json = None
    user_api_key_team_alias: Json = None


def _litellm_tags(value: Json) -> dict[str, str]:
    """``request_tags`` (a JSON list, or its text, or comma-separated text) as tags."""
    if is_missing(value):
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            value = [t for t in value.split(",") if t.strip()]
    if not isinstance(value, list):
        raise BadRow("request_tags", f"expected a list of tags, got {shown(value)}")
    tags: dict[str, str] = {}
    for tag in value:
        text = str(tag).strip()
        key, sep, val = text.partition(":") if ":" in text else text.partition("=")
        if sep and key.strip():
            tags[key.strip()] = val.strip()
        elif text:
            tags[text] = "true"
    return tags


class LiteLLMSpendLog(FormatRecord, frozen=True):
    """``litellm``: one spend log (a row of the ``SpendLogs`` table or of ``/spend/logs``)."""

    request_id: Json = None
    start_time: Json = msgspec.field(default=None, name="startTime")
    model: Json = None
    model_group: Json = None
    custom_llm_provider: Json = None
    prompt_tokens: Json = None
    completion_tokens: Json = None
    metadata: Json = None
    request_tags: Json = None
    end_user: Json = None
    team_id: Json = None

    def row(self, source: str, now: float) -> LedgerRow:
        metadata = _part(object_field(self.metadata, "metadata"), LiteLLMMetadata)
        spend_meta = _part(metadata.spend_logs_metadata, LiteLLMTenant)
        asked_meta = _part(metadata.requester_metadata, LiteLLMTenant)
        tags = _litellm_tags(self.request_tags)
        model = optional_text_field(self.model, "model") or text_field(self.model_group, "model")
        provider = optional_text_field(self.custom_llm_provider, "custom_llm_provider")
        if provider and model.startswith(provider + "/"):
            model = model[len(provider) + 1 :]
        usage = _part(metadata.usage_object, LiteLLMUsage)
        cached = _dig(usage.prompt_tokens_details, "cached_tokens")
        if is_missing(cached):
            cached = usage.cache_read_input_tokens
        return checked_row(
            ts=time_field(self.start_time, "startTime"),
            agent_id=_first_text(
                tags.get("agent"),
                metadata.agent_id,
                spend_meta.agent_id,
                asked_meta.agent_id,
                metadata.user_api_key_alias,
            ),
            project_id=_first_text(
                tags.get("project"),
                metadata.project_id,
                spend_meta.project_id,
                asked_meta.project_id,
                self.end_user,
                metadata.user_api_key_team_alias,
                self.team_id,
            ),
            request_id=text_field(self.request_id, "request_id"),
            model=model,
            prompt_tokens=count_field(self.prompt_tokens, "prompt_tokens"),
            completion_tokens=count_field(self.completion_tokens, "completion_tokens"),
            cached_tokens=count_field(cached, "metadata.usage_object cached tokens", required=False),
            source=source,
            tags=tags_json(tags),
            cached_field="metadata.usage_object cached tokens",
        )


# -- provider responses ------------------------------------------------------------------------


class ProviderResponse(FormatRecord, frozen=True):
    """The members every provider format reads beside its usage: the call's id and model, and
    the ``agent_id``/``project_id`` a logger put beside the response (or in its ``metadata``)."""

    id: Json = None
    model: Json = None
    usage: Json = None
    agent_id: Json = None
    project_id: Json = None
    metadata: Json = None

    def tenant(self) -> tuple[str | None, str | None]:
        """``agent_id`` and ``project_id``, if any."""
        return (
            _first_text(self.agent_id, _dig(self.metadata, "agent_id")),
            _first_text(self.project_id, _dig(self.metadata, "project_id")),
        )


class OpenAIUsage(msgspec.Struct, frozen=True):
    """``usage`` of Chat Completions (``prompt_tokens``...) or Responses (``input_tokens``...)."""

    prompt_tokens: Json = msgspec.UNSET
    completion_tokens: Json = None
    prompt_tokens_details: Json = None
    input_tokens: Json = msgspec.UNSET
    output_tokens: Json = None
    input_tokens_details: Json = None


class OpenAIResponse(ProviderResponse, frozen=True):
    """``openai``: a Chat Completions or Responses object."""

    created: Json = None
    created_at: Json = None

    def row(self, source: str, now: float) -> LedgerRow:
        usage = _usage(self.usage, OpenAIUsage)
        if usage.prompt_tokens is not msgspec.UNSET or usage.input_tokens is msgspec.UNSET:
            prompt = count_field(usage.prompt_tokens, "usage.prompt_tokens")  # Chat Completions
            completion = count_field(usage.completion_tokens, "usage.completion_tokens")
            cached_field = "usage.prompt_tokens_details.cached_tokens"
            cached = _dig(usage.prompt_tokens_details, "cached_tokens")
        else:  # Responses
            prompt = count_field(usage.input_tokens, "usage.input_tokens")
            completion = count_field(usage.output_tokens, "usage.output_tokens")
            cached_field = "usage.input_tokens_details.cached_tokens"
            cached = _dig(usage.input_tokens_details, "cached_tokens")
        created = self.created if not is_missing(self.created) else self.created_at
        agent_id, project_id = self.tenant()
        return checked_row(
            ts=time_field(created, "created"),
            agent_id=agent_id,
            project_id=project_id,
            request_id=text_field(self.id, "id"),
            model=text_field(self.model, "model"),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=count_field(cached, cached_field, required=False),
            source=source,
            tags="{}",
            cached_field=cached_field,
        )


class AnthropicUsage(msgspec.Struct, frozen=True):
    """``usage`` of a Messages object: the prompt is counted in three parts."""

    input_tokens: Json = None
    output_tokens: Json = None
    cache_creation_input_tokens: Json = None
    cache_read_input_tokens: Json = None


class AnthropicMessage(ProviderResponse, frozen=True):
    """``anthropic``: a Messages object (with the time a logger added, if any)."""

    ts: Json = None
    created_at: Json = None
    timestamp: Json = None

    def row(self, source: str, now: float) -> LedgerRow:
        usage = _usage(self.usage, AnthropicUsage)
        read = count_field(usage.cache_read_input_tokens, "usage.cache_read_input_tokens", required=False)
        written = count_field(
            usage.cache_creation_input_tokens, "usage.cache_creation_input_tokens", required=False
        )
        times = (("ts", self.ts), ("created_at", self.created_at), ("timestamp", self.timestamp))
        when = next(((field, value) for field, value in times if not is_missing(value)), None)
        agent_id, project_id = self.tenant()
        return checked_row(
            ts=time_field(when[1], when[0]) if when else iso_utc(now),
            agent_id=agent_id,
            project_id=project_id,
            request_id=text_field(self.id, "id"),
            model=text_field(self.model, "model"),
            prompt_tokens=count_field(usage.input_tokens, "usage.input_tokens") + written + read,
            completion_tokens=count_field(usage.output_tokens, "usage.output_tokens"),
            cached_tokens=read,
            source=source,
            tags="{}",
            prompt_field="usage.input_tokens + cache_creation_input_tokens + cache_read_input_tokens",
        )


#: The struct each format's records are read as.
RECORD_TYPES: dict[str, type[FormatRecord]] = {
    "jsonl": LedgerRecord,
    "csv": LedgerRecord,
    "litellm": LiteLLMSpendLog,
    "openai": OpenAIResponse,
    "anthropic": AnthropicMessage,
}


def read_record(record: dict[str, Any], format: str, source: str, now: float) -> LedgerRow:
    """The ledger row of one ``format`` record (a decoded JSON object, or a CSV row by its header)."""
    return msgspec.convert(record, RECORD_TYPES[format]).row(source, now)


def detect_format(record: Mapping[str, Any], container: str) -> str | None:
    """The format of a file whose first record is ``record`` (``container``: json or csv).

    It reads the record as it is, before any format's struct: telling the formats apart is
    a question of which members are there.
    """
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
