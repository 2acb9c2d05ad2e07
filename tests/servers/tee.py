"""A byte-exact stdio tee: ``python tee.py DIR -- CMD [ARGS...]``.

Runs CMD with piped stdin and stdout (stderr inherited) and copies our stdin to its stdin
and its stdout to our stdout, unchanged, appending each direction to ``DIR/c2s.bin`` (what
CMD read) and ``DIR/s2c.bin`` (what CMD wrote). Our stdin's EOF closes CMD's stdin. Exits
with CMD's exit status once CMD has exited and its stdout is drained, so when this process
is gone both files are complete.

Put it between a client and ``mcpmeter wrap`` and again between ``mcpmeter wrap`` and the
server, and the two pairs of files show what each side saw on the wire.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 16


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy(source: int, sink: int, log: Path, close: Callable[[], None] | None) -> None:
    sink_open = True
    with log.open("ab", buffering=0) as out:
        while True:
            try:
                data = os.read(source, CHUNK)
            except OSError:
                data = b""
            if not data:
                break
            out.write(data)
            if sink_open:
                try:
                    write_all(sink, data)
                except OSError:  # the reader is gone: keep logging what comes
                    sink_open = False
    if close is not None:
        with contextlib.suppress(OSError):
            close()


def main() -> int:
    args = sys.argv[1:]
    directory = Path(args[0])
    command = args[2:] if args[1:2] == ["--"] else args[1:]
    directory.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert child.stdin is not None and child.stdout is not None
    to_child = child.stdin.fileno()
    from_child = child.stdout.fileno()
    inbound = threading.Thread(
        target=copy, args=(0, to_child, directory / "c2s.bin", child.stdin.close), daemon=True, name="c2s"
    )
    outbound = threading.Thread(target=copy, args=(from_child, 1, directory / "s2c.bin", None), name="s2c")
    inbound.start()
    outbound.start()
    returncode = child.wait()
    outbound.join()
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main())
