"""A raw stdio JSON-RPC server for the `wrap --listen` JSON-RPC tests: batches and held calls.

Newline-delimited JSON-RPC, no SDK; every answer is ``json.dumps(..., separators=(",", ":"))``.
Notifications and responses are read and ignored.

``--batches`` says what it does with a batch (a line that is a JSON array):

=========== ==================================================================================
``answer``  (default) one line: the batch of its requests' answers, in order (nothing when no
            member is answered); members that are not requests are ignored
``drop``    nothing at all, as servers of the 2025-06-18 revision on may do
=========== ==================================================================================

Requests: ``initialize``, ``ping``, ``tools/call`` (below); any other method gets -32601.

=========== ==================================================================================
``echo``    result ``{"text": arguments.text}``
``hold``    first a ``notifications/progress`` for the request's ``_meta.progressToken`` (so
            the client knows the call is here), then no answer until a ``release`` call comes
``release`` answers every held call, oldest first (``{"held": arguments.text}``), then itself
            (``{"released": N}``)
``hang``    never answered
=========== ==================================================================================

``--record FILE`` appends every line read from stdin to FILE, so a test can tell what the
proxy forwarded and what it kept back.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

NO_ANSWER = object()


def dumps(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class BatchServer:
    def __init__(self, options: argparse.Namespace) -> None:
        self.batches: str = options.batches
        self.record = open(options.record, "ab", buffering=0) if options.record else None  # noqa: SIM115
        self.held: list[tuple[object, object]] = []  # (id, arguments.text) of calls on hold

    def write(self, message: object) -> None:
        sys.stdout.buffer.write(dumps(message) + b"\n")
        sys.stdout.buffer.flush()

    def serve(self) -> int:
        for line in sys.stdin.buffer:
            if self.record is not None:
                self.record.write(line)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, list):
                if self.batches == "answer":
                    answers = [a for a in map(self.answer, message) if a is not NO_ANSWER]
                    if answers:
                        self.write(answers)
            else:
                answer = self.answer(message)
                if answer is not NO_ANSWER:
                    self.write(answer)
        return 0

    def answer(self, message: object) -> object:
        """The answer to one message, or NO_ANSWER (a notification, a held call ...)."""
        if not isinstance(message, dict) or not isinstance(message.get("method"), str) or "id" not in message:
            return NO_ANSWER
        rpc_id, method = message["id"], message["method"]
        params = message.get("params") or {}
        if method == "initialize":
            return self.result(
                rpc_id,
                {
                    "protocolVersion": params.get("protocolVersion", "2025-11-25"),
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "batch-server", "version": "1.0.0"},
                },
            )
        if method == "ping":
            return self.result(rpc_id, {})
        if method != "tools/call":
            return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32601, "message": "Method not found"}}
        name = params.get("name")
        args: dict[str, Any] = params.get("arguments") or {}
        if name == "echo":
            return self.result(rpc_id, {"text": args.get("text")})
        if name == "hold":
            token = (params.get("_meta") or {}).get("progressToken")
            progress = {"progressToken": token, "progress": 0, "message": "held"}
            self.write({"jsonrpc": "2.0", "method": "notifications/progress", "params": progress})
            self.held.append((rpc_id, args.get("text")))
            return NO_ANSWER
        if name == "release":
            held, self.held = self.held, []
            for held_id, text in held:
                self.write(self.result(held_id, {"held": text}))
            return self.result(rpc_id, {"released": len(held)})
        if name == "hang":
            return NO_ANSWER
        return {"jsonrpc": "2.0", "id": rpc_id, "error": {"code": -32602, "message": f"Unknown tool: {name}"}}

    @staticmethod
    def result(rpc_id: object, result: object) -> dict[str, object]:
        return {"jsonrpc": "2.0", "id": rpc_id, "result": result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", choices=("answer", "drop"), default="answer")
    parser.add_argument("--record", help="append every line read from stdin to this file")
    return BatchServer(parser.parse_args()).serve()


if __name__ == "__main__":
    sys.exit(main())
