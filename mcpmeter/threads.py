"""The threads mcpmeter starts leave the handled signals to the main thread.

SIGINT, SIGTERM and SIGHUP must interrupt the main thread's waits (``waitpid``, joins, the
event loop) at once, so every other thread blocks them first (see :mod:`mcpmeter.proxy.shutdown`
for what the main thread does with them).
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def quiet_thread() -> None:
    """Call first in every thread mcpmeter starts: the handled signals then reach the main
    thread, whose waits (``waitpid``, joins, the event loop) they interrupt at once."""
    with contextlib.suppress(ValueError, OSError):
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


class QuietTimer(threading.Timer):
    """A :class:`threading.Timer` whose thread leaves the handled signals to the main thread."""

    def run(self) -> None:
        quiet_thread()
        super().run()
