"""A raw stdio MCP server for benchmarks: no SDK, newline-delimited JSON-RPC.

* ``initialize`` answers a proper result (``serverInfo.name`` is ``bench-echo``).
* ``tools/list`` lists the two tools, ``ping`` answers ``{}``.
* ``tools/call`` answers a small text result, or, when the arguments carry ``"mb": N``
  (``{"name": "big", "arguments": {"mb": 10}}``), a text result of N MiB. The big payload is
  built once per size and written as three pieces (prefix, id, rest): no per-call copy.
* Notifications get no answer; other requests get a JSON-RPC error -32601.

Responses are written and flushed one by one, as a typical server does. Lines are read with
``sys.stdin.buffer.readline()``, which has no 64 KiB limit.
"""

from __future__ import annotations

import json
import sys
from typing import Any

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # the echo server also runs with a bare interpreter
    _loads = json.loads

SERVER_INFO = {"name": "bench-echo", "version": "1.0.0"}
DEFAULT_PROTOCOL = "2025-06-18"
TOOLS = [
    {
        "name": "echo",
        "description": "Answers a small text result.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
    {
        "name": "big",
        "description": "Answers a text result of `mb` MiB.",
        "inputSchema": {"type": "object", "properties": {"mb": {"type": "number"}}},
    },
]

MIB = 1 << 20
#: Every response starts with this, then the id, then one of the suffixes below.
PREFIX = b'{"jsonrpc":"2.0","id":'
SMALL_SUFFIX = b',"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}\n'
_BIG_HEAD = b',"result":{"content":[{"type":"text","text":"'
_BIG_TAIL = b'"}],"isError":false}}\n'
_PATTERN = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"


def big_payload(size: int) -> bytes:
    """``size`` bytes of JSON-safe text (no escaping needed)."""
    return (_PATTERN * (size // len(_PATTERN) + 1))[:size]


def small_response(raw_id: bytes) -> bytes:
    return PREFIX + raw_id + SMALL_SUFFIX


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def main() -> int:
    stdin = sys.stdin.buffer
    out = sys.stdout.buffer
    big_cache: dict[int, bytes] = {}

    def answer(raw_id: bytes, result: Any) -> None:
        out.write(PREFIX + raw_id + b',"result":' + _dumps(result) + b"}\n")

    while True:
        line = stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            msg = _loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict) or "id" not in msg or msg.get("id") is None:
            continue  # a notification (or a response): nothing to answer
        raw_id = _dumps(msg["id"])
        method = msg.get("method")
        params = msg.get("params") or {}
        if method == "tools/call":
            args = params.get("arguments") or {}
            mb = args.get("mb") if isinstance(args, dict) else None
            if mb:
                size = int(float(mb) * MIB)
                body = big_cache.get(size)
                if body is None:
                    body = big_cache[size] = _BIG_HEAD + big_payload(size) + _BIG_TAIL
                out.write(PREFIX)
                out.write(raw_id)
                out.write(body)
            else:
                out.write(small_response(raw_id))
        elif method == "initialize":
            answer(
                raw_id,
                {
                    "protocolVersion": params.get("protocolVersion") or DEFAULT_PROTOCOL,
                    "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": SERVER_INFO,
                },
            )
        elif method == "tools/list":
            answer(raw_id, {"tools": TOOLS})
        elif method == "ping":
            answer(raw_id, {})
        else:
            error = {"code": -32601, "message": f"method not found: {method}"}
            out.write(PREFIX + raw_id + b',"error":' + _dumps(error) + b"}\n")
        out.flush()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)
