"""Single keys from the terminal without blocking the screen, and signals that unwind cleanly.

:class:`KeyReader` puts the terminal in cbreak mode (keys arrive one by one, unechoed;
Ctrl-C still interrupts) and reads them on a thread, calling ``on_key`` for each. The
terminal is restored when the ``with`` block ends, however it ends: :func:`signals_raise`
turns SIGTERM and SIGHUP into an exception in the main thread, so those unwind through the
same ``with`` blocks as ``q``, Ctrl-C and errors do.

:func:`printable` makes text from the store safe to show on a terminal: tool names, agents,
servers and hashes are whatever a client or a server sent, and a control character among
them (an OSC 52 clipboard write, ``ESC[2J``, a bidi override) would act on the reader's
terminal instead of being read. Every human-readable output passes its data through it.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import IO, Any

#: What a terminal may act on rather than show: C0 controls (tab and newline included: one
#: value must stay on its line and in its column), DEL, C1 controls (8-bit CSI, OSC, ...),
#: and the bidi embeddings, overrides and isolates that reorder what follows them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with each control character written as a visible escape (``\\x1b``, ``\\u202e``).

    Text without any comes back unchanged (the same object). The escape is for reading, not
    reversible: a name that really contains a backslash, ``x``, ``1``, ``b`` looks the same.
    Machine-readable outputs (JSON, CSV, Parquet) keep the exact value instead.
    """
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_visible, text)


class Terminated(Exception):
    """A signal asked the process to end; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.exit_code = 128 + signum


@contextlib.contextmanager
def signals_raise(*signums: int) -> Iterator[None]:
    """Within the block, ``signums`` raise :class:`Terminated` in the main thread (once;
    a second signal during the unwinding is ignored so cleanup finishes)."""
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Terminated(signum)

    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class KeyReader:
    """Calls ``on_key(char)`` on a thread for each key typed on ``stream`` (a terminal).

    Escape sequences (arrows, function keys) are dropped whole. When ``stream`` is not a
    terminal it reads nothing and changes nothing.
    """

    def __init__(self, on_key: Callable[[str], Any], stream: IO[str] | None = None) -> None:
        self._on_key = on_key
        self._stream = stream if stream is not None else sys.stdin
        self._fd: int | None = None
        self._saved: list[Any] | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True while keys are being read."""
        return self._thread is not None

    def __enter__(self) -> KeyReader:
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            return self
        if not os.isatty(fd):
            return self
        self._fd = fd
        self._saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd, termios.TCSANOW)
            self._wake = os.pipe()
            self._thread = threading.Thread(target=self._run, name="mcpmeter-keys", daemon=True)
            self._thread.start()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        if self._fd is not None and self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        if self._wake is not None:
            for end in self._wake:
                with contextlib.suppress(OSError):
                    os.close(end)
            self._wake = None

    def _run(self) -> None:
        assert self._fd is not None and self._wake is not None
        fd, wake = self._fd, self._wake[0]
        while True:
            try:
                ready, _, _ = select.select([fd, wake], [], [])
                if wake in ready:
                    return
                data = os.read(fd, 64)
            except (OSError, ValueError):
                return
            if not data:
                return  # the terminal went away
            text = data.decode("utf-8", errors="ignore")
            for char in text.split("\x1b", 1)[0]:  # keys typed before an escape sequence
                with contextlib.suppress(Exception):
                    self._on_key(char)
