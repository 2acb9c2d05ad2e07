"""mcpmeter's own messages: one line each, on stderr (stdout belongs to JSON-RPC)."""

from __future__ import annotations

import os
import sys
import threading

_once: set[str] = set()
_lock = threading.Lock()


def warn(message: str) -> None:
    """Write ``mcpmeter: message`` to stderr. Never raises."""
    try:
        sys.stderr.write(f"mcpmeter: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def warn_once(key: str, message: str) -> None:
    """Like :func:`warn`, but only the first time ``key`` is seen in this process."""
    with _lock:
        if key in _once:
            return
        _once.add(key)
    warn(message)


def verbose() -> bool:
    """True when ``MCPMETER_LOG=info`` (or ``debug``) asks for a summary at exit."""
    return os.environ.get("MCPMETER_LOG", "").lower() in {"info", "debug"}
