"""Who may talk to ``wrap --listen``: the Origin and Host checks, the bearer token, CORS.

Only loopback addresses are served without ``--auth-token`` (``Authorization: Bearer``,
compared in constant time). ``Origin`` is checked on every request (DNS rebinding): absent,
a localhost origin, or one given with ``--allow-origin``; anything else gets 403.

A loopback bind without a token also checks ``Host`` (421 unless a loopback name), since a
DNS-rebinding page sends no ``Origin`` on its same-origin GETs. Accepted browser origins
get CORS answers.

No I/O here: the application (:mod:`mcpmeter.proxy.listen.asgi`) applies these checks
before any handler runs: the Origin, then the Host, then a browser's preflight, then the
token.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from mcpmeter.proxy.listen.http import Message, Send

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether a bind address is this machine's own (``localhost`` or a loopback IP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No ``Origin`` (not a browser), a localhost origin, or one listed in ``allowed``."""
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    try:
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and host in _LOCAL_HOSTS


def host_is_local(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name (any port)."""
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.strip("[]").lower() in _LOCAL_HOSTS


#: The answer to a browser's preflight (OPTIONS) from an accepted origin.
CORS_HEADERS = [
    (b"access-control-allow-methods", b"GET, POST, DELETE"),
    (
        b"access-control-allow-headers",
        b"authorization, content-type, last-event-id, mcp-session-id, mcp-protocol-version, mcp-method, "
        b"mcp-name, x-request-id, x-mcpmeter-project, x-mcpmeter-agent, x-mcpmeter-session",
    ),
    (b"access-control-max-age", b"600"),
]
_CORS_EXPOSE = (b"access-control-expose-headers", b"mcp-session-id, mcp-protocol-version")


def with_cors(send: Send, origin: str) -> Send:
    """``send``, adding the CORS headers an allowed browser origin needs to read the answer."""
    allow = [(b"access-control-allow-origin", origin.encode("latin-1")), _CORS_EXPOSE, (b"vary", b"Origin")]

    async def cors_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", []), *allow])
        await send(message)

    return cors_send


def authorized(value: str | None, token: bytes) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` as its bearer token."""
    scheme, _, given = (value or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)
