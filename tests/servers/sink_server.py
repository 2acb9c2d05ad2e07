"""A stdio server that never holds a whole frame: for memory tests of the proxy in front of it.

It reads stdin in 64 KiB chunks and, for each line, answers
``{"jsonrpc":"2.0","id":ID,"result":{"bytes":N}}``: ID is the first ``"id":`` value (an
integer or a plain string) in the line's first 4 KiB, N the line's size without its
``\\n``. Lines without an id are not answered. Its own memory stays a few MB whatever the
frame size, so a test measuring the peak RSS of a process tree (``ru_maxrss`` of waited
children includes this grandchild) measures the proxy.
"""

from __future__ import annotations

import os
import re
import sys

CHUNK = 1 << 16
HEAD = 4096
ID = re.compile(rb'"id"\s*:\s*(-?\d+|"[^"\\]*")')


def answer(head: bytes, size: int) -> None:
    found = ID.search(head)
    if found is None:
        return
    line = b'{"jsonrpc":"2.0","id":' + found.group(1) + b',"result":{"bytes":' + str(size).encode() + b"}}\n"
    view = memoryview(line)
    while view:
        view = view[os.write(1, view) :]


def main() -> int:
    head = b""
    size = 0
    while True:
        data = os.read(0, CHUNK)
        if not data:
            return 0
        start = 0
        while True:
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl]
            if len(head) < HEAD:
                head += piece[: HEAD - len(head)]
            size += len(piece)
            if nl < 0:
                break
            answer(head, size)
            head, size = b"", 0
            start = nl + 1


if __name__ == "__main__":
    sys.exit(main())
