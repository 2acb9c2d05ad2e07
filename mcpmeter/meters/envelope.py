"""The JSON-RPC envelope, decoded without the payload.

The meter needs a handful of fields: the id, the method, the tool name or URI, ``_meta``,
``isError``, the error code and message, and the handshake's peer info. These structs name
only those; msgspec skips everything else (tool arguments, results, 10 MB of content)
while validating it, without building Python objects for it. That is several times faster
than a full parse on small frames and orders of magnitude faster on large structured
results, and it keeps memory flat: a result's payload is never materialised. Arguments and
results never become Python objects, let alone rows.

Every field is optional and loosely typed: a frame that is valid JSON always decodes, and
the meter decides what is JSON-RPC.
"""

from __future__ import annotations

from typing import Any

import msgspec

UNSET = msgspec.UNSET
_Scalar = str | int | float | bool | None


class Params(msgspec.Struct):
    name: Any = None
    uri: Any = None
    meta: Any = msgspec.field(default=None, name="_meta")
    protocolVersion: Any = None
    clientInfo: Any = None
    requestId: Any = None


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


class _ArgumentsParams(msgspec.Struct):
    arguments: Any = None


class _ArgumentsMessage(msgspec.Struct):
    params: _ArgumentsParams | list[Any] | _Scalar = None


decode_message = msgspec.json.Decoder(Message).decode
#: Only for ``wrap --record-args``: a request's ``params.arguments``, decoded in full.
_decode_arguments = msgspec.json.Decoder(_ArgumentsMessage).decode


def arguments_of(frame: bytes | bytearray) -> Any:
    """The ``params.arguments`` of a request frame (None if it has none)."""
    params = _decode_arguments(frame).params
    return params.arguments if isinstance(params, _ArgumentsParams) else None


#: A batch: each member's exact bytes, decoded one by one (so each has a true size).
decode_batch = msgspec.json.Decoder(list[msgspec.Raw]).decode
DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError
