"""Redacted copies of tool arguments, for ``wrap --record-args``.

Arguments are never stored by default. With ``--record-args`` a copy is stored in which
values under keys that name a secret are replaced, and strings that look like credentials
(bearer tokens, API keys of common providers, JWTs, private keys, passwords in URLs) are
masked wherever they appear. The copy is cut at :data:`MAX_ARGS_BYTES`.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

MASK = "[REDACTED]"
MAX_ARGS_BYTES = 4096

#: A key names a secret when, lower-cased without separators, it ends with one of these
#: (``accessToken``, ``X-Api-Key``, ``db_password``) or is one of the short ones exactly.
_SECRET_SUFFIXES = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "accesskey",
    "secretkey",
    "signingkey",
    "credential",
    "credentials",
    "cookie",
    "authorization",
    "signature",
)
_SECRET_KEYS = frozenset({"auth", "pin", "otp", "pwd", "key"})
_SEPARATORS = re.compile(r"[^a-z0-9]")
_SECRET_VALUE = re.compile(
    r"(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"  # Authorization header values
    r"|\bsk-(?:ant-|proj-|live_|test_)?[A-Za-z0-9_-]{16,}"  # OpenAI, Anthropic, Stripe
    r"|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"  # user:password@ in URLs
)


def is_secret_key(key: str) -> bool:
    """``api_key``, ``X-Api-Key``, ``accessToken``, ``password``: yes. ``max_tokens``, ``author``: no."""
    name = _SEPARATORS.sub("", key.lower())
    return name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES)


def redact(value: Any) -> Any:
    """A copy of ``value`` with secrets masked (keys by name, strings by pattern)."""
    if isinstance(value, dict):
        return {
            key: MASK if isinstance(key, str) and is_secret_key(key) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return _SECRET_VALUE.sub(MASK, value)
    return value


def redacted_json(arguments: Any) -> str:
    """The redacted arguments as JSON text, cut at :data:`MAX_ARGS_BYTES` (marked ``...``)."""
    text = msgspec.json.encode(redact(arguments))
    if len(text) > MAX_ARGS_BYTES:
        return text[: MAX_ARGS_BYTES - 3].decode("utf-8", "ignore") + "..."
    return text.decode()
