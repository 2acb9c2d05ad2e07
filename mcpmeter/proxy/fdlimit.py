"""The open-file limit: mcpmeter's own raised to the hard limit, its children's left as found.

Every connection, server pipe and store file is a file descriptor, and the usual soft
limit of 1,024 is reached by a few hundred HTTP clients (after which new connections hang
and accept() fails). ``wrap`` raises its soft limit to the hard one at start. The servers
it starts get the limit it was started with back (in their ``preexec_fn``): some programs
still use select(), which breaks on descriptors past 1,024, and ``wrap`` changes nothing a
server would see without it.
"""

from __future__ import annotations

import resource

#: The soft limit this process was started with, once :func:`raise_fd_limit` raised it.
_inherited: int | None = None
#: Where the hard limit is unlimited (not on Linux, whose hard limit is finite): a ceiling.
_CEILING = 1 << 20


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    global _inherited
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a sandbox may refuse: keep what there is
            return soft
        if _inherited is None:
            _inherited = soft
        return target
    return soft


def restore_fd_limit() -> None:
    """In a child between fork and exec: the soft limit mcpmeter itself was started with."""
    if _inherited is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (_inherited, hard))
