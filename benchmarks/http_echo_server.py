"""A minimal streamable-HTTP MCP server for the HTTP benchmark: raw ASGI on uvicorn (h11).

It serves ``POST /mcp`` with JSON answers: ``initialize`` (a session id in
``Mcp-Session-Id``), ``tools/call`` (a small text result), ``ping``; notifications get 202;
``DELETE /mcp`` ends the session. It is the same HTTP stack mcpmeter's ``--listen`` uses, so
the benchmark measures the hop mcpmeter adds, not a difference between HTTP servers.
It binds 127.0.0.1 on a free port and prints ``PORT <n>`` once it listens.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import uvicorn

Message = MutableMapping[str, Any]

SMALL = b',"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}'
INIT = (
    b',"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},'
    b'"serverInfo":{"name":"bench-http-echo","version":"1.0.0"}}}'
)


async def app(
    scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = [(b"content-type", b"application/json")]
    if scope["method"] == "DELETE" or not body:
        status, out = 200, b""
    else:
        request = orjson.loads(body)
        if "id" not in request:
            status, out = 202, b""
        else:
            raw_id = orjson.dumps(request["id"])
            if request.get("method") == "initialize":
                headers.append((b"mcp-session-id", os.urandom(8).hex().encode()))
                out = b'{"jsonrpc":"2.0","id":' + raw_id + INIT
            else:
                out = b'{"jsonrpc":"2.0","id":' + raw_id + SMALL
            status = 200
    headers.append((b"content-length", str(len(out)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": out})


async def main() -> None:
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sys.stdout.write(f"PORT {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", http="h11", ws="none", access_log=False, interface="asgi3"
    )
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    asyncio.run(main())
