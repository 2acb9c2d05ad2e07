"""A raw stdio JSON-RPC server for process tests: no SDK, every byte under the test's control.

It reads newline-delimited frames from stdin (bytes, any size) and:

- answers requests by method (``initialize``, ``ping``, ``tools/call``; others get -32601);
- echoes back, byte for byte, every line that is neither a request, a notification nor a
  response (not JSON, blank, a JSON scalar ...), line ending included;
- answers with the same line ending the request came with (``\\n`` or ``\\r\\n``);
- ignores notifications (so a cancelled ``hang`` call simply stays unanswered).

``tools/call`` names (arguments in ``params.arguments``):

=================== ===============================================================================
``whoami``          result ``{"pid", "pgid"}``; answering it also means "ready"
``echo``            result ``{"bytes", "sha256", "text"}``: size and digest of the request line
                    as read (line ending excluded) and ``arguments.text``
``error``           a JSON-RPC error ``{"code": arguments.code, "message": arguments.message}``
``crash``           ``os._exit(arguments.code)`` without answering
``kill_self``       ``os.kill(own pid, arguments.signal)`` without answering
``partial_then_die`` write ``arguments.text`` (no newline) to stdout, then ``os._exit(arguments.code)``
``ask``             send the client the request ``{"jsonrpc", "id": arguments.id, "method":
                    arguments.method[, "params": arguments.params]}``; when its response comes,
                    answer the tool call with ``{"answer": <that response>}``
``hang``            never answer
``stderr``          write ``bytes.fromhex(arguments.hex)`` to fd 2, then answer ``{}``
``spawn_child``     start a grandchild in this process group that waits for a signal (it
                    ignores SIGTERM when ``arguments.ignore_sigterm``; it keeps our stdout when
                    ``arguments.hold_stdout``); answers ``{"child_pid"}`` once the child is set up
=================== ===============================================================================

Every response is serialised with ``json.dumps(..., separators=(",", ":"))``, so a test can
compute the exact bytes it will read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def dumps(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class RawServer:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.out = sys.stdout.buffer
        self.asked: dict[object, tuple[object, bytes]] = {}  # s2c id -> (tools/call id, line ending)
        self.record = open(options.record, "ab", buffering=0) if options.record else None  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    def reply(self, rpc_id: object, ending: bytes, result: object = None, error: object = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id}
        if error is not None:
            message["error"] = error
        else:
            message["result"] = result
        self.write(dumps(message) + ending)

    def serve(self) -> int:
        stdin = sys.stdin.buffer
        while True:
            line = stdin.readline()
            if not line:
                return int(self.options.exit_code)
            if self.record is not None:
                self.record.write(line)
            if line.endswith(b"\r\n"):
                body, ending = line[:-2], b"\r\n"
            elif line.endswith(b"\n"):
                body, ending = line[:-1], b"\n"
            else:
                body, ending = line, b""
            self.on_line(line, body, ending)

    def on_line(self, line: bytes, body: bytes, ending: bytes) -> None:
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.write(line)  # not JSON-RPC: back as it came
            return
        method = message.get("method")
        if isinstance(method, str):
            if "id" in message:
                self.on_request(message["id"], method, message.get("params") or {}, body, ending)
            return  # a notification
        if "id" in message and ("result" in message or "error" in message):
            asked = self.asked.pop(message["id"], None)
            if asked is not None:
                call_id, call_ending = asked
                self.reply(call_id, call_ending, {"answer": message})
            return
        self.write(line)

    def on_request(
        self, rpc_id: object, method: str, params: dict[str, Any], body: bytes, ending: bytes
    ) -> None:
        if method == "initialize":
            result = {
                "protocolVersion": params.get("protocolVersion", "2025-11-25"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw-server", "version": "1.2.3"},
            }
            self.reply(rpc_id, ending, result)
        elif method == "ping":
            self.reply(rpc_id, ending, {})
        elif method == "tools/call":
            self.on_tool(rpc_id, params.get("name"), params.get("arguments") or {}, body, ending)
        else:
            self.reply(rpc_id, ending, error={"code": -32601, "message": f"Method not found: {method}"})

    def on_tool(self, rpc_id: object, name: object, args: dict[str, Any], body: bytes, ending: bytes) -> None:
        if name == "whoami":
            self.reply(rpc_id, ending, {"pid": os.getpid(), "pgid": os.getpgrp()})
        elif name == "echo":
            digest = hashlib.sha256(body).hexdigest()
            self.reply(rpc_id, ending, {"bytes": len(body), "sha256": digest, "text": args.get("text")})
        elif name == "error":
            self.reply(rpc_id, ending, error={"code": args["code"], "message": args["message"]})
        elif name == "crash":
            os._exit(int(args["code"]))
        elif name == "kill_self":
            os.kill(os.getpid(), int(args["signal"]))
        elif name == "partial_then_die":
            self.write(str(args["text"]).encode())
            os._exit(int(args["code"]))
        elif name == "ask":
            request: dict[str, Any] = {"jsonrpc": "2.0", "id": args["id"], "method": args["method"]}
            if "params" in args:
                request["params"] = args["params"]
            self.asked[args["id"]] = (rpc_id, ending)
            self.write(dumps(request) + b"\n")
        elif name == "hang":
            pass
        elif name == "stderr":
            data = bytes.fromhex(str(args["hex"]))
            while data:
                data = data[os.write(2, data) :]
            self.reply(rpc_id, ending, {})
        elif name == "spawn_child":
            ready_r, ready_w = os.pipe()
            code = "import os, signal\n"
            if args.get("ignore_sigterm"):
                code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            code += f"os.write({ready_w}, b'r')\nos.close({ready_w})\nwhile True:\n    signal.pause()\n"
            child = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.DEVNULL,
                stdout=None if args.get("hold_stdout") else subprocess.DEVNULL,
                pass_fds=(ready_w,),
            )
            os.close(ready_w)
            os.read(ready_r, 1)  # the child's signal dispositions are in place
            os.close(ready_r)
            self.reply(rpc_id, ending, {"child_pid": child.pid})
        else:
            self.reply(rpc_id, ending, error={"code": -32602, "message": f"Unknown tool: {name}"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exit-code", type=int, default=0, help="exit status when stdin reaches EOF")
    parser.add_argument("--record", help="append every byte read from stdin to this file")
    parser.add_argument(
        "--signal-file", help="on SIGTERM/SIGINT/SIGHUP append the signal's name here and exit"
    )
    parser.add_argument("--signal-exit-code", type=int, default=42, help="exit status after a signal")
    parser.add_argument("--ignore-sigterm", action="store_true", help="ignore SIGTERM, SIGINT and SIGHUP")
    options = parser.parse_args()

    if options.ignore_sigterm:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    elif options.signal_file:

        def record_signal(signum: int, frame: object) -> None:
            with open(options.signal_file, "a") as file:
                file.write(signal.Signals(signum).name + "\n")
            os._exit(options.signal_exit_code)

        for sig in SIGNALS:
            signal.signal(sig, record_signal)
    return RawServer(options).serve()


if __name__ == "__main__":
    sys.exit(main())
