"""The JSON-RPC envelope, decoded without the payload.

Everything that reads a frame reads this one envelope, decoded once per frame (see
:class:`mcpmeter.protocol.frame.Frame`): the meter needs the id, the method, the tool name
or URI, ``_meta``, ``isError``, the error code and message and the handshake's peer info;
the budget gate the raw arguments; the HTTP routing and the id rewriter the progress token
and the cancelled request's id. These structs name only those; msgspec skips everything
else (results, 10 MB of content) while validating it, without building Python objects for
it, and keeps the arguments as a view of their bytes. That is several times faster than a
full parse on small frames and orders of magnitude faster on large structured results, and
it keeps memory flat: a result's payload is never materialised. Arguments and
results never become Python objects, let alone rows.

Every field is optional and loosely typed: a frame that is valid JSON always decodes, and
the meter decides what is JSON-RPC.

msgspec's decoder recurses once per nesting level, bounded by the interpreter's recursion
limit (1000 by default, less what the caller's stack already uses): a frame nested deeper
anywhere, even inside arguments it would skip, raises ``RecursionError``. Only then does
:func:`read_envelope` run: an iterative reader that walks the top-level members and those of
``params``, ``result`` and ``error``, steps over every other value by counting brackets, and
decodes only the members the meter needs. A needed member nested more than
:data:`MAX_DEPTH` levels deep is read as if it were absent (``None``; an id as an invalid
one): the scalars of the envelope cannot be nested at all, so only ``_meta``,
``clientInfo`` and ``serverInfo`` lose anything. The common path never pays for it.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

UNSET = msgspec.UNSET
_Scalar = str | int | float | bool | None
#: Frames and members of frames (``bytes``, a ``bytearray`` being collected, or a view of one).
Buffer = bytes | bytearray | memoryview
#: How deeply nested a member the bounded reader decodes may be (``_meta``, ``clientInfo``):
#: well under the interpreter's recursion limit, so decoding it cannot raise RecursionError
#: from any thread's stack. A deeper member is read as absent.
MAX_DEPTH = 512


#: ``params.arguments`` of a message that has none.
NO_ARGUMENTS = msgspec.Raw(b"null")


class Params(msgspec.Struct):
    name: Any = None
    uri: Any = None
    meta: Any = msgspec.field(default=None, name="_meta")
    protocolVersion: Any = None
    clientInfo: Any = None
    requestId: Any = None
    progressToken: Any = None
    #: The arguments' exact bytes, a view of the frame (never decoded here: a 200 MB
    #: argument stays the frame's 200 MB). The loop guard hashes them; ``--record-args``
    #: decodes them. Whoever keeps a message beyond the frame's life must drop them.
    arguments: msgspec.Raw = NO_ARGUMENTS


class Result(msgspec.Struct):
    isError: Any = None
    meta: Any = msgspec.field(default=None, name="_meta")
    serverInfo: Any = None
    protocolVersion: Any = None


class Error(msgspec.Struct):
    code: Any = None
    message: Any = None


class Message(msgspec.Struct):
    """One JSON-RPC message. ``UNSET`` tells an absent member from an explicit ``null``."""

    id: Any = UNSET
    method: Any = None
    params: Params | list[Any] | _Scalar = None
    result: Result | list[Any] | _Scalar | msgspec.UnsetType = UNSET
    error: Error | list[Any] | _Scalar | msgspec.UnsetType = UNSET


def valid_id(value: object) -> bool:
    """JSON-RPC ids are strings or numbers (``true`` is not ``1``)."""
    kind = type(value)
    return kind is int or kind is str or kind is float


decode_message = msgspec.json.Decoder(Message).decode
_decode_any = msgspec.json.decode


#: A batch: each member's exact bytes, decoded one by one (so each has a true size).
decode_batch = msgspec.json.Decoder(list[msgspec.Raw]).decode
DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError


# -- the bounded reader: for frames msgspec cannot decode without recursing too deep ----------

_WS = re.compile(rb"[ \t\r\n]*")
#: The rest of a string after its opening quote, closing quote included.
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.S)
#: What matters while stepping over a container: a string's start, or a run of brackets.
_TOKEN = re.compile(rb'"|[\[{]+|[\]}]+')
_SCALAR = re.compile(rb"[^,:\[\]{}\s\"]+")
_CLOSERS = bytes.maketrans(b"[{", b"]}")
#: Span of a value in the frame: (start, end, nesting depth; 0 for a scalar).
_Span = tuple[int, int, int]
_PARAMS = frozenset(
    {"name", "uri", "_meta", "protocolVersion", "clientInfo", "requestId", "progressToken", "arguments"}
)
_RESULT = frozenset({"isError", "_meta", "serverInfo", "protocolVersion"})
_ERROR = frozenset({"code", "message"})
_TOP = frozenset({"id", "method", "params", "result", "error"})


def _ws(buf: Buffer, i: int) -> int:
    match = _WS.match(buf, i)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _skip(buf: Buffer, i: int) -> tuple[int, int]:
    """The end of the JSON value at ``buf[i]`` and its nesting depth, without recursing.

    Containers are stepped over by runs of brackets, with the closers still due on a stack
    (so ``[}`` is caught); strings are skipped whole; scalars are not validated (the frame is
    relayed as it is whatever this says). Raises ValueError or IndexError when malformed.
    """
    first = buf[i]
    if first == 0x22:  # '"'
        string = _STRING_REST.match(buf, i + 1)
        if string is None:
            raise ValueError("unterminated string")
        return string.end(), 0
    if first != 0x5B and first != 0x7B:  # neither '[' nor '{'
        scalar = _SCALAR.match(buf, i)
        if scalar is None:
            raise ValueError("no value")
        return scalar.end(), 0
    due = bytearray()  # closers still due, innermost last
    deepest = 0
    pos = i
    while True:
        token = _TOKEN.search(buf, pos)
        if token is None:
            raise ValueError("unterminated container")
        pos = token.end()
        run = token.group()
        if run == b'"':
            string = _STRING_REST.match(buf, pos)
            if string is None:
                raise ValueError("unterminated string")
            pos = string.end()
        elif run[0] == 0x5B or run[0] == 0x7B:
            due += run.translate(_CLOSERS)
            deepest = max(deepest, len(due))
        else:  # closers; the run may go on past this value's end (its enclosing container's)
            n = min(len(run), len(due))  # due is never empty here: the first run opened
            if due[len(due) - n :] != run[n - 1 :: -1]:
                raise ValueError("mismatched brackets")
            del due[len(due) - n :]
            if not due:
                return token.start() + n, deepest


def _members(buf: Buffer, i: int, wanted: frozenset[str]) -> tuple[dict[str, _Span], int]:
    """The spans of the ``wanted`` members of the object at ``buf[i]``, and its end."""
    if buf[i] != 0x7B:
        raise ValueError("not an object")
    found: dict[str, _Span] = {}
    i = _ws(buf, i + 1)
    if buf[i] == 0x7D:
        return found, i + 1
    while True:
        if buf[i] != 0x22:
            raise ValueError("a key must be a string")
        key_end, _ = _skip(buf, i)
        key = _decode_any(buf[i:key_end])
        i = _ws(buf, key_end)
        if buf[i] != 0x3A:  # ':'
            raise ValueError("no colon after a key")
        start = _ws(buf, i + 1)
        end, depth = _skip(buf, start)
        if key in wanted:
            found[key] = (start, end, depth)  # the last of duplicate keys wins, as in msgspec
        i = _ws(buf, end)
        if buf[i] == 0x2C:  # ','
            i = _ws(buf, i + 1)
        elif buf[i] == 0x7D:  # '}'
            return found, i + 1
        else:
            raise ValueError("no comma between members")


def _value(buf: Buffer, span: _Span, too_deep: Any = None) -> Any:
    """The member at ``span``, decoded; ``too_deep`` when nested more than MAX_DEPTH levels."""
    start, end, depth = span
    if depth > MAX_DEPTH:
        return too_deep
    with memoryview(buf) as view:
        return _decode_any(view[start:end])


def _fields(buf: Buffer, span: _Span, wanted: frozenset[str]) -> dict[str, _Span] | None:
    """The spans of the ``wanted`` members of the object at ``span``; None if it is no object."""
    if buf[span[0]] != 0x7B:
        return None
    return _members(buf, span[0], wanted)[0]


def read_envelope(frame: Buffer) -> tuple[Message, tuple[int, int] | None]:
    """The envelope of a frame too deeply nested for :data:`decode_message`, read without
    recursing; also the span of ``params.arguments`` in ``frame`` (None without one).

    Within MAX_DEPTH it reads what :data:`decode_message` would. Raises
    ``msgspec.DecodeError`` when the frame is not a JSON object (as far as the reader can
    tell: it does not validate what it steps over).
    """
    try:
        top, end = _members(frame, _ws(frame, 0), _TOP)
        if _ws(frame, end) != len(frame):
            raise ValueError("trailing bytes")
        message = Message()
        arguments: tuple[int, int] | None = None
        if "id" in top:
            message.id = _value(frame, top["id"], [])  # a list: no valid id, as msgspec reads it
        if "method" in top:
            message.method = _value(frame, top["method"])
        span = top.get("params")
        if span is not None:
            params = _fields(frame, span, _PARAMS)
            if params is None:  # an array or a scalar: not the params the meter reads
                message.params = _value(frame, span, [])
            else:
                raw_arguments = NO_ARGUMENTS
                if "arguments" in params:
                    arguments = params.pop("arguments")[:2]
                    raw_arguments = msgspec.Raw(memoryview(frame)[arguments[0] : arguments[1]])
                got = {name: _value(frame, member) for name, member in params.items()}
                message.params = Params(
                    name=got.get("name"),
                    uri=got.get("uri"),
                    meta=got.get("_meta"),
                    protocolVersion=got.get("protocolVersion"),
                    clientInfo=got.get("clientInfo"),
                    requestId=got.get("requestId"),
                    progressToken=got.get("progressToken"),
                    arguments=raw_arguments,
                )
        span = top.get("result")
        if span is not None:
            result = _fields(frame, span, _RESULT)
            if result is None:
                message.result = _value(frame, span)
            else:
                got = {name: _value(frame, member) for name, member in result.items()}
                message.result = Result(
                    isError=got.get("isError"),
                    meta=got.get("_meta"),
                    serverInfo=got.get("serverInfo"),
                    protocolVersion=got.get("protocolVersion"),
                )
        span = top.get("error")
        if span is not None:
            error = _fields(frame, span, _ERROR)
            if error is None:
                message.error = _value(frame, span)
            else:
                got = {name: _value(frame, member) for name, member in error.items()}
                message.error = Error(code=got.get("code"), message=got.get("message"))
        return message, arguments
    except (ValueError, IndexError) as exc:  # msgspec's DecodeError is a ValueError too
        raise DecodeError(f"not a JSON object the bounded reader can read: {exc}") from None


def read_batch(frame: Buffer) -> list[memoryview]:
    """The members of a batch too deeply nested for :data:`decode_batch`, as views of
    ``frame``, found without recursing. Raises ``msgspec.DecodeError`` when it is no array."""
    try:
        view = memoryview(frame)
        i = _ws(frame, 0)
        if frame[i] != 0x5B:
            raise ValueError("not an array")
        members: list[memoryview] = []
        i = _ws(frame, i + 1)
        if frame[i] == 0x5D:
            i += 1
        else:
            while True:
                end, _ = _skip(frame, i)
                members.append(view[i:end])
                i = _ws(frame, end)
                if frame[i] == 0x2C:
                    i = _ws(frame, i + 1)
                elif frame[i] == 0x5D:
                    i += 1
                    break
                else:
                    raise ValueError("no comma between members")
        if _ws(frame, i) != len(frame):
            raise ValueError("trailing bytes")
        return members
    except (ValueError, IndexError) as exc:
        raise DecodeError(f"not a JSON array the bounded reader can read: {exc}") from None
