"""Signals from a ``wrap``'s start to its exit, and the bounded end of a relay.

MCP clients stop a server by closing its stdin, then SIGTERM a second or two later, then
SIGKILL. So SIGINT, SIGTERM and SIGHUP are mcpmeter's to handle from the moment the relay
starts until the process exits, never the default action (which would drop the rows not yet
written): while relaying, a signal does what the transport needs (forward it to the
server's process group, or stop the event loop); once the relay is over and the audit
writer is flushing, a signal makes it spill what is unwritten at once. Either way the exit
status is the one the contract gives (the server's, or 128+N when a signal ended it).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from mcpmeter.threads import HANDLED_SIGNALS

if TYPE_CHECKING:
    import asyncio

    from mcpmeter.metering.audit import AuditWriter

#: How long the writer may take at exit before what is left is spilled: well inside the
#: second or two an MCP client waits after closing stdin before it sends SIGTERM.
EXIT_FLUSH_S = 1.0
#: The same once a signal has come (SIGKILL may not be far behind).
SIGNALLED_FLUSH_S = 0.25


class Signals:
    """Our handlers for :data:`HANDLED_SIGNALS`, installed by :meth:`install` (main thread)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._action: Callable[[int], object] | None = None
        self._writer: AuditWriter | None = None
        self._wakeup = (-1, -1)

    def install(self) -> Signals:
        """Our handlers, and a wake-up pipe: whichever thread the kernel picks to take a
        signal, the main thread's event loop wakes (see :meth:`watch`)."""
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._handle)
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wakeup = (read, write)
        return self

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake ``loop`` (running on the main thread) when a signal comes, so that the Python
        handler runs at once even if the signal landed on one of the loop's worker threads."""
        loop.add_reader(self._wakeup[0], self._drain_wakeup)

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wakeup[0], 512):
                pass

    def while_relaying(self, action: Callable[[int], object] | None) -> None:
        """What a signal does while the relay runs (None: only remember it)."""
        self._action = action

    def while_flushing(self, writer: AuditWriter) -> None:
        """From now on a signal makes ``writer`` spill what is left and stop."""
        self._action = None
        self._writer = writer

    def flush_timeout(self) -> float:
        """How long the final flush may take (see :data:`EXIT_FLUSH_S`)."""
        return SIGNALLED_FLUSH_S if self.received else EXIT_FLUSH_S

    def done(self) -> None:
        """Every row is written or spilled: ignore these signals for the rest of the exit.

        The interpreter's own teardown would put the default actions back (and a SIGTERM
        then would end the process with -15 instead of the status the contract gives); an
        ignored signal stays ignored through it.
        """
        for sig in HANDLED_SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_IGN)

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        self.received.append(sig)
        if self._writer is not None:
            self._writer.hurry()
        elif self._action is not None:
            self._action(sig)
