"""The floor: the simplest correct byte relay, no parsing. ``floor_relay.py CMD [ARGS...]``.

Spawns CMD, copies our stdin to its stdin and its stdout to our stdout with ``os.read`` /
``os.write`` of 64 KiB chunks in two threads, closes CMD's stdin when ours ends, and exits
with CMD's exit code once its stdout is drained. CMD's stderr is ours. This is what any
relay costs before it looks at a byte; mcpmeter is measured against it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable

CHUNK = 1 << 16


def _copy(src: int, dst: int, close_dst: Callable[[], None] | None) -> None:
    try:
        while True:
            data = os.read(src, CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
    except OSError:  # the far side went away (EPIPE) or the read failed
        pass
    finally:
        if close_dst is not None:
            with contextlib.suppress(OSError):
                close_dst()  # EOF to the child


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: floor_relay.py CMD [ARGS...]\n")
        return 2
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert child.stdin is not None and child.stdout is not None
    # stdin -> child: a daemon, since our stdin may stay open after the child exits.
    threading.Thread(target=_copy, args=(0, child.stdin.fileno(), child.stdin.close), daemon=True).start()
    out = threading.Thread(target=_copy, args=(child.stdout.fileno(), 1, None))
    out.start()
    code = child.wait()
    out.join()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
