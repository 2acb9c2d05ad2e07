"""What the HTTP transports need to know about a JSON-RPC message, and id surgery on its bytes.

Routing a message over HTTP needs its kind, id, method, the name a 2026-07-28 request
mirrors in ``Mcp-Name``, the protocol version in its ``_meta``, and a progress token. A
:class:`Head` holds those, read from the frame's one decoded envelope
(:class:`~mcpmeter.protocol.frame.Frame`), which the meter and the budget gate read too.

Multiplexing several clients over one server rewrites request ids. :func:`member_span`
finds the exact bytes of a top-level member's value, so an id is swapped in place and every
other byte of the frame stays as it was: the object's members are decoded as
``msgspec.Raw`` (zero-copy slices of the frame), and a short scan over the keys walks
from one member to the next by the length of each raw value, never through its contents.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple

import msgspec

from mcpmeter.protocol.envelope import UNSET, Error, Message, Params, Result, decode_message, valid_id
from mcpmeter.protocol.frame import BATCH, MESSAGE, Frame, first_byte

#: Protocol revisions negotiated with ``initialize`` (anything else on an HTTP request is
#: the 2026-07-28 per-request envelope).
HANDSHAKE_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
PROTOCOL_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
#: Methods whose ``Mcp-Name`` header mirrors a params member (2026-07-28).
NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
#: JSON-RPC error code for headers that disagree with the body (2026-07-28).
HEADER_MISMATCH = -32020
#: The code of the errors mcpmeter answers itself when the upstream cannot.
UPSTREAM_ERROR = -32000
#: JSON-RPC's own codes, for bodies mcpmeter refuses before they reach the server.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
#: How deep arrays and objects may nest in a body from a client. The decoders recurse
#: (msgspec gives up near Python's recursion limit, servers' parsers often sooner), so a
#: deeper body is refused up front, the same way whatever the stack depth of the moment.
MAX_DEPTH = 512

_WS = b" \t\r\n"


_decode_members = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_decode_elements = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_str = msgspec.json.Decoder(str).decode

REQUEST = "request"
NOTIFICATION = "notification"
RESPONSE = "response"
OTHER = "other"


class Head(NamedTuple):
    """The routing facts of one JSON-RPC message."""

    kind: str
    id: object = None
    method: str | None = None
    name: str | None = None
    version: str | None = None
    progress_token: object = None
    cancelled_id: object = None
    error_code: int | None = None
    result_version: str | None = None


def id_key(value: object) -> tuple[str, object]:
    """A dict key for a JSON-RPC id: ``1`` and ``"1"`` differ, as they do on the wire."""
    return (type(value).__name__, value)


def head_of(msg: Message | None) -> Head:
    """The routing facts of one decoded message (:data:`OTHER` for a member that is none)."""
    if msg is None:
        return Head(OTHER)
    method = msg.method
    params = msg.params
    if isinstance(method, str):
        name = version = progress = cancelled = None
        if isinstance(params, Params):
            key = NAME_PARAMS.get(method)
            if key is not None:
                value = params.name if key == "name" else params.uri
                name = value if isinstance(value, str) else None
            meta = params.meta
            if isinstance(meta, dict):
                found = meta.get(PROTOCOL_VERSION_KEY)
                if isinstance(found, str):
                    version = found
                progress = meta.get("progressToken")
            if method == "notifications/progress":
                progress = params.progressToken
            elif method == "notifications/cancelled" and valid_id(params.requestId):
                cancelled = params.requestId
        if msg.id is not UNSET and msg.id is not None:
            if not valid_id(msg.id):
                return Head(OTHER)
            return Head(REQUEST, msg.id, method, name, version, progress)
        return Head(NOTIFICATION, None, method, name, version, progress, cancelled)
    if msg.id is not UNSET and (msg.result is not UNSET or msg.error is not UNSET):
        code = None
        if isinstance(msg.error, Error) and type(msg.error.code) is int:
            code = msg.error.code
        result_version = None
        if isinstance(msg.result, Result) and isinstance(msg.result.protocolVersion, str):
            result_version = msg.result.protocolVersion
        return Head(RESPONSE, msg.id, error_code=code, result_version=result_version)
    return Head(OTHER)


def heads(frame: Frame) -> list[Head]:
    """One head per message: one for an object, one per member for a batch; none if not JSON.

    Read from the frame's one decoded envelope (the meter reads the same). A batch member
    that is not a JSON-RPC message (a number, a string, ``{}``) has a head of kind
    ``other``, so the valid members of a batch keep theirs. A frame nested too deeply for
    the decoder has no heads, like any frame that is not JSON.
    """
    kind = frame.kind
    if frame.deep:
        return []
    if kind is MESSAGE:
        return [head_of(frame.message)]
    if kind is BATCH:
        return [head_of(member) for _raw, member in frame.members]
    return []


def is_message(head: Head) -> bool:
    """Whether a head is a JSON-RPC request, notification or response (not junk)."""
    return head.kind != OTHER


_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKET_OR_QUOTE = bytes(b for b in range(256) if b not in b'[]{}"')


def _brackets(text: bytes) -> bytes:
    """The brackets of the JSON text ``text`` that are not inside strings, all as ``[`` ``]``.

    Escapes go first (``\\\\``, then ``\\"``; read left to right, as a decoder does), so
    every quote left delimits a string. Then only brackets and quotes are kept; each pair of
    adjacent quotes (a string without brackets) is dropped, which leaves every bracket with
    the same parity of quotes before it; the strings still left are cut out by that parity.
    Every step runs in C, and the last only over strings that hold a bracket.
    """
    if b"\\" in text:
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = text.translate(_SQUARE, _NOT_BRACKET_OR_QUOTE).replace(b'""', b"")
    if b'"' in kept:
        kept = b"".join(kept.split(b'"')[::2])
    return kept


def too_deep(frame: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``frame`` nests arrays and objects deeper than ``limit``.

    Meant for text the decoder accepted (every string closed). A frame with at most
    ``limit`` brackets cannot be deeper, which two byte counts tell: nearly every message
    stops there. Otherwise each round peels the innermost level (every empty pair) off its
    brackets, so what is left after ``limit`` rounds nests deeper than ``limit``. About
    15 ms for a 4 MB body of small objects.
    """
    if frame.count(b"[") + frame.count(b"{") <= limit:
        return False
    brackets = _brackets(frame)
    if brackets.startswith(b"[" * (limit + 1)):
        return True
    for _ in range(limit):
        peeled = brackets.replace(b"[]", b"")
        if len(peeled) == len(brackets):  # empty, or not balanced: not a question of depth
            return False
        brackets = peeled
    return bool(brackets)


def body_problem(frame: bytes) -> tuple[int, str]:
    """Why a frame with no JSON-RPC message in it is refused: a code and a message.

    Only called on that rare path, so decoding the whole frame to tell "not JSON" (-32700)
    from "JSON, but no JSON-RPC message" (-32600) costs the common path nothing.
    """
    if first_byte(frame) is None:
        return PARSE_ERROR, "mcpmeter: Parse error: the body is empty"
    try:
        value = msgspec.json.decode(frame)
    except RecursionError:
        return PARSE_ERROR, f"mcpmeter: Parse error: JSON nested deeper than {MAX_DEPTH} levels"
    except (msgspec.DecodeError, msgspec.ValidationError):
        return PARSE_ERROR, "mcpmeter: Parse error: the body is not valid JSON"
    if value == []:
        return INVALID_REQUEST, "mcpmeter: Invalid Request: an empty batch"
    return INVALID_REQUEST, "mcpmeter: Invalid Request: not a JSON-RPC message"


class Member(NamedTuple):
    """One message of a frame (the frame itself, or one member of a batch), as bytes."""

    head: Head
    raw: bytes
    #: The exact bytes of its id (a string or a number), or ``null`` when it has none.
    raw_id: bytes


def _raw_id(message: bytes) -> bytes:
    spans = member_spans(message)
    if spans is None or "id" not in spans:
        return b"null"
    start, end = spans["id"]
    raw = message[start:end]
    return raw if raw[:1] in b'"-0123456789' else b"null"


def _member_head(raw: bytes) -> Head:
    try:
        return head_of(decode_message(raw))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Head(OTHER)


def frame_members(frame: bytes) -> list[Member]:
    """Each message of ``frame`` with its exact bytes and id bytes; none if it is not JSON.

    For the rarer paths (a batch with junk or a reused id, mcpmeter answering for the
    server): it slices the frame, so the ids mcpmeter answers with are byte for byte the
    ones the client wrote (``1.50`` stays ``1.50``).
    """
    if first_byte(frame) == 0x5B:
        spans = element_spans(frame)
        if spans is None:
            return []
        parts = [frame[start:end] for start, end in spans]
    elif first_byte(frame) == 0x7B:
        parts = [frame]
    else:
        return []
    return [Member(_member_head(part), part, _raw_id(part)) for part in parts]


def raw_ids(frame: bytes) -> dict[tuple[str, object], bytes]:
    """The exact id bytes of each request in ``frame``, by :func:`id_key`."""
    return {id_key(m.head.id): m.raw_id for m in frame_members(frame) if m.head.kind == REQUEST}


def join_batch(parts: list[bytes]) -> bytes:
    """One batch of the messages in ``parts``; a part that is itself a batch is spliced in.

    The members keep their bytes: a server's batch answer and mcpmeter's own answers become
    one array without re-serialising anything.
    """
    inner: list[bytes] = []
    for part in parts:
        text = part.strip(_WS)
        if text[:1] == b"[" and text[-1:] == b"]":
            text = text[1:-1].strip(_WS)
        if text:
            inner.append(text)
    return b"[" + b",".join(inner) + b"]"


def is_batch(frame: bytes) -> bool:
    return first_byte(frame) == 0x5B


# -- byte surgery ----------------------------------------------------------------------------


def _skip_ws(data: bytes, i: int) -> int:
    n = len(data)
    while i < n and data[i] in _WS:
        i += 1
    return i


def _string_end(data: bytes, i: int) -> int:
    """Index just past the JSON string starting at ``data[i]`` (a ``"``), or -1."""
    j = i + 1
    while True:
        q = data.find(b'"', j)
        if q < 0:
            return -1
        k = q - 1
        while data[k] == 0x5C:  # "\\"
            k -= 1
        if (q - 1 - k) % 2 == 0:
            return q + 1
        j = q + 1


def member_spans(obj: bytes, start: int = 0) -> dict[str, tuple[int, int]] | None:
    """``{key: (start, end)}`` of each top-level member value of the JSON object at ``obj[start:]``.

    None when ``obj`` is not an object, or has a key twice (a span would be ambiguous).
    """
    try:
        members = _decode_members(obj[start:] if start else obj)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    spans: dict[str, tuple[int, int]] = {}
    i = _skip_ws(obj, start)
    if obj[i : i + 1] != b"{":
        return None
    i = _skip_ws(obj, i + 1)
    if obj[i : i + 1] == b"}":
        return spans
    while True:
        if obj[i : i + 1] != b'"':
            return None
        end = _string_end(obj, i)
        if end < 0:
            return None
        raw_key = obj[i:end]
        key = _decode_str(raw_key) if b"\\" in raw_key else raw_key[1:-1].decode()
        if key in spans or key not in members:
            return None
        i = _skip_ws(obj, end)
        if obj[i : i + 1] != b":":
            return None
        i = _skip_ws(obj, i + 1)
        value_end = i + len(members[key])
        spans[key] = (i, value_end)
        i = _skip_ws(obj, value_end)
        sep = obj[i : i + 1]
        if sep == b"}":
            return spans if len(spans) == len(members) else None
        if sep != b",":
            return None
        i = _skip_ws(obj, i + 1)


def element_spans(array: bytes) -> list[tuple[int, int]] | None:
    """``(start, end)`` of each element of the JSON array ``array``, or None if it is not one."""
    try:
        elements = _decode_elements(array)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    spans: list[tuple[int, int]] = []
    i = _skip_ws(array, 0)
    if array[i : i + 1] != b"[":
        return None
    i = _skip_ws(array, i + 1)
    for element in elements:
        end = i + len(element)
        spans.append((i, end))
        i = _skip_ws(array, end)
        if array[i : i + 1] == b",":
            i = _skip_ws(array, i + 1)
    return spans


def splice(data: bytes, replacements: list[tuple[int, int, bytes]]) -> bytes:
    """``data`` with each ``(start, end)`` span replaced by its bytes (spans must not overlap)."""
    if not replacements:
        return data
    out: list[bytes] = []
    at = 0
    for start, end, new in sorted(replacements, key=lambda r: r[0]):
        out.append(data[at:start])
        out.append(new)
        at = end
    out.append(data[at:])
    return b"".join(out)


def message_spans(frame: bytes) -> list[tuple[int, dict[str, tuple[int, int]]]] | None:
    """For each message of a frame (one, or each batch member): its member spans, frame-relative."""
    first = first_byte(frame)
    if first == 0x7B:
        spans = member_spans(frame)
        return None if spans is None else [(0, spans)]
    if first != 0x5B:
        return None
    elements = element_spans(frame)
    if elements is None:
        return None
    out: list[tuple[int, dict[str, tuple[int, int]]]] = []
    for start, end in elements:
        spans = member_spans(frame[start:end])
        if spans is None:
            return None
        out.append((start, {k: (s + start, e + start) for k, (s, e) in spans.items()}))
    return out


# -- small frames mcpmeter writes itself ------------------------------------------------------


def error_frame(raw_id: bytes, message: str, code: int = UPSTREAM_ERROR) -> bytes:
    """A JSON-RPC error response for the request whose id bytes are ``raw_id``."""
    text = msgspec.json.encode(message)
    return (
        b'{"jsonrpc":"2.0","id":'
        + raw_id
        + b',"error":{"code":'
        + str(code).encode()
        + b',"message":'
        + text
        + b"}}"
    )


def encode_id(value: object) -> bytes:
    return msgspec.json.encode(value)


def cancelled_frame(raw_id: bytes, reason: str) -> bytes:
    text = msgspec.json.encode(reason)
    return (
        b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":'
        + raw_id
        + b',"reason":'
        + text
        + b"}}"
    )


def one_line(body: bytes) -> bytes:
    """``body`` made fit for a newline-delimited stream, length unchanged.

    A raw CR or LF can only be whitespace between JSON tokens (inside strings they are
    escaped), so turning each into a space changes no message and no byte count.
    """
    if b"\n" in body or b"\r" in body:
        return body.replace(b"\r", b" ").replace(b"\n", b" ")
    return body


# -- Mcp-Name header values (2026-07-28) ----------------------------------------------------

_HEADER_SAFE = re.compile(r"^[\x20-\x7E]*$")
_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


def encode_header_value(value: str) -> str:
    """Plain visible ASCII as is; anything else as ``=?base64?...?=`` (UTF-8)."""
    if _HEADER_SAFE.fullmatch(value) and value == value.strip() and not _B64_SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode()).decode('ascii')}?="


def decode_header_value(value: str | None) -> str | None:
    """The inverse of :func:`encode_header_value`; None for a malformed sentinel."""
    if value is None:
        return None
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def is_modern(version: str | None) -> bool:
    """Whether a protocol version names the 2026-07-28 era (no handshake, no session)."""
    return version is not None and version not in HANDSHAKE_VERSIONS
