"""Newline-delimited framing, without I/O.

The relay forwards the bytes it reads as they come; the :class:`LineSplitter` only tells the
meters where each frame (one line) ends. It never changes a byte and has no size limit: a
100 MB line is collected in one growing ``bytearray`` (no 64 KiB ``readline`` ceiling).
"""

from __future__ import annotations

from collections.abc import Callable

#: A line handler receives the frame without its ``\n`` (a trailing ``\r`` is kept: the
#: meter decides what the frame's size is) and the time its last byte was read.
LineHandler = Callable[[bytes | bytearray, float], None]


class LineSplitter:
    """Cuts a byte stream into lines and hands each complete line to ``on_line``.

    ``feed`` may be called with chunks split anywhere, including inside a multi-byte UTF-8
    sequence or between ``\\r`` and ``\\n``; the lines handed out are the same whatever the
    chunking. ``finish`` hands out a last line that had no newline (a peer that died while
    writing) and reports whether there was one.
    """

    __slots__ = ("_on_line", "_partial")

    def __init__(self, on_line: LineHandler) -> None:
        self._on_line = on_line
        self._partial = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes of the incomplete line held so far."""
        return len(self._partial)

    def feed(self, data: bytes, now: float) -> None:
        nl = data.find(b"\n")
        if nl < 0:
            self._partial += data
            return
        on_line = self._on_line
        if self._partial:
            self._partial += data[:nl]
            line = self._partial
            self._partial = bytearray()
            on_line(line, now)
        else:
            on_line(data[:nl], now)
        start = nl + 1
        find = data.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            on_line(data[start:nl], now)
            start = nl + 1
        if start < len(data):
            self._partial += data[start:]

    def finish(self, now: float) -> bool:
        """Hand out the unterminated last line, if any. Returns True when there was one."""
        if not self._partial:
            return False
        line = self._partial
        self._partial = bytearray()
        self._on_line(line, now)
        return True
