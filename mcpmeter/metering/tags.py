"""Tenant tags: who pays for a call (project, agent, session and free dimensions)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import msgspec

from mcpmeter.errors import UsageError


class Tenant(NamedTuple):
    """The tags stamped on every row a proxy writes."""

    project_id: str | None
    agent_id: str | None
    session_id: str
    tags: Mapping[str, str] = MappingProxyType({})

    @property
    def tags_json(self) -> str:
        """The free dimensions as a JSON object, keys sorted."""
        return msgspec.json.encode(dict(sorted(self.tags.items()))).decode()


def new_session_id() -> str:
    """A random (version 4) UUID, without importing :mod:`uuid` on the start-up path."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_tag_pairs(pairs: Sequence[str], source: str) -> dict[str, str]:
    """``["team=growth", "env=prod"]`` -> ``{"team": "growth", "env": "prod"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        pair = pair.strip()
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{source}: expected k=v, got {pair!r}")
        out[key] = value.strip()
    return out


def resolve_tenant(
    *,
    project: str | None = None,
    agent: str | None = None,
    session: str | None = None,
    tags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Tenant:
    """Flags win over env vars; a session id is generated when neither gives one.

    Env vars: ``MCPMETER_PROJECT_ID``, ``MCPMETER_AGENT_ID`` (alias ``MCPMETER_AGENT_NAME``),
    ``MCPMETER_SESSION_ID``, ``MCPMETER_TAGS`` (``k=v,k2=v2``). Flag tags are merged over the
    env tags key by key. Empty values count as not given.
    """
    env = os.environ if env is None else env
    project_id = project or env.get("MCPMETER_PROJECT_ID") or None
    agent_id = agent or env.get("MCPMETER_AGENT_ID") or env.get("MCPMETER_AGENT_NAME") or None
    session_id = session or env.get("MCPMETER_SESSION_ID") or new_session_id()
    merged = parse_tag_pairs(env.get("MCPMETER_TAGS", "").split(","), "MCPMETER_TAGS")
    merged.update(parse_tag_pairs(tags, "--tag"))
    return Tenant(project_id=project_id, agent_id=agent_id, session_id=session_id, tags=merged)
