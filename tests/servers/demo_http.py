"""An SDK server over HTTP, for `wrap --url` tests: the demo server (examples/demo_server.py)
or, with ``--sampling``, the one that asks its client things (tests/servers/sampling_server.py).

    python demo_http.py streamable-http [--json-response] [--stateless] [--sampling]
    python demo_http.py sse [--sampling]

It binds 127.0.0.1 on a free port and prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import anyio
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["streamable-http", "sse"])
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--stateless", action="store_true")
    parser.add_argument("--sampling", action="store_true")
    options = parser.parse_args()
    if options.sampling:
        from sampling_server import server
    else:
        from demo_server import server
    if options.transport == "sse":
        app = server.sse_app(host="127.0.0.1")
    else:
        app = server.streamable_http_app(
            host="127.0.0.1", json_response=options.json_response, stateless_http=options.stateless
        )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sys.stdout.write(f"PORT {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", lifespan="on", http="h11", ws="none")
    await uvicorn.Server(config).serve(sockets=[sock])


if __name__ == "__main__":
    anyio.run(main)
