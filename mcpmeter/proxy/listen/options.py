"""What one ``wrap --listen`` is asked to do: :class:`ListenOptions`, the ``--listen``
address, and the checks that refuse to start what must not."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from mcpmeter.errors import MeterError, UsageError
from mcpmeter.metering.tags import Tenant
from mcpmeter.proxy.listen.limits import ListenLimits
from mcpmeter.proxy.listen.security import is_loopback

if TYPE_CHECKING:
    from mcpmeter.metering.budget import Budget

#: How long the members of a batch wait for the server (``--batch-timeout``). Servers of
#: the 2025-06-18 revision on may drop a batch without a word; after this, mcpmeter answers
#: each member still unanswered with a -32000 error and tells the server it gave up.
BATCH_TIMEOUT_S = 60.0


class ListenOptions(NamedTuple):
    host: str
    port: int
    tenant: Tenant
    #: The session id was given (``--session`` / ``MCPMETER_SESSION_ID``): every session uses it.
    fixed_session: bool = False
    argv: list[str] | None = None
    url: str | None = None
    transport: str = "auto"
    headers: Mapping[str, str] = {}
    shared_server: bool = False
    trust_tag_headers: bool = False
    auth_token: str | None = None
    allow_origins: tuple[str, ...] = ()
    kill_after: float = 5.0
    #: The flag budgets of one session's tags (``--budget``, ``--max-calls``); stored ones too.
    budgets_for: Callable[[Tenant], tuple[Budget, ...]] | None = None
    max_repeat: int | None = None
    reject_as: str = "tool-error"
    #: ``--batch-timeout``: how long a batch's members wait for the server's answers.
    batch_timeout: float = BATCH_TIMEOUT_S
    #: ``--max-sessions``, ``--max-body``, ``--header-timeout`` ... (see listen/limits.py).
    limits: ListenLimits = ListenLimits()


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[::1]:PORT`` or ``PORT`` (on 127.0.0.1)."""
    host, colon, port = value.rpartition(":")
    if not colon:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"wrap: --listen expects HOST:PORT, got {value!r}")
    return host, int(port)


def check_options(options: ListenOptions) -> None:
    """Refuse what must not start: a bare non-loopback bind, a command that is not there."""
    if not is_loopback(options.host) and not options.auth_token:
        raise UsageError(
            f"wrap: --listen {options.host} is not a loopback address: "
            "give --auth-token (or MCPMETER_AUTH_TOKEN) to serve it"
        )
    if options.argv is not None and shutil.which(options.argv[0]) is None:
        if os.path.sep in options.argv[0] and os.path.exists(options.argv[0]):
            raise MeterError(f"permission denied: {options.argv[0]}", exit_code=126)
        raise MeterError(f"command not found: {options.argv[0]}", exit_code=127)
