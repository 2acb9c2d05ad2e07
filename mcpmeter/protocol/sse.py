"""Server-sent events (the ``text/event-stream`` format), parsed and written, without I/O.

The parser follows the WHATWG HTML "event stream interpretation" rules: lines end with
``\\r\\n``, ``\\n`` or ``\\r``; a line starting with ``:`` is a comment; ``data`` lines are
joined with ``\\n``; a blank line dispatches the event; an event with no ``data`` line is
not dispatched; a leading UTF-8 byte order mark is dropped. Chunks may be cut anywhere
(inside a line, between ``\\r`` and ``\\n``) and the events are the same. Data stays
``bytes``: an MCP message is relayed as the exact bytes the server put in its ``data``
lines. There is no size limit beyond memory (a 100 MB event parses like a small one).
"""

from __future__ import annotations

from typing import NamedTuple

_BOM = b"\xef\xbb\xbf"


class Event(NamedTuple):
    """One dispatched event. ``event`` is ``"message"`` when the stream named no type."""

    event: str
    data: bytes
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Feed it bytes as they arrive; it returns the events each chunk completed."""

    __slots__ = (
        "_buffer",
        "_data",
        "_event",
        "_has_data",
        "_last_id",
        "_retry",
        "_scanned",
        "_started",
        "_strip_lf",
    )

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the start of the buffer known to hold no line end
        self._data: list[bytes] = []
        self._has_data = False
        self._event = ""
        self._retry: int | None = None
        self._last_id: str | None = None
        self._started = False
        self._strip_lf = False  # the previous chunk ended with "\r": a "\n" may follow

    @property
    def last_event_id(self) -> str | None:
        """The last ``id`` field seen (for a ``Last-Event-ID`` reconnection)."""
        return self._last_id

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by ``chunk``. Linear in the bytes fed, however they are cut."""
        if not chunk:
            return []
        buffer = self._buffer
        if self._strip_lf:
            self._strip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buffer += chunk
        if not self._started:
            if len(buffer) < 3 and _BOM.startswith(bytes(buffer)):
                return []
            if buffer[:3] == _BOM:
                del buffer[:3]
            self._started = True
        events: list[Event] = []
        size = len(buffer)
        find = buffer.find
        start = 0
        next_cr = find(b"\r", self._scanned)
        next_lf = find(b"\n", self._scanned)
        if next_cr < 0:
            next_cr = size
        if next_lf < 0:
            next_lf = size
        while next_cr < size or next_lf < size:
            if next_lf < next_cr:
                end = next_lf
                after = end + 1
            else:
                end = next_cr
                if end + 1 < size:
                    after = end + 2 if buffer[end + 1] == 0x0A else end + 1
                else:  # "\r" ends what we have: the line is over, and a "\n" may come next
                    after = size
                    self._strip_lf = True
            event = self._line(bytes(memoryview(buffer)[start:end]))
            if event is not None:
                events.append(event)
            start = after
            if next_cr < after:
                next_cr = find(b"\r", after)
                if next_cr < 0:
                    next_cr = size
            if next_lf < after:
                next_lf = find(b"\n", after)
                if next_lf < 0:
                    next_lf = size
        if start:
            del buffer[:start]
        self._scanned = len(buffer)
        return events

    def _line(self, line: bytes) -> Event | None:
        if not line:
            return self._dispatch()
        if line[0] == 0x3A:  # ":" a comment
            return None
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            skip = colon + 2 if line[colon + 1 : colon + 2] == b" " else colon + 1
            value = line[skip:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        event = None
        if self._has_data:
            data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
            event = Event(self._event or "message", data, self._last_id, self._retry)
        self._data = []
        self._has_data = False
        self._event = ""
        return event


def encode_event(data: bytes, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event as it goes on the wire; ``data`` may hold newlines (one ``data`` line each)."""
    head = b""
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    if b"\n" not in data and b"\r" not in data:
        return head + b"data: " + data + b"\n\n"
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
