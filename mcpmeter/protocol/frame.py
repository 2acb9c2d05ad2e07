"""Frames, without I/O: newline-delimited framing, and one frame decoded once.

The relay forwards the bytes it reads as they come; the :class:`LineSplitter` only tells the
meters where each frame (one line) ends. It never changes a byte and has no size limit: a
100 MB line is collected in one growing ``bytearray`` (no 64 KiB ``readline`` ceiling).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from mcpmeter.protocol.envelope import (
    Buffer,
    DecodeError,
    Message,
    ValidationError,
    decode_batch,
    decode_message,
    read_batch,
    read_envelope,
)

decode_json = msgspec.json.decode

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


# -- one frame, decoded once -------------------------------------------------------------------

#: Directions: ``c2s`` frames travel client -> server, ``s2c`` server -> client.
C2S = "c2s"
S2C = "s2c"

#: What a frame turned out to be (:attr:`Frame.kind`).
MESSAGE = "message"
BATCH = "batch"
BLANK = "blank"
NOT_JSON = "not_json"
NOT_JSONRPC = "not_jsonrpc"

_WHITESPACE = frozenset(b" \t\r\n")
#: Frames that cannot be JSON-RPC are parsed only up to this size, to classify them right.
_CLASSIFY_LIMIT = 1 << 16


def first_byte(data: Buffer) -> int | None:
    """The first byte that is not JSON whitespace, or None for a blank frame."""
    for i in range(len(data)):
        byte = data[i]
        if byte not in _WHITESPACE:
            return byte
    return None


def _read_deep(data: Buffer) -> Message | None:
    """The envelope of a message nested too deeply for msgspec, read without recursing;
    None when even that cannot be read (then it is junk like any other)."""
    try:
        return read_envelope(data)[0]
    except (DecodeError, UnicodeDecodeError):
        return None


class Frame:
    """One frame seen on the relay: its exact bytes, the way it travelled, when it was read.

    ``data`` is the frame without its newline (a trailing ``\\r`` is kept; :attr:`size`
    leaves it out), possibly a view of the bytes read: it is not copied, and nothing that
    keeps a frame's message past the frame's life may keep its ``arguments``. The envelope
    is decoded on first use and only once, whoever asks first (the budget gate before the
    frame is forwarded, the meter after it, the HTTP routing): :attr:`kind` says what the
    frame is, :attr:`message` is the message of a single-message frame, :attr:`members`
    the members of a batch with their own bytes. Decoding never raises: a frame that is
    not JSON, or not JSON-RPC, is a kind.
    """

    __slots__ = ("_kind", "_members", "_message", "data", "deep", "direction", "seen")

    def __init__(self, data: Buffer, direction: str, seen: float) -> None:
        self.data = data
        self.direction = direction
        self.seen = seen
        #: Whether the bounded reader decoded it (nested deeper than msgspec can recurse).
        self.deep = False
        self._kind: str | None = None
        self._message: Message | None = None
        self._members: list[tuple[Buffer, Message | None]] = []

    def tobytes(self) -> bytes:
        """The frame's bytes as ``bytes`` (the same object when they already are)."""
        data = self.data
        return data if isinstance(data, bytes) else bytes(data)

    @property
    def size(self) -> int:
        """The frame's size in bytes, a trailing ``\\r`` left out (what a row records)."""
        data = self.data
        size = len(data)
        return size - 1 if size and data[size - 1] == 0x0D else size

    @property
    def kind(self) -> str:
        kind = self._kind
        if kind is None:
            kind = self._decode()
        return kind

    @property
    def message(self) -> Message | None:
        """The message, when the frame is one (:data:`MESSAGE`)."""
        if self._kind is None:
            self._decode()
        return self._message

    @property
    def members(self) -> list[tuple[Buffer, Message | None]]:
        """A batch's members (:data:`BATCH`): each one's bytes and its message, None for a
        member that is not a JSON-RPC message."""
        if self._kind is None:
            self._decode()
        return self._members

    def _decode(self) -> str:
        data = self.data
        size = len(data)
        first = data[0] if size and data[0] not in _WHITESPACE else first_byte(data)
        if first == 0x7B:  # "{"
            kind = self._decode_object(data)
        elif first == 0x5B:  # "[": a batch, each member with its own bytes
            kind = self._decode_batch(data)
        elif first is None:
            kind = BLANK
        elif size <= _CLASSIFY_LIMIT:
            try:
                decode_json(data)  # a JSON scalar is JSON, just not JSON-RPC
                kind = NOT_JSONRPC
            except (DecodeError, UnicodeDecodeError):
                kind = NOT_JSON
        else:
            kind = NOT_JSON
        self._kind = kind
        return kind

    def _decode_object(self, data: Buffer) -> str:
        try:
            self._message = decode_message(data)
        except ValidationError:
            return NOT_JSONRPC
        except (DecodeError, UnicodeDecodeError):  # invalid UTF-8 is not JSON either
            return NOT_JSON
        except RecursionError:  # nested too deeply for msgspec: the bounded reader
            self.deep = True
            self._message = _read_deep(data)
            if self._message is None:
                return NOT_JSON
        return MESSAGE

    def _decode_batch(self, data: Buffer) -> str:
        raws: list[msgspec.Raw] | list[memoryview]
        try:
            raws = decode_batch(data)
        except (DecodeError, ValidationError, UnicodeDecodeError):
            return NOT_JSON
        except RecursionError:
            self.deep = True
            try:
                raws = read_batch(data)
            except DecodeError:
                return NOT_JSON
        if not raws:
            return NOT_JSONRPC
        members = self._members
        for raw in raws:
            member: Message | None
            try:
                member = decode_message(raw)
            except (DecodeError, ValidationError, UnicodeDecodeError):
                member = None
            except RecursionError:
                self.deep = True
                member = _read_deep(raw)
            members.append((raw, member))
        return BATCH
